"""The objective on small tensors: targets, clamps, queue, hard negatives, momentum, and that it learns."""

import numpy as np
import pytest
import torch

from hada.baselines import ConcatPair
from hada.losses import FeatureQueue, HadaObjective, LossConfig, multi_positive_targets, sample_hard_negatives
from hada.model.encoder import ModalityBatch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch_of(embeds):
    return ModalityBatch(tokens=[], lengths=[], embeds=embeds)


def toy_pairs(n=12, dims=(6, 5), seed=0, aligned=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(n) // 2  # two captions per image
    img = [torch.randn(n, d, generator=g) for d in dims]
    img = [x[ids * 2] for x in img]  # rows of the same image are identical
    txt = [x + 0.1 * torch.randn(x.shape, generator=g) for x in img] if aligned else \
        [torch.randn(n, d, generator=g) for d in dims]
    return batch_of(img), batch_of(txt), ids


def objective(dims=(6, 5), **kw):
    torch.manual_seed(0)
    cfg = LossConfig(**kw)
    return HadaObjective(ConcatPair(dims, dims, 8), cfg, dim=8, main_dim=dims[0])


def test_multi_positive_targets():
    ids = torch.tensor([0, 0, 1, 2])
    ids_all = torch.tensor([0, 0, 1, 2, 1, 0, 7])
    t = multi_positive_targets(ids, ids_all)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert torch.allclose(t[0], torch.tensor([1, 1, 0, 0, 0, 1, 0]) / 3.0)
    assert torch.allclose(t[2], torch.tensor([0, 0, 1, 0, 1, 0, 0]) / 2.0)


def test_clamps_hold_and_mix_off():
    obj = objective()
    img, txt, ids = toy_pairs()
    with torch.no_grad():
        obj.temp.fill_(5.0)
        obj.mix_weight.fill_(2.0)
    assert float(obj.tau().detach()) == pytest.approx(0.5) and float(obj.w().detach()) == pytest.approx(0.9)
    obj(img, txt, ids)
    assert obj.temp.item() == pytest.approx(0.5) and obj.mix_weight.item() == pytest.approx(0.9)
    with torch.no_grad():
        obj.temp.fill_(-1.0)
        obj.mix_weight.fill_(-1.0)
    obj.clamp_()
    assert obj.temp.item() == pytest.approx(0.001) and obj.mix_weight.item() == pytest.approx(0.1)

    off = objective(mix=False)
    assert "mix_weight" not in dict(off.named_parameters()) and float(off.w()) == 0.0
    assert off.inference_weights() == (1.0, 0.0)
    off(img, txt, ids).loss.backward()


def test_queue_ring_buffer():
    q = FeatureQueue(5, 2, 3)
    for step in range(3):  # 3 pushes of 2: slots wrap around
        n = 2
        q.push(torch.full((n, 2), step), torch.zeros(n, 2), torch.zeros(n, 3), torch.zeros(n, 3),
               torch.tensor([10 * step, 10 * step + 1]))
    f = q.filled()
    assert int(q.count) == 5 and int(q.ptr) == 1
    assert sorted(f["ids"].tolist()) == [1, 10, 11, 20, 21]  # the oldest (0) was overwritten
    q.push(*(torch.zeros(7, d) for d in (2, 2, 3, 3)), torch.arange(7))  # more than fits: newest 5 kept
    assert sorted(q.filled()["ids"].tolist()) == [2, 3, 4, 5, 6]


def test_hard_negatives_are_negatives():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    positive = ids[:, None] == ids[None, :]
    idx, valid = sample_hard_negatives(torch.randn(6, 6), positive)
    assert valid.all() and not positive[torch.arange(6), idx].any()
    same = torch.zeros(3, dtype=torch.long)
    idx, valid = sample_hard_negatives(torch.randn(3, 3), same[:, None] == same[None, :])
    assert not valid.any()  # nothing to sample: rows dropped, no error


def test_loss_prefers_aligned_and_learns():
    img, txt, ids = toy_pairs(aligned=True)
    obj = objective(itm=False, queue_size=0)
    aligned = obj(img, txt, ids).loss.item()
    _, txt_random, _ = toy_pairs(aligned=False)
    assert aligned < objective(itm=False, queue_size=0)(img, txt_random, ids).loss.item()

    # a growing queue adds negatives and raises the loss, so learning is measured without one
    for factor, kw in ((1.0, {"queue_size": 0, "distill": True}), (0.5, {"queue_size": 0, "itm": False})):
        obj = objective(**kw)
        opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(25):
            out = obj(img, txt, ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        floor = np.log(2) if kw.get("itm") is False else 0.0  # two positives per row: entropy ln 2
        assert np.mean(losses[-5:]) - floor < factor * (np.mean(losses[:5]) - floor), kw

    obj = objective(queue_size=16)
    for _ in range(3):
        obj(img, txt, ids).loss.backward()
    assert int(obj.queue.count) == 16 and set(obj.queue.filled()["ids"].tolist()) <= set(ids.tolist())


def test_momentum_encoder_follows():
    obj = objective(momentum=0.5)
    p, p_m = next(obj.pair.parameters()), next(obj.pair_m.parameters())
    assert torch.equal(p, p_m) and not p_m.requires_grad
    with torch.no_grad():
        p.add_(1.0)
    before = p_m.clone()
    obj.momentum_update()
    assert torch.allclose(p_m, 0.5 * before + 0.5 * p)


def test_weights_and_itm():
    img, txt, ids = toy_pairs()
    obj = objective(i2t_weight=1.0, t2i_weight=0.0, itm=True, queue_size=0)
    out = obj(img, txt, ids)
    assert out.itm > 0 and 0.0 <= out.itm_accuracy <= 1.0
    assert torch.isclose(out.loss, out.itc + out.itm)
    grads = torch.autograd.grad(out.loss, [obj.temp, obj.mix_weight])
    assert all(torch.isfinite(g) for g in grads)


def test_scores_against_the_queue_without_copying_it_and_enqueue_after_the_step():
    from hada.losses import against

    g = torch.Generator().manual_seed(0)
    x, keys, queued = (torch.randn(n, 8, generator=g) for n in (3, 4, 50))
    assert torch.allclose(against(x, (keys, queued)), x @ torch.cat([keys, queued]).T)

    # a full (random) queue is scored in place: the keys go in only after the backward pass, at end_step
    obj = objective(queue_size=50, queue_init="random")
    img, txt, ids = toy_pairs()
    opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.1)
    before = obj.queue.image.clone()
    for step in range(2):
        out = obj(img, txt, ids)
        assert torch.equal(obj.queue.image, before)  # nothing enqueued during the step
        out.loss.backward()  # an in-place write before this would fail: the scores keep the queue for it
        opt.step()
        obj.end_step()
        assert int(obj.queue.ptr) == 12 * (step + 1) and not torch.equal(obj.queue.image, before)
        before = obj.queue.image.clone()
