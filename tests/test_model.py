"""hada.model.encoder and hada.model.fast: the dense backend equals torch_geometric's convolutions on the full
graph, the parameter count matches the paper's formula, and bad input ends in a HadaError."""

import itertools

import pytest
import torch

from hada.errors import HadaError
from hada.config import EdgeWeights, ModelConfig
import hada.model.fast.dense
from hada.model.fast.dense import DenseLayout, GatV2ClsAttention, GatV2ClsScores, ValidRows
from hada.model.encoder import FeatureDims, HadaEncoder, HadaPair, ModalityBatch, count_parameters

TOKEN_DIMS = (12, 10, 8)
EMBED_DIMS = (6, 5, 7)
SIZES = (6, 4, 3)  # padded node counts per backbone


def rand_batch(k: int, batch: int = 5, seed: int = 0, ragged: bool = True) -> ModalityBatch:
    """Random ragged batch, zero-padded like the feature store; sample 0 keeps every token, sample 1 only CLS."""
    g = torch.Generator().manual_seed(seed)
    tokens, lengths, embeds = [], [], []
    for n, d, e in zip(SIZES[:k], TOKEN_DIMS[:k], EMBED_DIMS[:k]):
        length = torch.randint(1, n + 1, (batch,), generator=g) if ragged else torch.full((batch,), n)
        length[0], length[1] = n, (1 if ragged else n)
        valid = torch.arange(n)[None, :, None] < length[:, None, None]
        tokens.append(torch.randn(batch, n, d, generator=g) * valid)
        lengths.append(length)
        embeds.append(torch.randn(batch, e, generator=g))
    return ModalityBatch(tokens, lengths, embeds)


def small_config(k: int, **kw) -> tuple[ModelConfig, FeatureDims]:
    """A small model for K backbones: its ModelConfig (edge weights by their own names) and its input widths."""
    edges = EdgeWeights(**{name: kw.pop(name) for name in ("w_fc", "w_fcx", "w_cc", "w_ffx", "w_self", "directed")
                           if name in kw})
    model = ModelConfig(**{"width": 16, "out_dim": 8, "dropout": 0.0, **kw}, edges=edges)
    return model, FeatureDims.same(TOKEN_DIMS[:k], EMBED_DIMS[:k])


@pytest.mark.parametrize("gnn,k,layers,heads",
                         list(itertools.product(["gatv2", "gcn", "transformer"], [2, 3], [1, 2], [1, 4])))
def test_dense_equals_pyg(gnn, k, layers, heads):
    torch.manual_seed(0)
    model = HadaEncoder(*small_config(k, gnn=gnn, layers=layers, heads=heads)).eval()
    batch = rand_batch(k)
    dense, att_dense = model(batch, return_attention=True, backend="dense")
    pyg, att_pyg = model(batch, return_attention=True, backend="pyg")
    assert dense.shape == (5, 8)
    torch.testing.assert_close(dense, pyg, atol=1e-5, rtol=1e-5)
    assert len(att_dense["attention"]) == layers
    for a, b in zip(att_dense["attention"], att_pyg["attention"]):
        assert a.shape == (5, k, 1 if gnn == "gcn" else heads, sum(SIZES[:k]))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def assert_dense_gradients_equal_pyg(model: HadaEncoder, batch: ModalityBatch) -> None:
    grads = {}
    for backend in ("dense", "pyg"):
        model.zero_grad()
        model(batch, backend=backend).pow(3).sum().backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["dense"].items():
        torch.testing.assert_close(g, grads["pyg"][name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("gnn,layers", list(itertools.product(["gatv2", "gcn", "transformer"], [1, 2])))
def test_dense_gradients_equal_pyg(gnn, layers):
    """One layer: the projected nodes are never materialised (hada.model.fast.dense.ProjectedTokens); two: they are."""
    torch.manual_seed(1)
    model = HadaEncoder(*small_config(3, gnn=gnn, layers=layers, heads=2))
    assert_dense_gradients_equal_pyg(model, rand_batch(3, seed=1))


#: The implementations of GATv2 at the CLS nodes: numba's fused kernels (GatV2ClsAttention, the CPU path) and
#: PyTorch ops (GatV2ClsScores + softmax + einsum, the path on other devices) with score tiles that split
#: blocks (24) or not.
SCORE_KERNELS = {"fused": (True, 1 << 18), "tiled-small": (False, 24), "tiled": (False, 1 << 18)}


def use_score_kernel(monkeypatch, kernel: str) -> None:
    fused, chunk = SCORE_KERNELS[kernel]
    monkeypatch.setattr(hada.model.fast.dense, "FUSED_CPU_ATTENTION", fused)
    monkeypatch.setattr(hada.model.fast.dense, "GATV2_CHUNK_ELEMENTS", chunk)


def plain_gatv2_attention(q, q_cls, xl, att, mask, blocks, slope=0.2):
    """The formula, written out: (messages [B, K, H*C], alpha [B, K, N, H])."""
    B, K, N, (H, C) = q.shape[0], q.shape[1], xl.shape[1], att.shape
    src = torch.stack([(q_cls if n == lo else q)[:, :, m] for m, (lo, hi) in enumerate(blocks)
                       for n in range(lo, hi)], 2)  # [B, K, N, H*C]
    z = torch.nn.functional.leaky_relu(src + xl.unsqueeze(1), slope).view(B, K, N, H, C)
    score = (z * att).sum(-1).masked_fill(~mask[:, None, :, None], float("-inf"))
    alpha = torch.softmax(score, dim=2)
    return torch.einsum("bknh,bnhc->bkhc", alpha, xl.view(B, N, H, C)).reshape(B, K, H * C), alpha


def attention_inputs(dtype=torch.float64, B=3, K=2, H=2, C=3, sizes=(3, 2), seed=0):
    """Random q, q_cls, xl, att; a mask with padding in both blocks (CLS nodes valid); the node layout."""
    g = torch.Generator().manual_seed(seed)
    layout = DenseLayout.build(list(sizes), EdgeWeights(), "cpu")
    N = sum(sizes)
    tensors = [torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
               for shape in [(B, K, len(sizes), H * C), (B, K, len(sizes), H * C), (B, N, H * C), (H, C)]]
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 1:3] = mask[2, N - 1] = False
    return tensors, mask, layout


@pytest.mark.parametrize("kernel", ["tiled-small", "tiled"])
def test_gatv2_score_function_gradcheck(monkeypatch, kernel):
    """The tiled GATv2 scores against autograd's numerical gradient and the plain formula."""
    use_score_kernel(monkeypatch, kernel)
    (q, q_cls, xl, att), mask, layout = attention_inputs()
    blocks = layout.blocks
    fn = lambda q, q_cls, xl, att: GatV2ClsScores.apply(q, q_cls, xl, att, blocks, 0.2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, q_cls, xl, att))
    all_valid = torch.ones_like(mask)
    _, alpha = plain_gatv2_attention(q, q_cls, xl, att, all_valid, blocks)
    torch.testing.assert_close(torch.softmax(fn(q, q_cls, xl, att), dim=2), alpha)


def fused_attention(mask, layout, att, slope=0.2, in_place=False):
    """GatV2ClsAttention as a function of a padded xl (packed into the valid rows the kernels read, or read in
    place) and, optionally, the per-block bias the kernels add to those rows (zero by default)."""
    rows = (ValidRows.padded if in_place else ValidRows.build)(mask, layout)
    zero = torch.zeros(len(layout.blocks), att.numel(), dtype=att.dtype)

    def fn(q, q_cls, xl, att, bias=zero):
        return GatV2ClsAttention.apply(q, q_cls, bias, att, rows, slope, None, *rows.pack(xl))
    return fn


@pytest.mark.parametrize("in_place", [False, True])
def test_fused_gatv2_attention_gradcheck_and_formula(in_place):
    """The fused kernels, on packed rows or reading the padded xl in place: messages and alpha against the
    formula with padding, and both outputs' gradients against autograd's numerical ones."""
    (q, q_cls, xl, att), mask, layout = attention_inputs()
    fn = fused_attention(mask, layout, att, in_place=in_place)
    assert torch.autograd.gradcheck(fn, (q, q_cls, xl, att))
    for got, want in zip(fn(q, q_cls, xl, att), plain_gatv2_attention(q, q_cls, xl, att, mask, layout.blocks)):
        torch.testing.assert_close(got, want)
    assert (fn(q, q_cls, xl, att)[1][~mask[:, None, :].expand(-1, 2, -1)] == 0).all()


def test_fused_gatv2_attention_adds_each_blocks_bias():
    """The kernels add block m's bias to its rows (xl = x W_l without bias): same outputs as the formula on
    xl + bias, and the bias's gradient (through the scores and the messages) matches the numerical one."""
    (q, q_cls, xl, att), mask, layout = attention_inputs(K=3, sizes=(3, 2, 4), seed=2)
    bias = torch.randn(3, att.numel(), dtype=att.dtype, requires_grad=True)
    fn = fused_attention(mask, layout, att)
    assert torch.autograd.gradcheck(fn, (q, q_cls, xl, att, bias))
    with_bias = xl + bias[layout.node_backbone]
    for got, want in zip(fn(q, q_cls, xl, att, bias), plain_gatv2_attention(q, q_cls, with_bias, att, mask,
                                                                             layout.blocks)):
        torch.testing.assert_close(got, want)


def test_fused_kernels_start_no_thread_pool():
    """numba's parallel pool (OpenMP) spins beside torch's threads: two training processes on 2 cores, as
    `hada prepare` runs them, then took 10x longer per step. The kernels must stay single-threaded."""
    import numba.np.ufunc.parallel as numba_parallel

    (q, q_cls, xl, att), mask, layout = attention_inputs()
    out, alpha = fused_attention(mask, layout, att)(q, q_cls, xl, att)
    (out.sum() + alpha.sum()).backward()
    assert not numba_parallel._is_initialized


def test_fused_and_torch_attention_agree_in_float32(monkeypatch):
    """At K=3 with 4 heads, in float32: the fused kernels and the PyTorch path give the same dense GATv2
    outputs and parameter gradients."""
    torch.manual_seed(0)
    model = HadaEncoder(*small_config(3, heads=4))
    batch = rand_batch(3, batch=6)
    results = {}
    for kernel in ("fused", "tiled-small"):
        use_score_kernel(monkeypatch, kernel)
        model.zero_grad()
        out = model(batch, backend="dense")
        out.pow(3).sum().backward()
        results[kernel] = (out, *(p.grad.clone() for p in model.parameters()))
    for a, b in zip(results["fused"], results["tiled-small"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["fused", "tiled-small"])
def test_dense_equals_pyg_with_each_score_kernel(monkeypatch, kernel):
    use_score_kernel(monkeypatch, kernel)
    torch.manual_seed(0)
    model = HadaEncoder(*small_config(3, heads=2, layers=2)).eval()
    batch = rand_batch(3)
    torch.testing.assert_close(model(batch, backend="dense"), model(batch, backend="pyg"), atol=1e-5, rtol=1e-5)


class SharedDropout:
    """One attention-dropout mask for both backends. Per layer it draws, from a seeded generator, the weights of
    the coefficients at the CLS nodes [B, K, N, H] and of every node's self loop [B, N, H] (0 or 1 / (1 - p));
    the dense backend reads them through ``attention_dropout``, and torch_geometric's ``F.dropout`` inside its
    convolutions gets the same weight for each edge of the batched graph (edges into a CLS node from the
    first, a feature node's self loop from the second)."""

    def __init__(self, model: HadaEncoder, batch: ModalityBatch, p: float, seed: int = 0):
        from hada.model.graph import batch_graphs, padded_nodes

        self.p, self.g = p, torch.Generator().manual_seed(seed)
        self.B, self.K = batch.batch_size, batch.num_backbones
        self.N = sum(t.shape[1] for t in batch.tokens)
        self.H = model.convs[0].heads
        self.layers = [self._draw(self.B, self.K, self.N, self.H) for _ in model.convs]
        graph = batch_graphs(batch.lengths, model.edge_weights)
        cls_pos, _, _ = padded_nodes(tuple(t.shape[1] for t in batch.tokens), "cpu")
        src, dst = graph.edge_index
        self.to_cls = graph.node_token[dst] == 0
        self.b = graph.batch[dst]
        self.k = graph.node_backbone[dst]
        self.src_pos = cls_pos[graph.node_backbone[src]] + graph.node_token[src]
        self.dst_pos = cls_pos[graph.node_backbone[dst]] + graph.node_token[dst]
        assert torch.equal(src[~self.to_cls], dst[~self.to_cls])  # a feature node's only edge: its self loop
        self.reset()

    def _draw(self, *shape):
        keep = torch.rand(*shape, generator=self.g) >= self.p
        return keep.float() / (1 - self.p), keep[:, 0].float() / (1 - self.p)  # [B, K, N, H], [B, N, H]

    def dense(self, shape, p, device):
        """The CLS nodes' weights of the next layer [B, K, N, H], or (asked by a layer a later one reads) its
        self loops' [B, N, H]."""
        assert p == self.p
        kind = "cls" if len(shape) == 4 else "self"
        layer = self.calls[kind]
        self.calls[kind] += 1
        return self.layers[layer][0 if kind == "cls" else 1]

    def edge_weights(self, layer: int) -> torch.Tensor:
        """[E, H] weight of each edge of the batched graph, in its order."""
        cls, self_loops = self.layers[layer]
        return torch.where(self.to_cls.unsqueeze(-1), cls[self.b, self.k, self.src_pos],
                           self_loops[self.b, self.dst_pos])

    def pyg(self, alpha, p=0.5, training=True):
        assert training and p == self.p
        weights = self.edge_weights(self.calls["pyg"])
        self.calls["pyg"] += 1
        return alpha * weights.to(alpha.dtype)

    def patch(self, monkeypatch):
        import types

        import torch.nn.functional as F
        import torch_geometric.nn.conv.gatv2_conv as gatv2_conv
        import torch_geometric.nn.conv.transformer_conv as transformer_conv

        functional = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
        functional.dropout = self.pyg
        for module in (gatv2_conv, transformer_conv):
            monkeypatch.setattr(module, "F", functional)
        monkeypatch.setattr(hada.model.fast.dense, "attention_dropout", self.dense)

    def reset(self):
        self.calls = {"cls": 0, "self": 0, "pyg": 0}


@pytest.mark.parametrize("gnn,layers,kernel", [("gatv2", 1, "fused"), ("gatv2", 2, "fused"),
                                               ("gatv2", 1, "tiled-small"), ("gatv2", 2, "tiled-small"),
                                               ("transformer", 1, "fused"), ("transformer", 2, "fused")])
def test_attention_dropout_dense_equals_pyg_under_one_mask(monkeypatch, gnn, layers, kernel):
    """Attention dropout (the published recipe's 0.7) on the dense backend, in the fused numba kernels and in the
    tiled PyTorch ops, equals torch_geometric's convolutions given the same dropout mask: outputs, attention
    (the dense backend returns alpha before dropout) and every parameter's gradient, in training mode."""
    use_score_kernel(monkeypatch, kernel)
    torch.manual_seed(3)
    model = HadaEncoder(*small_config(3, gnn=gnn, layers=layers, heads=2, attention_dropout=0.7)).train()
    batch = rand_batch(3, seed=3)
    shared = SharedDropout(model, batch, 0.7)
    shared.patch(monkeypatch)
    results = {}
    for backend in ("dense", "pyg"):
        shared.reset()
        model.zero_grad()
        out, info = model(batch, return_attention=True, backend=backend)
        out.pow(3).sum().backward()
        results[backend] = (out, info["attention"], {n: p.grad.clone() for n, p in model.named_parameters()})
        used = {"cls": layers, "self": layers - 1, "pyg": 0} if backend == "dense" else \
            {"cls": 0, "self": 0, "pyg": layers}
        assert shared.calls == used  # every layer's mask, once
    dense, pyg = results["dense"], results["pyg"]
    torch.testing.assert_close(dense[0], pyg[0], atol=1e-5, rtol=1e-5)
    for (cls_drop, _), a, b in zip(shared.layers, dense[1], pyg[1]):
        if gnn == "gatv2":  # GATv2Conv returns its coefficients after dropout, TransformerConv before
            a = a * cls_drop.permute(0, 1, 3, 2)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for name, g in dense[2].items():
        torch.testing.assert_close(g, pyg[2][name], atol=1e-5, rtol=1e-4, msg=name)
    # the mask matters: without it (eval mode) the output differs
    assert not torch.allclose(model.eval()(batch, backend="dense"), dense[0], atol=1e-3)


def test_fused_attention_dropout_gradcheck_and_formula():
    """The fused kernels with a dropout mask: messages = (alpha * drop) . xl, alpha before dropout, and both
    outputs' gradients against autograd's numerical ones (the mask held fixed)."""
    (q, q_cls, xl, att), mask, layout = attention_inputs()
    rows = ValidRows.build(mask, layout)
    B, K, N, H = q.shape[0], q.shape[1], xl.shape[1], att.shape[0]
    g = torch.Generator().manual_seed(5)
    drop = (torch.rand(B, K, N, H, generator=g, dtype=torch.float64) > 0.5).double() * 2
    zero = torch.zeros(len(layout.blocks), att.numel(), dtype=att.dtype)

    def fn(q, q_cls, xl, att):
        return GatV2ClsAttention.apply(q, q_cls, zero, att, rows, 0.2, drop, *rows.pack(xl))
    assert torch.autograd.gradcheck(fn, (q, q_cls, xl, att))
    _, alpha = plain_gatv2_attention(q, q_cls, xl, att, mask, layout.blocks)
    out, got_alpha = fn(q, q_cls, xl, att)
    torch.testing.assert_close(got_alpha, alpha)
    want = torch.einsum("bknh,bnhc->bkhc", alpha * drop, xl.view(B, N, H, -1)).reshape(B, K, -1)
    torch.testing.assert_close(out, want)


def test_attention_is_a_distribution_over_valid_nodes():
    torch.manual_seed(0)
    model = HadaEncoder(*small_config(2)).eval()
    batch = rand_batch(2)
    _, info = model(batch, return_attention=True)
    att, mask = info["attention"][0], info["node_mask"]
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:3]))
    assert (att.permute(0, 1, 3, 2)[~mask[:, None].expand(-1, 2, -1)] == 0).all()
    assert info["node_backbone"].tolist() == [0] * 6 + [1] * 4
    assert info["node_token"].tolist() == list(range(6)) + list(range(4))
    assert mask[1].tolist() == [True] + [False] * 5 + [True] + [False] * 3  # sample 1: CLS tokens only


def test_pyg_backend_uses_hand_set_self_loop_weight():
    """The public code's GATv2 replaced self-loop weights with its fill value; ours must not."""
    torch.manual_seed(0)
    batch = rand_batch(2)
    outs = []
    for w_self in (1.0, 3.0):
        torch.manual_seed(0)
        model = HadaEncoder(*small_config(2, w_self=w_self, backend="pyg")).eval()
        assert all(not conv.add_self_loops for conv in model.convs)
        outs.append(model(batch))
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("options", [dict(directed=False), dict(w_ffx=0.5)])
def test_general_edge_options_run_on_pyg(options):
    torch.manual_seed(0)
    cfg, dims = small_config(2, **options)
    assert cfg.resolve_backend() == "pyg"
    model = HadaEncoder(cfg, dims).eval()
    out = model(rand_batch(2))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    with pytest.raises(HadaError):
        model(rand_batch(2), backend="dense")
    with pytest.raises(HadaError):
        small_config(2, backend="dense", **options)


def test_inference_mode_then_training():
    """Cached layouts built under inference_mode must still work in a later training step."""
    torch.manual_seed(0)
    model = HadaEncoder(*small_config(2))
    batch = rand_batch(2)
    batch.tokens = [torch.randn(5, 7, 12), torch.randn(5, 9, 10)]  # padded sizes no other test uses
    batch.lengths = [torch.full((5,), 7), torch.full((5,), 9)]
    with torch.inference_mode():
        model(batch)
    model(batch).sum().backward()
    assert model.readout.weight.grad is not None


def test_auto_picks_dense_for_published_graph():
    assert small_config(2)[0].resolve_backend() == "dense"


def paper_count(cfg: ModelConfig, dims: FeatureDims) -> int:
    """The paper's trainable parameters from the formula (9,986,048 for the two encoders), for gatv2."""
    W, H, O = cfg.width, cfg.heads, cfg.out_dim
    total = 0
    for modality in ("image", "text"):
        token_dims, embed_dims = dims.of(modality)
        total += sum(d * W + W for d in token_dims)  # per-backbone linear maps
        total += 2 * (W * H * W + H * W)  # GATv2 lin_l, lin_r (with bias)
        total += H * W  # att
        total += 1 * H * W  # lin_edge (edge_dim 1, no bias)
        total += H * W  # conv bias
        total += H * W * W + W  # heads -> width linear
        total += (len(token_dims) * W + sum(embed_dims)) * O + O  # readout linear
    return total


def test_paper_parameter_count():
    cfg, dims = ModelConfig(), FeatureDims.paper()  # the defaults are the paper's shape
    pair = HadaPair(cfg, dims)
    assert count_parameters(pair) == sum(p.numel() for p in pair.parameters()) == paper_count(cfg, dims)
    assert paper_count(cfg, dims) == 9_986_048  # "about 10.0M"


def test_per_modality_dims_and_pair():
    torch.manual_seed(0)
    dims = FeatureDims(image_token_dims=(12, 10), text_token_dims=(8, 6), image_embed_dims=(6, 5),
                       text_embed_dims=(6, 5))
    pair = HadaPair(ModelConfig(width=16, out_dim=8, dropout=0.0), dims).eval()
    images = rand_batch(2, ragged=False)
    texts = rand_batch(2, seed=3)
    texts.tokens = [texts.tokens[0][..., :8], texts.tokens[1][..., :6]]
    img, txt = pair(images, texts)
    assert img.shape == txt.shape == (5, 8)
    with pytest.raises(HadaError, match="tokens of backbone 0"):
        pair.text(images)


def test_config_json_roundtrip():
    import dataclasses
    import json

    cfg = ModelConfig(gnn="gcn", edges=EdgeWeights(w_ffx=0.5))
    assert ModelConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    dims = FeatureDims((12, 10), (8, 6), (6, 5), (6, 5))
    again = FeatureDims(**json.loads(json.dumps(dims.to_dict())))
    assert again == dims and again.text_token_dims == (8, 6)


@pytest.mark.parametrize("gnn", ["gatv2", "gcn"])
def test_one_backbone_is_a_graph_of_its_own_tokens_on_both_paths(gnn):
    """K=1 (the reference of "When does fusion help?"): the CLS node and its feature nodes, no cross edges."""
    model = HadaEncoder(*small_config(1, gnn=gnn)).eval()
    batch = rand_batch(1)
    with torch.no_grad():
        dense, pyg = model(batch, backend="dense"), model(batch, backend="pyg")
    assert dense.shape == (5, 8) and torch.allclose(dense, pyg, atol=1e-5)


def test_bad_lengths():
    model = HadaEncoder(*small_config(2))
    batch = rand_batch(2)
    batch.lengths[1] = batch.lengths[1].clone()
    batch.lengths[1][2] = 0
    with pytest.raises(HadaError, match="lengths of backbone 1"):
        model(batch)


@pytest.mark.parametrize("make", [lambda: FeatureDims.same((), ()), lambda: ModelConfig(gnn="gin"),
                                  lambda: FeatureDims.same((4, 4), (4, 4, 4)), lambda: ModelConfig(width=0)])
def test_bad_configs(make):
    with pytest.raises(HadaError):
        make()


@pytest.mark.parametrize("gnn", ["gatv2", "transformer"])
def test_head_dim_dense_equals_pyg(gnn):
    """head_dim sets the channels per head (default: width, the paper's); both backends agree."""
    torch.manual_seed(0)
    model = HadaEncoder(*small_config(3, gnn=gnn, heads=4, head_dim=3, layers=2)).eval()
    assert model.convs[0].out_channels == 3 and model.post[0].in_features == 12
    assert HadaEncoder(*small_config(2, heads=4)).post[0].in_features == 4 * 16  # None: heads x width
    batch = rand_batch(3)
    dense, att_dense = model(batch, return_attention=True, backend="dense")
    pyg, att_pyg = model(batch, return_attention=True, backend="pyg")
    torch.testing.assert_close(dense, pyg, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(att_dense["attention"][-1], att_pyg["attention"][-1], atol=1e-5, rtol=1e-5)
    with pytest.raises(HadaError):
        small_config(2, head_dim=0)


@pytest.mark.parametrize("gnn,backend", [("gatv2", "dense"), ("gcn", "dense"), ("transformer", "dense"),
                                         ("gatv2", "pyg")])
def test_bf16_precision_close_to_fp32(gnn, backend):
    """bf16 autocast: float32, L2-normalised outputs within bf16 rounding of fp32's; gradients reach every
    parameter; attention stays a float32 distribution."""
    outs, grads = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = HadaEncoder(*small_config(3, gnn=gnn, heads=2, layers=2, precision=precision, backend=backend))
        model.eval()
        out, info = model(rand_batch(3), return_attention=True)
        assert out.dtype == torch.float32 and info["attention"][0].dtype == torch.float32
        out.pow(3).sum().backward()
        outs[precision] = out.detach()
        grads[precision] = torch.cat([p.grad.flatten() for p in model.parameters()])
        if gnn != "gcn":  # GCN's "attention" is its normalised edge coefficients, not a distribution
            torch.testing.assert_close(info["attention"][-1].sum(-1), torch.ones(info["attention"][-1].shape[:3]))
    torch.testing.assert_close(outs["bf16"], outs["fp32"], atol=3e-2, rtol=0)
    assert not torch.equal(outs["bf16"], outs["fp32"])  # autocast was really on
    cos = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert cos > 0.99
    with pytest.raises(HadaError):
        small_config(2, precision="fp16")


@pytest.mark.parametrize("kernel", ["fused", "tiled", "tiled-40"])
def test_gatv2_scores_with_bfloat16_xl_match_the_widened_float32_ones(monkeypatch, kernel):
    """Under autocast xl arrives in bfloat16 and is widened (tile by tile in the tiled ops): outputs and
    gradients equal those of the float32 function on the widened xl, and xl's gradient comes back in bfloat16."""
    use_score_kernel(monkeypatch, kernel.split("-")[0])
    if kernel == "tiled-40":
        monkeypatch.setattr(hada.model.fast.dense, "GATV2_CHUNK_ELEMENTS", 40)
    (q, q_cls, xl, att), mask, layout = attention_inputs(torch.float32, H=2, C=4, sizes=(5, 3))
    xl16 = xl.detach().bfloat16()
    if kernel == "fused":
        fn = fused_attention(mask, layout, att)
    else:
        fn = lambda *t: (GatV2ClsScores.apply(*t, layout.blocks, 0.2),)  # noqa: E731
    results = []
    for x in (xl16, xl16.float()):
        inputs = [t.detach().clone().requires_grad_() for t in (q, q_cls, x, att)]
        outs = fn(*inputs)
        sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(1))).sum() for o in outs).backward()
        results.append((*outs, *(t.grad for t in inputs)))
    assert results[0][-2].dtype == torch.bfloat16
    for a, b in zip(results[0], results[1]):
        torch.testing.assert_close(a.float(), b.to(a.dtype).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("gnn", ["gatv2", "transformer"])
def test_dense_one_layer_with_and_without_folded_projection(monkeypatch, gnn, fold):
    """A one-layer dense model maps every node through lin(proj(t)) either as one product with the folded
    weight or as two; both equal torch_geometric, outputs and parameter gradients."""
    monkeypatch.setattr(hada.model.fast.dense, "_fold_is_cheaper", lambda *args: fold)
    torch.manual_seed(0)
    assert_dense_gradients_equal_pyg(HadaEncoder(*small_config(2, gnn=gnn, heads=2)), rand_batch(2))
