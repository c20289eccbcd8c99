"""The embedded synthetic dataset: rendered scenes of coloured shapes, in Flickr30k's Karpathy layout.

Flickr30k cannot be fetched offline, so ``hada data synth`` writes a stand-in that the same loader
reads: ``<root>/dataset_flickr30k.json`` (``"dataset": "synthetic"``) and ``<root>/flickr30k-images/``.

What a scene is. A 64 px image (64 to 96 allowed) on a white, gray or cream background holds one to
three objects in distinct cells of a 3 x 3 grid. Each object has a shape (circle, square, triangle,
diamond, star, cross), a colour (8), a size (small, medium, large) and a pattern (solid, striped,
outlined). Every image has five different captions. Per-image extra keys (``background``,
``objects`` with each object's attributes, pixel centre and radius, ``group`` and ``edit``) let tests
and the book check captions against pixels; loaders ignore them.

Why the captions differ by split. The ``pretrain`` split is only for pretraining the small embedded
CLIP backbones, and its captions are *coarse*, like web alt-text: colours and shapes only, sometimes
only one of the objects, never a size, pattern, position, relation or count. The ``train``, ``val``
and ``test`` captions are *detailed*: sizes, patterns, positions, relations ("to the left of"),
counts and the background. A backbone pretrained on coarse text has no reason to keep the details in
its pooled embedding, but its patch tokens still carry them (each patch sees its own pixels). That
is the situation in which HADA, which reads the backbones' token features through a graph, can beat
every backbone and any fusion of their pooled embeddings, as web-pretrained CLIP leaves room on
Flickr30k.

Why retrieval is hard. Scenes come in groups of two to four near-duplicates: a base scene and
variants that each differ from it in exactly one attribute (one object's colour, shape, size,
pattern or position, two objects swapped, or one object added or removed). Every split is made of
such groups by the same sampler, drawn interleaved, so attribute distributions are identical across
splits; no scene (ignoring sub-pixel jitter) occurs twice in the whole dataset.

Determinism. One seed drives a small random stream built only on ``random.Random.random()`` (whose
sequence Python guarantees across versions); rendering is a pure function of the scene, so the
worker count does not matter, and PNGs are written with fixed settings and no metadata: the same
seed gives byte-identical json and images.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hada.errors import HadaError
from hada.io import progress_enabled, replace_folder

GENERATOR_VERSION = 1
JSON_NAME = "dataset_flickr30k.json"
IMAGE_DIR = "flickr30k-images"
STAMP_NAME = "synth.json"
SPLITS = ("pretrain", "train", "val", "test")
CAPTIONS_PER_IMAGE = 5
DEFAULT_IMAGE_SIZE = 64
IMAGE_SIZE_RANGE = (64, 96)

# --- the world: attribute values and how they look ---------------------------------------------
COLORS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 25),
    "yellow": (235, 210, 35),
    "green": (45, 160, 65),
    "cyan": (40, 195, 210),
    "blue": (40, 80, 215),
    "purple": (135, 60, 185),
    "pink": (240, 130, 195),
}
BACKGROUNDS = {"white": (250, 250, 250), "gray": (196, 196, 196), "cream": (242, 230, 200)}
OUTLINE_RGB = (25, 25, 25)
STRIPE_SHADE = 0.5  # stripes are the object's own colour, darkened, so the colour word stays true
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZES = ("small", "medium", "large")
PATTERNS = ("solid", "striped", "outlined")
RADIUS = {"small": 0.075, "medium": 0.105, "large": 0.14}  # fraction of the image side
GRID = 3
MAX_OBJECTS = 3
GROUP_SIZES = (2, 3, 4)
EDIT_WEIGHTS = {"color": 1.0, "shape": 1.0, "size": 1.0, "pattern": 1.0, "position": 1.0, "swap": 1.0, "count": 0.5}
ATTRIBUTE_VALUES = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES, "pattern": PATTERNS}

# --- the words ------------------------------------------------------------------------------------
SHAPE_WORDS = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "star": ("star", "five-pointed star"),
    "cross": ("cross", "plus sign"),
}
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
                 "diamond": "diamonds", "star": "stars", "cross": "crosses"}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium", "medium-sized", "mid-sized"),
              "large": ("large", "big", "huge")}
PATTERN_ADJECTIVES = {"solid": ("solid", "filled"), "striped": ("striped",), "outlined": ("outlined",)}
PATTERN_SUFFIXES = {"striped": ("with stripes", "with dark stripes"),
                    "outlined": ("with a black outline", "with a dark border")}
RELATION_WORDS = {"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
                  "above": ("above", "over"), "below": ("below", "under", "beneath")}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
COLLECTIVE_WORDS = ("shapes", "objects", "figures")
COARSE_PREFIXES = ("", "a photo of ", "an image of ", "a picture of ", "a drawing of ", "clip art of ",
                   "an illustration of ", "a graphic with ")
_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


@dataclass(frozen=True)
class SplitSizes:
    """Images per split; the preset names are what ``--size`` accepts."""

    pretrain: int
    train: int
    val: int
    test: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())


SIZE_PRESETS = {"default": SplitSizes(6000, 3000, 500, 1000), "tiny": SplitSizes(40, 40, 20, 20)}


@dataclass(frozen=True)
class ObjectSpec:
    """One object; ``offset`` is a jitter of -1..1 in 1/64 of the image side (not an attribute)."""

    shape: str
    color: str
    size: str
    pattern: str
    cell: tuple[int, int]  # (row, col) in the 3 x 3 grid
    offset: tuple[int, int] = (0, 0)

    def appearance(self) -> tuple[str, str, str, str]:
        return (self.shape, self.color, self.size, self.pattern)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ObjectSpec, ...]

    def key(self) -> tuple:
        """Identity of a scene up to jitter and object order: no two images in the dataset share one."""
        return (self.background, tuple(sorted((o.cell, o.appearance()) for o in self.objects)))


@dataclass(frozen=True)
class Item:
    """One image before it is written: its scene, its group, how it differs from the group's base."""

    split: str
    scene: Scene
    group: int
    edit: dict | None
    captions: tuple[str, ...]


@dataclass(frozen=True)
class SynthResult:
    root: Path
    created: bool  # False when the folder already held this exact dataset
    counts: dict[str, int]
    seconds: float


class _Rng:
    """Random choices built only on ``random()``, whose sequence Python keeps stable across versions."""

    def __init__(self, seed: int):
        self._random = random.Random(seed).random

    def below(self, n: int) -> int:
        return min(int(self._random() * n), n - 1)

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def chance(self, p: float) -> bool:
        return self._random() < p

    def shuffled(self, seq) -> list:
        out = list(seq)
        for i in range(len(out) - 1, 0, -1):
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out

    def weighted(self, weights: dict):
        total = sum(weights.values())
        x = self._random() * total
        for key, w in weights.items():
            x -= w
            if x < 0 and w > 0:
                return key
        return next(k for k, w in reversed(list(weights.items())) if w > 0)


# --- scenes and near-duplicate groups ---------------------------------------------------------------
def _free_cells(objects) -> list[tuple[int, int]]:
    used = {o.cell for o in objects}
    return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in used]


def _sample_object(rng: _Rng, cell: tuple[int, int]) -> ObjectSpec:
    return ObjectSpec(shape=rng.pick(SHAPES), color=rng.pick(ATTRIBUTE_VALUES["color"]), size=rng.pick(SIZES),
                      pattern=rng.pick(PATTERNS), cell=cell, offset=(rng.below(3) - 1, rng.below(3) - 1))


def sample_scene(rng: _Rng) -> Scene:
    n = 1 + rng.below(MAX_OBJECTS)
    cells = rng.shuffled(_free_cells(()))[:n]
    return Scene(rng.pick(tuple(BACKGROUNDS)), tuple(_sample_object(rng, c) for c in cells))


def apply_edit(rng: _Rng, scene: Scene, kind: str) -> tuple[Scene, dict] | None:
    """Change exactly one attribute of ``scene``; None when ``kind`` does not apply to it."""
    objs = list(scene.objects)
    if kind in ATTRIBUTE_VALUES:
        i = rng.below(len(objs))
        old = getattr(objs[i], kind)
        new = rng.pick([v for v in ATTRIBUTE_VALUES[kind] if v != old])
        objs[i] = replace(objs[i], **{kind: new})
        edit = {"kind": kind, "object": i, "from": old, "to": new}
    elif kind == "position":
        i = rng.below(len(objs))
        new = rng.pick(_free_cells(objs))
        edit = {"kind": kind, "object": i, "from": list(objs[i].cell), "to": list(new)}
        objs[i] = replace(objs[i], cell=new)
    elif kind == "swap":
        pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs))
                 if objs[i].appearance() != objs[j].appearance()]
        if not pairs:
            return None
        i, j = rng.pick(pairs)
        a, b = objs[i], objs[j]
        objs[i], objs[j] = replace(a, cell=b.cell, offset=b.offset), replace(b, cell=a.cell, offset=a.offset)
        edit = {"kind": kind, "objects": [i, j]}
    elif kind == "count":
        n = len(objs)
        if n == 1 or (n < MAX_OBJECTS and rng.chance(0.5)):
            objs.append(_sample_object(rng, rng.pick(_free_cells(objs))))
            edit = {"kind": kind, "object": n, "from": n, "to": n + 1}
        else:
            i = rng.below(n)
            del objs[i]
            edit = {"kind": kind, "object": i, "from": n, "to": n - 1}
    else:
        raise ValueError(f"unknown edit kind {kind!r}")
    return Scene(scene.background, tuple(objs)), edit


def sample_group(rng: _Rng, size: int, used: set) -> list[tuple[Scene, dict | None]]:
    """A base scene and ``size - 1`` variants, each one edit away from the base, all new to ``used``."""
    for _ in range(1000):
        base = sample_scene(rng)
        if base.key() in used:
            continue
        members, keys = [(base, None)], {base.key()}
        weights = dict(EDIT_WEIGHTS)
        while len(members) < size and any(weights.values()):
            kind = rng.weighted(weights)
            weights[kind] = 0.0  # distinct edit kinds within a group
            variant = apply_edit(rng, base, kind)
            if variant is None or variant[0].key() in keys or variant[0].key() in used:
                continue
            members.append(variant)
            keys.add(variant[0].key())
        if len(members) == size:
            used |= keys
            return members
    raise RuntimeError("could not sample a new near-duplicate group; the world is too small for this size")


# --- captions ------------------------------------------------------------------------------------------
def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(parts: list[str], rng: _Rng) -> str:
    if len(parts) == 1:
        return parts[0]
    comma = "," if len(parts) > 2 and rng.chance(0.3) else ""
    return ", ".join(parts[:-1]) + f"{comma} and {parts[-1]}"


def _noun_phrase(rng: _Rng, obj: ObjectSpec) -> str:
    """'a small striped red circle', 'a big blue box with a black outline', ... (size, pattern optional)."""
    words, suffix = [], ""
    if rng.chance(0.8):
        words.append(rng.pick(SIZE_WORDS[obj.size]))
    if obj.pattern == "solid":
        if rng.chance(0.2):
            words.append(rng.pick(PATTERN_ADJECTIVES["solid"]))
    elif rng.chance(0.75):
        if rng.chance(0.5):
            words.append(rng.pick(PATTERN_ADJECTIVES[obj.pattern]))
        else:
            suffix = " " + rng.pick(PATTERN_SUFFIXES[obj.pattern])
    words += [obj.color, rng.pick(SHAPE_WORDS[obj.shape])]
    return _with_article(" ".join(words)) + suffix


def position_phrase(rng: _Rng, cell: tuple[int, int]) -> str:
    row, col = cell
    side = ("left", "center", "right")[col]
    if (row, col) == (1, 1):
        return rng.pick(("in the center", "in the middle", "at the center"))
    if row == 1:
        return rng.pick((f"on the {side}", f"on the {side} side", f"at the {side}"))
    vertical = ("top", None, "bottom")[row]
    if col == 1:
        return rng.pick((f"at the {vertical}", f"at the {vertical} center", f"in the {vertical} middle"))
    vertical = rng.pick((vertical, {"top": "upper", "bottom": "lower"}[vertical]))
    return rng.pick((f"in the {vertical} {side} corner", f"at the {vertical} {side}", f"in the {vertical} {side}"))


def _placed(rng: _Rng, obj: ObjectSpec) -> str:
    phrase = _noun_phrase(rng, obj)
    return phrase + " " + position_phrase(rng, obj.cell) if rng.chance(0.9) else phrase


def _listing(rng: _Rng, scene: Scene) -> str:
    return _join([_placed(rng, o) for o in rng.shuffled(scene.objects)], rng)


def _count_phrases(scene: Scene) -> list[str]:
    n = len(scene.objects)
    if n == 1:
        return ["a single shape", "one shape", "only one object"]
    out = [f"{NUMBER_WORDS[n]} {w}" for w in COLLECTIVE_WORDS]
    for color, k in Counter(o.color for o in scene.objects).items():
        if k > 1:
            out.append(f"{NUMBER_WORDS[k]} {color} shapes")
    for shape, k in Counter(o.shape for o in scene.objects).items():
        if k > 1:
            out.append(f"{NUMBER_WORDS[k]} {SHAPE_PLURALS[shape]}")
    return out


def _relations(a: ObjectSpec, b: ObjectSpec) -> list[str]:
    out = []
    if a.cell[1] != b.cell[1]:
        out.append("left" if a.cell[1] < b.cell[1] else "right")
    if a.cell[0] != b.cell[0]:
        out.append("above" if a.cell[0] < b.cell[0] else "below")
    return out


def _t_listing(rng, scene):
    return _listing(rng, scene)


def _t_count(rng, scene):
    return f"{rng.pick(_count_phrases(scene))}: {_listing(rng, scene)}"


def _t_there(rng, scene):
    return "there is " + _listing(rng, scene)


def _t_background(rng, scene):
    bg = f"on a {scene.background} background"
    return f"{bg}, {_listing(rng, scene)}" if rng.chance(0.5) else f"{_listing(rng, scene)}, {bg}"


def _t_picture(rng, scene):
    return rng.pick(("an image of ", "a picture showing ", "this picture shows ")) + _listing(rng, scene)


def _t_relation(rng, scene):
    if len(scene.objects) < 2:
        return None
    a, b, *rest = rng.shuffled(scene.objects)
    relation = rng.pick(RELATION_WORDS[rng.pick(_relations(a, b))])
    text = f"{_noun_phrase(rng, a)} {'is ' if rng.chance(0.4) else ''}{relation} {_noun_phrase(rng, b)}"
    return text + (f", and {_placed(rng, rest[0])}" if rest else "")


DETAILED_TEMPLATES = (_t_listing, _t_count, _t_there, _t_background, _t_picture, _t_relation)


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def detailed_captions(rng: _Rng, scene: Scene, n: int = CAPTIONS_PER_IMAGE) -> tuple[str, ...]:
    """Captions that name every object with its colour and shape, and most sizes, patterns, places."""
    out: list[str] = []
    templates = rng.shuffled(DETAILED_TEMPLATES)
    for attempt in range(200):
        template = templates[attempt] if attempt < len(templates) else rng.pick(DETAILED_TEMPLATES)
        text = template(rng, scene)
        if text is not None and _sentence(text) not in out:
            out.append(_sentence(text))
        if len(out) == n:
            return tuple(out)
    raise RuntimeError(f"could not write {n} different captions for {scene}")


def coarse_caption(rng: _Rng, scene: Scene) -> str:
    """Alt-text style: colour + shape only, sometimes one object only; no size, pattern, place, count."""
    pairs = list(dict.fromkeys((o.color, o.shape) for o in rng.shuffled(scene.objects)))
    if len(pairs) > 1 and rng.chance(0.35):
        pairs = pairs[:1]
    article = rng.chance(0.6)
    parts = [f"{color} {rng.pick(SHAPE_WORDS[shape])}" for color, shape in pairs]
    parts = [_with_article(p) if article else p for p in parts]
    joined = parts[0] if len(parts) == 1 else rng.pick((" and ", ", ")).join(parts)
    return rng.pick(COARSE_PREFIXES) + joined


def coarse_captions(rng: _Rng, scene: Scene, n: int = CAPTIONS_PER_IMAGE) -> tuple[str, ...]:
    out: list[str] = []
    for _ in range(500):
        text = coarse_caption(rng, scene)
        if text not in out:
            out.append(text)
        if len(out) == n:
            return tuple(out)
    raise RuntimeError(f"could not write {n} different coarse captions for {scene}")


def tokenize(text: str) -> list[str]:
    """Karpathy-style tokens: lower case, punctuation dropped, hyphenated words kept whole."""
    return _TOKEN.findall(text.lower())


_MENTION = re.compile(
    r"\b(" + "|".join(COLORS) + r") ("
    + "|".join(sorted((w for ws in SHAPE_WORDS.values() for w in ws), key=len, reverse=True)) + r")\b"
)
_SHAPE_OF_WORD = {w: s for s, ws in SHAPE_WORDS.items() for w in ws}


def caption_mentions(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in order: every caption writes colour then shape."""
    return [(m.group(1), _SHAPE_OF_WORD[m.group(2)]) for m in _MENTION.finditer(text.lower())]


# --- sampling the whole dataset ---------------------------------------------------------------------
def sample_items(sizes: SplitSizes, seed: int) -> list[Item]:
    """All images, split by split in file order. Groups go to splits at random, in proportion to the
    room left in each, so whatever the de-duplication rejects is spread evenly across splits."""
    rng = _Rng(seed)
    remaining = sizes.as_dict()
    per_split: dict[str, list[Item]] = {s: [] for s in SPLITS}
    used: set = set()
    group = 0
    while any(remaining.values()):
        split = rng.weighted(remaining)
        n = min(rng.pick(GROUP_SIZES), remaining[split])
        for scene, edit in sample_group(rng, n, used):
            captions = coarse_captions(rng, scene) if split == "pretrain" else detailed_captions(rng, scene)
            per_split[split].append(Item(split, scene, group, edit, captions))
        remaining[split] -= n
        group += 1
    return [item for s in SPLITS for item in per_split[s]]


# --- rendering -------------------------------------------------------------------------------------------
SUPERSAMPLE = 4
_STRIPE_PERIOD = 3  # output pixels; the centre row of every object is never a stripe


def object_center(obj: ObjectSpec, image_size: int) -> tuple[int, int]:
    """Pixel (x, y) whose centre is the object's centre; its colour is the object's pure colour."""
    row, col = obj.cell
    cx = int((col + 0.5) * image_size / GRID) + round(obj.offset[0] * image_size / 64)
    cy = int((row + 0.5) * image_size / GRID) + round(obj.offset[1] * image_size / 64)
    return cx, cy


def object_radius(obj: ObjectSpec, image_size: int) -> float:
    return RADIUS[obj.size] * image_size


def _star(outer: float, inner: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        a = math.radians(-90 + 36 * k)
        r = outer if k % 2 == 0 else inner
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _regular(n: int, radius: float) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(-90 + 360 * k / n)), radius * math.sin(math.radians(-90 + 360 * k / n)))
            for k in range(n)]


# Unit shapes (radius 1, y down). Every edge of these is equally far from the origin, so scaling them
# about the origin moves every edge inward by the same amount: that is how outlines are inset.
_UNIT_POLYGONS = {
    "square": [(-0.9, -0.9), (0.9, -0.9), (0.9, 0.9), (-0.9, 0.9)],
    "diamond": [(0.0, -1.05), (1.05, 0.0), (0.0, 1.05), (-1.05, 0.0)],
    "triangle": _regular(3, 1.1),
    "star": _star(1.05, 0.47),
}


def _edge_distance(points) -> float:
    (x1, y1), (x2, y2) = points[0], points[1]
    return abs(x1 * y2 - x2 * y1) / math.hypot(x2 - x1, y2 - y1)


_EDGE_DISTANCE = {name: _edge_distance(pts) for name, pts in _UNIT_POLYGONS.items()}
_CROSS_ARM = 0.36  # half-width of the cross's arms, in radii


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, inset: float, fill) -> None:
    """Draw ``shape`` of radius ``r`` centred at (cx, cy), shrunk so that each edge moves in by ``inset``."""
    if shape == "circle":
        rr = r - inset
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill)
    elif shape == "cross":
        a, e = _CROSS_ARM * r - inset, r - inset
        pts = [(a, -e), (a, -a), (e, -a), (e, a), (a, a), (a, e),
               (-a, e), (-a, a), (-e, a), (-e, -a), (-a, -a), (-a, -e)]
        draw.polygon([(cx + x, cy + y) for x, y in pts], fill=fill)
    else:
        h = _EDGE_DISTANCE[shape] * r
        s = r * (h - inset) / h
        draw.polygon([(cx + s * x, cy + s * y) for x, y in _UNIT_POLYGONS[shape]], fill=fill)


def _draw_object(img, obj: ObjectSpec, image_size: int) -> None:
    from PIL import Image, ImageDraw

    ss = SUPERSAMPLE
    x, y = object_center(obj, image_size)
    cx, cy = (x + 0.5) * ss, (y + 0.5) * ss
    r = object_radius(obj, image_size) * ss
    color = COLORS[obj.color]
    draw = ImageDraw.Draw(img)
    if obj.pattern == "outlined":
        _draw_shape(draw, obj.shape, cx, cy, r, 0.0, OUTLINE_RGB)
        _draw_shape(draw, obj.shape, cx, cy, r, max(0.2 * r, 0.9 * ss), color)
        return
    _draw_shape(draw, obj.shape, cx, cy, r, 0.0, color)
    if obj.pattern == "striped":
        import numpy as np

        mask = Image.new("L", img.size, 0)
        _draw_shape(ImageDraw.Draw(mask), obj.shape, cx, cy, r, 0.0, 255)
        period = _STRIPE_PERIOD * ss
        phase = (np.arange(img.size[1]) + 0.5 - cy) % period
        rows = (phase >= 1.5 * ss) & (phase < 2.5 * ss)  # one output pixel per period, never the centre row
        stripes = np.asarray(mask) * rows[:, None].astype(np.uint8)
        dark = tuple(int(c * STRIPE_SHADE) for c in color)
        img.paste(dark, mask=Image.fromarray(stripes))


def render(scene: Scene, image_size: int = DEFAULT_IMAGE_SIZE):
    """The scene as an RGB PIL image: drawn at 4x and box-filtered down, so edges are anti-aliased while
    every pixel well inside an object keeps its exact colour."""
    from PIL import Image

    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    for obj in scene.objects:
        _draw_object(img, obj, image_size)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def _render_task(task: tuple[str, Scene, int]) -> None:
    path, scene, image_size = task
    render(scene, image_size).save(path, format="PNG", compress_level=6, optimize=False)


# --- writing ----------------------------------------------------------------------------------------------
def filename_for(image_id: int) -> str:
    return f"{image_id:05d}.png"


def _object_json(obj: ObjectSpec, image_size: int) -> dict:
    return {"shape": obj.shape, "color": obj.color, "size": obj.size, "pattern": obj.pattern,
            "cell": list(obj.cell), "offset": list(obj.offset), "center": list(object_center(obj, image_size)),
            "radius": round(object_radius(obj, image_size), 3)}


def _image_json(image_id: int, item: Item, image_size: int) -> dict:
    sentids = [image_id * CAPTIONS_PER_IMAGE + j for j in range(len(item.captions))]
    sentences = [{"tokens": tokenize(raw), "raw": raw, "imgid": image_id, "sentid": sid}
                 for raw, sid in zip(item.captions, sentids)]
    return {"filename": filename_for(image_id), "imgid": image_id, "split": item.split, "sentids": sentids,
            "sentences": sentences, "background": item.scene.background,
            "objects": [_object_json(o, image_size) for o in item.scene.objects],
            "group": item.group, "edit": item.edit}


def build_json(items: list[Item], size: str, seed: int, image_size: int) -> bytes:
    doc = {"images": [_image_json(i, item, image_size) for i, item in enumerate(items)],
           "dataset": "synthetic",
           "generator": {"name": "hada.synth", "version": GENERATOR_VERSION, "size": size, "seed": seed,
                         "image_size": image_size}}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _default_root(root) -> Path:
    if root is not None:
        return Path(root)
    from hada.paths import synthetic_root

    return synthetic_root()


def _stamp(size: str, seed: int, image_size: int, sizes: SplitSizes, json_sha256: str) -> dict:
    return {"generator": "hada.synth", "version": GENERATOR_VERSION, "size": size, "seed": seed,
            "image_size": image_size, "counts": sizes.as_dict(), "json_sha256": json_sha256}


def _read_stamp(root: Path) -> dict | None:
    """The stamp, ``{}`` when it exists but cannot be read (still ours to replace), None when absent."""
    path = root / STAMP_NAME
    if not path.exists():
        return None
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def _is_complete(root: Path, stamp: dict) -> bool:
    """The stamp is written last, but check the json hash and the image count too (files can be deleted)."""
    import hashlib

    try:
        digest = hashlib.sha256((root / JSON_NAME).read_bytes()).hexdigest()
        n_images = sum(1 for e in os.scandir(root / IMAGE_DIR) if e.name.endswith(".png"))
    except OSError:
        return False
    return digest == stamp.get("json_sha256") and n_images == sum(stamp.get("counts", {}).values())


def _wants(stamp: dict, size: str, seed: int, image_size: int) -> bool:
    made = (stamp.get("version"), stamp.get("size"), stamp.get("seed"), stamp.get("image_size"))
    return made == (GENERATOR_VERSION, size, seed, image_size)


def _describe(stamp: dict) -> str:
    return (f"a synthetic dataset made with size={stamp.get('size')}, seed={stamp.get('seed')}, "
            f"image size {stamp.get('image_size')}, generator version {stamp.get('version')}")


def _check_target(root: Path, size: str, seed: int, image_size: int, force: bool) -> bool:
    """True when ``root`` already holds this dataset. Raises when replacing it would need ``force``,
    or would delete something that is not a synthetic dataset."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise HadaError(f"{root} exists and is not a folder; choose another --data-root")
    stamp = _read_stamp(root)
    if stamp is None and any(root.iterdir()):
        raise HadaError(f"{root} is not empty and holds no {STAMP_NAME}, so it is not a synthetic dataset; "
                        "refusing to overwrite it (choose an empty or new --data-root)")
    complete = stamp is not None and _is_complete(root, stamp)
    if complete and _wants(stamp, size, seed, image_size):
        return not force
    if stamp is not None and not force:
        state = _describe(stamp) if complete else "an incomplete or damaged synthetic dataset"
        raise HadaError(f"{root} holds {state}; pass --force to replace it")
    return False


def _write_images(items: list[Item], folder: Path, image_size: int, workers: int, progress: bool) -> None:
    from tqdm import tqdm  # plain text bars: readable in terminals, notebooks and logs

    tasks = [(str(folder / filename_for(i)), item.scene, image_size) for i, item in enumerate(items)]
    bar = tqdm(total=len(tasks), desc="rendering", unit="img", disable=not progress_enabled(progress))
    if workers <= 1:
        for task in tasks:
            _render_task(task)
            bar.update()
    else:
        import multiprocessing

        with multiprocessing.get_context().Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_task, tasks, chunksize=128):
                bar.update()
    bar.close()


def generate(root: Path | str | None = None, size: str = "default", seed: int = 0, *,
             image_size: int = DEFAULT_IMAGE_SIZE, force: bool = False, progress: bool = True,
             workers: int | None = None) -> SynthResult:
    """Write the synthetic dataset to ``root`` (default ``synthetic_root()``), unless it is already there.

    Everything is written to a hidden sibling folder and renamed into place at the end, so an
    interrupted run leaves nothing half-written under ``root``.
    """
    if size not in SIZE_PRESETS:
        raise HadaError(f"unknown size {size!r}; choose one of: {', '.join(SIZE_PRESETS)}")
    if not IMAGE_SIZE_RANGE[0] <= image_size <= IMAGE_SIZE_RANGE[1]:
        raise HadaError(f"image size {image_size} is outside {IMAGE_SIZE_RANGE[0]}..{IMAGE_SIZE_RANGE[1]} px")
    root = _default_root(root).expanduser().resolve()
    sizes = SIZE_PRESETS[size]
    start = time.perf_counter()
    if _check_target(root, size, seed, image_size, force):
        return SynthResult(root, False, sizes.as_dict(), time.perf_counter() - start)

    import hashlib

    items = sample_items(sizes, seed)
    payload = build_json(items, size, seed, image_size)
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"  # per process: two `hada prepare` may run at once
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run of a process with the same id
    (tmp / IMAGE_DIR).mkdir(parents=True)
    if workers is None:  # a pool only pays off beyond a few hundred images
        workers = min(2, os.cpu_count() or 1) if len(items) >= 400 else 1
    _write_images(items, tmp / IMAGE_DIR, image_size, workers, progress)
    (tmp / JSON_NAME).write_bytes(payload)
    stamp = _stamp(size, seed, image_size, sizes, hashlib.sha256(payload).hexdigest())
    (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    replace_folder(tmp, root)
    return SynthResult(root, True, sizes.as_dict(), time.perf_counter() - start)


# --- a trivial baseline: how far colour alone gets -----------------------------------------------------
def _random_recalls(n_img: int, n_cap: int, per_image: int) -> dict[str, float]:
    """Expected recalls of a random ranking, exactly."""
    out = {}
    for k in (1, 5, 10):
        miss = math.comb(n_cap - per_image, k) / math.comb(n_cap, k)
        out[f"text_retrieval_recall@{k}"] = 100.0 * (1 - miss)
    for k in (1, 5, 10):
        out[f"image_retrieval_recall@{k}"] = 100.0 * k / n_img
    out["rsum"] = sum(out.values())
    return out


def _pixel_colour_histograms(paths: list[Path]):
    """Per image, the share of object pixels nearest to each palette colour (stripes count as theirs)."""
    import numpy as np
    from PIL import Image

    names = list(COLORS)
    refs = [COLORS[c] for c in names] + [tuple(int(v * STRIPE_SHADE) for v in COLORS[c]) for c in names]
    labels = list(range(len(names))) * 2
    refs += list(BACKGROUNDS.values()) + [OUTLINE_RGB]
    labels += [-1] * (len(BACKGROUNDS) + 1)
    refs_arr, labels_arr = np.array(refs, dtype=np.float32), np.array(labels)
    hist = np.zeros((len(paths), len(names)), dtype=np.float64)
    for i, path in enumerate(paths):
        px = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).reshape(-1, 1, 3)
        nearest = labels_arr[((px - refs_arr[None]) ** 2).sum(-1).argmin(1)]
        counts = np.bincount(nearest[nearest >= 0], minlength=len(names))
        hist[i] = counts / max(counts.sum(), 1)
    return hist


def _cosine(a, b):
    import numpy as np

    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def trivial_baseline_recalls(root: Path | str | None = None, split: str = "test",
                             seed: int = 0) -> dict[str, dict]:
    """Recalls of three matchers that need no learning, to show where the floor and the coarse ceiling are.

    - ``random``: the expected recalls of a random ranking.
    - ``color_histogram``: the colour words of a caption (bag of words) against the image's histogram of
      pixels over the palette (cosine). What a model that sees only colour can do.
    - ``color_shape_oracle``: the caption's (colour, shape) mentions against the image's true objects
      (cosine of bags). A perfect *coarse* model, as pretraining on alt-text captions teaches: it knows
      every colour and shape but no size, pattern, position, relation or count.
    Ties are broken at random (seeded), never by file order (near-duplicates sit next to each other).
    """
    import numpy as np

    from hada.metrics import retrieval_metrics

    root = _default_root(root)
    doc = json.loads((root / JSON_NAME).read_text())
    entries = [e for e in doc["images"] if e["split"] == split]
    if not entries:
        raise HadaError(f"split {split!r} of {root / JSON_NAME} has no images")
    captions = [s["raw"] for e in entries for s in e["sentences"]]
    caption_image = np.array([i for i, e in enumerate(entries) for _ in e["sentences"]])
    colors = list(COLORS)
    pairs = [(c, s) for c in colors for s in SHAPES]

    text_colors = np.array([[Counter(tokenize(t))[c] for c in colors] for t in captions], dtype=np.float64)
    image_colors = _pixel_colour_histograms([root / IMAGE_DIR / e["filename"] for e in entries])
    mentions = [Counter(caption_mentions(t)) for t in captions]
    text_pairs = np.array([[m[p] for p in pairs] for m in mentions], dtype=np.float64)
    objects = [Counter((o["color"], o["shape"]) for o in e["objects"]) for e in entries]
    image_pairs = np.array([[m[p] for p in pairs] for m in objects], dtype=np.float64)

    noise = np.random.default_rng(seed).random((len(entries), len(captions))) * 1e-6
    return {
        "random": _random_recalls(len(entries), len(captions), CAPTIONS_PER_IMAGE),
        "color_histogram": retrieval_metrics(_cosine(image_colors, text_colors) + noise, caption_image),
        "color_shape_oracle": retrieval_metrics(_cosine(image_pairs, text_pairs) + noise, caption_image),
    }
