"""The published recipe (shared/DESIGN.md section 1a) as configuration: the `paper` and `lavis` recipes, the
parameter counts at the paper's widths, and one behaviour test per recipe item."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hada.train as ht
from fixtures.toy_features import toy_splits, use_toy_stores
from hada.config import EdgeWeights, LossConfig, ModelConfig, TrainConfig, recipe
from hada.features.batching import FeatureData, PairLoader, compute_stats
from hada.losses import RANDOM_ID, FeatureQueue, HadaObjective, ItmHead
from hada.model.encoder import FeatureDims, HadaEncoder, HadaPair, ModalityBatch, count_parameters
from hada.model.graph import EDGE_SELF, build_edges



def hada_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hada", *args], capture_output=True, text=True, timeout=120)


def test_print_config_of_both_recipes():
    out = hada_cli("train", "--recipe", "paper", "--print-config", "--init-from", "runs/earlier")
    assert out.returncode == 0, out.stderr
    paper = json.loads(out.stdout)
    assert paper["model"]["attention_dropout"] == paper["model"]["post_dropout"] == paper["model"]["dropout"] == 0.7
    assert paper["model"]["edges"]["self_loops"] == "mean" and paper["model"]["init"] == "kaiming"
    assert paper["loss"]["queue_size"] == 64000 and paper["loss"]["itm_head"] == "linear"
    assert (paper["optim"]["lr"], paper["optim"]["batch_size"], paper["optim"]["t_mult"]) == (5e-5, 20, 2)
    assert paper["optim"]["init_from"] == "runs/earlier" and paper["data"]["token_stats"] == "global"
    assert paper["optim"]["epochs"] == 100 and paper["loss"]["itm_keys"] == "momentum"
    assert paper["loss"]["itm_negatives"] == "hada" and paper["optim"]["warm_start"] == "online"
    assert paper["data"]["augment_backbones"] == "main" and paper["data"]["test_captions_per_image"] is None
    out = hada_cli("train", "--recipe", "lavis", "--print-config")
    assert out.returncode == 0, out.stderr
    lavis = json.loads(out.stdout)
    assert lavis == recipe("lavis").resolved().to_dict()
    assert lavis["model"]["single_node"] == [1] and lavis["loss"]["i2t_weight"] == 0.5
    assert (lavis["optim"]["lr"], lavis["optim"]["batch_size"], lavis["optim"]["eta_min"]) == (1e-4, 40, 1e-5)
    assert lavis["model"]["dropout"] == 0.4 and lavis["loss"]["mix_from_epoch"] == 0 and lavis["loss"]["mix"]
    assert lavis["optim"]["warm_start"] == "online" and lavis["loss"]["w_init"] == 0.5  # stage 2: w learned from 0.5
    assert lavis["optim"]["epochs"] == 100 and lavis["loss"]["itm_keys"] == "momentum"
    assert lavis["data"]["token_stats"] == "raw" and lavis["model"]["embed_norm"] == "raw"
    assert lavis["data"]["test_captions_per_image"] == 5 and lavis["data"]["augment_backbones"] == "all"
    out = hada_cli("train", "--recipe", "lavis-stage1", "--print-config")
    assert out.returncode == 0, out.stderr
    stage1 = json.loads(out.stdout)
    assert stage1["loss"]["mix"] is False and {**stage1, "loss": {**stage1["loss"], "mix": True}} == lavis


def test_book_runs_of_the_published_recipe_keep_the_books_budget(tmp_path):
    from hada.experiments import Setting, plan

    setting = Setting("synthetic", tmp_path, ("a", "b"), epochs=10, pairs_per_epoch=3000, seed=0)
    runs = {name: config for _, name, config in plan(setting).recipes[2]}
    assert recipe("paper").optim.epochs == 100
    assert (runs["paper-k2"].optim.epochs, runs["paper-k2"].optim.pairs_per_epoch) == (10, 3000)
    assert runs["paper-k2"].model.attention_dropout == 0.7  # the rest is the published recipe


def test_book_runs_of_the_published_recipe_keep_its_queue_at_the_datas_scale(tmp_path):
    """The published 64,000 keys are 44% of Flickr30k's 145,000 training captions; the book's run keeps that share
    of its own train split (6,621 of 15,000), never more than 64,000, and the recipe itself prints 64,000."""
    from hada.experiments import FLICKR30K_TRAIN_CAPTIONS, Setting, plan, queue_at_scale

    assert FLICKR30K_TRAIN_CAPTIONS == 145_000
    assert queue_at_scale(64000, FLICKR30K_TRAIN_CAPTIONS) == 64000
    assert queue_at_scale(64000, 5 * 113_287) == 64000  # COCO's larger train split: the published size
    assert queue_at_scale(64000, 15_000) == 6621 and queue_at_scale(1024, 10) == 1
    assert queue_at_scale(0, 15_000) == 0  # in-batch negatives stay in-batch
    counts = {"train": {"images": 3000, "captions": 15000}}
    setting = Setting("synthetic", tmp_path, ("a", "b"), epochs=10, pairs_per_epoch=3000, seed=0, counts=counts)
    runs = {name: config for _, name, config in plan(setting).recipes[2]}
    assert recipe("paper").loss.queue_size == 64000
    assert runs["paper-k2"].loss.queue_size == 6621 and plan(setting).published_queues["paper"] == 64000
    assert runs["hada-k2"].loss.queue_size == recipe("miniature").loss.queue_size  # the book's own is untouched
    flickr = Setting("flickr30k", tmp_path, ("a", "b"), epochs=10, pairs_per_epoch=None, seed=0,
                     counts={"train": {"images": 29000, "captions": 145000}})
    assert {n: c for _, n, c in plan(flickr).recipes[2]}["paper-k2"].loss.queue_size == 64000


def test_paper_recipe_counts_at_the_papers_widths():
    cfg = recipe("paper")
    pair = HadaPair(cfg.model, FeatureDims.paper())
    assert count_parameters(pair) == 9_986_048
    loss = cfg.override(queue_size=0, use_momentum=False).loss  # the head alone (the 64k queue: tested below)
    objective = HadaObjective(pair, loss, cfg.model.out_dim, 256, init="kaiming")
    assert count_parameters(objective.itm_head) == 2_049
    assert count_parameters(objective) == 9_986_048 + 2_049 + 2  # plus tau and w


# ------------------------------------------------------------------------------------------ the model
TOKEN_DIMS, EMBED_DIMS, SIZES = (12, 10), (6, 5), (6, 4)


def rand_batch(batch: int = 5, seed: int = 0) -> ModalityBatch:
    g = torch.Generator().manual_seed(seed)
    tokens, lengths, embeds = [], [], []
    for n, d, e in zip(SIZES, TOKEN_DIMS, EMBED_DIMS):
        length = torch.randint(1, n + 1, (batch,), generator=g)
        length[0] = n
        tokens.append(torch.randn(batch, n, d, generator=g) * (torch.arange(n)[None, :, None] < length[:, None, None]))
        lengths.append(length)
        embeds.append(torch.randn(batch, e, generator=g))
    return ModalityBatch(tokens, lengths, embeds)


def encoder(**kw) -> HadaEncoder:
    edges = EdgeWeights(self_loops=kw.pop("self_loops", "fixed"))
    torch.manual_seed(0)
    return HadaEncoder(ModelConfig(**{"width": 16, "out_dim": 8, "heads": 2, "dropout": 0.0, **kw}, edges=edges),
                       FeatureDims.same(TOKEN_DIMS, EMBED_DIMS))


def test_the_paper_recipe_trains_on_the_fused_cpu_kernels(monkeypatch):
    """The published attention dropout (0.7) no longer sends a training step to the tiled PyTorch ops: ``auto``
    picks the dense backend, and on CPU its GATv2 runs in the fused kernels, dropout included."""
    import hada.model.fast.dense as dense

    config = recipe("paper", width=16, out_dim=8, heads=2).model
    assert config.attention_dropout == 0.7 and config.resolve_backend() == "dense"
    used = []
    fused = dense.GatV2ClsAttention.apply

    def tiled(*args):
        raise AssertionError("the paper recipe's step ran the tiled attention")

    monkeypatch.setattr(dense.GatV2ClsScores, "apply", tiled)
    monkeypatch.setattr(dense.GatV2ClsAttention, "apply", lambda *args: used.append(args[6]) or fused(*args))
    torch.manual_seed(0)
    model = HadaEncoder(config, FeatureDims.same(TOKEN_DIMS, EMBED_DIMS)).train()
    model(rand_batch()).sum().backward()
    (drop,) = used  # one layer, its dropout mask handed to the kernels: 0 or 1 / (1 - 0.7)
    assert drop is not None and all(v == 0 or v == pytest.approx(1 / 0.3) for v in drop.unique().tolist())
    assert (drop == 0).any() and (drop > 0).any()
    assert all(p.grad is not None for p in model.convs.parameters())


@pytest.mark.parametrize("option", ["attention_dropout", "post_dropout", "dropout"])
@pytest.mark.parametrize("backend", ["dense", "pyg"])
def test_each_dropout_acts_in_training_only(option, backend):
    model, batch = encoder(**{option: 0.5}), rand_batch()
    assert not torch.equal(model.train()(batch, backend=backend), model(batch, backend=backend))
    assert torch.equal(model.eval()(batch, backend=backend), model(batch, backend=backend))


def test_itm_head_dropout_acts_in_training_only():
    head, a, b = ItmHead(8, kind="linear", dropout=0.7), torch.randn(6, 8), torch.randn(6, 8)
    assert count_parameters(head) == 4 * 8 + 1
    assert not torch.equal(head.train()(a, b), head(a, b))
    assert torch.equal(head.eval()(a, b), head(a, b))


def test_mean_self_loop_is_the_mean_of_incoming_weights_as_gatv2conv_fills_it():
    from torch_geometric.nn import GATv2Conv

    counts = (4, 3)
    index, weight, kind = build_edges(counts, EdgeWeights(self_loops="mean"))
    for node in range(sum(counts)):
        incoming = (index[1] == node) & (kind != EDGE_SELF)
        loop = (index[1] == node) & (kind == EDGE_SELF)
        expected = weight[incoming].mean() if incoming.any() else torch.tensor(0.0)
        torch.testing.assert_close(weight[loop], expected.view(1))
    assert weight[(index[1] == 0) & (kind == EDGE_SELF)].item() == pytest.approx((3 * 0.9 + 2 * 0.7 + 1.1) / 6)
    # the published GATv2Conv (its own mean-filled loops) == ours (explicit loops, add_self_loops=False)
    torch.manual_seed(0)
    ours = GATv2Conv(5, 3, heads=2, edge_dim=1, add_self_loops=False)
    theirs = GATv2Conv(5, 3, heads=2, edge_dim=1, add_self_loops=True, fill_value="mean")
    theirs.load_state_dict(ours.state_dict())
    x, no_loops = torch.randn(sum(counts), 5), kind != EDGE_SELF
    expected = theirs(x, index[:, no_loops], weight[no_loops].unsqueeze(-1))
    torch.testing.assert_close(ours(x, index, weight.unsqueeze(-1)), expected)


@pytest.mark.parametrize("layers", [1, 2])
def test_dense_equals_pyg_with_mean_self_loops_and_graph_layernorm(layers):
    model, batch = encoder(self_loops="mean", layers=layers, norm="graph").eval(), rand_batch(seed=3)
    assert model.config.resolve_backend() == "dense"
    torch.testing.assert_close(model(batch, backend="dense"), model(batch, backend="pyg"), atol=1e-5, rtol=1e-5)
    grads = {}
    for backend in ("dense", "pyg"):
        model.zero_grad()
        model(batch, backend=backend).pow(3).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, g in grads["dense"].items():
        torch.testing.assert_close(g, grads["pyg"][name], atol=1e-5, rtol=1e-4, msg=name)
    assert ModelConfig(gnn="gcn", edges=EdgeWeights(self_loops="mean")).resolve_backend() == "pyg"


def test_graph_layernorm_normalises_over_each_graphs_nodes():
    from torch_geometric.nn import LayerNorm

    from hada.model.encoder import graph_layer_norm

    norm = LayerNorm(4, mode="graph")
    x, mask = torch.randn(3, 5, 4), torch.arange(5)[None, :] < torch.tensor([[5], [2], [3]])
    dense = graph_layer_norm(norm, x * mask.unsqueeze(-1), mask)
    flat = graph_layer_norm(norm, x[mask], torch.arange(3).repeat_interleave(mask.sum(1)))
    torch.testing.assert_close(dense[mask], flat)
    assert dense[mask][:5].mean().abs() < 1e-5 and (dense[~mask] == 0).all()


def test_kaiming_init_of_every_linear():
    torch.manual_seed(0)
    model = HadaEncoder(ModelConfig(width=256, out_dim=128, heads=1, init="kaiming"), FeatureDims.same((384, 384),
                                                                                                      (64, 64)))
    for lin in (model.proj[0], model.post[0], model.readout):
        assert lin.weight.std().item() == pytest.approx((2 / lin.in_features) ** 0.5, rel=0.05)
    torch.manual_seed(0)
    head = HadaObjective(HadaPair(ModelConfig(width=16, out_dim=64), FeatureDims.same((8, 8), (4, 4))),
                         LossConfig(itm_head="linear"), 64, 4, init="kaiming").itm_head
    assert head.net[1].weight.std().item() == pytest.approx((2 / 256) ** 0.5, rel=0.15)


def test_readout_embeddings_standardised_with_the_token_statistics():
    model, batch = encoder(embed_norm="standardise").eval(), rand_batch()
    model.set_embed_stats([(0.01, 0.05), (-0.02, 0.1)])
    e = batch.embeds[1]
    torch.testing.assert_close(model.embed_input(e, 1), (F.normalize(e, dim=-1) + 0.02) / 0.1)
    assert not torch.allclose(model(batch), encoder().eval()(batch))


def test_single_node_backbone_enters_as_its_embedding():
    model, batch = encoder(single_node=[1]).eval(), rand_batch()
    assert model.proj[1].in_features == EMBED_DIMS[1]
    out = model(batch, backend="dense")
    torch.testing.assert_close(out, model(batch, backend="pyg"), atol=1e-5, rtol=1e-5)
    other = ModalityBatch(list(batch.tokens), list(batch.lengths), batch.embeds)
    other.tokens[1] = torch.randn_like(other.tokens[1])  # its tokens are never read
    torch.testing.assert_close(model(other), out)


# ------------------------------------------------------------------------------------------- the loss
def tiny_objective(**loss) -> HadaObjective:
    torch.manual_seed(0)
    pair = HadaPair(ModelConfig(width=16, out_dim=8, heads=2), FeatureDims.same(TOKEN_DIMS, EMBED_DIMS))
    return HadaObjective(pair, LossConfig(**loss), 8, EMBED_DIMS[0])


def test_random_queue_starts_full_of_unit_vectors_that_match_nothing(monkeypatch):
    import hada.losses as hl

    queue = FeatureQueue(50, 8, 6, init="random")
    filled = queue.filled()
    assert len(filled["ids"]) == 50 and (filled["ids"] == RANDOM_ID).all()
    for name in ("image", "text", "image_main", "text_main"):
        torch.testing.assert_close(filled[name].norm(dim=1), torch.ones(50))
    objective, batch = tiny_objective(queue_size=50, queue_init="random"), rand_batch(4)
    seen, original = {}, hl.multi_positive_targets
    monkeypatch.setattr(hl, "multi_positive_targets", lambda ids, all_ids: seen.setdefault("t", original(ids, all_ids)))
    objective(batch, batch, torch.arange(4))
    assert seen["t"].shape == (4, 4 + 50) and (seen["t"][:, 4:] == 0).all()  # the whole queue, no positive


def record_hard_negative_sims(monkeypatch) -> list:
    import hada.losses as hl

    sims, original = [], hl.sample_hard_negatives
    monkeypatch.setattr(hl, "sample_hard_negatives", lambda sim, pos: (sims.append(sim), original(sim, pos))[1])
    return sims


def test_hard_negatives_against_the_momentum_keys_of_the_batch(monkeypatch):
    objective, batch = tiny_objective(itm_negatives="hada", queue_size=8), rand_batch(4)
    assert LossConfig().itm_keys == "momentum"
    with torch.no_grad():  # momentum encoders that differ from the online ones
        for p in objective.pair_m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    sims = record_hard_negative_sims(monkeypatch)
    objective.eval()
    objective(batch, batch, torch.arange(4))  # updates the momentum encoders before their forward
    img, txt = objective.pair.image(batch), objective.pair.text(batch)
    img_m, txt_m = objective.pair_m.image(batch), objective.pair_m.text(batch)
    assert not torch.allclose(img_m, img, atol=1e-3)
    tau = objective.tau().detach()
    torch.testing.assert_close(sims[1], (img @ txt_m.T / tau).detach())  # per image, a text key
    torch.testing.assert_close(sims[0], (txt @ img_m.T / tau).detach())  # per text, an image key
    # the mixed similarity against the momentum keys: the ITC logits' batch columns
    objective, sims[:] = tiny_objective(itm_negatives="mixed", queue_size=8), []
    objective.eval()
    objective(batch, batch, torch.arange(4))
    img, txt_m = objective.pair.image(batch), objective.pair_m.text(batch)
    main = F.normalize(batch.embeds[0], dim=-1)
    w, tau = objective.w().detach(), objective.tau().detach()
    torch.testing.assert_close(sims[1], ((1 - w) * img @ txt_m.T + w * main @ main.T).detach() / tau)


def test_hard_negatives_online_against_online(monkeypatch):
    objective, batch = tiny_objective(itm_negatives="hada", itm_keys="online", queue_size=0), rand_batch(4)
    sims = record_hard_negative_sims(monkeypatch)
    torch.manual_seed(0)
    objective.eval()
    objective(batch, batch, torch.arange(4))
    img, txt = objective.pair.image(batch), objective.pair.text(batch)
    hada = img @ txt.T / objective.tau()
    torch.testing.assert_close(sims[1], hada.detach())  # per image, a text
    torch.testing.assert_close(sims[0], hada.T.detach())
    objective, sims[:] = tiny_objective(itm_negatives="mixed", itm_keys="online", queue_size=0), []
    objective.eval()
    objective(batch, batch, torch.arange(4))
    img, txt, main = objective.pair.image(batch), objective.pair.text(batch), F.normalize(batch.embeds[0], dim=-1)
    w, tau = objective.w().detach(), objective.tau().detach()
    torch.testing.assert_close(sims[1], ((1 - w) * img @ txt.T + w * main @ main.T).detach() / tau)


def test_distillation_ramp_and_two_stages():
    objective = tiny_objective(distill=True, alpha_ramp=True, mix_from_epoch=1)
    objective.progress = 0.25
    assert objective.alpha() == pytest.approx(0.1) and float(objective.w()) == 0.0
    objective.progress = 1.0
    assert objective.alpha() == pytest.approx(0.4) and float(objective.w().detach()) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------- data and training
def test_global_standardisation_is_one_mean_and_std():
    splits = toy_splits(n_images=8, seed=0)
    stats = compute_stats(splits, pooled=True)
    assert len({(s.mean, s.std) for s in stats.image + stats.text}) == 1
    values = []
    for s in splits:
        values.append(F.normalize(torch.from_numpy(s.image_tokens.astype(np.float32)), dim=-1).reshape(-1))
        text = F.normalize(torch.from_numpy(s.text_tokens.astype(np.float32)), dim=-1)
        values.append(text[torch.arange(text.shape[1])[None, :] < torch.from_numpy(s.text_lengths)[:, None]].reshape(-1))
    values = torch.cat(values).double()
    assert stats.image[0].mean == pytest.approx(values.mean().item(), abs=1e-9)
    assert stats.image[0].std == pytest.approx(values.std(unbiased=False).item(), rel=1e-6)


def test_augmented_views_used_with_probability_075():
    splits = toy_splits(n_images=40, seed=0)
    views = 3
    for s in splits:  # view v of every image: its tokens and embedding filled with v + 10
        tok = np.stack([np.full_like(s.image_tokens, v + 10) for v in range(views)])
        emb = np.stack([np.full_like(s.image_embeds, v + 10) for v in range(views)])
        s.augmented = (tok, emb)
    data = FeatureData(splits, compute_stats(splits), augment_p=0.75)
    torch.manual_seed(0)
    rows = np.tile(np.arange(40), 50)
    batch = data.image_batch(rows, augment=True)
    used = batch.embeds[0][:, 0] >= 10
    assert abs(used.float().mean().item() - 0.75) < 0.03  # 2,000 seeded draws
    assert torch.equal(used, batch.embeds[1][:, 0] >= 10)  # the same view in every backbone
    plain = data.image_batch(rows)
    assert torch.equal(plain.embeds[0], data.image_embeds[0][torch.from_numpy(rows)])
    _, txt, _ = next(iter(PairLoader(data, 8)))
    assert txt.batch_size == 8


def test_augmentation_of_the_main_backbone_alone():
    splits = toy_splits(n_images=40, seed=0)
    for s in splits:  # view v of every image: its tokens and embedding filled with v + 10
        s.augmented = tuple(np.stack([np.full_like(a, v + 10) for v in range(3)]) for a in (s.image_tokens,
                                                                                            s.image_embeds))
    data = FeatureData(splits, compute_stats(splits), augment_p=0.75, augment_backbones="main")
    torch.manual_seed(0)
    batch = data.image_batch(np.tile(np.arange(40), 10), augment=True)
    assert (batch.embeds[0][:, 0] >= 10).any() and (batch.tokens[0] != data.image_batch(np.tile(np.arange(40), 10))
                                                     .tokens[0]).any()
    plain = data.image_batch(np.tile(np.arange(40), 10))
    assert torch.equal(batch.embeds[1], plain.embeds[1]) and torch.equal(batch.tokens[1], plain.tokens[1])
    splits[1].augmented = None  # the published extracts views of the main backbone only: enough for "main"
    FeatureData(splits, compute_stats(splits), augment_p=0.75, augment_backbones="main")
    # which backbones' views a run reads (and hada prepare extracts)
    assert recipe("paper", backbones=["a", "b"]).data.augmented_backbones == ["a"]
    assert recipe("paper", backbones=["a", "b"], augment_backbones="all").data.augmented_backbones == ["a", "b"]
    assert recipe("miniature", backbones=["a", "b"]).data.augmented_backbones == []


def test_albef_augmentation_policy():
    from PIL import Image

    from hada.features import augment as aug

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8))
    torch.manual_seed(0)
    policy = aug.policy_transform("albef", 32)
    out = [policy(image) for _ in range(20)]
    assert all(o.size == (32, 32) for o in out) and len({o.tobytes() for o in out}) == 20
    torch.manual_seed(0)
    assert [o.tobytes() for o in out[:3]] == [policy(image).tobytes() for _ in range(3)]  # seeded: reproducible
    torch.manual_seed(0)
    chosen = [policy.chosen_ops() for _ in range(4000)]
    assert np.mean([len(c) for c in chosen]) == pytest.approx(1.0, abs=0.05)  # 2 draws, each kept with p 0.5
    assert {op for c in chosen for op in c} == set(aug.ALBEF_OPS)
    grey = Image.new("RGB", (20, 20), (100, 100, 100))
    assert aug.apply_op(grey, "brightness", 7).getpixel((5, 5)) == (136, 136, 136)  # factor 0.1 + 1.8 * 0.7
    bar = np.zeros((20, 20, 3), dtype=np.uint8)
    bar[:, 10] = 255
    moved = np.asarray(aug.apply_op(Image.fromarray(bar), "translate_x", 7))
    assert {int(np.argmax(moved[5, :, 0]))} <= {3, 17}  # 7 pixels either way
    assert tuple(moved[5, 0]) == (128, 128, 128) or tuple(moved[5, -1]) == (128, 128, 128)  # grey fill
    assert aug.input_size({"size": (336, 336)}) == 336 and recipe("paper").data.augment_policy == "albef"


def test_lavis_augments_blip_with_blips_transform_and_clip_with_albefs():
    """HADA-LAVIS makes BLIP's training views with LAVIS's blip_image_train (ALBEF's transform at magnitude 5) and
    CLIP's with ALBEF's at magnitude 7: the lavis recipe's policy gives each backbone its own, hada prepare and
    ``hada features extract`` make each store with it, and a run refuses a store made with the other."""
    from hada.features import augment as aug
    from hada.errors import HadaError
    from hada.pipeline import augment_policies

    assert aug.policy_transform("blip", 32).magnitude == 5 and aug.policy_transform("albef", 32).magnitude == 7
    grey = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (20, 20), (100, 100, 100))
    assert aug.apply_op(grey, "brightness", 5).getpixel((5, 5)) == (100, 100, 100)  # factor 0.1 + 1.8 * 0.5 = 1
    for stage in ("lavis", "lavis-stage1"):
        config = recipe(stage, backbones=["blip", "clip"])
        assert config.data.augment_policy == "lavis" and config.data.augmented_backbones == ["blip", "clip"]
        assert augment_policies([(stage, config)]) == {"blip": "blip", "clip": "albef"}
    assert augment_policies([("paper", recipe("paper", backbones=["a", "b"]))]) == {"a": "albef"}
    splits = toy_splits(n_images=12, seed=0)
    for s, made in zip(splits, ("blip", "albef")):
        s.augmented = (np.stack([s.image_tokens] * 2), np.stack([s.image_embeds] * 2))
        s.augment_policy, s.manifest = made, {"backbone": f"made-{made}"}
    FeatureData(splits, compute_stats(splits), augment_p=1.0, augment_policy="lavis")
    splits[0].augment_policy = "albef"  # BLIP's views made with CLIP's transform: refused, naming the backbone
    with pytest.raises(HadaError, match="made-blip's augmented views were made with the albef policy, the run "
                                        "wants blip"):
        FeatureData(splits, compute_stats(splits), augment_p=1.0, augment_policy="lavis")


def test_raw_inputs_enter_unnormalised():
    splits = toy_splits(n_images=8, seed=0)
    stats = compute_stats(splits, raw=True)
    assert all(s.raw for s in stats.image + stats.text)
    assert type(stats).from_dict(json.loads(json.dumps(stats.to_dict()))) == stats
    assert "raw" not in json.dumps(compute_stats(splits).to_dict())  # earlier statistics read the same
    data = FeatureData(splits, stats)
    img, txt = data.image_batch(np.arange(4)), data.text_batch(np.arange(5))
    torch.testing.assert_close(img.tokens[1], torch.from_numpy(splits[1].image_tokens[:4].astype(np.float32)))
    stored = torch.from_numpy(splits[0].text_tokens[:5].astype(np.float32))[:, :txt.tokens[0].shape[1]]
    torch.testing.assert_close(txt.tokens[0], stored)  # padding is stored as zeros
    model, batch = encoder(embed_norm="raw").eval(), rand_batch()
    torch.testing.assert_close(model.embed_input(batch.embeds[1], 1), batch.embeds[1])
    assert recipe("lavis").data.token_stats == "raw" and recipe("lavis").model.embed_norm == "raw"


def test_first_captions_of_each_test_image():
    splits = toy_splits(n_images=10, captions_per_image=(2, 3, 1), seed=0)
    full, stats = FeatureData(splits, compute_stats(splits)), compute_stats(splits)
    kept = FeatureData(splits, stats, captions_per_image=2)
    counts = np.bincount(kept.caption_image_index, minlength=10)
    assert kept.n_captions == 2 + 2 + 1 + 2 + 2 + 1 + 2 + 2 + 1 + 2 and counts.max() == 2 and counts.min() == 1
    rows = kept.caption_rows
    assert np.array_equal(full.caption_image_index[rows], kept.caption_image_index)
    a, b = kept.text_batch(np.arange(kept.n_captions)), full.text_batch(rows)
    for x, y in zip(a.tokens + a.embeds, b.tokens + b.embeds):
        torch.testing.assert_close(x, y)
    assert np.array_equal(rows, [i for i, c in enumerate(full.caption_image_index)
                                 if list(full.caption_image_index[:i]).count(c) < 2])  # the first two, in order
    config = recipe("lavis")
    assert ht.split_options(config, "test") == {"captions_per_image": 5}
    assert ht.split_options(config, "val") == ht.split_options(config, "train") == {"captions_per_image": None}
    assert recipe("paper").data.test_captions_per_image is None  # ours: every caption


@pytest.fixture
def toy_world(monkeypatch, tmp_path):
    use_toy_stores(monkeypatch, tmp_path)
    return tmp_path


def tiny_paper(**kw) -> TrainConfig:
    base = dict(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, head_dim=8, epochs=2, batch_size=16,
                queue_size=32, eval_batch_size=64, augment_p=0.0, lr=1e-3)
    return recipe("paper").override(**{**base, **kw})


def test_scheduler_steps_every_iteration_with_the_fractional_epoch(toy_world, monkeypatch):
    calls = []
    step = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts.step
    monkeypatch.setattr(torch.optim.lr_scheduler.CosineAnnealingWarmRestarts, "step",
                        lambda self, epoch=None: (calls.append(epoch), step(self, epoch))[1])
    result = ht.train(tiny_paper(), toy_world / "run")
    assert calls[0] is None  # the constructor's own step
    calls, iters = calls[1:], (len(calls) - 1) // 2
    assert calls == [e + k / iters for e in range(2) for k in range(1, iters + 1)]
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(reference, T_0=30, T_mult=2, eta_min=5e-6)
    scheduler.step(1.0)
    assert result.history[1]["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-12)


def test_warm_start_loads_the_online_encoders_and_itm_head_only(toy_world):
    result = ht.train(tiny_paper(epochs=1, tau_init=0.05, w_init=0.4), toy_world / "run")
    best = torch.load(result.run_dir / "best.pt", weights_only=False)["model"]
    assert recipe("paper").optim.warm_start == "online"
    runs = {}
    for parts in ("online", "all"):
        config = tiny_paper(init_from=str(result.run_dir), seed=5, warm_start=parts).resolved()
        (toy_world / parts).mkdir()
        runs[parts] = ht._start(config, toy_world / parts, True, None)
        ht.seed_everything(config.seed)
        fresh = ht.build_objective(config, runs[parts].dims, runs[parts].stats)  # the same seed's fresh init
        state, fresh_state = runs[parts].objective.state_dict(), fresh.state_dict()
        for name, value in state.items():
            if name.startswith(("pair.", "itm_head.")) or parts == "all" and not name.startswith("queue."):
                torch.testing.assert_close(value, best[name], msg=name)  # from the earlier run
            else:  # tau, w, the momentum encoders and the queue: fresh
                torch.testing.assert_close(value, fresh_state[name], msg=name)
        assert not runs[parts].optimizer.state and runs[parts].scheduler.last_epoch == 0  # optimiser, schedule: new
    online = runs["online"].objective  # the new run's own initial tau and w, not the earlier run's
    assert (float(online.temp), float(online.mix_weight)) == pytest.approx((0.07, 0.5))
    assert float(best["temp"]) != pytest.approx(0.07) and float(runs["all"].objective.temp) == float(best["temp"])
    assert any(not torch.equal(p, best["pair_m." + n]) for n, p in online.pair_m.named_parameters())


def test_a_lavis_style_run_trains_on_raw_inputs_and_scores_the_first_test_captions(toy_world):
    config = tiny_paper(epochs=1, token_stats="raw", embed_norm="raw", test_captions_per_image=1)
    result = ht.train(config, toy_world / "run")
    stats = json.loads((result.run_dir / "stats.json").read_text())
    assert all(s["raw"] for s in stats["image"] + stats["text"])
    model = ht.load_trained(result.run_dir)
    test = model.load_data("test")
    assert test.n_captions == test.n_images == 12  # toy test split: 12 images with 2 or 3 captions each
    assert model.evaluate(test) == pytest.approx(result.test_metrics)
    assert model.load_data("val").n_captions > model.load_data("val").n_images  # val keeps every caption


def test_lavis_trains_as_two_runs_the_second_warm_started_from_the_first(toy_world, monkeypatch):
    """HADA-LAVIS's two runs: stage 1 (``lavis-stage1``) without the mix (w = 0) to early stopping, stage 2 (``lavis``)
    through --init-from the first's folder, loading its online encoders and ITM head, with a fresh optimiser,
    schedule and queue, and learning w from 0.5; the second's key follows the first's."""
    from hada.experiments import TwoStages
    from hada.runs import run_experiment

    small = dict(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, head_dim=8, epochs=2, batch_size=16,
                 queue_size=32, eval_batch_size=64, augment_p=0.0, lr=1e-2)
    first, second = recipe("lavis-stage1", **small), recipe("lavis", **small)
    starts = []
    warm_start = ht.warm_start
    monkeypatch.setattr(ht, "warm_start", lambda objective, run, parts: starts.append(
        (run, parts, float(objective.mix_weight.detach()))) or warm_start(objective, run, parts))
    result = TwoStages(("lavis-stage1", first), ("lavis", second)).run(progress=False)
    one = run_experiment(first)  # finished: loaded, not trained again
    assert [h["mix_weight"] for h in one.history] == [0.0, 0.0]  # stage 1: the HADA similarity alone
    assert result.config.optim.init_from == one.run_dir.name and result.run_dir.parent == one.run_dir.parent
    ((run, parts, w_at_start),) = starts  # stage 2 warm-started once, from stage 1's folder, as published
    assert (run, parts) == (one.run_dir.name, "online") and w_at_start == pytest.approx(0.5)
    assert result.history[0]["lr"] == pytest.approx(second.optim.lr)  # a fresh schedule from the recipe's rate
    assert result.metrics["mix_weight"] != pytest.approx(0.5)  # w learned in stage 2
    # another first stage gives another second stage
    other = TwoStages(("lavis-stage1", first.override(seed=7)), ("lavis", second))
    assert other.second_config(run_experiment(other.first[1])).optim.init_from != one.run_dir.name


def test_early_stopping_threshold():
    assert not ht.improves(100.05, 100.0, 0.1)
    assert ht.improves(100.15, 100.0, 0.1)
    assert ht.improves(100.05, 100.0, 0.0)
    assert recipe("paper").optim.min_delta == 0.1


def test_departure_table_has_a_reason_for_every_setting_where_the_recipes_differ(monkeypatch):
    from hada.book import departures
    from hada.errors import HadaError

    differing = departures.differing_settings()
    paths = {p for p, _, _ in differing}
    assert {"loss.queue_size", "model.width", "optim.lr", "model.embed_norm"} <= paths
    table = departures.departure_table(train_captions=15_000)
    listed = [p for row in table.rows for p in row["name"].split(", ")]
    assert sorted(listed) == sorted(paths)  # every differing setting once, nothing that agrees
    queue = next(r for r in table.rows if "loss.queue_size" in r["name"])
    assert queue["paper"] == "64,000 / random" and "15,000 captions" in queue["why"] and "4.3 times" in queue["why"]
    assert "{" not in "".join(r["why"] for r in table.rows)  # every number filled in

    # a recipe change without its reason cannot slip through
    trimmed = {group: why for group, why in departures.DEPARTURES.items() if "optim.lr" not in group}
    monkeypatch.setattr(departures, "DEPARTURES", trimmed)
    with pytest.raises(HadaError, match="optim.lr"):
        departures.departure_table(train_captions=15_000)


def test_baselines_score_the_first_test_captions_too(toy_world):
    """The untrained rows (each backbone alone, their average) of a run keeping the first N captions of each test
    image are scored on those captions: their caches were keyed without the option, so a second setting read the
    first one's rows (scored on every caption)."""
    from hada.baselines import untrained_baselines
    from hada.experiments import _untrained_systems, baseline_rows
    from hada.runs import shared_data

    every, first = (tiny_paper(test_captions_per_image=n).resolved() for n in (None, 1))
    for config in (every, first):  # every caption first, so the cache holds its rows when the other asks
        rows = baseline_rows(config, "test", concat=False)
        data = shared_data(config, "test")
        assert data.n_captions == (12 if config is first else data.n_captions)
        expected = [m["rsum"] for _, _, m in untrained_baselines(data, config.data.backbones)]
        assert [r["rsum"] for r in rows] == pytest.approx(expected)
        systems = _untrained_systems(config, "test")
        assert [s.metrics[0]["rsum"] for s in systems] == pytest.approx(expected)
    assert shared_data(every, "test").n_captions > 12
