#!/usr/bin/env bash
# The GPU check: one prepared run for a lent GPU machine (the project's device tool runs it in a copy of the working
# tree; nothing is installed from this repo: hada is imported from the tree). At most 8 minutes on one H200, each
# part under its own time limit, then one table:
#   1. extraction: ViT-B-16 at 224 px on 6144 generated JPEGs, hada's DataLoader path vs a bare encode_image loop
#      fed by the same loader (goal >= 0.9x; benchmarks/bench_gpu_extract.py; skipped without open_clip)
#   2. one training epoch of a Flickr30k-size split (29,000 images, 145,000 captions) at the paper's shapes from
#      random features made on the device, through hada.train's own epoch (goal <= 15 s; bench_gpu_epoch.py)
#   3. the same epoch on 2 processes with torchrun, when the machine has 2 GPUs
#   4. the paper-shape rows of bench_train_step.py on CUDA (dense path checked against torch-geometric first)
#   and, after part 2's epochs, the host synchronisations of a few steps (torch.cuda.set_sync_debug_mode; goal <= 2)
# Needs the machine's own python3 (or $PYTHON) with torch, torchvision (built for that torch), torch_geometric,
# numpy, PIL and tqdm. What else hada needs there (open_clip and its needs) comes from the GPU kit (make gpu-kit,
# README), installed first with pip --no-index --no-deps into a temporary folder: only what this python lacks.
# The kit is .gpu-kit beside this tree (with the device tool: carry it) or $HADA_GPU_KIT; without one, open_clip
# must already be installed (else the extraction is skipped). Prints the tables and, when $OUT is set, keeps
# gpu_check.txt and the rows (gpu_check_rows.jsonl) there.
#
#     bash benchmarks/gpu_check.sh                        # on the GPU machine
#     bash benchmarks/gpu_check.sh --quick --device cpu   # every piece at a tiny size on a CPU (about 2-4 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
quick=() device=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=(--quick); shift ;;
    --device) device="$2"; shift 2 ;;
    *) echo "usage: $0 [--quick] [--device DEVICE]" >&2; exit 2 ;;
  esac
done
out="${OUT:-/tmp}"
mkdir -p "$out"
log="$out/gpu_check.txt" rows="$out/gpu_check_rows.jsonl"
: > "$rows"

# The kit: what this python lacks of it, installed offline into a folder removed at the end.
kit="${HADA_GPU_KIT:-$PWD/.gpu-kit}" site=""
if ls "$kit"/*.whl >/dev/null 2>&1; then
  site="$(mktemp -d "${TMPDIR:-/tmp}/hada-gpu-kit.XXXXXX")"
  trap 'rm -rf "$site"' EXIT
  need=$("$PY" benchmarks/gpu_kit.py missing --dest "$kit") || exit 1
  if [ -n "$need" ]; then
    # shellcheck disable=SC2086  # one distribution name per word
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --find-links "$kit" --target "$site" $need || { echo "gpu_check: the kit did not install" >&2; exit 1; }
  fi
  kit_line="GPU kit $kit: installed ${need:-nothing (all present)}" kit_line="${kit_line//$'\n'/ }"
else
  kit_line="GPU kit: none at $kit (make gpu-kit); using what $PY has"
fi
export PYTHONPATH="$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HADA_NO_PROGRESS=1

# part NAME SECONDS COMMAND...: run under a time limit; a timeout, or a failure that wrote no row of its own,
# becomes a row of the table
part() {
  local name="$1" limit="$2"; shift 2
  echo "== $name (limit ${limit}s): $*"
  local before; before=$(wc -l < "$rows")
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  if [ $rc -eq 124 ] || { [ $rc -ne 0 ] && [ "$(wc -l < "$rows")" -eq "$before" ]; }; then
    local why="failed (exit $rc)"; [ $rc -eq 124 ] && why="timed out after ${limit}s"
    echo "{\"check\": \"$name\", \"result\": \"$why\"}" >> "$rows"
  fi
}

{
  date -u
  echo "$kit_line"
  "$PY" --version
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, torch_geometric; print('torch', torch.__version__, 'pyg', torch_geometric.__version__, 'cuda', torch.cuda.is_available(), 'gpus', torch.cuda.device_count())"
  "$PY" -c "import open_clip; print('open_clip', open_clip.__version__)" 2>/dev/null || echo "open_clip: not installed"
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

  part extraction 150 "$PY" benchmarks/bench_gpu_extract.py ${quick[@]+"${quick[@]}"} --device "$device" --json "$rows"
  if [ ${#quick[@]} -gt 0 ]; then
    part epoch 120 "$PY" benchmarks/bench_gpu_epoch.py --quick --sync-steps 4 --device "$device" --json "$rows"
    part "epoch, 2 processes" 120 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
      benchmarks/bench_gpu_epoch.py --quick --batch-sizes 8 --device "$device" --json "$rows"
  else
    part epoch 150 "$PY" benchmarks/bench_gpu_epoch.py --batch-sizes 64 256 --sync-steps 6 --device "$device" \
      --json "$rows"
    if [ "$gpus" -ge 2 ]; then  # batch per process: the global batches are those of one process at 64 and 256
      part "epoch, 2 processes" 100 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
        benchmarks/bench_gpu_epoch.py --batch-sizes 32 128 --json "$rows"
    else
      echo "{\"check\": \"epoch, 2 processes\", \"result\": \"skipped: $gpus GPU(s)\"}" >> "$rows"
    fi
    part "train step" 75 "$PY" benchmarks/bench_train_step.py --devices cuda --shapes paper --batch-sizes 20 40 \
      --steps 3 --warmup 1 --no-reference
  fi

  echo
  echo "== summary"
  "$PY" - "$rows" <<'EOF'
import json, sys
sys.path.insert(0, "benchmarks")
from tables import markdown_table

table = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["check"] == "extraction" and "img_s" in r:
        setting = f"{r['path']}; {r['images']} JPEGs, batch {r['batch']}, {r['workers']} workers, {r['device']}"
        measured = f"{r['img_s']} img/s" + (f" ({r['ratio']}x bare)" if "ratio" in r else "")
        table.append(["extraction", setting, measured, r.get("goal", "-"), r.get("result", "-")])
    elif r["check"].startswith("epoch") and "seconds" in r:
        setting = (f"{r['processes']} process(es) x batch {r['batch']}, {r['captions']:,} pairs, {r['steps']} steps, "
                   f"{r['shape']} shape, {r['features_gb']} GB features on {r['device']}")
        peak = f", peak {r['peak_gib']} GiB" if r.get("peak_gib") is not None else ""
        table.append([r["check"], setting, f"{r['seconds']} s ({r['pairs_s']} pairs/s{peak})", r["goal"], r["result"]])
    elif r["check"] == "host syncs" and "per_step" in r:
        setting = f"{r['steps']} steps at batch {r['batch']} on {r['device']} ({r['how']})"
        table.append([r["check"], setting, f"{r['per_step']} per step", r["goal"], r["result"]])
    else:
        table.append([r["check"], r.get("path", "-"), "-", "-", r.get("result", "-")])
print(markdown_table(["check", "setting", "measured", "goal", "result"], table))
EOF
} 2>&1 | tee "$log"
# the status: 1 when a part failed or timed out (a skipped part is not a failure)
! grep -q '"result": "\(failed\|timed out\)' "$rows"
