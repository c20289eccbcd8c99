#!/usr/bin/env bash
# The GPU rows of benchmarks/bench_train_step.py, as one short prepared run for a lent GPU machine (the
# project's device tool runs it in a copy of the working tree; nothing there is installed from this repo).
# It needs only python3 with torch, torch_geometric and tqdm (the H200 image has them; open_clip is not
# needed): hada is imported from the tree. Prints the tables and, when $OUT is set, keeps a copy there.
#
#     bash benchmarks/gpu_check.sh            # about 3 minutes on an H200
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_check.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, torch_geometric; print('torch', torch.__version__, 'pyg', torch_geometric.__version__, 'cuda', torch.cuda.is_available())"
  python3 benchmarks/bench_train_step.py --devices cuda --shapes embedded --batch-sizes 64 256 --steps 5 --warmup 2
  python3 benchmarks/bench_train_step.py --devices cuda --shapes paper --batch-sizes 20 40 --steps 3 --warmup 1
} 2>&1 | tee "$log"
