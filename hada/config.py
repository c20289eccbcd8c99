"""Every setting of a training run, in one place: the model, loss, optimiser and data configs, composed.

``TrainConfig`` is the composition (no field is copied from one class into another); its resolved dict names
the run (``hada.runs``). Defaults are the paper's where the paper fixes a value. Named **recipes** are data:
overrides on top of the defaults (``RECIPES``), so a run, a chapter or a config file says "the miniature, with
two GNN layers" as ``recipe("miniature", **{"model.layers": 2})``. Each field's ``help`` metadata is what
``hada train --help`` prints, so the command line cannot drift from the code.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from hada.errors import HadaError
from hada.features.augment import RUN_POLICY_CHOICES

GNN_TYPES = ("gatv2", "gcn", "transformer")
ARCHS = ("hada", "concat")
BACKENDS = ("auto", "dense", "pyg")
#: "fp32": everything in float32 (the paper). "bf16": the encoders' linear maps, attention scores and pooling
#: under bfloat16 autocast (softmax, readout, L2 norm and the loss stay float32). "auto": bf16 on a CUDA device
#: that supports it, fp32 on the CPU: there autocast's casts cost more than bfloat16 products save at these widths,
#: even where the CPU multiplies bfloat16 natively (benchmarks/bench_epoch.py: a step of the book's model took
#: 43 ms in bf16 and 32 ms in fp32 on a Xeon with AMX).
PRECISIONS = ("auto", "fp32", "bf16")
INITS = ("default", "kaiming")
SELF_LOOPS = ("fixed", "mean")
NORMS = ("node", "graph")
EMBED_NORMS = ("unit", "standardise", "raw")
TOKEN_STATS = ("backbone", "global", "raw")
ITM_HEADS = ("mlp", "linear")
ITM_NEGATIVES = ("mixed", "hada")
ITM_KEYS = ("online", "momentum")
WARM_STARTS = ("all", "online")
AUGMENT_BACKBONES = ("all", "main")
AUGMENT_POLICIES = RUN_POLICY_CHOICES  # an image policy, or a run's (one per backbone)
QUEUE_INITS = ("empty", "random")
SCHEDULE_STEPS = ("epoch", "iteration")


def _opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its command-line help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class EdgeWeights:
    """Edge weights (a 1-d edge feature fed to the attention, not a message multiplier) and direction of the
    node graph; the paper's values by default."""

    w_fc: float = _opt(0.9, "edge weight feature -> own backbone's CLS")
    w_fcx: float = _opt(0.7, "edge weight feature -> another backbone's CLS")
    w_cc: float = _opt(1.1, "edge weight CLS <-> CLS")
    w_ffx: float | None = _opt(None, "edge weight feature <-> feature across backbones ('none': no such edges)")
    w_self: float = _opt(1.0, "self-loop weight (with --self-loops fixed)")
    self_loops: str = _opt("fixed", "fixed: every self loop has weight w_self; mean: a node's self-loop weight is "
                                    "the mean of its incoming edge weights, 0 without any (what the published "
                                    "GATv2Conv did with fill_value='mean')", choices=SELF_LOOPS)
    directed: bool = _opt(True, "directed feature -> CLS edges (the published graph)")

    def __post_init__(self) -> None:
        _choose(self, "self_loops", SELF_LOOPS)
        _check_floats(self)

    def as_tuple(self) -> tuple[float, ...]:
        """Weight of each edge type, indexed by type code (``ffx`` is 0 when absent; it has no edges then)."""
        ffx = 0.0 if self.w_ffx is None else float(self.w_ffx)
        return (float(self.w_fc), float(self.w_fcx), float(self.w_cc), ffx, float(self.w_self))

    def by_type(self):
        """:meth:`as_tuple` as a float32 tensor, for indexing by edge type."""
        import torch

        return torch.tensor(self.as_tuple(), dtype=torch.float32)

    @property
    def published_topology(self) -> bool:
        """True for the published graph (directed, no feature-feature edges): a feature node then receives only
        its self loop, which is what lets the fast path attend from the K CLS nodes only."""
        return self.directed and self.w_ffx is None


@dataclass
class ModelConfig:
    """The trained encoders' shape; the paper's by default (ALBEF-sized: width 512, 4 heads of 512 channels)."""

    arch: str = _opt("hada", "hada (graph fusion) or concat (baseline: a linear map of the concatenated "
                             "embeddings)", choices=ARCHS)
    width: int = _opt(512, "node width after each backbone's linear map")
    out_dim: int = _opt(512, "width of the final (L2-normalised) embedding")
    gnn: str = _opt("gatv2", "graph convolution", choices=GNN_TYPES)
    heads: int = _opt(4, "attention heads")
    head_dim: int | None = _opt(None, "channels per attention head ('none': --width, the paper's setting: the "
                                      "heads concatenate heads x width channels)")
    layers: int = _opt(1, "graph layers (more than one adds GELU, a skip connection and LayerNorm)")
    norm: str = _opt("node", "with several layers: node (LayerNorm of each node after every layer) or graph "
                             "(the published x + conv(x), GELU, then LayerNorm over each graph's nodes, between "
                             "layers only)", choices=NORMS)
    dropout: float = _opt(0.3, "dropout before the readout layer")
    attention_dropout: float = _opt(0.0, "dropout on the attention coefficients (GATv2Conv's own dropout)")
    post_dropout: float = _opt(0.0, "dropout before each layer's heads -> width linear")
    init: str = _opt("default", "initialisation of the encoders' linear layers: PyTorch's default or kaiming "
                                "(Kaiming-normal weights, std sqrt(2 / fan_in), the published code's)",
                     choices=INITS)
    embed_norm: str = _opt("unit", "the backbones' own embeddings entering the readout (and a single-node "
                                   "backbone's node): unit (L2-normalised), standardise (L2-normalised, then "
                                   "standardised with the token statistics, as published) or raw (as the backbone "
                                   "gives them: HADA-LAVIS)", choices=EMBED_NORMS)
    single_node: list[int] = _opt([], "comma-separated backbone positions (0 = main) that enter the graph as ONE "
                                      "node, their pooled projected embedding, instead of their tokens (CLIP in "
                                      "HADA-LAVIS)", metavar="K,...")
    edges: EdgeWeights = field(default_factory=EdgeWeights)
    backend: str = _opt("auto", "dense (CLS-only, fast; needs the published graph), pyg (torch-geometric on "
                                "the full graph) or auto", choices=BACKENDS)
    precision: str = _opt("fp32", "fp32, bf16 (the encoders' matrix products under bfloat16 autocast; the loss "
                                  "stays fp32) or auto: bf16 on a CUDA GPU that supports it, fp32 on the CPU",
                          choices=PRECISIONS)

    def __post_init__(self) -> None:
        if isinstance(self.edges, dict):
            self.edges = EdgeWeights(**self.edges)
        _choose(self, "arch", ARCHS)
        _choose(self, "gnn", GNN_TYPES)
        _choose(self, "backend", BACKENDS)
        _choose(self, "precision", PRECISIONS)
        _choose(self, "norm", NORMS)
        _choose(self, "init", INITS)
        _choose(self, "embed_norm", EMBED_NORMS)
        _at_least_one(self, "width", "out_dim", "heads", "layers", "head_dim")
        for name in ("dropout", "attention_dropout", "post_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise HadaError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if isinstance(self.single_node, (str, int)):
            self.single_node = [p for p in str(self.single_node).split(",") if p.strip()]
        try:
            self.single_node = sorted({int(k) for k in self.single_node})
        except (TypeError, ValueError):
            raise HadaError(f"single_node must be backbone positions (0, 1, ...), got {self.single_node!r}") from None
        if any(k < 0 for k in self.single_node):
            raise HadaError(f"single_node positions must be >= 0, got {self.single_node}")
        if self.backend == "dense":
            self.resolve_backend()  # a graph the dense path cannot compute is one clear error
        _check_floats(self)

    def resolve_backend(self, backend: str | None = None) -> str:
        """"dense" or "pyg": ``backend`` (or the config's), with "auto" -> dense when the graph allows it."""
        backend = backend or self.backend
        if backend not in BACKENDS:
            raise HadaError(f"backend must be one of {BACKENDS}, got {backend!r}")
        dense_ok = self.edges.published_topology and (self.edges.self_loops == "fixed" or self.gnn == "gatv2")
        if backend == "auto":
            return "dense" if dense_ok else "pyg"
        if backend == "dense" and not dense_ok:
            raise HadaError("the dense backend needs the published graph (directed, w_ffx none) and, with mean "
                            "self loops, GATv2")
        return backend


@dataclass
class LossConfig:
    """The objective: ITC over batch + queue mixed with the main backbone, plus ITM; the paper's values except
    the queue, sized for a miniature."""

    tau_init: float = _opt(0.07, "initial temperature (learned, clamped to [tau_min, tau_max])")
    tau_min: float = _opt(0.001, "lowest temperature")
    tau_max: float = _opt(0.5, "highest temperature")
    mix: bool = _opt(True, "mix the main backbone's similarity in with a learned weight w (off: w = 0)")
    w_init: float = _opt(0.5, "initial mix weight (learned, clamped to [w_min, w_max])")
    w_min: float = _opt(0.1, "lowest mix weight")
    w_max: float = _opt(0.9, "highest mix weight")
    i2t_weight: float = _opt(0.3, "weight of the image->text contrastive loss")
    t2i_weight: float = _opt(0.7, "weight of the text->image contrastive loss")
    queue_size: int = _opt(1024, "negatives kept in the queue (0: in-batch only)")
    queue_init: str = _opt("empty", "empty: only filled slots are used; random: the queue starts full of random "
                                    "unit vectors whose ids match nothing and is used whole from the first step "
                                    "(ALBEF's, the published)", choices=QUEUE_INITS)
    momentum: float = _opt(0.995, "EMA momentum of the momentum encoders")
    use_momentum: bool = _opt(True, "fill the queue from momentum encoders (off: from the trained encoders)")
    distill: bool = _opt(False, "momentum distillation of the contrastive targets")
    alpha: float = _opt(0.4, "distillation weight")
    distill_source: str = _opt("mixed", "similarity the distillation targets come from: mixed (with w) or hada (the "
                                        "HADA-only momentum similarity, as published)", choices=ITM_NEGATIVES)
    alpha_ramp: bool = _opt(False, "ramp the distillation weight from 0 to alpha over the first epoch (ALBEF's)")
    mix_from_epoch: int = _opt(0, "two stages inside one run: the HADA similarity alone (w = 0) for this many "
                                  "epochs, then the learned mix (0: the mix from the start; the published HADA-LAVIS "
                                  "trains two separate runs instead, the recipes lavis-stage1 and lavis)")
    itm: bool = _opt(True, "add the image-text matching loss with hard negatives")
    itm_weight: float = _opt(1.0, "weight of the matching loss")
    itm_hidden: int = _opt(0, "width of the matching head's hidden layer (0: the embedding width)")
    itm_head: str = _opt("mlp", "matching head: mlp (Linear, GELU, Linear) or linear (Dropout, Linear(4 x dim -> "
                                "1): the published 2,049 parameters)", choices=ITM_HEADS)
    itm_dropout: float = _opt(0.0, "dropout before the linear matching head's linear")
    itm_negatives: str = _opt("mixed", "similarity the hard negatives are drawn from: mixed (with w) or hada "
                                       "(the HADA-only similarity, as published)", choices=ITM_NEGATIVES)
    itm_keys: str = _opt("momentum", "what each online embedding is compared with to draw its hard negative: the "
                                     "momentum encoders' keys of the batch (as published) or the online embeddings "
                                     "of the batch", choices=ITM_KEYS)

    def __post_init__(self) -> None:
        if self.queue_size < 0:
            raise HadaError(f"queue_size must be >= 0, got {self.queue_size}")
        if self.mix_from_epoch < 0:
            raise HadaError(f"mix_from_epoch must be >= 0, got {self.mix_from_epoch}")
        _choose(self, "queue_init", QUEUE_INITS)
        _choose(self, "itm_head", ITM_HEADS)
        _choose(self, "itm_negatives", ITM_NEGATIVES)
        _choose(self, "itm_keys", ITM_KEYS)
        _choose(self, "distill_source", ITM_NEGATIVES)
        if not 0.0 <= self.itm_dropout < 1.0:
            raise HadaError(f"itm_dropout must be in [0, 1), got {self.itm_dropout}")
        _check_floats(self, {"tau_init": (1e-6, 100.0), "tau_min": (1e-6, 100.0), "tau_max": (1e-6, 100.0),
                             "w_init": (0.0, 1.0), "w_min": (0.0, 1.0), "w_max": (0.0, 1.0),
                             "i2t_weight": (0.0, 1e6), "t2i_weight": (0.0, 1e6), "momentum": (0.0, 1.0),
                             "alpha": (0.0, 1.0), "itm_weight": (0.0, 1e6)})


@dataclass
class OptimConfig:
    """AdamW with cosine warm restarts (stepped once per epoch, or every iteration with the fractional epoch) and
    early stopping on the validation Rsum."""

    epochs: int = _opt(10, "maximum epochs")
    batch_size: int = _opt(64, "caption-image pairs per batch")
    pairs_per_epoch: int | None = _opt(None, "train on a fresh random subset of this many caption-image pairs each "
                                             "epoch (seeded, checkpointed draw; 'none': every pair)")
    lr: float = _opt(1e-4, "AdamW learning rate")
    weight_decay: float = _opt(0.02, "AdamW weight decay")
    fused: bool = _opt(True, "torch's fused AdamW kernel (the same update as the per-tensor loop, faster)")
    t0: int | None = _opt(None, "epochs per cosine cycle (CosineAnnealingWarmRestarts T_0; 'none': one cycle over "
                                "--epochs)")
    t_mult: int = _opt(1, "factor by which each cosine cycle is longer than the last (T_mult)")
    eta_min: float = _opt(0.0, "lowest learning rate of the cosine schedule")
    schedule_step: str = _opt("epoch", "step the cosine schedule once per epoch, or every iteration with the "
                                       "fractional epoch (epoch + i / iterations, as published)",
                              choices=SCHEDULE_STEPS)
    patience: int = _opt(5, "stop after this many epochs without a better validation Rsum")
    min_delta: float = _opt(0.0, "a validation Rsum counts as better only when it beats the best by more than this")
    init_from: str | None = _opt(None, "warm start: a finished run's folder (or its best.pt) whose trained weights "
                                       "the model starts from ('none': a fresh init)", metavar="RUN")
    warm_start: str = _opt("all", "what --init-from loads: all (the encoders, momentum encoders, tau, w and ITM "
                                  "head) or online (the online encoders and the ITM head only: tau, w and the "
                                  "momentum encoders start fresh, as published); the optimiser, schedule and "
                                  "queue always start fresh", choices=WARM_STARTS)

    def __post_init__(self) -> None:
        _at_least_one(self, "epochs", "batch_size", "pairs_per_epoch", "t0", "patience", "t_mult")
        _choose(self, "schedule_step", SCHEDULE_STEPS)
        _choose(self, "warm_start", WARM_STARTS)
        if self.min_delta < 0:
            raise HadaError(f"min_delta must be >= 0, got {self.min_delta}")
        _check_floats(self, {"lr": (0.0, 10.0), "weight_decay": (0.0, 1e3), "eta_min": (0.0, 10.0),
                             "min_delta": (0.0, 600.0)})
        if self.init_from is not None:
            self.init_from = str(self.init_from)


def backbone_list(value) -> list[str]:
    """Backbone specs from ``"A, B, ..."`` (spaces around commas ignored) or a sequence: the package's one parser
    of a backbone list (the config, the command line's ``--backbones`` and a chapter's parameter use it)."""
    if isinstance(value, str):
        return [b.strip() for b in value.split(",") if b.strip()]
    return [str(b) for b in value]


@dataclass
class DataConfig:
    """Which stored features a run reads: the dataset, its folder and the backbones (the first is the main one)."""

    dataset: str = _opt("synthetic", "dataset of the feature stores")
    data_root: str | None = _opt(None, "dataset folder the features were extracted from (default: the embedded "
                                       "data)", metavar="PATH")
    backbones: list[str] = _opt([], "comma-separated backbone specs, the first is the main one (default: the "
                                    "first two embedded backbones)", metavar="A,B,...")
    train_split: str = _opt("train", "split to train on")
    val_split: str = _opt("val", "split for early stopping")
    test_split: str = _opt("test", "split for the final metrics")
    eval_batch_size: int = _opt(256, "batch size when embedding a split for evaluation")
    token_stats: str = _opt("backbone", "token preprocessing: L2 norm, then one mean/std per backbone and "
                                        "modality (backbone) or one global mean/std over all backbones and "
                                        "modalities (global, the published); raw: the tokens as stored, no L2 "
                                        "norm and no standardisation (HADA-LAVIS)", choices=TOKEN_STATS)
    augment_p: float = _opt(0.0, "probability that a training image uses one of its augmented views stored by "
                                 "hada features extract --augment N (published: 0.75)")
    augment_backbones: str = _opt("all", "which backbones see the augmented view when one is drawn: all, or main "
                                         "(backbone 0 alone; the others see the plain image, as published)",
                                  choices=AUGMENT_BACKBONES)
    augment_policy: str = _opt("randaugment", "how the stored augmented views were made (hada features extract "
                                              "--augment N --augment-policy P): randaugment (torchvision's default "
                                              "RandAugment), albef (a random resized crop of half to all of the "
                                              "image, a horizontal flip, 2 of ALBEF's operations at magnitude 7: "
                                              "the published), blip (the same at magnitude 5: BLIP's) or lavis "
                                              "(blip for the main backbone, albef for the others: HADA-LAVIS's)",
                               choices=AUGMENT_POLICIES)
    test_captions_per_image: int | None = _opt(None, "score the test split on the first N captions of each image "
                                                     "(HADA-LAVIS keeps 5 on MSCOCO; default 'none': every caption, "
                                                     "all 25,010 of MSCOCO's test split)", metavar="N")

    def __post_init__(self) -> None:
        _choose(self, "token_stats", TOKEN_STATS)
        _choose(self, "augment_backbones", AUGMENT_BACKBONES)
        _choose(self, "augment_policy", AUGMENT_POLICIES)
        _check_floats(self)
        if not 0.0 <= self.augment_p <= 1.0:
            raise HadaError(f"augment_p must be in [0, 1], got {self.augment_p}")
        self.backbones = backbone_list(self.backbones)
        if self.data_root is not None:
            self.data_root = str(self.data_root)
        _at_least_one(self, "eval_batch_size", "test_captions_per_image")

    @property
    def augmented_backbones(self) -> list[str]:
        """The backbones whose augmented views a run reads (none without augmentation)."""
        if self.augment_p == 0:
            return []
        return list(self.backbones[:1] if self.augment_backbones == "main" else self.backbones)

    @property
    def splits(self) -> tuple[str, str, str]:
        """The splits a run reads: train, val, test."""
        return (self.train_split, self.val_split, self.test_split)


@dataclass
class TrainConfig:
    """Everything that determines a run's numbers: the composition of the four configs and the seed."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = _opt(0, "random seed (model init, data order, dropout, hard negatives)")
    device: str = _opt("auto", "where the run trains and evaluates: auto (CUDA when present), cpu, cuda or cuda:N; "
                               "resolved to its type, so a GPU run is another run than a CPU one")

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                setattr(self, f.name, _build(f.type, value))

    def resolved(self) -> "TrainConfig":
        """A copy with the embedded default backbones, the device's type ("cpu" or "cuda") and an "auto"
        precision filled in (what the key and the run use: a GPU run, or a machine without bfloat16 units,
        trains and caches its own numbers under its own key). A device this machine lacks is a HadaError."""
        from hada.devices import resolve_device

        data, model = self.data, self.model
        if not data.backbones:
            from hada.backbones import EMBEDDED_BACKBONES

            data = replace(data, backbones=list(EMBEDDED_BACKBONES[:2]))
        device = resolve_device(self.device).type
        if model.precision == "auto":
            model = replace(model, precision="bf16" if has_bf16(device) else "fp32")
        return replace(self, data=data, model=model, device=device)

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """What makes a run this run: every setting but the dataset's folder, whose content the feature stores'
        ids already cover (a run is the same run wherever its data folder was moved)."""
        out = self.to_dict()
        out["data"].pop("data_root")
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """A config from its nested dict; an unknown key is one clear error."""
        return _build(cls, d)

    def override(self, overrides: dict | None = None, **dotted) -> "TrainConfig":
        """A copy with some values changed, given nested (``{"model": {"gnn": "gcn"}}``) or dotted
        (``**{"model.gnn": "gcn"}``) or by a leaf's own name when it is unique (``gnn="gcn"``)."""
        merged = self.to_dict()
        for key, value in {**_flatten(overrides or {}), **dotted}.items():
            _set_path(merged, _full_path(key), value)
        return TrainConfig.from_dict(merged)


# ------------------------------------------------------------------------------------------------- recipes
#: Named configurations as overrides of the defaults. "miniature" is what the book trains on the embedded data:
#: GATv2 at width 128 with 4 heads of 32 channels (the paper concatenates 4 heads of the full width), which
#: makes an epoch several times faster on a CPU at about the same validation Rsum (benchmarks/bench_epoch.py),
#: a budget of 10 epochs of 3,000 pairs, and bfloat16 on a GPU that supports it (float32 on the CPU).
RECIPES: dict[str, dict] = {
    "default": {},
    "miniature": {"model": {"width": 128, "out_dim": 128, "heads": 4, "head_dim": 32, "precision": "auto"},
                  "optim": {"epochs": 10, "pairs_per_epoch": 3000}},
}

#: The published recipe (HADA_m_extend with its C5 config; shared/DESIGN.md section 1a, item by item): every
#: setting where the paper's code departs from our defaults, and the published value of a few defaults an ablation
#: flips (hard negatives against the momentum keys). The widths, heads and one layer are the defaults.
RECIPES["paper"] = {
    "data": {"token_stats": "global", "augment_p": 0.75, "augment_backbones": "main", "augment_policy": "albef"},
    "model": {"dropout": 0.7, "attention_dropout": 0.7, "post_dropout": 0.7, "init": "kaiming",
              "embed_norm": "standardise", "norm": "graph", "edges": {"self_loops": "mean"}},
    "loss": {"queue_size": 64000, "queue_init": "random", "itm_head": "linear", "itm_dropout": 0.7,
             "itm_negatives": "hada", "itm_keys": "momentum", "distill_source": "hada", "alpha_ramp": True},
    "optim": {"epochs": 100, "lr": 5e-5, "batch_size": 20, "t0": 30, "t_mult": 2, "eta_min": 5e-6,
              "schedule_step": "iteration", "patience": 5, "min_delta": 0.1, "warm_start": "online"},
}


def _merged(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s nested values on top (a recipe built on another)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in over.items():
        out[key] = _merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


#: The follow-up (HADA-LAVIS, BLIP + CLIP ViT-L/14-336): the paper's recipe with the second backbone as ONE node
#: (its pooled embedding), tokens and embeddings entering raw (no L2 norm, no standardisation), every training
#: sample augmented in every backbone (BLIP's training transform for the main backbone, ALBEF's for CLIP, as
#: HADA-LAVIS makes CLIP's training views), ITC 0.5 / 0.5, lr 1e-4, dropout 0.4, batch 40, min lr 1e-5, MSCOCO's test
#: split on the first 5 captions of each image. It trains as two separate runs, each to early stopping:
#: ``lavis-stage1`` without the mix (the HADA similarity alone, w = 0), then ``lavis`` (stage 2) warm-started from
#: stage 1 through ``--init-from``, with a fresh optimiser, schedule, queue, tau and momentum encoders, learning w
#: from 0.5 (``warm_start="online"``, as the published recipe's).
_LAVIS = _merged(RECIPES["paper"], {
    "data": {"token_stats": "raw", "augment_p": 1.0, "augment_backbones": "all", "augment_policy": "lavis",
             "test_captions_per_image": 5},
    "model": {"single_node": [1], "dropout": 0.4, "attention_dropout": 0.4, "post_dropout": 0.4,
              "embed_norm": "raw"},
    "loss": {"i2t_weight": 0.5, "t2i_weight": 0.5, "itm_dropout": 0.4},
    "optim": {"lr": 1e-4, "batch_size": 40, "eta_min": 1e-5},
})
RECIPES["lavis-stage1"] = _merged(_LAVIS, {"loss": {"mix": False}})
RECIPES["lavis"] = _LAVIS  # stage 2: run it with --init-from a finished lavis-stage1 run


#: The recipe a command or a library call uses when none is named: the one that trains in minutes on a CPU.
DEFAULT_RECIPE = "miniature"


def recipe(name: str = DEFAULT_RECIPE, overrides: dict | None = None, **dotted) -> TrainConfig:
    """The named recipe, with ``overrides`` (nested or dotted keys, see :meth:`TrainConfig.override`)."""
    if name not in RECIPES:
        raise HadaError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return TrainConfig().override(RECIPES[name]).override(overrides, **dotted)


def load_config_file(path: str | Path) -> dict:
    """A run described in a YAML or JSON file: nested sections (data, model, loss, optim), dotted keys, or a
    leaf's own name; an optional ``recipe`` key names the recipe the file starts from."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise HadaError(f"config file {path} is a folder; give the YAML or JSON file inside it")
    if not path.is_file():
        raise HadaError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix.lower() == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as exc:  # a parser's own message names the line
        raise HadaError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: "
                        f"{_parse_problem(exc)}; fix it or give another --config") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise HadaError(f"config file {path} must hold a mapping of settings, got {type(values).__name__}")
    return values


def _parse_problem(exc: Exception) -> str:
    """A parser's complaint in one line, with its line number (YAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    lines = str(exc).splitlines()
    problem = getattr(exc, "problem", None) or (lines[0] if lines else type(exc).__name__)
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def has_bf16(device_type: str) -> bool:
    """Whether "auto" precision means bfloat16 on this device type: on CUDA when the GPU supports it, never on
    the CPU (:data:`PRECISIONS` says why), whatever :func:`cpu_has_bf16` answers."""
    if device_type == "cuda":
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return False


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX tiles or AVX512-BF16); elsewhere bfloat16
    products are emulated. The benchmarks print it beside their bf16 rows."""
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


# ---------------------------------------------------------------------------------------- dict <-> configs
def leaf_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, dataclasses.Field)`` of every leaf setting, in declaration order (the CLI's options)."""
    out = []
    for f in fields(cls):
        kind = _dataclass_type(f.type)
        if kind is not None:
            out += leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f))
    return out


def _dataclass_type(annotation) -> type | None:
    kinds = {c.__name__: c for c in (DataConfig, ModelConfig, LossConfig, OptimConfig, EdgeWeights, TrainConfig)}
    return kinds.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))


def _build(cls, values: dict):
    if isinstance(cls, str):
        cls = _dataclass_type(cls)
    if is_dataclass(values):
        return values
    if not isinstance(values, dict):
        raise HadaError(f"{cls.__name__} needs a mapping of settings, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise HadaError(f"unknown {cls.__name__} settings: {', '.join(unknown)}")
    kwargs = {}
    for name, value in values.items():
        kind = _dataclass_type(known[name].type)
        if kind is not None:
            kwargs[name] = _build(kind, value)
        else:
            kwargs[name] = _checked(cls.__name__, name, str(known[name].type), value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise HadaError(f"{cls.__name__}: {exc}") from None


_SCALARS = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _checked(owner: str, name: str, annotation: str, value):
    """``value`` when it has the field's type (a whole number passes as a float, a list as ``list[str]``), else one
    clear error: a config file with ``width: wide`` must not end in a comparison deep inside a dataclass."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return value
    if value is not None:
        for kind in kinds:
            if kind.startswith("list") and isinstance(value, (list, tuple, str, int)):
                return value
            if kind == "float" and isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    continue
            expected = _SCALARS.get(kind)
            if expected and isinstance(value, expected) and not (kind != "bool" and isinstance(value, bool)):
                return float(value) if kind == "float" else value
    raise HadaError(f"{owner}.{name} must be {' or '.join(kinds)}, got {value!r}")


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and _full_path(prefix + key, strict=False) in _SECTIONS:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


_LEAVES = {path: f for path, f in leaf_fields()}
_SECTIONS = {"data", "model", "loss", "optim", "model.edges"}


def _full_path(key: str, strict: bool = True) -> str:
    """A dotted path, or a leaf's own name when only one leaf has it (``gnn`` -> ``model.gnn``)."""
    if key in _LEAVES or key in _SECTIONS:
        return key
    matches = [p for p in _LEAVES if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if strict:
        raise HadaError(f"unknown setting {key!r}" + (f" (ambiguous: {matches})" if matches else ""))
    return key


def get_path(tree: dict, path: str):
    """The value at a dotted path of a config's nested dict (``"model.edges.w_fc"``)."""
    for part in path.split("."):
        tree = tree[part]
    return tree


def _set_path(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        tree = tree[p]
    tree[leaf] = value


def _check_floats(obj, ranges: dict | None = None) -> None:
    """Every float setting of ``obj`` finite, and within ``ranges[name]`` (inclusive) where given: a NaN or a
    1e30 learning rate must be one line here, not a failure inside AdamW or a numba kernel."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if "float" not in str(f.type) or value is None or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HadaError(f"{f.name} must be a finite number, got {value!r}")
        lo, hi = (ranges or {}).get(f.name, (-math.inf, math.inf))
        if not lo <= value <= hi:
            raise HadaError(f"{f.name} must be in [{lo:g}, {hi:g}], got {value!r}")


def _choose(obj, name: str, choices: tuple) -> None:
    if getattr(obj, name) not in choices:
        raise HadaError(f"{name} must be one of {', '.join(choices)}; got {getattr(obj, name)!r}")


def _at_least_one(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < 1:
            raise HadaError(f"{name} must be >= 1, got {value}")

