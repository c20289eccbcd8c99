"""Where the book's recipe (``miniature``) departs from the published one (``paper``), setting by setting, and why.

The table is generated from the two recipe objects; only the reasons are written here. A setting that differs
and has no reason is an error (``departure_table``), so a recipe change cannot leave the table behind.
"""

from __future__ import annotations

from hada.config import get_path, leaf_fields, recipe

#: Kinds of reason: "budget" (what a 2-core build can afford), "scale" (the embedded data's size),
#: "no effect" (inactive in both recipes), "our choice" (a design decision, not forced by the budget).
DEPARTURES: dict[tuple[str, ...], tuple[str, str]] = {
    ("model.width", "model.out_dim", "model.head_dim"): (
        "budget", "The published attention concatenates {p_heads} heads of the full width ({p_channels:,} channels at "
                  "width {p_width}); {m_heads} heads of {m_head_dim} channels at width {m_width} make a step many times "
                  "cheaper on a CPU."),
    ("model.precision",): (
        "budget", "auto: the encoders' matrix products in bfloat16 on a GPU that supports it (the loss, softmax "
                  "and readout stay float32), float32 on the CPU, where bfloat16 autocast makes a step slower."),
    ("optim.epochs",): (
        "budget", "The published recipe trains for up to {p_epochs} epochs, to early stopping; every run of the book "
                  "(the published recipe's own run in the results chapter included) stops at {m_epochs}, which a "
                  "2-core build can afford."),
    ("optim.pairs_per_epoch",): (
        "budget", "A fresh draw of {m_pairs:,} pairs per epoch instead of all {train_captions:,} training captions keeps "
                  "an epoch to seconds."),
    ("optim.batch_size",): (
        "budget", "Larger batches: fewer steps, each cheaper per pair on a CPU."),
    ("optim.lr",): (
        "budget", "A higher rate for a run of {m_epochs} short epochs."),
    ("optim.t0", "optim.t_mult", "optim.eta_min", "optim.schedule_step"): (
        "budget", "One cosine cycle over the run's epochs. The published first cycle lasts {p_t0} epochs, so a "
                  "{m_epochs}-epoch run would end {cycle_share:.0%} of the way down it, still at a high rate."),
    ("model.dropout", "model.attention_dropout", "model.post_dropout", "loss.itm_dropout"): (
        "budget", "Dropout {p_dropout:g} in four places regularises a long run over Flickr30k's {flickr_captions:,} "
                  "training captions; a run of {m_epochs} short epochs needs speed of learning more than regularisation."),
    ("data.augment_p",): (
        "budget", "Augmented views are extracted ahead, one more pass over the training images per view (of the "
                  "main backbone, in the published recipe); the miniature trains on the plain view only."),
    ("data.augment_backbones", "data.augment_policy"): (
        "no effect", "Which backbones see an augmented view, and how the views are made: the miniature draws none; "
                     "the published augments its main backbone alone, with ALBEF's training transform."),
    ("loss.queue_size", "loss.queue_init"): (
        "scale", "The train split has {train_captions:,} captions: a {p_queue:,}-slot queue would hold {queue_ratio:.1f} "
                 "times the data, much of it random vectors for a whole short run, and scoring every batch "
                 "against it is a large share of a published step on a CPU."),
    ("optim.min_delta",): (
        "scale", "Every improvement of the validation Rsum counts; a {m_epochs}-epoch run with patience "
                 "{m_patience} stops early rarely either way."),
    ("model.norm",): (
        "no effect", "LayerNorm between graph layers: both recipes have one layer, so neither applies it."),
    ("optim.warm_start",): (
        "no effect", "What a warm start (--init-from) loads: the published loads the online encoders and the "
                     "matching head only, tau, w and the momentum encoders starting fresh. The book's one run "
                     "that starts from another (the HADA-LAVIS graph's second stage) takes that value."),
    ("loss.distill_source", "loss.alpha_ramp"): (
        "no effect", "Distillation settings: distillation is off in both (as in the published C5 config)."),
    ("data.token_stats",): (
        "our choice", "The embedded backbones' tokens have different scales; standardising each backbone and "
                      "modality on its own keeps one of them from setting the scale of all."),
    ("model.embed_norm",): (
        "our choice", "The backbones' own embeddings enter the readout as unit vectors, at the scale of the "
                      "cosine they are trained for, instead of standardised with the token statistics."),
    ("model.init",): (
        "our choice", "PyTorch's default initialisation; the published Kaiming-normal is an option."),
    ("model.edges.self_loops",): (
        "our choice", "A self loop of weight {m_self:g}, as the paper's text describes; the published code fills "
                      "it with the mean of the node's incoming edge weights."),
    ("loss.itm_head",): (
        "our choice", "A hidden layer lets the matching head combine [a, b, |a-b|, a*b] non-linearly; the "
                      "published head is one linear map ({p_itm:,} parameters)."),
    ("loss.itm_negatives",): (
        "our choice", "Hard negatives come from the similarity that is ranked at test time (HADA mixed with the "
                      "main backbone); the published ones from HADA's alone."),
}


def differing_settings(a: str = "paper", b: str = "miniature") -> list[tuple[str, object, object]]:
    """``(dotted path, value in a, value in b)`` of every setting where the recipes ``a`` and ``b`` differ."""
    va, vb = recipe(a).to_dict(), recipe(b).to_dict()
    return [(path, get_path(va, path), get_path(vb, path)) for path, _ in leaf_fields()
            if get_path(va, path) != get_path(vb, path)]


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def reason_values(train_captions: int) -> dict:
    """The numbers the reasons quote, from the two recipes and the training split's size."""
    from hada.data.datasets import EXPECTED_IMAGES

    paper, mini = recipe("paper"), recipe("miniature")
    pm, mm = paper.model, mini.model
    return {"p_heads": pm.heads, "p_width": pm.width, "p_channels": pm.heads * (pm.head_dim or pm.width),
            "m_heads": mm.heads, "m_head_dim": mm.head_dim or mm.width, "m_width": mm.width,
            "m_pairs": mini.optim.pairs_per_epoch, "m_epochs": mini.optim.epochs, "m_patience": mini.optim.patience,
            "p_t0": paper.optim.t0, "p_epochs": paper.optim.epochs, "cycle_share": mini.optim.epochs / paper.optim.t0,
            "p_dropout": pm.dropout, "flickr_captions": 5 * EXPECTED_IMAGES["flickr30k"]["train"],
            "train_captions": train_captions, "p_queue": paper.loss.queue_size,
            "queue_ratio": paper.loss.queue_size / train_captions, "m_self": mm.edges.w_self,
            "p_itm": 4 * pm.out_dim + 1}


def departure_table(train_captions: int):
    """One row per group of settings where the miniature departs from the published recipe: the published and
    the miniature values, the kind of reason and the reason (its numbers from :func:`reason_values` for a
    training split of ``train_captions``). Raises if a differing setting has no reason."""
    from hada.book.tables import Table
    from hada.errors import HadaError

    differing = differing_settings()
    by_path = {path: (paper, mini) for path, paper, mini in differing}
    missing = [p for p in by_path if not any(p in group for group in DEPARTURES)]
    if missing:
        raise HadaError(f"settings where the miniature departs from the paper without a reason: {missing}")
    values = reason_values(train_captions)
    rows = []
    for group, (kind, why) in DEPARTURES.items():
        present = [p for p in group if p in by_path]
        if not present:
            continue
        rows.append({"name": ", ".join(present), "paper": " / ".join(_show(by_path[p][0]) for p in present),
                     "miniature": " / ".join(_show(by_path[p][1]) for p in present), "kind": kind,
                     "why": why.format(**values)})
    return Table(rows, columns=(("name", "setting"), ("paper", "paper"), ("miniature", "miniature"),
                                ("kind", "reason"), ("why", "why")),
                 caption=f"The {len(differing)} settings where the book's recipe (miniature) departs from the "
                         "published one (paper)")
