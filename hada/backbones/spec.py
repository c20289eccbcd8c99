"""Backbone spec strings -> an open_clip model name plus a weights file that is already on disk.

Nothing here downloads. A spec is one of

* an embedded name (``tiny-vit``): weights in ``backbones_dir()/<name>/`` (written by ``hada backbones pretrain``);
* ``<embedded name>@<epoch>`` (``tiny-vit@1``): the snapshot pretraining kept after that epoch (a weaker model);
* ``MODEL:TAG``: an open_clip pretrained tag, looked up only in local caches;
* ``MODEL:/path/to/weights.bin`` (or ``.pt``/``.pth``/``.safetensors``): a local weights file;
* ``local-dir:/path``: an open_clip folder with ``open_clip_config.json`` and a weights file.

Resolving a spec to a file first (instead of letting open_clip "download or find" it) is what makes a missing
file a one-line :class:`HadaError` that says which file and where to put it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hada.errors import HadaError
from hada.paths import backbones_dir, data_dir

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_CONFIG_DIR = PACKAGE_DIR / "model_configs"
RECIPES_FILE = PACKAGE_DIR / "embedded.json"

WEIGHTS_FILE = "open_clip_model.safetensors"  # name open_clip's local-dir loader prefers
CONFIG_FILE = "open_clip_config.json"
RECORD_FILE = "hada_backbone.json"
SNAPSHOT_DIR = "snapshots"  # inside an embedded backbone's folder: epoch<N>/ per kept epoch
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def load_recipes() -> dict:
    """The embedded backbones: open_clip model name, input mode and pretraining recipe, in a fixed order."""
    return json.loads(RECIPES_FILE.read_text())["backbones"]


EMBEDDED_BACKBONES: tuple[str, ...] = tuple(load_recipes())


class _RandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model ... Model initialized randomly." record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def random_init_expected():
    """Around an ``open_clip.create_model`` call whose random init is what hada asks for (an embedded backbone
    pretrained from scratch, a ``MODEL:random`` spec): open_clip then warns on the root logger that no pretrained
    weights were loaded, which is true and expected here, and only adds noise to every build log. The filter
    holds for this call only: a load that was meant to read weights still warns."""
    notice, root = _RandomInitNotice(), logging.getLogger()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


_registered = False


def register_model_configs() -> None:
    """Make the package's model configs known to open_clip (idempotent)."""
    global _registered
    if _registered:
        return
    import open_clip

    open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


def openclip_cache_dir() -> Path:
    """Where pretrained tags are looked up: ``HADA_OPENCLIP_CACHE`` or ``<data>/open_clip_cache``."""
    return Path(os.environ.get("HADA_OPENCLIP_CACHE", data_dir() / "open_clip_cache"))


@dataclass
class ResolvedSpec:
    """What to build: open_clip ``model_name`` + an existing ``weights`` file (None = random init, tests only)."""

    spec: str
    kind: str  # "embedded" | "tag" | "file" | "local-dir" | "random"
    model_name: str
    weights: Path | None
    preprocess_overrides: dict = field(default_factory=dict)  # from a pretrained tag (mean/std/...)
    quick_gelu: bool = False
    hada: dict = field(default_factory=dict)  # hada input options, e.g. {"grayscale": true}
    local_dir: Path | None = None

    @property
    def source(self) -> str:
        """One line for manifests: where the weights came from."""
        if self.kind == "random":
            return "random-init:seed0"
        return f"{self.kind}:{self.weights}"


def file_sha256(path: Path, _cache: dict = {}) -> str:  # noqa: B006 - deliberate per-process memo
    """sha256 of a file, memoised by (path, inode, size, mtime, ctime) so large weights are hashed once per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)  # ctime: no one sets it back
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _cache[key] = h.hexdigest()
    return _cache[key]


def _missing_embedded(name: str, path: Path) -> HadaError:
    return HadaError(
        f"backbone '{name}' has no weights: {path} is missing; run `hada backbones pretrain --backbones {name}` "
        f"(writes {path.parent}/)"
    )


def _resolve_embedded(name: str) -> ResolvedSpec:
    recipe = load_recipes()[name]
    folder = backbones_dir() / name
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() or not (folder / RECORD_FILE).is_file():
        raise _missing_embedded(name, weights)
    return ResolvedSpec(
        spec=name,
        kind="embedded",
        model_name=recipe["model"],
        weights=weights,
        hada={"grayscale": bool(recipe.get("grayscale", False))},
        local_dir=folder,
    )


def split_snapshot(spec: str) -> tuple[str, int | None]:
    """``"tiny-vit@2"`` -> ``("tiny-vit", 2)``; any other spec -> ``(spec, None)``."""
    name, at, epoch = spec.partition("@")
    if at and name in EMBEDDED_BACKBONES and epoch.isdigit():
        return name, int(epoch)
    return spec, None


def _resolve_snapshot(name: str, epoch: int) -> ResolvedSpec:
    resolved = _resolve_embedded(name)  # the finished backbone must exist: its pretraining wrote the snapshots
    folder = resolved.local_dir / SNAPSHOT_DIR / f"epoch{epoch}"
    if not (folder / WEIGHTS_FILE).is_file():
        kept = sorted(p.name.removeprefix("epoch") for p in (resolved.local_dir / SNAPSHOT_DIR).glob("epoch*"))
        raise HadaError(f"backbone '{name}' has no snapshot after epoch {epoch} ({folder} is missing; kept: "
                        f"{', '.join(kept) or 'none'}; the epochs are the 'snapshots' of its recipe)")
    return ResolvedSpec(spec=f"{name}@{epoch}", kind="embedded", model_name=resolved.model_name,
                        weights=folder / WEIGHTS_FILE, hada=dict(resolved.hada), local_dir=folder)


def _resolve_local_dir(spec: str, path: str) -> ResolvedSpec:
    folder = Path(path).expanduser()
    cfg_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise HadaError(f"{spec}: folder {folder} does not exist")
    if not cfg_path.is_file():
        raise HadaError(f"{spec}: {cfg_path} is missing (an open_clip local-dir needs {CONFIG_FILE} + weights)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise HadaError(f"{spec}: {cfg_path} is not valid json ({exc})") from exc
    if "model_cfg" not in cfg:
        raise HadaError(f"{spec}: {cfg_path} has no 'model_cfg' key")
    found = [p for p in sorted(folder.iterdir()) if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    from open_clip.factory import _find_checkpoint_in_dir

    chosen = _find_checkpoint_in_dir(folder) if found else None
    if chosen is None:
        raise HadaError(
            f"{spec}: no weights file in {folder}; put the model's weights there as {WEIGHTS_FILE} "
            f"(or open_clip_pytorch_model.bin)"
        )
    return ResolvedSpec(
        spec=spec,
        kind="local-dir",
        model_name=f"local-dir:{folder}",
        weights=Path(chosen),
        hada=dict(cfg.get("hada", {})),
        local_dir=folder,
    )


def _find_cached_tag(cfg: dict, cache_dir: Path) -> tuple[Path | None, list[str]]:
    """Look for a tag's weights in the hub cache layout and open_clip's url cache; never touches the network."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    expected: list[str] = []
    caches = [cache_dir, None]  # ours first, then the default hub cache (HF_HOME)
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)
        names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for c in caches:
            for n in names:
                hit = try_to_load_from_cache(repo_id=repo, filename=n, cache_dir=c)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit), expected
        expected.append(f"hub repo {repo} file {names[-1]} under {cache_dir} (huggingface cache layout)")
    url = cfg.get("url", "")
    if url:
        name = os.path.basename(url)
        for folder in (cache_dir, Path.home() / ".cache" / "clip"):
            if (folder / name).is_file():
                return folder / name, expected
        expected.append(f"{cache_dir / name}")
    return None, expected


def check_spec_name(spec: str) -> None:
    """Raise the one-line "unknown backbone" error for a spec that names no backbone, without needing its weights:
    a command that only reads stored features must not send the user to extract features for a typo."""
    spec = spec.strip()
    if spec in EMBEDDED_BACKBONES or split_snapshot(spec)[1] is not None or spec.startswith(("local-dir:", "hf-hub:")):
        return
    if ":" not in spec:
        resolve_spec(spec)  # the unknown-backbone line
    register_model_configs()
    import open_clip

    model = spec.split(":", 1)[0]
    if model.replace("/", "-") not in open_clip.list_models():
        raise HadaError(f"unknown backbone '{spec}': no open_clip model '{model}' (see open_clip.list_models())")


def resolve_spec(spec: str) -> ResolvedSpec:
    """Turn a spec string into a model name and a weights file that exists, or raise one clear HadaError."""
    spec = spec.strip()
    if not spec:
        raise HadaError("empty backbone spec")
    if spec in EMBEDDED_BACKBONES:
        return _resolve_embedded(spec)
    name, epoch = split_snapshot(spec)
    if epoch is not None:
        return _resolve_snapshot(name, epoch)
    if spec.startswith("local-dir:"):
        return _resolve_local_dir(spec, spec[len("local-dir:"):])
    if spec.startswith("hf-hub:"):
        raise HadaError(f"{spec}: hf-hub specs would download; copy the repo to a folder and use local-dir:/path")
    if ":" not in spec:
        raise HadaError(
            f"unknown backbone '{spec}': use an embedded name ({', '.join(EMBEDDED_BACKBONES)}), NAME@EPOCH "
            f"(a pretraining snapshot), MODEL:TAG, MODEL:/path/to/weights or local-dir:/path"
        )
    model, pretrained = spec.split(":", 1)
    register_model_configs()
    import open_clip

    model_clean = model.replace("/", "-")
    if model_clean not in open_clip.list_models():
        raise HadaError(f"unknown open_clip model '{model}' in spec '{spec}' (see open_clip.list_models())")
    if pretrained in ("", "none", "random"):
        return ResolvedSpec(spec=spec, kind="random", model_name=model_clean, weights=None)
    looks_like_path = os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)
    if looks_like_path:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise HadaError(f"{spec}: weights file {path} does not exist")
        return ResolvedSpec(spec=spec, kind="file", model_name=model_clean, weights=path)
    cfg = open_clip.get_pretrained_cfg(model_clean, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_clean)
        raise HadaError(f"{spec}: '{pretrained}' is not an open_clip tag of {model_clean} (tags: {', '.join(tags)})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = openclip_cache_dir()
    path, expected = _find_cached_tag(cfg, cache)
    if path is None:
        raise HadaError(
            f"{spec}: weights are not in the local cache (nothing is downloaded at run time); expected "
            + " or ".join(expected)
            + "; fetch them on a machine with internet into that cache (HADA_OPENCLIP_CACHE), or pass "
            f"{model}:/path/to/weights"
        )
    overrides = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    return ResolvedSpec(
        spec=spec,
        kind="tag",
        model_name=model_clean,
        weights=path,
        preprocess_overrides=overrides,
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )
