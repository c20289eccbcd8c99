"""The environment is part of the result: pins and ranges must agree, and the torch stack must load.

A CPU-only torch wheel on these machines cannot load torchvision's compiled ops, which breaks
`import open_clip`; these tests make such a mismatch fail loudly instead of silently.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("book", "test"):
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def _environment_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"^\s*-\s*([A-Za-z0-9_.\-]+)==(\S+)\s*$", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def test_every_range_is_pinned_and_the_pin_satisfies_it():
    pins = _environment_pins()
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not pinned in environment.yml"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"environment.yml pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_environment_yml_installs_the_project_and_python():
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*-\s*python=3\.11\s*$", text, re.M)
    assert re.search(r"^\s*-\s*-e \.\[book,test\]\s*$", text, re.M)


def test_installed_versions_match_the_pins():
    mismatched = []
    for name, pinned in _environment_pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            mismatched.append(f"{name}: pinned {pinned}, not installed")
            continue
        if installed != pinned:
            mismatched.append(f"{name}: pinned {pinned}, installed {installed}")
    assert not mismatched, "environment differs from environment.yml:\n" + "\n".join(mismatched)


def test_torch_and_torchvision_are_a_matching_pair():
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


@pytest.mark.parametrize("module", ["open_clip", "torch_geometric", "jupytext", "papermill", "networkx"])
def test_libraries_import(module):
    __import__(module)


def _closure(roots: list[str]) -> set[str]:
    """Canonical names of the installed distributions ``roots`` need, themselves included (Linux x86-64,
    Python 3.12; extras left out)."""
    env = {"python_version": "3.12", "python_full_version": "3.12.0", "platform_machine": "x86_64",
           "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(req.name)
    return seen


def test_gpu_kit_holds_what_torch_and_torch_geometric_do_not_bring():
    """benchmarks/gpu_kit.py's list is open_clip_torch's closure less torch's, torchvision's and torch-geometric's
    (numba and llvmlite left out on purpose), every one pinned here."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_kit
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    kit = {canonicalize_name(n) for n in gpu_kit.KIT}
    needed = _closure(["open_clip_torch"]) - _closure(["torch", "torchvision", "torch-geometric"])
    assert needed <= kit, f"the GPU kit lacks {sorted(needed - kit)}"
    extra = kit - needed - {"tqdm"}  # tqdm: torch-geometric brings it, hada imports it; 80 kB
    assert not extra, f"the GPU kit holds more than it needs: {sorted(extra)}"
    assert not kit & {canonicalize_name(n) for n in gpu_kit.OMITTED}
    assert {r.split("==")[0] for r in gpu_kit.requirements()} == set(gpu_kit.KIT)  # all pinned here
