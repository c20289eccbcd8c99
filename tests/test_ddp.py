"""DDP training on the CPU with gloo: 2 ranks x batch B train like 1 process x batch 2B.

Two processes are started with torch.multiprocessing.spawn and join a gloo process group through the same
env:// variables torchrun sets. Each builds its own toy features (an in-process monkeypatch does not cross
processes). The one-process reference runs in the test process.

Tolerances. With dropout 0 and no ITM, nothing random is drawn during training: each rank's queries score
against the all-gathered keys exactly as the global batch does in one process, DDP averages the gradients, so
the two runs differ only by float rounding (the matrix products run on other shapes, the all-reduce sums in
another order): measured, at most 2e-7 on the epoch losses and 4e-7 on any parameter or queue entry after
two epochs, so 1e-5 leaves a wide margin.
With ITM and dropout (0.3) the ranks draw their own hard negatives (from the local batch, as ALBEF) and
dropout masks, so the two runs are different samples of the same training, and what they may differ by is
measured against how much the training's randomness moves a result: one process with seeds 0-3 on these toy
features gave epoch-1 ITC losses 2.17-2.53 and val Rsums 398-451 (40 val images). We allow 0.15 and 20 points,
under half of those spreads; a wrong all-gather (a rank scoring only its own keys, a queue
missing a rank's keys) shows in the exact case above, which does not rely on this tolerance.
"""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import hada.train as ht
from fixtures.toy_features import toy_splits
from hada.config import TrainConfig
from hada.errors import HadaError
from hada.features.batching import FeatureData, PairLoader, compute_stats

SPLITS = {"train": 0, "val": 1, "test": 2}
B = 8  # per-rank batch; the one-process reference uses 2 * B
#: (name, overrides): exact (nothing random while training) and the paper's objective (ITM, dropout).
CASES = [("exact", dict(dropout=0.0, itm=False, distill=True)), ("full", dict())]


def toy_open(config, split):
    """The same toy features in every process, whatever the process (deterministic by split)."""
    return toy_splits(n_images=24 if split == "train" else 40, seed=SPLITS[split])[: len(config.data.backbones)]


def case_config(batch_size: int, **kw) -> TrainConfig:
    base = dict(backbones=["toy0", "toy1"], width=16, out_dim=16, heads=2, head_dim=32, precision="fp32",
                epochs=2, lr=1e-3, queue_size=32, eval_batch_size=64, pairs_per_epoch=59)  # 3 x 16 + 6/5 pairs
    return TrainConfig().override(**{**base, **kw, "batch_size": batch_size})


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), HADA_DATA=str(Path(root) / "data"), HADA_NO_PROGRESS="1")
    ht.open_splits = toy_open
    for name, options in CASES:
        result = ht.train(case_config(B, **options), Path(root) / f"ddp-{name}")
        assert result is not None and result.run_dir.name == f"ddp-{name}"  # every rank gets the result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both cases trained by 2 ranks x B (spawned) and by 1 process x 2B (here)."""
    root = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    mp = pytest.MonkeyPatch()
    mp.setattr(ht, "open_splits", toy_open)
    mp.setenv("HADA_DATA", str(root / "data"))
    mp.setenv("HADA_NO_PROGRESS", "1")
    try:
        for name, options in CASES:
            ht.train(case_config(2 * B, **options), root / f"one-{name}")
    finally:
        mp.undo()
    return root


def _load(run_dir: Path):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    return ckpt["model"], json.loads((run_dir / "history.json").read_text()), \
        json.loads((run_dir / "metrics.json").read_text())


def test_two_ranks_equal_one_process_with_the_global_batch(runs):
    model2, hist2, metrics2 = _load(runs / "ddp-exact")
    model1, hist1, metrics1 = _load(runs / "one-exact")
    assert [h["pairs"] for h in hist2] == [h["pairs"] for h in hist1] == [59, 59]  # both ranks' pairs counted
    for a, b in zip(hist2, hist1):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["tau"] == pytest.approx(b["tau"], abs=1e-5)
    assert model2.keys() == model1.keys()
    for key in model1:
        assert torch.allclose(model2[key].float(), model1[key].float(), atol=1e-5), key
    # the queue got every rank's keys, in the global batch's order (also with a 6/5 split last batch)
    assert torch.equal(model2["queue.ids"], model1["queue.ids"])
    assert abs(metrics2["val"]["rsum"] - metrics1["val"]["rsum"]) <= 1.0
    assert abs(metrics2["test"]["rsum"] - metrics1["test"]["rsum"]) <= 1.0


def test_two_ranks_with_itm_and_dropout_train_alike(runs):
    _, hist2, metrics2 = _load(runs / "ddp-full")
    _, hist1, metrics1 = _load(runs / "one-full")
    assert hist2[0]["loss_itc"] == pytest.approx(hist1[0]["loss_itc"], abs=0.15)
    assert abs(metrics2["val"]["rsum"] - metrics1["val"]["rsum"]) <= 20.0
    assert {p.name for p in (runs / "ddp-full").iterdir()} == {p.name for p in (runs / "one-full").iterdir()}


def test_resume_needs_the_same_number_of_ranks(runs, monkeypatch):
    monkeypatch.setattr(ht, "open_splits", toy_open)
    monkeypatch.setenv("HADA_NO_PROGRESS", "1")
    with pytest.raises(HadaError, match="2 process"):
        ht.train(case_config(B, **CASES[0][1]), runs / "ddp-exact")


def test_pair_loader_shards_each_global_batch():
    splits = toy_splits(n_images=10, seed=0)
    data = FeatureData(splits, compute_stats(splits))  # 25 captions
    one = [idx for _, _, idx in PairLoader(data, 6, rng=np.random.default_rng(3))]
    ranks = [[idx for _, _, idx in PairLoader(data, 3, rng=np.random.default_rng(3), rank=r, world_size=2)]
             for r in (0, 1)]
    assert len(one) == 5 and len(ranks[0]) == len(ranks[1]) == 4  # the last global batch, 1 pair for 2 ranks: skipped
    for b in range(4):  # rank 0's rows then rank 1's = the one-process batch
        assert torch.equal(torch.cat([ranks[0][b], ranks[1][b]]), one[b])
    three = [[len(idx) for _, _, idx in PairLoader(data, 3, rng=np.random.default_rng(3), rank=r, world_size=3)]
             for r in range(3)]
    assert three == [[3, 3, 3], [3, 3, 2], [3, 3, 2]]  # 25 = 2 x 9 + 7, the 7 split 3/2/2
    with pytest.raises(HadaError):
        PairLoader(data, 3, rank=2, world_size=2)


class _WithBuffer(torch.nn.Module):
    def __init__(self, rank: int):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.register_buffer("queue", torch.full((4,), float(rank)))

    def forward(self, x):
        return self.lin(x).sum() + 0 * self.queue.sum()


def _buffers_worker(rank: int, world: int, port: int, new_api: bool, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method="env://")
    try:
        ht._ddp_has_forward_sync_buffers = lambda: new_api
        model = ht._data_parallel(_WithBuffer(rank))
        synced = model.module.queue.tolist()  # rank 0's, on every rank
        model.module.queue.fill_(10.0 + rank)  # each rank's own from here on (as the queue's equal updates)
        model(torch.ones(5, 3)).backward()
        Path(out, f"{rank}.json").write_text(json.dumps({"synced": synced, "after": model.module.queue.tolist()}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("new_api", [True, False], ids=["forward_sync_buffers", "torch-2.11"])
def test_buffers_synced_once_at_the_start_with_or_without_forward_sync_buffers(tmp_path, new_api):
    """torch 2.11's DDP has no ``forward_sync_buffers``: the wrap then broadcasts the buffers itself, once, and
    no forward broadcasts them again, as with the keyword on newer torch."""
    if new_api and "forward_sync_buffers" not in __import__("inspect").signature(
            torch.nn.parallel.DistributedDataParallel.__init__).parameters:
        pytest.skip("this torch's DDP has no forward_sync_buffers")
    torch.multiprocessing.spawn(_buffers_worker, args=(2, _free_port(), new_api, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got == {"synced": [0.0] * 4, "after": [10.0 + rank] * 4}
