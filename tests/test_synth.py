"""The synthetic dataset: layout, captions that tell the truth about the pixels, coarse vs detailed
captions, near-duplicate groups, identical distributions across splits, determinism, safe writing."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hada.data import synthetic as synth
from hada.cli import main
from hada.errors import HadaError

# --- a caption parser written for the tests, from the generator's vocabulary only ---------------------
def _alt(words) -> str:
    return "|".join(sorted({re.escape(w) for w in words}, key=len, reverse=True))


WORD_SIZE = {w: s for s, ws in synth.SIZE_WORDS.items() for w in ws}
WORD_PATTERN = {w: p for p, ws in {**synth.PATTERN_ADJECTIVES, **synth.PATTERN_SUFFIXES}.items() for w in ws}
WORD_SHAPE = {w: s for s, ws in synth.SHAPE_WORDS.items() for w in ws}
WORD_RELATION = {w: r for r, ws in synth.RELATION_WORDS.items() for w in ws}
NP = re.compile(
    rf"(?:\b(?P<size>{_alt(WORD_SIZE)}) )?"
    rf"(?:(?P<padj>{_alt(w for ws in synth.PATTERN_ADJECTIVES.values() for w in ws)}) )?"
    rf"\b(?P<color>{_alt(synth.COLORS)}) (?P<shape>{_alt(WORD_SHAPE)})\b"
    rf"(?: (?P<suffix>{_alt(w for ws in synth.PATTERN_SUFFIXES.values() for w in ws)}))?"
)
PLACE_WORDS = "top|upper|bottom|lower|left|right|center|middle"
PP = re.compile(rf"^ (?:in|at|on) the ((?:{PLACE_WORDS})(?: (?:{PLACE_WORDS}))?)(?: (?:corner|side))?\b")
RELATION = re.compile(rf"^ (?:is )?({_alt(WORD_RELATION)}) an? ")
DETAIL_WORDS = set(WORD_SIZE) | {"striped", "stripes", "outlined", "outline", "border", "solid", "filled"} | {
    "left", "right", "top", "bottom", "upper", "lower", "center", "middle", "above", "below", "under",
    "beneath", "over", "one", "two", "three", "single", "background"}


def _cell_of(phrase: str) -> tuple[int, int]:
    words = phrase.split()
    row = next((0 if w in ("top", "upper") else 2 for w in words if w in ("top", "upper", "bottom", "lower")), 1)
    col = next((0 if w == "left" else 2 for w in words if w in ("left", "right")), 1)
    return row, col


def _fits(obj: dict, m: re.Match, with_color: bool = True) -> bool:
    pattern = WORD_PATTERN.get(m["padj"] or m["suffix"] or "")
    return ((not with_color or obj["color"] == m["color"]) and obj["shape"] == WORD_SHAPE[m["shape"]]
            and (m["size"] is None or obj["size"] == WORD_SIZE[m["size"]])
            and (pattern is None or obj["pattern"] == pattern))


def _holds(relation: str, a: dict, b: dict) -> bool:
    (ra, ca), (rb, cb) = a["cell"], b["cell"]
    return {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


# --- helpers ------------------------------------------------------------------------------------------
def _doc(root: Path) -> dict:
    return json.loads((root / synth.JSON_NAME).read_text())


def _scene_from_json(entry: dict) -> synth.Scene:
    """The scene of one image entry of the json, rebuilt from what the json records (a test's reading of it: the
    package itself never reads a scene back)."""
    objects = tuple(synth.ObjectSpec(o["shape"], o["color"], o["size"], o["pattern"], tuple(o["cell"]),
                                     tuple(o.get("offset", (0, 0)))) for o in entry["objects"])
    return synth.Scene(entry["background"], objects)


def _pixels(root: Path, entry: dict) -> np.ndarray:
    return np.asarray(Image.open(root / synth.IMAGE_DIR / entry["filename"]).convert("RGB")).astype(int)


def _nearest_color(rgb) -> str:
    return min(synth.COLORS, key=lambda c: sum((int(a) - b) ** 2 for a, b in zip(rgb, synth.COLORS[c])))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def doc(tiny_synthetic) -> dict:
    return _doc(tiny_synthetic)


@pytest.fixture(scope="module")
def default_items() -> list:
    """The default-size dataset as sampled scenes and captions (no rendering: about 2 s)."""
    return synth.sample_items(synth.SIZE_PRESETS["default"], seed=0)


# --- layout ---------------------------------------------------------------------------------------------
def test_layout_is_flickr30k_karpathy(tiny_synthetic, doc):
    assert doc["dataset"] == "synthetic"
    assert Counter(e["split"] for e in doc["images"]) == synth.SIZE_PRESETS["tiny"].as_dict()
    sentids = []
    for e in doc["images"]:
        assert {"filename", "imgid", "split", "sentids", "sentences"} <= set(e)
        assert e["sentids"] == [s["sentid"] for s in e["sentences"]]
        for s in e["sentences"]:
            assert s["imgid"] == e["imgid"] and s["tokens"] == synth.tokenize(s["raw"]) and s["tokens"]
        sentids += e["sentids"]
        with Image.open(tiny_synthetic / synth.IMAGE_DIR / e["filename"]) as im:
            assert im.size == (64, 64) and im.mode == "RGB" and im.format == "PNG"
    assert len(set(sentids)) == len(sentids)
    assert len({e["imgid"] for e in doc["images"]}) == len(doc["images"])
    stamp = json.loads((tiny_synthetic / synth.STAMP_NAME).read_text())
    assert stamp["json_sha256"] == hashlib.sha256((tiny_synthetic / synth.JSON_NAME).read_bytes()).hexdigest()


def test_every_image_has_five_distinct_captions(doc):
    for e in doc["images"]:
        raws = [s["raw"] for s in e["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5, raws


def test_splits_are_disjoint_in_ids_files_scenes_and_groups(doc):
    by_split: dict[str, list[dict]] = {}
    for e in doc["images"]:
        by_split.setdefault(e["split"], []).append(e)
    keys = [_scene_from_json(e).key() for e in doc["images"]]
    assert len(set(keys)) == len(keys), "a scene occurs twice"
    group_split = {}
    for e in doc["images"]:
        assert group_split.setdefault(e["group"], e["split"]) == e["split"], "a group spans two splits"
    files = [{e["filename"] for e in es} for es in by_split.values()]
    assert sum(map(len, files)) == len(set().union(*files))


# --- captions tell the truth about the pixels ---------------------------------------------------------
def test_object_centres_hold_the_recorded_colour_inside_the_recorded_cell(tiny_synthetic, doc):
    for e in doc["images"]:
        px = _pixels(tiny_synthetic, e)
        for o in e["objects"]:
            x, y = o["center"]
            assert tuple(px[y, x]) == synth.COLORS[o["color"]], (e["filename"], o)
            assert (y * 3 // 64, x * 3 // 64) == tuple(o["cell"])


def test_colour_words_match_the_pixels_of_the_objects_they_name(tiny_synthetic, doc):
    """Find the object a phrase names by shape (and size/pattern when given), then read its colour
    from the pixel at its centre: it must be the colour word of the phrase."""
    checked = 0
    for e in doc["images"]:
        px = _pixels(tiny_synthetic, e)
        for s in e["sentences"]:
            for m in NP.finditer(s["raw"].lower()):
                seen = {_nearest_color(px[o["center"][1], o["center"][0]]) for o in e["objects"] if _fits(o, m, False)}
                assert m["color"] in seen, (s["raw"], e["objects"])
                checked += 1
    assert checked > 500


def test_detailed_captions_name_every_object_and_their_places_truly(doc):
    places = relations = counts = 0
    for e in (e for e in doc["images"] if e["split"] != "pretrain"):
        objs = e["objects"]
        for s in e["sentences"]:
            text = s["raw"].lower()
            matches = list(NP.finditer(text))
            assert Counter((m["color"], WORD_SHAPE[m["shape"]]) for m in matches) == Counter(
                (o["color"], o["shape"]) for o in objs), (text, objs)
            for m, nxt in zip(matches, matches[1:] + [None]):
                fitting = [o for o in objs if _fits(o, m)]
                assert fitting, (text, m.group(0), objs)
                rest = text[m.end():]
                if pp := PP.match(rest):
                    assert any(tuple(o["cell"]) == _cell_of(pp[1]) for o in fitting), (text, pp[0], objs)
                    places += 1
                elif (rel := RELATION.match(rest)) and nxt is not None and nxt.start() == m.end() + rel.end():
                    kind = WORD_RELATION[rel[1]]
                    assert any(_holds(kind, a, b) for a in fitting for b in objs if _fits(b, nxt)), (text, objs)
                    relations += 1
            for number, what in re.findall(r"\b(one|two|three) (shapes|objects|figures)\b", text):
                assert synth.NUMBER_WORDS[len(objs)] == number, text
                counts += 1
            for number, color in re.findall(rf"\b(two|three) ({_alt(synth.COLORS)}) shapes\b", text):
                assert synth.NUMBER_WORDS[sum(o["color"] == color for o in objs)] == number, text
            for number, plural in re.findall(rf"\b(two|three) ({_alt(synth.SHAPE_PLURALS.values())})\b", text):
                shape = {v: k for k, v in synth.SHAPE_PLURALS.items()}[plural]
                assert synth.NUMBER_WORDS[sum(o["shape"] == shape for o in objs)] == number, text
            if re.search(r"\b(a single shape|one shape|only one object)\b", text):
                assert len(objs) == 1
            for bg in re.findall(r"on a (\w+) background", text):
                assert bg == e["background"]
    assert places > 100 and relations > 5 and counts > 5


def test_pretrain_captions_are_coarse_and_detailed_ones_are_not(doc):
    """Pretrain: colour + shape only, sometimes only one of several objects. Elsewhere: details."""
    partial = 0
    for e in (e for e in doc["images"] if e["split"] == "pretrain"):
        names = Counter((o["color"], o["shape"]) for o in e["objects"])
        for s in e["sentences"]:
            assert not set(s["tokens"]) & DETAIL_WORDS, s["raw"]
            mentioned = synth.caption_mentions(s["raw"])
            assert mentioned and set(mentioned) <= set(names), (s["raw"], names)
            partial += len(set(mentioned)) < len(names)
    assert partial > 0
    detailed = [s["tokens"] for e in doc["images"] if e["split"] != "pretrain" for s in e["sentences"]]
    share = lambda words: np.mean([bool(set(t) & words) for t in detailed])  # noqa: E731
    assert share(set(WORD_SIZE)) > 0.6
    assert share({"left", "right", "top", "bottom", "upper", "lower", "center", "middle"}) > 0.6
    assert share({"striped", "stripes", "outlined", "outline", "border"}) > 0.2


def test_rendered_shapes_look_like_their_names():
    """A medium or large object of each shape and pattern, alone: classify its silhouette from the pixels."""
    for shape in synth.SHAPES:
        for pattern, size in zip(synth.PATTERNS * 2, ("medium",) * 3 + ("large",) * 3):
            for background in synth.BACKGROUNDS:
                obj = synth.ObjectSpec(shape, "yellow", size, pattern, (1, 1))
                px = np.asarray(synth.render(synth.Scene(background, (obj,)))).astype(int)
                mask = np.abs(px - synth.BACKGROUNDS[background]).max(-1) > 40
                assert _silhouette(mask) == shape, (shape, pattern, background)


def _silhouette(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    solidity, fill = mask.sum() / _hull_area(corners), mask.sum() / box
    if fill > 0.9:
        return "square"
    if solidity < 0.685:
        return "star"
    if solidity < 0.8:
        return "cross"
    if fill > 0.62:
        return "circle"
    middle = (ys.min() + ys.max()) / 2
    return "triangle" if (ys < middle).sum() < 0.4 * len(ys) else "diamond"


def _hull_area(points: np.ndarray) -> float:
    pts = sorted(set(map(tuple, points.tolist())))
    cross = lambda o, a, b: (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])  # noqa: E731
    hull = []
    for sweep in (pts, pts[::-1]):
        part = []
        for p in sweep:
            while len(part) >= 2 and cross(part[-2], part[-1], p) <= 0:
                part.pop()
            part.append(p)
        hull += part[:-1]
    return 0.5 * abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(hull, hull[1:] + hull[:1])))


def test_images_are_the_recorded_scenes(tiny_synthetic, doc):
    for e in doc["images"][::13]:
        assert np.array_equal(np.asarray(synth.render(_scene_from_json(e))), _pixels(tiny_synthetic, e))


# --- near-duplicates ----------------------------------------------------------------------------------------
def _difference(base: list[dict], variant: list[dict]) -> str:
    """The one attribute in which two object lists differ, found without reading the ``edit`` record."""
    fields = ("color", "shape", "size", "pattern", "cell")
    if len(base) != len(variant):
        short, long = sorted((base, variant), key=len)
        assert len(long) - len(short) == 1
        assert any([o for k, o in enumerate(long) if k != i] == short for i in range(len(long)))
        return "count"
    changed = [(i, f) for i, (a, b) in enumerate(zip(base, variant)) for f in fields if a[f] != b[f]]
    if len(changed) == 2 and {f for _, f in changed} == {"cell"}:
        (i, _), (j, _) = changed
        assert base[i]["cell"] == variant[j]["cell"] and base[j]["cell"] == variant[i]["cell"]
        return "swap"
    assert len(changed) == 1, changed
    return {"cell": "position"}.get(changed[0][1], changed[0][1])


@pytest.mark.parametrize("split", ["val", "test"])
def test_near_duplicate_groups_differ_in_exactly_one_attribute(doc, split):
    groups: dict[int, list[dict]] = {}
    for e in doc["images"]:
        if e["split"] == split:
            groups.setdefault(e["group"], []).append(e)
    multi = [g for g in groups.values() if len(g) > 1]
    assert len(multi) >= 4 and sum(map(len, multi)) >= 0.8 * sum(map(len, groups.values()))
    for members in multi:
        base = [m for m in members if m["edit"] is None]
        assert len(base) == 1
        for variant in members:
            if variant is base[0]:
                continue
            assert variant["background"] == base[0]["background"]
            assert _difference(base[0]["objects"], variant["objects"]) == variant["edit"]["kind"]


def test_all_edit_kinds_occur_and_scenes_never_repeat(default_items):
    kinds = Counter(item.edit["kind"] for item in default_items if item.edit)
    assert set(kinds) == set(synth.EDIT_WEIGHTS)
    keys = [item.scene.key() for item in default_items]
    assert len(set(keys)) == len(keys) == synth.SIZE_PRESETS["default"].total


def test_attribute_distributions_match_across_splits(default_items):
    """Total variation distance between each split's and the whole set's marginals stays small."""
    def marginals(items):
        objs = [o for it in items for o in it.scene.objects]
        return {
            "color": Counter(o.color for o in objs), "shape": Counter(o.shape for o in objs),
            "size": Counter(o.size for o in objs), "pattern": Counter(o.pattern for o in objs),
            "cell": Counter(o.cell for o in objs), "n": Counter(len(it.scene.objects) for it in items),
            "background": Counter(it.scene.background for it in items),
            "edit": Counter(it.edit["kind"] if it.edit else "base" for it in items),
        }

    def tv(a: Counter, b: Counter) -> float:
        na, nb = sum(a.values()), sum(b.values())
        return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))

    pooled = marginals(default_items)
    for split in synth.SPLITS:
        mine = marginals([it for it in default_items if it.split == split])
        for name in pooled:
            assert tv(mine[name], pooled[name]) < 0.08, (split, name, mine[name], pooled[name])


# --- determinism and safe writing ------------------------------------------------------------------------
def test_same_seed_gives_byte_identical_files_whatever_the_worker_count(tiny_synthetic, tmp_path):
    synth.generate(tmp_path / "pool", size="tiny", seed=0, progress=False, workers=2)
    synth.generate(tmp_path / "other", size="tiny", seed=1, progress=False)
    assert _tree_hashes(tmp_path / "pool") == _tree_hashes(tiny_synthetic)
    assert _tree_hashes(tmp_path / "other")[synth.JSON_NAME] != _tree_hashes(tiny_synthetic)[synth.JSON_NAME]


def test_generate_reuses_refuses_and_replaces(tmp_path):
    root = tmp_path / "synthetic"
    assert synth.generate(root, size="tiny", progress=False).created
    first = _tree_hashes(root)
    assert not synth.generate(root, size="tiny", progress=False).created
    with pytest.raises(HadaError, match="seed=0.*--force"):
        synth.generate(root, size="tiny", seed=5, progress=False)
    assert _tree_hashes(root) == first
    assert synth.generate(root, size="tiny", seed=5, force=True, progress=False).created
    assert _tree_hashes(root) != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no temp folders left

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(HadaError, match="refusing"):
        synth.generate(foreign, size="tiny", force=True, progress=False)
    assert (foreign / "holiday.jpg").exists()


def test_an_interrupted_run_leaves_nothing_half_written(tmp_path, monkeypatch):
    root = tmp_path / "synthetic"
    calls = []
    real = synth._render_task

    def dies_midway(task):
        calls.append(task)
        if len(calls) == 50:
            raise KeyboardInterrupt
        real(task)

    monkeypatch.setattr(synth, "_render_task", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        synth.generate(root, size="tiny", progress=False, workers=1)
    assert not root.exists()
    monkeypatch.setattr(synth, "_render_task", real)
    assert synth.generate(root, size="tiny", progress=False).created
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_incomplete_or_damaged_dataset_is_not_reused(tmp_path):
    root = tmp_path / "synthetic"
    synth.generate(root, size="tiny", progress=False)
    next((root / synth.IMAGE_DIR).iterdir()).unlink()
    with pytest.raises(HadaError, match="incomplete"):
        synth.generate(root, size="tiny", progress=False)
    (root / synth.STAMP_NAME).write_text("{not json")
    with pytest.raises(HadaError, match="damaged"):
        synth.generate(root, size="tiny", progress=False)
    assert synth.generate(root, size="tiny", progress=False, force=True).created
    assert not synth.generate(root, size="tiny", progress=False).created


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(HadaError, match="size"):
        synth.generate(tmp_path / "a", size="huge")
    with pytest.raises(HadaError, match="64..96"):
        synth.generate(tmp_path / "a", size="tiny", image_size=200)


def test_cli_synth_writes_then_says_nothing_to_do(hada_data, capsys):
    assert main(["data", "synth", "--size", "tiny"]) == 0
    assert "wrote 120 images" in capsys.readouterr().out
    assert (hada_data / "synthetic" / synth.JSON_NAME).exists()
    assert main(["data", "synth", "--size", "tiny"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["data", "synth", "--size", "tiny", "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hada: error:") and "--force" in err and err.count("\n") == 1


# --- the trivial baselines ----------------------------------------------------------------------------------
def test_trivial_baselines(tiny_synthetic):
    res = synth.trivial_baseline_recalls(tiny_synthetic, split="test")
    assert set(res) == {"random", "color_histogram", "color_shape_oracle"}
    for metrics in res.values():
        assert all(0 <= v <= 100 for k, v in metrics.items() if k != "rsum")
        assert metrics["rsum"] == pytest.approx(sum(v for k, v in metrics.items() if k != "rsum"))
    assert res["random"]["image_retrieval_recall@1"] == pytest.approx(100 / 20)
    assert res["color_shape_oracle"]["rsum"] > res["random"]["rsum"]
