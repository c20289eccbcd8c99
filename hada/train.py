"""Training HADA (or the no-graph concatenation baseline) on stored features, resumable to the bit.

:func:`train` runs AdamW with cosine warm restarts (stepped once per epoch), evaluates the validation
Rsum after every epoch, keeps the best model (``best.pt``) and stops early after ``patience`` epochs
without improvement. After every epoch it writes ``checkpoint.pt`` atomically with everything the rest
of the run depends on: model, momentum encoders and queue (all in the objective's state dict),
optimiser, scheduler, the torch / numpy / python RNG states and the data-order generator, the history,
and the early-stopping state. Resuming from it gives exactly the run an uninterrupted call gives.

A run folder holds ``config.json``, ``stats.json`` (train feature statistics), ``history.json`` (one
entry per epoch, for the book's curves), ``checkpoint.pt``, ``best.pt`` and, once finished,
``metrics.json`` (validation and test metrics of the best epoch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from hada.errors import HadaError
from hada.io import progress_enabled, torch_save, write_json

# torch and numpy are imported inside functions: the CLI reads TrainConfig for its help without them.

ARCHS = ("hada", "concat")
MODEL_FIELDS = ("width", "out_dim", "gnn", "heads", "head_dim", "layers", "dropout", "w_fc", "w_fcx", "w_cc",
                "w_ffx", "w_self", "directed", "backend", "precision")


PRECISIONS = ("auto", "fp32", "bf16")  # hada.model.encoder.PRECISIONS plus "auto" (resolved by TrainConfig.resolved)
#: Fields added after runs were first saved, with the value that reproduces those runs.
LEGACY_VALUES = {"head_dim": None, "precision": "fp32", "fused_optimizer": False}
RENAMED = {"max_train_pairs": "pairs_per_epoch"}


@dataclass
class TrainConfig:
    """Everything that determines a run's numbers (its hash names the run folder)."""

    # data
    dataset: str = "synthetic"
    data_root: str | None = None  # None: the embedded synthetic data under data/
    backbones: list[str] = field(default_factory=list)  # first = main backbone; [] = the embedded default
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    pairs_per_epoch: int | None = None  # None: every caption-image pair; N: a fresh random N of them each epoch
    # model
    arch: str = "hada"  # "hada" or "concat" (no graph: linear map of the concatenated embeddings)
    width: int = 128  # paper: 512; 128 keeps the miniature's epochs short on 2 CPU cores
    out_dim: int = 128
    gnn: str = "gatv2"
    heads: int = 4
    # channels per head; None: width (the paper: 4 heads x 512 concatenated). 32 = width // heads: half the
    # epoch time of None here (benchmarks/bench_epoch.py), val/test Rsum within seed noise after 3 epochs
    head_dim: int | None = 32
    layers: int = 1
    dropout: float = 0.3
    w_fc: float = 0.9
    w_fcx: float = 0.7
    w_cc: float = 1.1
    w_ffx: float | None = None
    w_self: float = 1.0
    directed: bool = True
    backend: str = "auto"
    # "bf16": the encoders under bfloat16 autocast (loss in fp32); "auto": bf16 where the CPU has native
    # bfloat16 matrix units (AMX or AVX512-BF16), else fp32 -- resolved() writes the choice into the config
    precision: str = "auto"
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.02
    t0: int | None = None  # CosineAnnealingWarmRestarts period in epochs; None: one cycle over ``epochs``
    fused_optimizer: bool = True  # torch's fused AdamW kernel (same update; ~3x faster step than the per-tensor loop)
    eta_min: float = 0.0
    patience: int = 5  # early stop after this many epochs without a better val Rsum
    seed: int = 0
    # loss (hada.losses.LossConfig)
    itm: bool = True
    mix: bool = True
    queue_size: int = 1024
    momentum: float = 0.995
    use_momentum: bool = True
    distill: bool = False
    alpha: float = 0.4
    tau_init: float = 0.07
    w_init: float = 0.5
    i2t_weight: float = 0.3
    t2i_weight: float = 0.7
    itm_weight: float = 1.0
    # evaluation
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if isinstance(self.backbones, str):
            self.backbones = [b.strip() for b in self.backbones.split(",") if b.strip()]
        self.backbones = list(self.backbones)
        if self.arch not in ARCHS:
            raise HadaError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "t0", "pairs_per_epoch", "head_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise HadaError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.queue_size < 0 or self.patience < 1:
            raise HadaError("queue_size must be >= 0 and patience >= 1")
        if self.precision not in PRECISIONS:
            raise HadaError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")

    def resolved(self) -> "TrainConfig":
        """A copy with the embedded default backbones and an "auto" precision filled in (what the hash and
        the run use: a machine without bfloat16 units trains, and caches, an fp32 run under its own key)."""
        values = self.to_dict()
        if not self.backbones:
            from hada.backbones import EMBEDDED_BACKBONES

            values["backbones"] = list(EMBEDDED_BACKBONES[:2])
        if self.precision == "auto":
            values["precision"] = "bf16" if cpu_has_bf16() else "fp32"
        return TrainConfig(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from its dict; a dict saved before a field existed gets that field's old behaviour
        (``LEGACY_VALUES``), so older runs and checkpoints load as they were trained."""
        d = dict(d)
        for old, new in RENAMED.items():
            if old in d and new not in d:
                d[new] = d.pop(old)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise HadaError(f"unknown training config keys: {sorted(unknown)}")
        return cls(**{**{k: v for k, v in LEGACY_VALUES.items() if k not in d}, **d})

    def hash(self) -> str:
        """12 hex digits of the sha256 of the resolved config (sorted json)."""
        text = json.dumps(self.resolved().to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def loss_config(self):
        from hada.losses import LossConfig

        return LossConfig(tau_init=self.tau_init, mix=self.mix, w_init=self.w_init, i2t_weight=self.i2t_weight,
                          t2i_weight=self.t2i_weight, queue_size=self.queue_size, momentum=self.momentum,
                          use_momentum=self.use_momentum, distill=self.distill, alpha=self.alpha, itm=self.itm,
                          itm_weight=self.itm_weight)


# ---------------------------------------------------------------------------------------- helpers
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX tiles or AVX512-BF16): there bf16
    autocast makes the encoders' matrix products several times faster; elsewhere it may be slower."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


#: Torch threads of a training call when neither ``threads`` nor ``HADA_THREADS`` says otherwise.
DEFAULT_THREADS = 1


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(order_rng) -> dict:
    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "order": order_rng.bit_generator.state}


def set_rng_state(state: dict, order_rng) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    order_rng.bit_generator.state = state["order"]


def open_splits(config: TrainConfig, split: str) -> list:
    """The FeatureSplit of every backbone of the run for one split (memory-mapped)."""
    from hada.features.store import open_features

    return [open_features(config.dataset, b, split) for b in config.backbones]


def build_objective(config: TrainConfig, dims: dict):
    """The trained pair wrapped in its loss. ``dims``: image/text token and embed dims per backbone."""
    from hada.losses import HadaObjective

    if config.precision == "auto":
        config = config.resolved()

    if config.arch == "hada":
        from hada.model.encoder import HadaConfig, HadaPair

        hc = HadaConfig(image_token_dims=dims["image_token_dims"], text_token_dims=dims["text_token_dims"],
                        image_embed_dims=dims["image_embed_dims"], text_embed_dims=dims["text_embed_dims"],
                        **{k: getattr(config, k) for k in MODEL_FIELDS})
        pair = HadaPair(hc)
    else:
        from hada.baselines import ConcatPair

        pair = ConcatPair(dims["image_embed_dims"], dims["text_embed_dims"], config.out_dim, config.dropout)
    if dims["image_embed_dims"][0] != dims["text_embed_dims"][0]:
        raise HadaError("the main backbone's image and text embeddings have different widths; "
                        "its cosine similarity is undefined")
    return HadaObjective(pair, config.loss_config(), config.out_dim, dims["image_embed_dims"][0])


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
    def w(self) -> float:
        return self.objective.inference_weights()[1]

    def similarity(self, data):
        """Inference similarity on a split: ``(1 - w) cos_HADA + w cos_main`` as a SimilaritySource."""
        from hada.evaluate import EmbeddingSimilarity, embed_split

        img, txt = embed_split(self.pair, data, self.config.eval_batch_size)
        w_hada, w_main = self.objective.inference_weights()
        main_img, main_txt = data.main_embeddings(0)
        return EmbeddingSimilarity([(w_hada, img, txt), (w_main, main_img, main_txt)])

    def evaluate(self, data) -> dict:
        from hada.evaluate import retrieval_metrics

        return retrieval_metrics(self.similarity(data), data.caption_image_index)

    def load_data(self, split: str):
        """FeatureData of one split, normalised with this run's train statistics."""
        from hada.features.batching import FeatureData

        return FeatureData(open_splits(self.config, split), self.stats, with_tokens=self.config.arch == "hada")


def load_trained(run_dir: str | os.PathLike, which: str = "best") -> TrainedModel:
    """Rebuild a trained model from ``best.pt`` (or ``checkpoint.pt`` with ``which="last"``); no features needed."""
    import torch

    from hada.features.batching import FeatureStats

    path = Path(run_dir) / ("best.pt" if which == "best" else "checkpoint.pt")
    if not path.exists():
        raise HadaError(f"no trained model at {path}; train it first (hada train)")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = TrainConfig.from_dict(state["config"])
    objective = build_objective(config, state["dims"])
    objective.load_state_dict(state["model"])
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
          threads: int | None = None) -> TrainResult | None:
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
    a different one.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(train_threads(threads))
    try:
        return _train(config, run_dir, resume, progress, max_epochs_this_call, data)
    finally:
        torch.set_num_threads(before)


def _train(config, run_dir, resume, progress, max_epochs_this_call, data):
    import numpy as np
    import torch
    from tqdm import tqdm  # plain text bars: readable in terminals, notebooks and logs

    from hada.features.batching import FeatureData, FeatureStats, PairLoader, compute_stats

    config = config.resolved()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, best_path = run_dir / "checkpoint.pt", run_dir / "best.pt"
    saved_config = run_dir / "config.json"
    if saved_config.exists() and json.loads(saved_config.read_text()) != config.to_dict():
        raise HadaError(f"{run_dir} holds a run with a different configuration; use another folder")
    if ckpt_path.exists() and not resume:
        raise HadaError(f"{run_dir} already has a checkpoint; resume it or delete the folder to start over")
    write_json(saved_config, config.to_dict())
    show = progress_enabled(progress)

    # -- data and statistics -----------------------------------------------------------------------
    seed_everything(config.seed)
    tokens = config.arch == "hada"
    data = dict(data or {})
    train_splits = open_splits(config, config.train_split)
    stats_path = run_dir / "stats.json"
    if stats_path.exists():
        stats = FeatureStats.from_dict(json.loads(stats_path.read_text()))
    else:
        stats = data[config.train_split].stats if config.train_split in data else compute_stats(train_splits)
        write_json(stats_path, stats.to_dict())
    if config.train_split not in data:
        data[config.train_split] = FeatureData(train_splits, stats, with_tokens=tokens)
    for split in (config.val_split, config.test_split):
        if split not in data:
            data[split] = FeatureData(open_splits(config, split), stats, with_tokens=tokens)
    dims = feature_dims(train_splits)

    # -- model, optimiser, schedule ----------------------------------------------------------------
    objective = build_objective(config, dims)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=True if config.fused_optimizer else None)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=config.t0 or config.epochs,
                                                                     eta_min=config.eta_min)
    order_rng = np.random.default_rng(config.seed)
    loader = PairLoader(data[config.train_split], config.batch_size, shuffle=True, rng=order_rng,
                        limit=config.pairs_per_epoch)
    state = {"epoch": 0, "history": [], "best_rsum": -math.inf, "best_epoch": 0, "bad_epochs": 0, "stopped": False}

    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        objective.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"], order_rng)
        state = ckpt["state"]

    def snapshot(kind: str) -> dict:
        out = {"config": config.to_dict(), "dims": dims, "stats": stats.to_dict(), "model": objective.state_dict(),
               "state": state}
        if kind == "checkpoint":
            out.update(optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), rng=rng_state(order_rng))
        return out

    # -- epochs ------------------------------------------------------------------------------------
    epochs_done_here = 0
    bar = tqdm(total=config.epochs, initial=state["epoch"], desc=f"train {run_dir.name}", unit="epoch",
               disable=not show, leave=True)
    while state["epoch"] < config.epochs and not state["stopped"]:
        if max_epochs_this_call is not None and epochs_done_here >= max_epochs_this_call:
            bar.close()
            return None
        epoch = state["epoch"] + 1
        objective.train()
        t_start = time.perf_counter()
        sums = {"loss": 0.0, "itc": 0.0, "itm": 0.0, "itm_acc": 0.0}
        n_batches, n_pairs = 0, 0
        lr = optimizer.param_groups[0]["lr"]
        steps = tqdm(loader, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not show)
        for image, text, image_index in steps:
            out = objective(image, text, image_index)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            objective.clamp_()
            n_batches += 1
            n_pairs += len(image_index)
            sums["loss"] += float(out.loss.detach())
            sums["itc"] += float(out.itc)
            sums["itm"] += float(out.itm)
            sums["itm_acc"] += 0.0 if math.isnan(out.itm_accuracy) else out.itm_accuracy
            if show and (n_batches % 10 == 0 or n_batches == len(loader)):
                rate = n_pairs / max(time.perf_counter() - t_start, 1e-9)
                steps.set_postfix(loss=f"{sums['loss'] / n_batches:.3f}", pairs_s=f"{rate:.0f}")
        steps.close()
        train_time = time.perf_counter() - t_start
        scheduler.step()
        objective.eval()
        val = _evaluate(objective, data[config.val_split], config)
        epoch_time = time.perf_counter() - t_start
        n = max(n_batches, 1)
        entry = {"epoch": epoch, "loss": sums["loss"] / n, "loss_itc": sums["itc"] / n, "loss_itm": sums["itm"] / n,
                 "itm_accuracy": sums["itm_acc"] / n if config.itm else None, "val_rsum": val["rsum"], "val": val,
                 "tau": float(objective.tau().detach()), "mix_weight": objective.inference_weights()[1], "lr": lr,
                 "train_time_s": train_time, "time_s": epoch_time, "pairs": n_pairs,
                 "pairs_per_s": n_pairs / max(train_time, 1e-9)}
        state["history"].append(entry)
        if val["rsum"] > state["best_rsum"]:
            state.update(best_rsum=val["rsum"], best_epoch=epoch, bad_epochs=0)
            torch_save(snapshot("best"), best_path)
        else:
            state["bad_epochs"] += 1
        state["stopped"] = state["bad_epochs"] >= config.patience
        state["epoch"] = epoch
        torch_save(snapshot("checkpoint"), ckpt_path)
        write_json(run_dir / "history.json", state["history"])
        epochs_done_here += 1
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.3f}", val_rsum=f"{val['rsum']:.1f}",
                        best=f"{state['best_rsum']:.1f}@{state['best_epoch']}")
    bar.close()

    # -- finish: the best epoch on val and test ----------------------------------------------------
    best = load_trained(run_dir, "best")
    val_metrics = best.evaluate(data[config.val_split])
    test_metrics = best.evaluate(data[config.test_split])
    metrics = {"run": run_dir.name, "config_hash": config.hash(), "best_epoch": state["best_epoch"],
               "epochs_run": state["epoch"], "stopped_early": state["stopped"], "val": val_metrics,
               "test": test_metrics, "tau": float(best.objective.tau().detach()), "mix_weight": best.w}
    write_json(run_dir / "metrics.json", metrics)
    return TrainResult(run_dir, state["history"], val_metrics, test_metrics, state["best_epoch"])
