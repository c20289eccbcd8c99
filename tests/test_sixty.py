""""HADA in 60 lines" (book/08_hada_in_60_lines.md): the page's own code cells, executed here on random small
features, give the same embeddings as hada.model.encoder.HadaPair on both backends, and train.

The cells are read from the chapter, not copied, so the page cannot drift from the package unnoticed. The
cells tagged ``hada-in-60`` (the method) and ``hada-check`` (the state-dict mapping and the comparison) are
executed; the rest of the page reads stored features and is run by the book build.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hada.config import EdgeWeights, ModelConfig
from hada.features.batching import ArraySplit, FeatureData, PairLoader, compute_stats
from hada.model.encoder import FeatureDims, HadaPair
from hada.model.graph import build_edges

CHAPTER = Path(__file__).resolve().parents[1] / "book" / "08_hada_in_60_lines.md"


def _cells(tag: str) -> list[str]:
    """Source of the chapter's code cells whose ``:tags:`` line names ``tag``, in page order."""
    from hada.book.source import tagged_cells

    return tagged_cells(CHAPTER, tag)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def page() -> dict:
    """The namespace the page's method and check cells define."""
    namespace: dict = {"__name__": "hada_in_60"}
    for code in _cells("hada-in-60") + _cells("hada-check"):
        exec(compile(code, str(CHAPTER), "exec"), namespace)
    return namespace


def _split(rng, n_images: int, per_image: int, image_tokens: int, max_words: int, dim: int, embed: int):
    """One backbone's features: random tokens, ragged captions (some only their pooled token)."""
    n_caps = n_images * per_image
    lengths = rng.integers(1, max_words + 1, n_caps)
    lengths[0] = 1
    text = rng.standard_normal((n_caps, max_words, dim)).astype(np.float16)
    text[np.arange(max_words)[None, :] >= lengths[:, None]] = 0
    return ArraySplit(image_tokens=rng.standard_normal((n_images, image_tokens, dim)).astype(np.float16),
                      image_embeds=rng.standard_normal((n_images, embed)).astype(np.float16),
                      text_tokens=text, text_lengths=lengths,
                      text_embeds=rng.standard_normal((n_caps, embed)).astype(np.float16),
                      image_ids=np.arange(n_images), caption_ids=np.arange(n_caps),
                      caption_image_index=np.repeat(np.arange(n_images), per_image), manifest={})


def _data(k: int, seed: int = 0) -> FeatureData:
    """K backbones of different widths (the main one's image and text embeddings share a width)."""
    rng = np.random.default_rng(seed)
    shapes = [(5, 6, 12, 8), (7, 4, 10, 6), (3, 5, 9, 7)][:k]  # image tokens, words, token dim, embed dim
    splits = [_split(rng, 10, 3, t, w, d, e) for t, w, d, e in shapes]
    return FeatureData(splits, compute_stats(splits))


def _pair(page: dict, data: FeatureData, heads: int, seed: int = 0):
    """The page's encoders (random init) and a HadaPair of the same shape holding the same weights."""
    torch.manual_seed(seed)
    width, head_dim, out_dim = 16, 8, 12
    token_dims = [s.image_tokens.shape[-1] for s in data.splits]
    embed_dims = [s.image_embeds.shape[-1] for s in data.splits]
    ours = torch.nn.ModuleDict({m: page["Encoder"](token_dims, embed_dims, width, heads, head_dim, out_dim)
                                for m in ("image", "text")})
    edges = EdgeWeights(w_fc=page["W_FC"], w_fcx=page["W_FCX"], w_cc=page["W_CC"], w_self=page["W_SELF"])
    config = ModelConfig(width=width, out_dim=out_dim, heads=heads, head_dim=head_dim, layers=1, gnn="gatv2",
                         precision="fp32", edges=edges)
    theirs = HadaPair(config, FeatureDims.same(token_dims, embed_dims))
    theirs.load_state_dict(page["to_hada"](ours.state_dict()))  # strict: every name maps
    return ours, theirs


def test_the_method_is_true_to_the_title():
    """What the page promises, "HADA in 60 lines": at most 60 lines of code, not counting imports, docstrings and
    blank lines, counted by the function whose number the page glues."""
    from hada.book.source import code_lines, method_lines

    assert 40 <= method_lines(CHAPTER) <= 60, f"the method cells hold {method_lines(CHAPTER)} lines of code"
    assert method_lines(CHAPTER.name) == method_lines(CHAPTER)  # as the page calls it, from book/ or not
    text = CHAPTER.read_text()
    assert "{glue:text}`method_lines`" in text and 'glue("method_lines", method_lines(' in text
    assert not re.search(r"under \d+ lines", text)  # the count is glued, never written by hand
    assert code_lines('import os\n\ndef f():\n    """Doc."""\n    return 1  # one\n') == 2


def test_page_graph_is_hada_model_graph(page):
    """Same edges with the same weights as hada.model.graph, for images (equal counts) and ragged captions."""
    assert (page["W_FC"], page["W_FCX"], page["W_CC"], page["W_SELF"]) == \
        tuple(getattr(EdgeWeights(), f) for f in ("w_fc", "w_fcx", "w_cc", "w_self"))
    for counts in [(4, 4), (1, 3), (3, 1, 2)]:
        edges, weights = page["sample_graph"](counts)
        ref_edges, ref_weights, _ = build_edges(counts, EdgeWeights())
        ours = sorted(zip(edges[0].tolist(), edges[1].tolist(), [round(w, 6) for w in weights.tolist()]))
        ref = sorted(zip(ref_edges[0].tolist(), ref_edges[1].tolist(), [round(w, 6) for w in ref_weights.tolist()]))
        assert ours == ref, counts


@pytest.mark.parametrize("k,heads", [(2, 4), (2, 1), (3, 2)])
def test_page_encoders_equal_hada_model_on_pyg_and_dense(page, k, heads):
    data = _data(k, seed=k + heads)
    ours, theirs = _pair(page, data, heads)
    rows = page["differences"](ours, theirs, data)  # asserts every row close to 1e-5
    assert [(r["name"], r["modality"]) for r in rows] == [(b, m) for b in ("pyg", "dense")
                                                         for m in ("images", "captions")]
    assert [r["rows"] for r in rows[:2]] == [data.n_images, data.n_captions]


def test_page_trains_and_stays_equal(page):
    """A few steps of the page's loop: finite losses, tau and w in range and moved, and still equal to hada."""
    data = _data(2, seed=5)
    ours, theirs = _pair(page, data, heads=2)
    itc = page["ITC"]()
    optimiser = torch.optim.AdamW([*ours.parameters(), *itc.parameters()], lr=1e-2)
    before = [p.detach().clone() for p in ours.parameters()]
    rng = np.random.default_rng(0)
    losses = [page["train_epoch"](ours, itc, optimiser, PairLoader(data, batch_size=8, rng=rng)) for _ in range(3)]
    assert all(np.isfinite(losses)), losses
    tau, w = itc.tau.item(), itc.w.item()
    assert 0.001 <= tau <= 0.5 and 0.1 <= w <= 0.9
    assert (tau, w) != (pytest.approx(0.07), pytest.approx(0.5))
    assert all(not torch.equal(a, b) for a, b in zip(before, ours.parameters()))
    theirs.load_state_dict(page["to_hada"](ours.state_dict()))
    page["differences"](ours, theirs, data)


def test_page_loss_is_multi_positive(page):
    """Both captions of an image in the batch are its positives (targets 1/2 each), written out by hand."""
    itc = page["ITC"](tau=0.5, w=0.1)

    class Batch:
        def __init__(self, e):
            self.embeds = [e]

    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # captions 0 and 1 describe image 0
    ids = torch.tensor([0, 0, 1])
    loss = itc(z, z, Batch(3 * z), Batch(3 * z), ids)  # main cosines = HADA cosines, so w drops out: s = z z^T / tau
    # rows 0, 1: s = [2, 2, 0], targets [1/2, 1/2, 0]; row 2: s = [0, 0, 2], target [0, 0, 1]; t2i is the same
    row01 = -np.log(np.exp(2) / (2 * np.exp(2) + 1))
    row2 = -np.log(np.exp(2) / (np.exp(2) + 2))
    assert float(loss) == pytest.approx((2 * row01 + row2) / 3, abs=1e-5)
