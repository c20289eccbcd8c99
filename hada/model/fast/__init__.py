"""The fast CPU path of :class:`hada.model.encoder.HadaEncoder` on the published graph; one entry point,
:func:`encode_cls`.

Why it exists: in the published graph (directed, no feature-feature edges) edges send features only to the CLS
nodes, so a feature node receives only its own self loop and nothing reads its output after the last layer;
only the K CLS rows are read. :mod:`hada.model.fast.dense` computes just those on dense ``[batch, nodes, width]``
tensors (a one-layer model does not even project every node), and :mod:`hada.model.fast.kernels` fuses GATv2's
scores, softmax and messages into one numba kernel each way on CPU: many times cheaper than torch-geometric's
per-edge convolutions (``benchmarks/bench_train_step.py``).

How it is checked: ``tests/test_model.py`` compares outputs, attention and gradients with the torch-geometric
path of the same encoder (``backend="pyg"``, every node and edge of the full graph), for each GNN type, K,
layer and head count, with the fused kernels and with the PyTorch fallback.
"""

from __future__ import annotations

from torch import Tensor

from hada.model.fast.dense import DENSE_CONVS, MaterialisedNodes, ProjectedTokens, dense_layout


def encode_cls(encoder, tokens: list[Tensor], mask: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The CLS nodes after the encoder's last block, [B, K, width], and each layer's attention [B, K, H, N].

    ``encoder`` is a :class:`~hada.model.encoder.HadaEncoder` whose graph is the published one: its token maps
    ``proj``, convolutions ``convs`` and ``_block`` are used as they are (same parameters as its pyg path).
    ``tokens`` are the K backbones' padded tokens, ``mask`` [B, N] the valid nodes on the padded node axis.
    A one-layer model never materialises the projected nodes; deeper ones need them for the skip connection.
    """
    layout = dense_layout(tuple(t.shape[1] for t in tokens), encoder.edge_weights, tokens[0].device)
    nodes = ProjectedTokens(tokens, encoder.proj)
    conv_fn = DENSE_CONVS[encoder.config.gnn]
    x = nodes if len(encoder.convs) == 1 else MaterialisedNodes(nodes.project())
    attention = []
    for layer, conv in enumerate(encoder.convs):
        last = layer == len(encoder.convs) - 1
        out = conv_fn(conv, x, mask, layout, need_all=not last)
        attention.append(out.attention)
        if last:
            return encoder._block(layer, out.cls, x.cls(layout.cls_pos)), attention
        x = MaterialisedNodes(encoder._block(layer, out.all, x.x, mask))
    raise AssertionError("unreachable: an encoder has at least one layer")


__all__ = ["encode_cls"]
