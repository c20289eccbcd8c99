"""Attention chapter helpers on a tiny random HADA model and toy features (no store, no trained run)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import hada.attention as ha  # noqa: E402
from fixtures.toy_features import toy_splits  # noqa: E402
from hada.features.batching import FeatureData, compute_stats  # noqa: E402
from hada.data.datasets import ImageRecord  # noqa: E402
from hada.errors import HadaError  # noqa: E402
from hada.config import TrainConfig  # noqa: E402
from hada.train import TrainedModel, build_objective, feature_dims  # noqa: E402

IMAGE_TOKENS = (5, 10)  # 1 + 2x2 and 1 + 3x3 patches
N_IMAGES = 12


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    plt.close("all")


class ToyDataset:
    """The two things attention_examples reads from a Dataset: ``split(name)`` records with paths/captions."""

    def __init__(self, records):
        self.records = records

    def split(self, name):
        return self.records


@pytest.fixture
def world(tmp_path):
    """A random (untrained) HADA run over toy features, and a matching dataset of tiny PNG images."""
    torch.manual_seed(0)
    splits = toy_splits(n_images=N_IMAGES, image_tokens=IMAGE_TOKENS, seed=3)
    # fp32: the dense and pyg backends agree to float32 rounding (bf16 autocast rounds them differently)
    config = TrainConfig().override(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, head_dim=32,
                                    queue_size=8, precision="fp32")
    trained = TrainedModel(build_objective(config, feature_dims(splits)), compute_stats(splits), config)
    trained.objective.eval()
    trained.load_data = lambda split: FeatureData(splits, trained.stats)
    ci = splits[0].caption_image_index
    records = []
    for i in range(N_IMAGES):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((20, 16, 3), 20 * i % 255, dtype=np.uint8)).save(path)
        n = int((ci == i).sum())
        records.append(ImageRecord(i, path, "test", [f"caption {i} {c} with words" for c in range(n)],
                                   list(range(n))))
    return trained, ToyDataset(records), splits


def store_labels(dataset, splits):
    """Fake tokenizers (the toy store has none) whose token counts match the store: pooled first, then words."""
    captions = [c for r in dataset.records for c in r.captions]

    def labels(caption, k):
        n = int(splits[k].text_lengths[captions.index(caption)])
        return ["<eot>"] + [f"w{i}" for i in range(n - 1)]

    return [lambda caption, k=k: labels(caption, k) for k in range(len(splits))]


# --------------------------------------------------------------------------------------- attention tensors
@pytest.mark.parametrize("backend", ["dense", "pyg"])
def test_cls_attention_sums_to_one_over_incoming_nodes(world, backend):
    trained, _, _ = world
    data = trained.load_data("test")
    batch = data.text_batch(np.array([0, 3, 5]))  # captions of different lengths: padding in the node axis
    enc = trained.pair.text
    _, out = enc(batch, return_attention=True, backend=backend)
    heads, nodes = ha.cls_attention(enc, batch)
    assert np.allclose(heads, out["attention"][-1].detach().numpy(), atol=1e-6)
    att = heads.mean(axis=2)  # [B, K, N]
    assert np.allclose(att.sum(-1), 1.0, atol=1e-5)
    for b, nm in enumerate(nodes):
        assert (att[b][:, ~nm.valid] == 0).all()  # padding receives nothing
        assert nm.valid.sum() == sum(int(n[b]) for n in batch.lengths)
        for k in range(2):
            m = ha.attention_mass(att[b, k], nm, k)
            assert sum(m.as_tuple()) == pytest.approx(1.0, abs=1e-5)
            assert nm.token[nm.cls_index(k)] == 0 and nm.backbone[nm.cls_index(k)] == k


def test_patch_grid_is_row_major_over_feature_tokens():
    sizes = (10, 5, 4)  # 3x3 grid, 2x2 grid, 3 tokens (no square grid)
    backbone = np.repeat(np.arange(3), sizes)
    token = np.concatenate([np.arange(s) for s in sizes])
    nodes = ha.NodeMap(backbone, token, np.ones(len(token), bool))
    att = 100.0 * backbone + token  # value encodes (backbone, token)
    assert [nodes.grid_side(k) for k in range(3)] == [3, 2, None]
    assert np.array_equal(ha.patch_grid(att, nodes, 0), 1.0 + np.arange(9).reshape(3, 3))
    assert np.array_equal(ha.patch_grid(att, nodes, 1), 101.0 + np.arange(4).reshape(2, 2))
    assert ha.patch_grid(att, nodes, 2) is None
    heat = ha.upsample(np.array([[0.0, 1.0], [0.0, 1.0]]), 8)
    assert heat.shape == (8, 8) and (heat[:, -1] == 1).all() and (heat[:, 0] == 0).all()
    assert (np.diff(heat, axis=1) >= 0).all()  # bilinear: monotone between the two columns


def test_attention_mass_splits_by_node_kind():
    backbone = np.array([0, 0, 0, 1, 1, 1])
    token = np.array([0, 1, 2, 0, 1, 2])
    nodes = ha.NodeMap(backbone, token, np.array([1, 1, 1, 1, 1, 0], bool))
    att = np.array([0.1, 0.2, 0.3, 0.15, 0.25, 9.0])  # the padded last node is ignored
    m = ha.attention_mass(att, nodes, 1)
    assert m.as_tuple() == pytest.approx((0.25, 0.5, 0.1, 0.15))


# --------------------------------------------------------------------------------------- example choice
def test_choose_examples_is_deterministic_and_correct():
    ci = np.repeat(np.arange(6), 2)  # captions 2i, 2i+1 belong to image i
    top = np.array([0, 5, 4, 2, 9, 1])  # hits: images 0, 2, 4
    a = ha.choose_examples(top, ci, 2, 2, seed=1)
    assert a == ha.choose_examples(top, ci, 2, 2, seed=1)
    assert [ok for _, ok in a] == [True, True, False, False]
    for row, ok in a:
        assert (ci[top[row]] == row) == ok
    assert len({r for r, _ in a}) == 4
    only = ha.choose_examples(top, ci, 5, 0)
    assert sorted(r for r, _ in only) == [0, 2, 4]  # fewer hits than asked: all of them
    sims = torch.zeros(6, 12)
    sims[torch.arange(6), torch.from_numpy(top)] = 1.0
    assert np.array_equal(ha.top_captions(sims, max_block_elements=24), top)  # row stripes of 2


# --------------------------------------------------------------------------------------- end to end
def test_attention_examples_and_figures(world):
    trained, dataset, splits = world
    labels = store_labels(dataset, splits)
    ex = ha.attention_examples(trained, dataset, n_correct=2, n_failures=1, token_labels=labels)
    again = ha.attention_examples(trained, dataset, n_correct=2, n_failures=1, token_labels=labels)
    assert [(i.row, i.correct) for i in ex.items] == [(i.row, i.correct) for i in again.items]
    assert 1 <= len(ex.items) <= 3 and ex.grid_backbones == [0, 1]
    data = trained.load_data("test")
    sims = trained.similarity(data).block(slice(None), slice(None))
    for item in ex.items:
        top = int(sims[item.row].argmax())
        assert item.top_caption_row == top and item.correct == (data.caption_image_index[top] == item.row)
        assert item.top_caption == [c for r in dataset.records for c in r.captions][top]
        assert item.grid(0, 1).shape == (3, 3) and item.grid(1, 0).shape == (2, 2)
        assert np.allclose(item.attention.sum(-1), 1.0, atol=1e-5)
    failures = [i for i in ex.items if not i.correct]
    assert failures and not ex.items[-1].correct  # failures come last
    assert ex.text is not None and ex.text.caption == dataset.records[ex.items[0].row].captions[0]
    assert ex.text.tokens[0][0] == "<eot>" and len(ex.text.tokens[1]) == len(ex.text.over_backbone(0, 1))

    from hada.book.figures import CONTENT_PX, FULL_WIDTH_PX, MIN_TEXT_PX, displayed_text_px

    from hada.book.views import AttentionView

    view = AttentionView(ex)  # the book draws what hada.attention computes
    assert view.items is ex.items
    fig = view.image_figure()
    assert len(fig.axes) == len(ex.items) * (2 + 2 * 2)  # image, 4 heatmaps, mass bars per row
    fig.savefig(io.BytesIO(), format="png")
    assert displayed_text_px(fig, FULL_WIDTH_PX) >= MIN_TEXT_PX  # book/07_attention.md shows it full width
    fig = view.text_figure()
    assert len(fig.axes) == 2
    fig.savefig(io.BytesIO(), format="png")
    assert displayed_text_px(fig, CONTENT_PX) >= MIN_TEXT_PX


def test_wrong_labels_fall_back_and_mismatched_dataset_fails(world):
    trained, dataset, _ = world
    with pytest.warns(UserWarning, match="labelling tokens by position"):
        ex = ha.attention_examples(trained, dataset, n_correct=1, n_failures=0,
                                   token_labels=[lambda c: ["x"], lambda c: ["y"]])
    assert ex.text.tokens[0][0] == "#0"
    with pytest.raises(HadaError, match="layer 1 does not exist"):
        ha.attention_examples(trained, dataset, layer=1)
    short = ToyDataset(dataset.records[:-1])
    with pytest.raises(HadaError, match="not the same dataset"):
        ha.attention_examples(trained, short, token_labels=[lambda c: [], lambda c: []])


def test_token_strings_follow_the_store_order():
    """Real tokenizer of a randomly initialised embedded architecture: pooled <eot> first, then <sot>, words."""
    from hada.backbones import load_backbone

    backbone = load_backbone("tiny-vit:random")
    caption = "a red circle above a blue square"
    strings = ha.caption_token_strings(backbone, caption)
    stored = backbone.encode_text_tokens([caption])
    assert len(strings) == int(stored.lengths[0])
    assert strings == ["<eot>", "<sot>", "a", "red", "circle", "above", "a", "blue", "square"]
