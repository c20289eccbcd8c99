#!/usr/bin/env bash
# The oldest versions pyproject.toml admits, checked on a CPU: a venv with torch 2.11, its torchvision (0.26) and
# torch-geometric 2.8.0 (what the GPU machines' image holds), made with this machine's python (3.12 where it has
# one, else 3.11), then `gpu_check.sh --quick --device cpu` run with it through the GPU kit, exactly as on a GPU
# machine: hada from the source tree, open_clip and its needs installed offline from .gpu-kit, no numba.
#
#     bash benchmarks/old_versions_check.sh          # venv under /tmp (about 5 GB: PyPI's torch is a CUDA build)
#
# Environment: PYTHON (the interpreter for the venv), HADA_OLD_VENV (where it goes; default
# /tmp/hada-old-py3.X), OUT (where gpu_check.txt and the rows go; default /tmp/hada-old-versions).
# Needs PyPI once for the venv and, when .gpu-kit is empty, for `make gpu-kit`; a venv already holding these
# versions is reused.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=2.11.0 TORCHVISION=0.26.0 PYG=2.8.0

works() { "$1" -c 'import sys, venv; sys.exit(sys.version_info[:2] not in ((3, 12), (3, 11)))' 2>/dev/null; }
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for c in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3 python3.11 python3; do
    if works "$c"; then py="$c"; break; fi
  done
fi
[ -n "$py" ] && works "$py" || { echo "old_versions_check: no Python 3.12 or 3.11 found (set PYTHON)" >&2; exit 2; }
ver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
venv="${HADA_OLD_VENV:-/tmp/hada-old-py$ver}"

have() { "$venv/bin/python" - "$@" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
want = dict(a.split("==") for a in sys.argv[1:])
sys.exit(any(version(n).split("+")[0] != v for n, v in want.items()))
EOF
}
pins=(torch==$TORCH torchvision==$TORCHVISION torch-geometric==$PYG)
if [ ! -x "$venv/bin/python" ]; then
  echo "== venv $venv with $py ($("$py" --version))"
  "$py" -m venv "$venv"
fi
if ! have "${pins[@]}"; then
  echo "== installing ${pins[*]} into $venv (from PyPI: a CUDA build of torch, several GB)"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q --progress-bar off "${pins[@]}"
fi
have "${pins[@]}" || { echo "old_versions_check: $venv does not hold ${pins[*]}" >&2; exit 1; }

if ! ls .gpu-kit/*.whl >/dev/null 2>&1; then
  echo "== no GPU kit yet: make gpu-kit"
  "$py" benchmarks/gpu_kit.py download --dest .gpu-kit
fi

"$venv/bin/python" -c "import sys, torch, torchvision, torch_geometric
print('venv:', sys.executable, sys.version.split()[0], '| torch', torch.__version__, '| torchvision',
      torchvision.__version__, '| torch_geometric', torch_geometric.__version__)"
"$venv/bin/python" -c "import open_clip" 2>/dev/null && echo "note: open_clip is already in the venv, not from the kit"
"$venv/bin/python" -c "import numba" 2>/dev/null && echo "note: numba is in the venv (the CPU's fused kernels)"
export OUT="${OUT:-/tmp/hada-old-versions}"
PYTHON="$venv/bin/python" bash benchmarks/gpu_check.sh --quick --device cpu
