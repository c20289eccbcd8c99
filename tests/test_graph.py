"""hada.model.graph: the paper's edge list, checked against hand-written lists, and vectorised batching."""

import pytest
import torch

from hada.model.graph import (EDGE_TYPES, EdgeWeights, batch_graphs, build_edges, edge_template, to_networkx)

W = EdgeWeights()  # paper values: w_fc 0.9, w_fcx 0.7, w_cc 1.1, no ffx, w_self 1.0, directed

# counts (3, 2): backbone 0 = nodes 0 (CLS), 1, 2; backbone 1 = nodes 3 (CLS), 4.
HAND_DIRECTED_3_2 = {
    (1, 0, "fc"), (2, 0, "fc"), (4, 3, "fc"),
    (1, 3, "fcx"), (2, 3, "fcx"), (4, 0, "fcx"),
    (0, 3, "cc"), (3, 0, "cc"),
    (0, 0, "self"), (1, 1, "self"), (2, 2, "self"), (3, 3, "self"), (4, 4, "self"),
}
WEIGHT = {"fc": 0.9, "fcx": 0.7, "cc": 1.1, "ffx": 0.5, "self": 1.0}


def as_set(edge_index, edge_weight, edge_type):
    edges = set()
    for (s, d), w, t in zip(edge_index.t().tolist(), edge_weight.tolist(), edge_type.tolist()):
        assert w == pytest.approx(WEIGHT[EDGE_TYPES[t]])
        edges.add((s, d, EDGE_TYPES[t]))
    assert len(edges) == edge_index.size(1), "duplicate edges"
    return edges


def test_published_graph_matches_hand_list():
    edge_index, edge_weight, edge_type = build_edges((3, 2), W)
    assert edge_index.dtype == torch.long and edge_type.dtype == torch.long
    assert edge_weight.dtype == torch.float32
    assert as_set(edge_index, edge_weight, edge_type) == HAND_DIRECTED_3_2


def test_undirected_and_ffx_options():
    undirected = as_set(*build_edges((3, 2), EdgeWeights(directed=False)))
    reversed_fc = {(d, s, t) for s, d, t in HAND_DIRECTED_3_2 if t in ("fc", "fcx")}
    assert undirected == HAND_DIRECTED_3_2 | reversed_fc

    ffx = as_set(*build_edges((3, 2), EdgeWeights(w_ffx=0.5)))
    assert ffx - HAND_DIRECTED_3_2 == {(1, 4, "ffx"), (2, 4, "ffx"), (4, 1, "ffx"), (4, 2, "ffx")}


def test_three_backbones_and_cls_only():
    edges = as_set(*build_edges((2, 1, 2), W))  # nodes: 0,1 | 2 | 3,4
    assert {(s, d) for s, d, t in edges if t == "cc"} == {(a, b) for a in (0, 2, 3) for b in (0, 2, 3) if a != b}
    assert {(s, d, t) for s, d, t in edges if s == 1} == {(1, 1, "self"), (1, 0, "fc"), (1, 2, "fcx"),
                                                         (1, 3, "fcx")}
    # a feature node receives only its self loop in the published graph (what hada.model.fast relies on)
    assert {(s, d) for s, d, t in edges if d in (1, 4)} == {(1, 1), (4, 4)}


def test_bad_counts():
    with pytest.raises(ValueError):
        build_edges((), W)
    with pytest.raises(ValueError):
        build_edges((3, 0), W)


def test_one_backbone_is_its_cls_with_its_features_and_self_loops():
    from hada.model.graph import EDGE_TYPES

    edge_index, _, etype = build_edges((3,), W)
    src, dst = edge_index.tolist()
    kinds = [EDGE_TYPES[t] for t in etype.tolist()]
    assert sorted(set(kinds)) == ["fc", "self"]  # no other backbone: no fcx, cc or ffx edges
    assert sorted((s, d) for s, d, k in zip(src, dst, kinds) if k == "fc") == [(1, 0), (2, 0)]


@pytest.mark.parametrize("weights", [W, EdgeWeights(directed=False, w_ffx=0.5)])
def test_batch_equals_offset_concatenation(weights):
    lengths = [torch.tensor([3, 2, 3, 1]), torch.tensor([2, 2, 2, 4]), torch.tensor([1, 3, 1, 2])]
    g = batch_graphs(lengths, weights)
    counts = torch.stack(lengths, 1)
    parts, offset = [], 0
    for row in counts.tolist():
        ei, ew, et = build_edges(row, weights)
        parts.append((ei + offset, ew, et))
        offset += sum(row)
    assert torch.equal(g.edge_index, torch.cat([p[0] for p in parts], 1))
    assert torch.equal(g.edge_weight, torch.cat([p[1] for p in parts]))
    assert torch.equal(g.edge_type, torch.cat([p[2] for p in parts]))
    assert g.ptr.tolist() == [0, 6, 13, 19, 26]
    assert g.cls_index.tolist() == [[0, 3, 5], [6, 8, 10], [13, 16, 18], [19, 20, 24]]
    assert g.batch.tolist() == [b for b, n in enumerate(counts.sum(1).tolist()) for _ in range(n)]
    assert g.node_backbone[:6].tolist() == [0, 0, 0, 1, 1, 2]
    assert g.node_token[:6].tolist() == [0, 1, 2, 0, 1, 0]


def test_templates_are_cached():
    edge_template.cache_clear()
    batch_graphs([torch.tensor([3, 3, 3]), torch.tensor([2, 2, 1])], W)
    info = edge_template.cache_info()
    assert info.misses == 2 and info.currsize == 2


def test_to_networkx():
    g = to_networkx((3, 2), W)
    assert g.number_of_nodes() == 5
    assert g.nodes[3] == {"backbone": 1, "token": 0, "is_cls": True}
    assert g.edges[4, 0] == {"type": "fcx", "weight": 0.7}
    assert {(s, d, a["type"]) for s, d, a in g.edges(data=True)} == HAND_DIRECTED_3_2
