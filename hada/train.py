"""Training HADA (or the no-graph concatenation baseline) on stored features, resumable to the bit.

:func:`train` runs AdamW with cosine warm restarts (stepped once per epoch, or every iteration with the
fractional epoch), evaluates the validation Rsum after every epoch, keeps the best model (``best.pt``) and
stops early after ``patience`` epochs without an improvement of more than ``min_delta``. ``init_from`` starts
the model from a finished run's weights (:func:`warm_start`). After every epoch it writes ``checkpoint.pt`` atomically with everything the rest
of the run depends on: model, momentum encoders and queue (all in the objective's state dict),
optimiser, scheduler, the torch (and, on a GPU, CUDA) / numpy / python RNG states and the data-order
generator, the history, and the early-stopping state. Resuming from it gives exactly the run an uninterrupted
call gives, on the same device type.

The run's ``device`` (``TrainConfig.device``, resolved by :mod:`hada.devices`) holds the objective, the batches,
the queue and, when they fit, the stored features (:class:`hada.features.batching.FeatureData`); evaluation
embeds and ranks there too. On the CPU every number is what it was before devices existed.

A run folder holds ``config.json``, ``stats.json`` (train feature statistics), ``history.json`` (one
entry per epoch, for the book's curves), ``checkpoint.pt``, ``best.pt`` and, once finished,
``metrics.json`` (validation and test metrics of the best epoch).

**Many processes (DDP).** Launched by torchrun, the same call trains with DistributedDataParallel::

    torchrun --standalone --nproc_per_node N -m hada train --batch-size B ...   # one machine, N GPUs (or CPUs)

``batch_size`` is per process: the global batch is ``B x N`` and the ranks take contiguous slices of the very
batches one process with batch ``B x N`` would draw (:class:`~hada.features.batching.PairLoader`). The momentum
queue receives every rank's keys (:mod:`hada.losses`), so it is the same on every rank. Rank 0 validates, keeps
the best model and writes the run folder; the other ranks wait for it and then read its decisions (early
stopping). NCCL on CUDA, gloo on a CPU; without torchrun's environment nothing of this runs and the numbers are
those of a plain single process. A checkpoint records the number of ranks and resumes only with the same number.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from hada import distributed
from hada.config import TrainConfig
from hada.errors import HadaError
from hada.io import progress_enabled, read_json, torch_save, write_json


# ---------------------------------------------------------------------------------------- helpers
#: Torch threads of a training call when neither ``threads`` nor ``HADA_THREADS`` says otherwise.
DEFAULT_THREADS = 1


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The torch seed of one rank's training step under DDP: a function of the run's seed, the rank and the global
    step, so that ranks draw their own dropout masks and hard negatives, and a resumed run draws what an
    uninterrupted one did whatever RNG state its checkpoint holds."""
    import numpy as np

    return int(np.random.SeedSequence([seed % 2**32, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def _seed_step(run: "_Run", step: int) -> None:
    """Under DDP, reseed torch (CPU and CUDA) for this rank's step; one process keeps its one stream, so its
    numbers are those of every run before per-rank seeds."""
    if distributed.world_size() > 1:
        import torch

        torch.manual_seed(step_seed(run.config.seed, distributed.rank(), step))


def rng_state(order_rng, device=None) -> dict:
    """Every random state a run draws from; with a CUDA ``device`` also its generator (dropout and hard
    negatives draw there)."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, gauss = np.random.get_state()  # as plain values: loadable with weights_only=True
    state = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "python": random.getstate(),
             "order": order_rng.bit_generator.state}
    if device is not None and torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, order_rng, device=None) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    order_rng.bit_generator.state = state["order"]
    if "cuda" in state and device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def open_splits(config: TrainConfig, split: str) -> list:
    """The FeatureSplit of every backbone of the run for one split (memory-mapped)."""
    from hada.features.store import open_features

    return [open_features(config.data.dataset, b, split, data_root=config.data.data_root)
            for b in config.data.backbones]


def build_objective(config: TrainConfig, dims: dict, stats=None):
    """The trained pair wrapped in its loss. ``dims``: image/text token and embed dims per backbone; ``stats``
    (the train :class:`~hada.features.batching.FeatureStats`) standardise the readout's embeddings when the
    model says so (a loaded state dict carries them too)."""
    from hada.losses import HadaObjective
    from hada.model.encoder import FeatureDims

    dims = FeatureDims(**dims)
    model = config.model
    if model.arch == "hada":
        from hada.model.encoder import HadaPair

        pair = HadaPair(model, dims)
    else:
        from hada.baselines import ConcatPair

        pair = ConcatPair(dims.image_embed_dims, dims.text_embed_dims, model.out_dim, model.dropout)
    if dims.image_embed_dims[0] != dims.text_embed_dims[0]:
        raise HadaError("the main backbone's image and text embeddings have different widths; "
                        "its cosine similarity is undefined")
    objective = HadaObjective(pair, config.loss, model.out_dim, dims.image_embed_dims[0], init=model.init)
    if stats is not None:
        for p in (objective.pair, objective.pair_m):
            for modality in ("image", "text"):
                encoder = getattr(p, modality, None) if p is not None else None
                if hasattr(encoder, "set_embed_stats"):
                    encoder.set_embed_stats([(s.mean, s.std) for s in getattr(stats, modality)])
    return objective


def split_options(config: TrainConfig, split: str) -> dict:
    """FeatureData's options for one split of a run that do not depend on training: the test split's captions."""
    if split == config.data.test_split and split != config.data.train_split:
        return {"captions_per_image": config.data.test_captions_per_image}
    return {"captions_per_image": None}


def feature_dims(splits: list) -> dict:
    return {"image_token_dims": [int(s.image_tokens.shape[-1]) for s in splits],
            "text_token_dims": [int(s.text_tokens.shape[-1]) for s in splits],
            "image_embed_dims": [int(s.image_embeds.shape[-1]) for s in splits],
            "text_embed_dims": [int(s.text_embeds.shape[-1]) for s in splits]}


# --------------------------------------------------------------------------------- trained model
@dataclass
class TrainedModel:
    """A trained objective (pair + tau + w) with the train statistics its inputs need."""

    objective: object
    stats: object  # hada.features.batching.FeatureStats
    config: TrainConfig

    @property
    def pair(self):
        return self.objective.pair

    @property
    def device(self):
        return next(self.objective.parameters()).device

    @property
    def w(self) -> float:
        return self.objective.inference_weights()[1]

    def similarity(self, data):
        """Inference similarity on a split: ``(1 - w) cos_HADA + w cos_main`` as a SimilaritySource."""
        from hada.evaluate import embed_split
        from hada.metrics import EmbeddingSimilarity

        img, txt = embed_split(self.pair, data, self.config.data.eval_batch_size)
        w_hada, w_main = self.objective.inference_weights()
        main_img, main_txt = data.main_embeddings(0)
        return EmbeddingSimilarity([(w_hada, img, txt), (w_main, main_img, main_txt)])

    def evaluate(self, data) -> dict:
        from hada.metrics import metrics_from_ranks

        return metrics_from_ranks(*self.ranks(data))

    def ranks(self, data) -> tuple:
        """Per-query ranks on a split (image->text, text->image): what the recalls and the bootstrap are made of."""
        from hada.metrics import retrieval_ranks

        return retrieval_ranks(self.similarity(data), data.caption_image_index)

    def load_data(self, split: str):
        """FeatureData of one split, normalised with this run's train statistics."""
        from hada.features.batching import FeatureData

        return FeatureData(open_splits(self.config, split), self.stats, with_tokens=self.config.model.arch == "hada",
                           device=self.device, **split_options(self.config, split))


CHECKPOINT_KEYS = ("config", "dims", "stats", "model")
#: The best model's per-query test ranks, beside metrics.json: what its test recalls were computed from.
TEST_RANKS_FILE = "test_ranks.npz"


def load_checkpoint(path: Path, device, hint: str, keys: tuple[str, ...] = ()) -> dict:
    """A checkpoint read with ``weights_only=True`` (plain dicts, lists, numbers, strings and tensors: a file cannot
    run code), or one line saying it is damaged and ``hint``: a truncated or foreign file is never a traceback."""
    import torch

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, a pickle of something else
        raise HadaError(f"{path} is damaged or not a checkpoint ({type(exc).__name__}); {hint}") from None
    missing = [k for k in CHECKPOINT_KEYS + tuple(keys) if not isinstance(state, dict) or k not in state]
    if missing:
        raise HadaError(f"{path} is damaged or not a checkpoint (no {missing[0]!r}); {hint}")
    return state


def load_trained(run_dir: str | os.PathLike, which: str = "best", device="cpu") -> TrainedModel:
    """Rebuild a trained model from ``best.pt`` (or ``checkpoint.pt`` with ``which="last"``) on ``device`` (a
    ``torch.device`` or a name for :func:`hada.devices.resolve_device`); no features needed."""
    import torch

    from hada.devices import resolve_device
    from hada.features.batching import FeatureStats

    device = resolve_device(device) if isinstance(device, str) else device
    path = Path(run_dir) / ("best.pt" if which == "best" else "checkpoint.pt")
    if not path.exists():
        raise HadaError(f"no trained model at {path}; train it first (hada train)")
    state = load_checkpoint(path, device, f"the run in {path.parent} is damaged; delete that folder (or rerun "
                                          "`hada train` with --restart) to train it again")
    try:
        config = TrainConfig.from_dict(state["config"])
        objective = build_objective(config, state["dims"]).to(device)
        objective.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # tensors of another shape or name
        raise HadaError(f"{path} is damaged ({type(exc).__name__}); delete {path.parent} (or rerun `hada train` "
                        "with --restart) to train it again") from None
    objective.progress = state.get("progress", math.inf)  # the training stage the weights were saved in
    objective.eval()
    return TrainedModel(objective, FeatureStats.from_dict(state["stats"]), config)


# ----------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    val_metrics: dict
    test_metrics: dict
    best_epoch: int


def _evaluate(objective, data, config) -> dict:
    return TrainedModel(objective, None, config).evaluate(data)


def train_threads(threads: int | None = None) -> int:
    """Torch CPU threads for a training call: ``threads``, else ``HADA_THREADS``, else ``DEFAULT_THREADS``."""
    value = threads or os.environ.get("HADA_THREADS") or DEFAULT_THREADS
    try:
        value = int(value)
    except ValueError:
        raise HadaError(f"HADA_THREADS must be a whole number, got {value!r}") from None
    if value < 1:
        raise HadaError(f"the thread count must be >= 1, got {value}")
    return value


def train(config: TrainConfig, run_dir: str | os.PathLike, resume: bool = True, progress: bool | None = None,
          max_epochs_this_call: int | None = None, data: dict | None = None,
          threads: int | None = None, log=print, device=None) -> TrainResult | None:
    """Train (or continue) the run in ``run_dir``; returns its result once finished.

    ``resume``: continue from ``checkpoint.pt`` if there is one (an existing checkpoint with
    ``resume=False`` is an error, so nothing is overwritten by accident). ``max_epochs_this_call``
    stops after that many epochs *without* finishing (returns None): an interruption, for tests.
    ``data``: optional ``{split: FeatureData}`` already built with this config's train statistics.
    ``threads`` (else ``HADA_THREADS``, else 1) sets torch's CPU threads for the call. One thread by
    default: the step is a long chain of small operations, and with a second thread busy-waiting in
    OpenMP a step on a shared 2-core machine was 2 to 10 times slower than with one (measured by
    benchmarks/bench_epoch.py); a fixed count also keeps the numbers independent of the machine's core
    count. Resume with the same thread count as the original run: reductions may round differently with
    a different one. ``log`` receives one line on where the features are when the run is not on the CPU.
    ``device``: the exact torch.device to train on (default: the config's, resolved here); a resolved config
    keeps only the device's type, so a caller that resolved it passes the device it resolved before.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(train_threads(threads))
    try:
        return _train(config, run_dir, resume, progress, max_epochs_this_call, data, log, device)
    finally:
        torch.set_num_threads(before)


@dataclass
class _Run:
    """What one training call works with: the objective, its optimiser and schedule, the data, and the state that
    a checkpoint carries from epoch to epoch."""

    config: TrainConfig
    run_dir: Path
    device: object  # torch.device
    data: dict
    stats: object
    dims: dict
    objective: object
    optimizer: object
    scheduler: object
    loader: object
    order_rng: object
    state: dict
    model: object = None  # what the step calls: the objective, or its DistributedDataParallel wrapper

    def snapshot(self, kind: str) -> dict:
        out = {"config": self.config.to_dict(), "dims": self.dims, "stats": self.stats.to_dict(),
               "model": self.objective.state_dict(), "state": self.state}
        if not math.isinf(self.objective.progress):
            out["progress"] = self.objective.progress
        if kind == "checkpoint":
            out.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                       rng=rng_state(self.order_rng, self.device))
        return out


def _check_run_dir(config: TrainConfig, run_dir: Path, resume: bool) -> None:
    """Refuse a folder that holds another configuration, or a checkpoint we were told not to resume."""
    saved_config = run_dir / "config.json"
    hint = f"delete {run_dir} (or rerun `hada train` with --restart) to train the run again"
    if saved_config.exists() and _identity(read_json(saved_config, hint)) != config.identity():
        raise HadaError(f"{run_dir} holds a run with a different configuration; use another folder")
    if (run_dir / "checkpoint.pt").exists() and not resume:
        raise HadaError(f"{run_dir} already has a checkpoint; resume it or delete the folder to start over")
    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(saved_config, config.to_dict())


def _identity(saved: dict) -> dict:
    """A saved config.json as :meth:`TrainConfig.identity` (its dataset folder left out: a moved folder is the
    same run)."""
    if isinstance(saved, dict) and isinstance(saved.get("data"), dict):
        saved = {**saved, "data": {k: v for k, v in saved["data"].items() if k != "data_root"}}
    return saved


def join_process_group(config: TrainConfig, device=None) -> bool:
    """Under torchrun, join its process group (NCCL when the run is on CUDA, else gloo); True with > 1 rank.
    ``device``: the run's exact device when the caller has it (the config may hold only its type)."""
    if not distributed.launched():
        return False
    from hada.devices import resolve_device

    return distributed.init_from_env(resolve_device(config.device) if device is None else device)


def _data_parallel(objective):
    """The objective wrapped in DistributedDataParallel when several ranks train, else itself.

    The whole objective is wrapped, not only the pair: tau, w and the ITM head are trained too and need their
    gradients averaged. Buffers (the queue) are equal on every rank by construction, so they are synced once at the
    start and never broadcast again.
    """
    if not distributed.active():
        return objective
    from torch.nn.parallel import DistributedDataParallel

    device = next(objective.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    if _ddp_has_forward_sync_buffers():
        return DistributedDataParallel(objective, device_ids=device_ids, forward_sync_buffers=False)
    # older torch (2.11 among them) has no forward_sync_buffers: broadcast_buffers=False stops the broadcast at
    # every forward but also the one in the constructor, done here instead
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for buffer in objective.buffers():
            dist.broadcast(buffer, src=0)
    return DistributedDataParallel(objective, device_ids=device_ids, broadcast_buffers=False)


def _ddp_has_forward_sync_buffers() -> bool:
    """Whether this torch's DistributedDataParallel takes ``forward_sync_buffers`` (newer than 2.11)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    return "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters


def _load_data(config: TrainConfig, run_dir: Path, data: dict | None, device):
    """Every split's FeatureData on ``device``, normalised with the train statistics (saved with the run, reused
    on resume); given ``data`` on another device is not used."""
    from hada.features.batching import FeatureData, FeatureStats, compute_stats

    tokens = config.model.arch == "hada"
    pooled, raw = config.data.token_stats == "global", config.data.token_stats == "raw"
    data = {split: d for split, d in (data or {}).items()
            if d.device == device and d.captions_per_image == split_options(config, split)["captions_per_image"]}
    train_split = config.data.train_split
    train_splits = open_splits(config, train_split)
    stats_path = run_dir / "stats.json"
    if stats_path.exists():
        stats = FeatureStats.from_dict(json.loads(stats_path.read_text()))
    else:
        given = next(iter(data.values())).stats if data else None  # the caller's data: the run's statistics
        stats = given if given is not None and _stats_fit(given, pooled, raw) else \
            compute_stats(train_splits, pooled=pooled, raw=raw)
        if distributed.is_main():
            write_json(stats_path, stats.to_dict())
    data = {split: d for split, d in data.items() if d.stats == stats}  # global statistics: our own data
    if config.data.augment_p > 0:  # the training data with its augmented views
        data.pop(train_split, None)
        data[train_split] = FeatureData(train_splits, stats, with_tokens=tokens, device=device,
                                        augment_p=config.data.augment_p,
                                        augment_backbones=config.data.augment_backbones,
                                        augment_policy=config.data.augment_policy)
    if train_split not in data:
        data[train_split] = FeatureData(train_splits, stats, with_tokens=tokens, device=device)
    for split in (config.data.val_split, config.data.test_split):
        if split not in data:
            data[split] = FeatureData(open_splits(config, split), stats, with_tokens=tokens, device=device,
                                      **split_options(config, split))
    return data, stats, feature_dims(train_splits)


def _stats_fit(stats, pooled: bool, raw: bool) -> bool:
    """Whether a caller's statistics are of the kind the config asks for (raw, global, or any for per-backbone)."""
    entries = list(stats.image) + list(stats.text)
    if raw or any(e.raw for e in entries):
        return raw and all(e.raw for e in entries)
    return not pooled or _is_pooled(stats)


def _is_pooled(stats) -> bool:
    """Whether statistics are global ones (one mean/std repeated for every backbone and modality)."""
    entries = list(stats.image) + list(stats.text)
    return all(e == entries[0] for e in entries)


def _start(config: TrainConfig, run_dir: Path, resume: bool, data: dict | None, log=print, device=None) -> _Run:
    """Seed, data, model, optimiser and schedule on ``device`` (default: the config's); then the checkpoint's state
    when resuming."""
    import numpy as np
    import torch

    from hada.devices import resolve_device
    from hada.features.batching import PairLoader, placement_line

    device = resolve_device(config.device) if device is None else device
    seed_everything(config.seed)
    data, stats, dims = _load_data(config, run_dir, data, device)
    if device.type != "cpu":
        log(f"training on {device}; {placement_line(data)}")
    objective = build_objective(config, dims, stats).to(device)
    optim = config.optim
    if optim.init_from is not None:
        warm_start(objective, optim.init_from, optim.warm_start)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay,
                                  fused=True if optim.fused else None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=optim.t0 or optim.epochs,
                                                                     T_mult=optim.t_mult, eta_min=optim.eta_min)
    order_rng = np.random.default_rng(config.seed)
    ranks = distributed.world_size()
    loader = PairLoader(data[config.data.train_split], optim.batch_size, shuffle=True, rng=order_rng,
                        limit=optim.pairs_per_epoch, rank=distributed.rank(), world_size=ranks)
    state = {"epoch": 0, "history": [], "best_rsum": -math.inf, "best_epoch": 0, "bad_epochs": 0, "stopped": False}
    ckpt_path = run_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device, "rerun with --restart (hada train --restart) to train this run "
                                                  "anew, or delete its folder", keys=("state", "optimizer", "rng"))
        if ckpt["state"].get("ranks", 1) != ranks:
            raise HadaError(f"{run_dir} was trained by {ckpt['state'].get('ranks', 1)} process(es); resume it "
                            f"with as many (this call has {ranks}): the global batch would change")
        try:
            objective.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            set_rng_state(ckpt["rng"], order_rng, device)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # readable, but not this run's checkpoint
            raise HadaError(f"{ckpt_path} is damaged ({type(exc).__name__}); rerun with --restart (hada train "
                            "--restart) to train this run anew, or delete its folder") from None
        state = ckpt["state"]
    if ranks > 1:
        state["ranks"] = ranks
    return _Run(config, run_dir, device, data, stats, dims, objective, optimizer, scheduler, loader, order_rng,
                state, model=_data_parallel(objective))


def find_run(run: str | os.PathLike) -> Path:
    """The ``best.pt`` of a finished run: its folder, the file itself, or a folder name under ``runs_dir()``."""
    from hada.paths import runs_dir

    path = Path(run).expanduser()
    for candidate in (path, runs_dir() / str(run)):
        if candidate.is_file():
            return candidate
        if (candidate / "best.pt").is_file():
            return candidate / "best.pt"
    raise HadaError(f"no finished run at {run} (a run folder with best.pt, or its name under {runs_dir()})")


#: What a warm start loads (``OptimConfig.warm_start``): the prefixes of the objective's state dict.
WARM_START_PARTS = {"all": ("pair.", "pair_m.", "itm_head.", "temp", "mix_weight"), "online": ("pair.", "itm_head.")}


def warm_start(objective, run: str | os.PathLike, parts: str = "all") -> list[str]:
    """Start ``objective`` from a finished run's best weights (the published C5 starts from an earlier run): every
    tensor of the same name and shape among ``parts`` (:data:`WARM_START_PARTS`): ``"all"`` the encoders, momentum
    encoders, tau, w and ITM head; ``"online"`` (the published) the online encoders and the ITM head only, so tau,
    w and the momentum encoders keep their fresh init. The queue, the optimiser and the schedule always start
    afresh. Returns the names loaded; a run whose encoders do not fit is one HadaError."""
    import torch

    if parts not in WARM_START_PARTS:
        raise HadaError(f"warm_start must be one of {', '.join(WARM_START_PARTS)}; got {parts!r}")
    path = find_run(run)
    source = load_checkpoint(path, "cpu", "give another run to start from, or retrain that one")["model"]
    own = objective.state_dict()
    loaded = {k: v for k, v in source.items()
              if k in own and k.startswith(WARM_START_PARTS[parts]) and own[k].shape == v.shape}
    missing = [k for k in own if k.startswith("pair.") and k not in loaded]
    if missing:
        raise HadaError(f"{run} does not fit this model: {len(missing)} encoder tensors missing or of another "
                        f"shape (first: {missing[0]})")
    objective.load_state_dict(loaded, strict=False)
    return sorted(loaded)


def _train_epoch(run: _Run, epoch: int, show: bool) -> dict:
    """One pass over the loader; the epoch's mean losses, pair count and timing."""
    import torch
    from tqdm import tqdm  # plain text bars: readable in terminals, notebooks and logs

    objective, optimizer = run.objective, run.optimizer
    objective.train()
    t_start = time.perf_counter()
    losses = []  # per step [loss, itc, itm, itm accuracy], summed once at the end: no device sync per step
    n_batches, n_pairs = 0, 0
    lr = optimizer.param_groups[0]["lr"]
    steps = tqdm(run.loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not show)
    iters = max(len(run.loader), 1)
    per_iteration = run.config.optim.schedule_step == "iteration"
    for image, text, image_index in steps:
        step = (epoch - 1) * iters + n_batches
        out = _train_step(run, image, text, image_index, epoch - 1 + n_batches / iters, step)
        n_batches += 1
        if per_iteration:  # the fractional epoch, as the published code steps it
            run.scheduler.step(epoch - 1 + n_batches / iters)
        n_pairs += len(image_index)
        losses.append(torch.stack([out.loss.detach(), out.itc, out.itm, out.itm_accuracy.nan_to_num(0.0)]))
        if show and (n_batches % 10 == 0 or n_batches == len(run.loader)):
            rate = n_pairs / max(time.perf_counter() - t_start, 1e-9)
            steps.set_postfix(loss=f"{_sum_losses(losses)[0] / n_batches:.3f}", pairs_s=f"{rate:.0f}")
    steps.close()  # progress stays at the last step's: validation and best.pt belong to that step's stage
    sums = dict(zip(("loss", "itc", "itm", "itm_acc"), _sum_losses(losses)))
    train_time = time.perf_counter() - t_start
    if distributed.active():  # every rank's pairs; the losses as the mean of the ranks' means
        ranks = distributed.world_size()
        *totals, n_pairs = distributed.all_reduce_sum([*sums.values(), n_pairs])
        sums, n_pairs = {k: v / ranks for k, v in zip(sums, totals)}, int(n_pairs)
    n = max(n_batches, 1)
    return {"epoch": epoch, "loss": sums["loss"] / n, "loss_itc": sums["itc"] / n, "loss_itm": sums["itm"] / n,
            "itm_accuracy": sums["itm_acc"] / n if run.config.loss.itm else None, "lr": lr,
            "train_time_s": train_time, "pairs": n_pairs, "pairs_per_s": n_pairs / max(train_time, 1e-9),
            "_start": t_start}


def _train_step(run: _Run, image, text, image_index, progress: float, step: int):
    """One optimiser step on one batch (on the run's device); ``progress``: the fractional epoch, ``step``: the
    global step. Returns the objective's LossOutput."""
    objective = run.objective
    objective.progress = progress  # the distillation ramp and the stages read it
    _seed_step(run, step)
    image, text = image.to(run.device, non_blocking=True), text.to(run.device, non_blocking=True)
    out = run.model(image, text, image_index.to(run.device, non_blocking=True))
    run.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    objective.drop_idle_grads()  # zero gradients that only kept DDP's reduction whole
    run.optimizer.step()
    objective.end_step()
    return out


def _sum_losses(losses: list) -> list[float]:
    """Column sums of the steps' [loss, itc, itm, itm accuracy] in step order, as Python floats (float64
    additions of the float32 values: the same numbers as adding ``float(value)`` step by step)."""
    import torch

    totals = [0.0, 0.0, 0.0, 0.0]
    if losses:
        for row in torch.stack(losses).cpu().tolist():
            totals = [t + v for t, v in zip(totals, row)]
    return totals


def _end_epoch(run: _Run, entry: dict) -> None:
    """Validate, record the epoch, keep the best model and write the checkpoint (atomically).

    Under DDP rank 0 does this alone; the other ranks receive its state (history, early stopping) when done."""
    if run.config.optim.schedule_step == "epoch":
        run.scheduler.step()
    if not distributed.is_main():
        run.state.update(distributed.broadcast_object(None))
        return
    run.objective.eval()
    val = _evaluate(run.objective, run.data[run.config.data.val_split], run.config)
    t_start = entry.pop("_start")
    entry.update(val_rsum=val["rsum"], val=val, tau=float(run.objective.tau().detach()),
                 mix_weight=run.objective.inference_weights()[1], time_s=time.perf_counter() - t_start)
    state = run.state
    state["history"].append(_ordered(entry))
    if improves(val["rsum"], state["best_rsum"], run.config.optim.min_delta):
        state.update(best_rsum=val["rsum"], best_epoch=entry["epoch"], bad_epochs=0)
        torch_save(run.snapshot("best"), run.run_dir / "best.pt")
    else:
        state["bad_epochs"] += 1
    state["stopped"] = state["bad_epochs"] >= run.config.optim.patience
    state["epoch"] = entry["epoch"]
    torch_save(run.snapshot("checkpoint"), run.run_dir / "checkpoint.pt")
    write_json(run.run_dir / "history.json", state["history"])
    distributed.broadcast_object(state)


def improves(rsum: float, best: float, min_delta: float) -> bool:
    """Whether a validation Rsum is a new best for early stopping: better than ``best`` by more than
    ``min_delta`` (the published 0.1 Rsum points; 0: any improvement)."""
    return rsum > best + min_delta


_HISTORY_KEYS = ("epoch", "loss", "loss_itc", "loss_itm", "itm_accuracy", "val_rsum", "val", "tau", "mix_weight",
                 "lr", "train_time_s", "time_s", "pairs", "pairs_per_s")


def _ordered(entry: dict) -> dict:
    """A history entry with its keys in one fixed order (history.json reads the same run after run)."""
    return {k: entry[k] for k in _HISTORY_KEYS}


def _finish(run: _Run) -> TrainResult:
    """The best epoch scored on val and test, written to metrics.json (by rank 0; the others read it)."""
    from hada.metrics import metrics_from_ranks, save_ranks

    config, state = run.config, run.state
    if not distributed.is_main():
        distributed.barrier()
        metrics = json.loads((run.run_dir / "metrics.json").read_text())
        return TrainResult(run.run_dir, state["history"], metrics["val"], metrics["test"], state["best_epoch"])
    best = load_trained(run.run_dir, "best", device=run.device)
    val_metrics = best.evaluate(run.data[config.data.val_split])
    test_ranks = best.ranks(run.data[config.data.test_split])
    test_metrics = metrics_from_ranks(*test_ranks)
    save_ranks(run.run_dir / TEST_RANKS_FILE, test_ranks)  # the book's bootstrap reads them, never recomputes
    metrics = {"run": run.run_dir.name, "best_epoch": state["best_epoch"],
               "epochs_run": state["epoch"], "stopped_early": state["stopped"], "val": val_metrics,
               "test": test_metrics, "tau": float(best.objective.tau().detach()), "mix_weight": best.w}
    write_json(run.run_dir / "history.json", state["history"])  # again: the checkpoint's, had its write failed
    write_json(run.run_dir / "metrics.json", metrics)
    distributed.barrier()
    return TrainResult(run.run_dir, state["history"], val_metrics, test_metrics, state["best_epoch"])


def _train(config, run_dir, resume, progress, max_epochs_this_call, data, log=print, device=None):
    from tqdm import tqdm

    from hada.devices import resolve_device

    device = resolve_device(config.device) if device is None else device  # before resolving drops the index
    config, run_dir = config.resolved(), Path(run_dir)
    join_process_group(config, device)
    _check_run_dir(config, run_dir, resume)
    distributed.barrier()  # the folder exists before any rank reads from it
    show = progress_enabled(progress) and distributed.is_main()
    run = _start(config, run_dir, resume, data, log, device)
    state, epochs = run.state, config.optim.epochs
    bar = tqdm(total=epochs, initial=state["epoch"], desc=f"train {run_dir.name}", unit="epoch", disable=not show,
               leave=True)
    done_here = 0
    while state["epoch"] < epochs and not state["stopped"]:
        if max_epochs_this_call is not None and done_here >= max_epochs_this_call:
            bar.close()
            return None
        entry = _train_epoch(run, state["epoch"] + 1, show)
        _end_epoch(run, entry)
        done_here += 1
        bar.update(1)
        last = state["history"][-1]  # every rank has it (rank 0 validates), entry only rank 0
        bar.set_postfix(loss=f"{last['loss']:.3f}", val_rsum=f"{last['val_rsum']:.1f}",
                        best=f"{state['best_rsum']:.1f}@{state['best_epoch']}")
    bar.close()
    return _finish(run)
