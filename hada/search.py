"""Searching a trained run: a caption against a split's images, or an image against its captions.

A query goes through exactly what a stored sample went through, so a caption of the split finds the scores
evaluation gave it: each backbone of the run (loaded from its spec, :func:`hada.backbones.load_backbone`)
makes its tokens and projected embedding as :mod:`hada.features.store` does, rounded to the store's fp16,
normalised with the run's train statistics (:meth:`hada.features.batching.FeatureData._normalise`), then the
run's encoder embeds them. The gallery is the split's stored features embedded as
:meth:`hada.train.TrainedModel.similarity` embeds them, and a query is scored with the same inference
similarity, ``(1 - w) cos_HADA + w cos_main``.

Entry points: :class:`RunSearch` (``hada search``), and :func:`text_to_image_ranks` / :func:`choose_queries`
for the chapter "Retrieval, seen", which compares a backbone's ranking with HADA's, query by query.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hada.errors import HadaError

STORE_DTYPE = torch.float16  # what hada.features.store keeps tokens and embeddings in (TOKEN_DTYPE)


# ------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class Hit:
    """One retrieved item: its 1-based rank, its row in the split (image row or caption row) and its score.
    ``correct``: whether it belongs to the query, when that is known (a query taken from the split)."""

    rank: int
    row: int
    score: float
    image_id: int
    path: Path
    caption: str | None = None
    correct: bool | None = None


# ------------------------------------------------------------------------------------------ queries
def _as_stored(x: Tensor) -> Tensor:
    """fp32 values as the feature store holds them (fp16), so a query from the split equals its stored row."""
    return x.to(STORE_DTYPE).to(torch.float32)


def query_batch(backbones, stats, modality: str, inputs, with_tokens: bool = True, device=None):
    """One :class:`~hada.model.encoder.ModalityBatch` of queries (``inputs``: captions, or RGB PIL images),
    made as extraction and batching make a stored sample's (tokens in the store's layout and precision,
    normalised with the run's train statistics ``stats``, a FeatureStats)."""
    from hada.features.batching import FeatureData
    from hada.model.encoder import ModalityBatch

    tokens, lengths, embeds = [], [], []
    for k, backbone in enumerate(backbones):
        with backbone.autocast():
            tb = backbone.encode_image_tokens(inputs) if modality == "image" else backbone.encode_text_tokens(inputs)
        t, n = _as_stored(tb.tokens).to(device), tb.lengths.to(device)
        embeds.append(_as_stored(tb.embeds).to(device))
        if not with_tokens:
            continue
        mask = None if modality == "image" else torch.arange(t.shape[1], device=t.device) < n[:, None]
        st = (stats.image if modality == "image" else stats.text)[k]
        tokens.append(FeatureData._normalise(t, st, mask))
        lengths.append(n)
    return ModalityBatch(tokens=tokens, lengths=lengths, embeds=embeds)


def read_image(path) -> "object":
    """The RGB image at ``path``; one HadaError line when it is missing or not an image."""
    from hada.data.images import open_rgb

    path = Path(path).expanduser()
    if not path.is_file():
        raise HadaError(f"no image file at {path}")
    from PIL import Image

    try:
        return open_rgb(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # Unidentified...: an OSError
        raise HadaError(f"cannot read {path} as an image: {str(exc).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------ a run's gallery
class RunSearch:
    """A trained run and one split of its data as a search space (see the module docstring).

    ``trained``: :func:`hada.train.load_trained` result; ``dataset``: the run's dataset (image paths and
    captions), default the one its configuration names. Backbones are loaded on the first query.
    """

    def __init__(self, trained, split: str = "test", dataset=None):
        from hada.data.datasets import load_dataset
        from hada.evaluate import embed_split

        cfg = trained.config.resolved()
        self.trained, self.split, self.specs = trained, split, list(cfg.data.backbones)
        self.dataset = dataset or load_dataset(cfg.data.dataset, cfg.data.data_root, check_images=False)
        if split not in self.dataset.splits_allowed:
            raise HadaError(f"no split {split!r} in {cfg.data.dataset}; splits: {', '.join(self.dataset.splits_allowed)}")
        self.records = self.dataset.split(split)
        self.data = trained.load_data(split)
        self.captions = [c for r in self.records for c in r.captions]
        if len(self.records) != self.data.n_images or len(self.captions) != self.data.n_captions:
            raise HadaError(f"the {split} split has {len(self.records)} images / {len(self.captions)} captions but "
                            f"the run's features have {self.data.n_images} / {self.data.n_captions}: not the same data")
        self.caption_image_index = np.asarray(self.data.caption_image_index)
        self.image, self.text = embed_split(trained.pair, self.data, cfg.data.eval_batch_size)
        self.main_image, self.main_text = self.data.main_embeddings(0)
        self.weights = tuple(float(w) for w in trained.objective.inference_weights())  # (1 - w, w)
        self._backbones = None

    @classmethod
    def open(cls, run_dir, split: str = "test", device="cpu") -> "RunSearch":
        from hada.train import load_trained

        return cls(load_trained(run_dir, device=device), split)

    @property
    def backbones(self) -> list:
        if self._backbones is None:
            from hada.backbones import load_backbone

            self._backbones = [load_backbone(s, device=str(self.trained.device)) for s in self.specs]
        return self._backbones

    @torch.no_grad()
    def encode(self, modality: str, inputs) -> tuple[Tensor, Tensor]:
        """L2-normalised (run embedding [n, d], main backbone's embedding [n, E]) of captions or images."""
        tokens = self.trained.config.model.arch == "hada"
        batch = query_batch(self.backbones, self.trained.stats, modality, inputs, tokens, self.trained.device)
        encoder = self.trained.pair.image if modality == "image" else self.trained.pair.text
        was = encoder.training
        encoder.eval()
        try:
            fused = encoder(batch)
        finally:
            encoder.train(was)
        return fused, F.normalize(batch.embeds[0], dim=-1)

    def _rank(self, fused: Tensor, main: Tensor, gallery: tuple[Tensor, Tensor], k: int) -> list[tuple[int, float]]:
        w_fused, w_main = self.weights
        scores = w_fused * (gallery[0] @ fused[0]) + w_main * (gallery[1] @ main[0])
        order = torch.sort(scores.float().cpu(), descending=True, stable=True)
        return [(int(i), float(s)) for s, i in zip(order.values[:k], order.indices[:k])]

    def text_to_image(self, query: str, k: int = 5) -> list[Hit]:
        """The split's ``k`` images scored highest for a caption; ``correct`` marked if the caption is the split's."""
        query = (query or "").strip()
        if not query:
            raise HadaError("empty query: give a caption to search for, or --image PATH")
        fused, main = self.encode("text", [query])
        own = {int(self.caption_image_index[j]) for j, c in enumerate(self.captions) if c == query}
        return [Hit(r + 1, i, s, self.records[i].image_id, Path(self.records[i].path),
                    correct=(i in own) if own else None)
                for r, (i, s) in enumerate(self._rank(fused, main, (self.image, self.main_image), k))]

    def image_to_text(self, image, k: int = 5) -> list[Hit]:
        """The split's ``k`` captions scored highest for an image (a path or a PIL image); ``correct`` marked if the
        image is one of the split's files."""
        path = Path(image).expanduser().resolve() if isinstance(image, (str, Path)) else None
        pil = read_image(path) if path is not None else image
        fused, main = self.encode("image", [pil])
        own = next((i for i, r in enumerate(self.records) if Path(r.path).resolve() == path), None)
        hits = []
        for r, (j, s) in enumerate(self._rank(fused, main, (self.text, self.main_text), k)):
            i = int(self.caption_image_index[j])
            hits.append(Hit(r + 1, j, s, self.records[i].image_id, Path(self.records[i].path), self.captions[j],
                            None if own is None else i == own))
        return hits

    def similarity(self):
        """The split's images x captions inference similarity (what evaluation scores), from the gallery."""
        from hada.metrics import EmbeddingSimilarity

        w_fused, w_main = self.weights
        return EmbeddingSimilarity([(w_fused, self.image, self.text), (w_main, self.main_image, self.main_text)])


# ------------------------------------------------------------------------------------------ comparing rankings
def text_to_image_ranks(similarity, caption_image_index) -> np.ndarray:
    """0-based rank of each caption's own image among the split's images (ties count for it, as in the recalls)."""
    from hada.metrics import retrieval_ranks

    return retrieval_ranks(similarity, caption_image_index)[1].numpy()


def top_images(similarity, captions, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(image rows [n, k], scores [n, k]) of the ``k`` images scored highest for each chosen caption row."""
    from hada.metrics import as_similarity

    src = as_similarity(similarity)
    cols = [src.block(slice(0, src.shape[0]), slice(int(j), int(j) + 1))[:, 0].float().cpu() for j in captions]
    order = [torch.sort(c, descending=True, stable=True) for c in cols]
    return (np.array([o.indices[:k].numpy() for o in order], dtype=np.int64).reshape(len(cols), -1),
            np.array([o.values[:k].numpy() for o in order], dtype=np.float64).reshape(len(cols), -1))


def outcome(ranks_a: np.ndarray, ranks_b: np.ndarray) -> np.ndarray:
    """Per query, +1 where B ranks the right image higher than A (B wins), -1 where lower, 0 where equal."""
    return np.sign(np.asarray(ranks_a) - np.asarray(ranks_b)).astype(np.int64)


#: Why a query is shown: drawn at random, or picked among the challenger's visible wins / losses.
REASONS = ("random", "win", "loss")


def choose_queries(ranks_a: np.ndarray, ranks_b: np.ndarray, n_random: int, n_losses: int, n_wins: int = 0,
                   seed: int = 0, visible: int | None = None) -> list[tuple[int, str]]:
    """``(caption row, reason)`` of the queries to show, the computation's choice and the same on every rebuild.

    In one seeded permutation of the captions: its first ``n_random``, then among the rest the first ``n_wins``
    where B ranks the right image higher than A and the first ``n_losses`` where B ranks it lower. With
    ``visible``, a win or loss counts only when one of the two puts the right image in its top ``visible`` (so a
    figure of top images shows it). Fewer wins or losses come back if there are fewer.
    """
    from hada.metrics import pick_rows

    o = outcome(ranks_a, ranks_b)
    seen = np.minimum(ranks_a, ranks_b) < visible if visible else np.ones(len(o), dtype=bool)
    return pick_rows(len(o), [("win", (o > 0) & seen, n_wins), ("loss", (o < 0) & seen, n_losses)], seed, n_random)


@dataclass
class TextToImageComparison:
    """Two scorers' text -> image rankings of one split, query by query, and the queries chosen to show.

    ``methods``: (reference, challenger), e.g. (the best backbone, HADA); ``ranks[m]``: 0-based rank of each
    caption's own image; ``top[m]``: (image rows, scores) of the shown queries' top images.
    """

    methods: tuple[str, str]
    split: str
    records: list
    captions: list[str]
    caption_image_index: np.ndarray
    ranks: dict
    shown: list[int]
    reasons: list[str]  # per shown query, one of REASONS
    top: dict

    @property
    def outcome(self) -> np.ndarray:
        """+1 where the challenger ranks the right image higher than the reference, -1 lower, 0 equal."""
        return outcome(self.ranks[self.methods[0]], self.ranks[self.methods[1]])

    def counts(self, rows=None) -> dict[str, int]:
        """``{"queries", "wins", "losses", "ties", "both_first"}`` of the challenger over ``rows`` (default: every
        caption); ``both_first``: ties where both rank the right image first."""
        o = self.outcome if rows is None else self.outcome[np.asarray(rows, dtype=np.int64)]
        rows = np.arange(len(self.outcome)) if rows is None else np.asarray(rows, dtype=np.int64)
        first = (self.ranks[self.methods[0]][rows] == 0) & (self.ranks[self.methods[1]][rows] == 0)
        return {"queries": int(len(o)), "wins": int((o > 0).sum()), "losses": int((o < 0).sum()),
                "ties": int((o == 0).sum()), "both_first": int(first.sum())}

    def recall_at(self, method: str, k: int = 1) -> float:
        """Text -> image R@k of ``method`` in percent (the number the results table shows)."""
        return 100.0 * float((self.ranks[method] < k).mean())

    def queries(self) -> list[dict]:
        """The shown queries as plain rows (drawn by :class:`hada.book.views.RetrievalView`)."""
        rows = []
        for q, j in enumerate(self.shown):
            own = int(self.caption_image_index[j])
            results = {m: [{"path": Path(self.records[i].path), "image_id": self.records[i].image_id,
                            "score": float(s), "correct": int(i) == own}
                           for i, s in zip(*(a[q] for a in self.top[m]))] for m in self.methods}
            why = {"random": "drawn at random", "win": f"a query {self.methods[1]} wins",
                   "loss": f"a query {self.methods[1]} loses"}[self.reasons[q]]
            ranks = ", ".join(f"{m} {int(self.ranks[m][j]) + 1}" for m in self.methods)
            rows.append({"row": j, "caption": self.captions[j], "results": results,
                         "note": f"({why}; rank of its image: {ranks})"})
        return rows


def compare_text_to_image(search: RunSearch, similarities: dict, n_random: int = 3, n_wins: int = 2,
                          n_losses: int = 2, top: int = 5, seed: int = 0) -> TextToImageComparison:
    """Rank every caption of ``search``'s split under two images x captions similarities ``{name: similarity}``
    (reference first, then challenger), choose the queries to show (:func:`choose_queries`, wins and losses
    visible in the ``top`` images) and collect their top images."""
    if len(similarities) != 2:
        raise HadaError(f"compare two rankings, got {len(similarities)}")
    methods = tuple(similarities)
    ranks = {m: text_to_image_ranks(s, search.caption_image_index) for m, s in similarities.items()}
    chosen = choose_queries(ranks[methods[0]], ranks[methods[1]], n_random, n_losses, n_wins, seed, visible=top)
    shown = [j for j, _ in chosen]
    tops = {m: top_images(s, shown, top) for m, s in similarities.items()}
    return TextToImageComparison(methods, search.split, search.records, search.captions, search.caption_image_index,
                                 ranks, shown, [why for _, why in chosen], tops)
