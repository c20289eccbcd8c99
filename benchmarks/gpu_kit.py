"""The GPU kit: the wheels a CUDA machine with torch, torchvision and torch-geometric lacks to run hada there.

A GPU machine image usually has Python with torch (and torchvision, built for that torch) and torch-geometric,
but no open_clip and no network; the project's 6 GB venv cannot travel. The kit is what is left: open_clip_torch
and what it needs beyond torch, torchvision and torch-geometric (ftfy, regex, timm, huggingface-hub, safetensors
and theirs), at environment.yml's pins, as wheels for CPython 3.12 and 3.11 on manylinux x86-64 (pure-Python
or abi3 wheels once, compiled ones once per version). About 14 MiB; the limit is 64 MiB.

numba (and llvmlite, 60 MB alone) is left out: it serves only the fused CPU kernels, and without it the CPU
takes the tiled PyTorch ops, the path CUDA always takes (hada.model.fast.dense.use_fused_kernels).

    python3 benchmarks/gpu_kit.py download [--dest .gpu-kit]     # make gpu-kit: here, with a network
    python3 benchmarks/gpu_kit.py missing [--dest .gpu-kit]      # the kit's wheels this python lacks (gpu_check.sh)

Standard library only: it runs with whatever python a machine has.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The kit's distributions: open_clip_torch and its closure, less what torch, torchvision and torch-geometric
#: bring (tests/test_environment.py checks this against the installed metadata). Versions: environment.yml's.
KIT = ["open_clip_torch", "ftfy", "wcwidth", "regex", "timm", "safetensors", "tqdm", "huggingface_hub", "hf-xet",
       "click", "httpx2", "httpcore2", "h11", "anyio", "truststore", "packaging", "PyYAML"]
#: Left out on purpose (see the docstring).
OMITTED = ["numba", "llvmlite"]
PYTHONS = ["3.12", "3.11"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
LIMIT_BYTES = 64 * 2**20


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    """environment.yml's exact pins, by canonical name."""
    found = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"^\s*-\s*([A-Za-z0-9_.\-]+)==(\S+)\s*$", line)
        if m:
            found[canonical(m.group(1))] = m.group(2)
    return found


def requirements() -> list[str]:
    pinned = pins()
    missing = [n for n in KIT if canonical(n) not in pinned]
    if missing:
        raise SystemExit(f"not pinned in environment.yml: {', '.join(missing)}")
    return [f"{n}=={pinned[canonical(n)]}" for n in KIT]


def wheel_name(path: Path) -> str:
    """The canonical distribution name of a wheel file."""
    return canonical(path.name.split("-")[0])


def download(dest: Path) -> int:
    dest.mkdir(parents=True, exist_ok=True)
    reqs = requirements()
    for version in PYTHONS:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary=:all:", "--implementation", "cp", "--python-version", version, "--dest", str(dest)]
        for platform in PLATFORMS:
            cmd += ["--platform", platform]
        print(f"python {version}: pip download {' '.join(reqs)}", flush=True)
        subprocess.run(cmd + reqs, check=True)
    wanted = {canonical(r.split("==")[0]): r.split("==")[1] for r in reqs}
    for wheel in sorted(dest.glob("*.whl")):  # one version of each: two would stop the install
        if wanted.get(wheel_name(wheel)) != wheel.name.split("-")[1]:
            print(f"removed (not in the kit): {wheel.name}")
            wheel.unlink()
    wheels = sorted(dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{total / 2**20:7.2f} MiB  in {len(wheels)} wheels under {dest} (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    if total > LIMIT_BYTES:
        print("the kit is over its limit", file=sys.stderr)
        return 1
    return 0


def missing(dest: Path) -> int:
    """Print the kit's distributions that this python has not installed (one per line), for pip to install with
    --no-deps: what is installed stays (the machine's own builds, e.g. of regex or pyyaml, and versions its
    other packages were installed against)."""
    names = sorted({wheel_name(w) for w in dest.glob("*.whl")})
    if not names:
        print(f"no wheels under {dest}: run `make gpu-kit` first", file=sys.stderr)
        return 1
    for name in names:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            print(name)
    return 0


def requires(wheel: Path) -> list[str]:
    """A wheel's Requires-Dist lines (for the tests)."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["download", "missing"])
    p.add_argument("--dest", type=Path, default=ROOT / ".gpu-kit")
    args = p.parse_args(argv)
    return download(args.dest) if args.action == "download" else missing(args.dest)


if __name__ == "__main__":
    sys.exit(main())
