#!/usr/bin/env bash
# Every GPU benchmark in one prepared run, for a lent GPU machine (see docs/benchmarks.md).
#   bash bench/gpu.sh [OUT_DIR]        # ~8-10 min on one GPU, plus the venv set-up
# Each part has its own time limit so one slow part cannot eat the others' time; figures
# are printed and also written as JSON under OUT_DIR (default bench/out/gpu).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$root/bench/out/gpu}}"
mkdir -p "$out"
venv="$("$root/scripts/bootstrap" | tail -n 1)"
py="$venv/bin/python"
cd "$root"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  | tee -a "$out/gpu.txt"

echo "== vision models: batch 1 / 8, dynamic batching vs one image per forward =="
timeout 300 "$py" -m bench.vision --device cuda --json "$out/vision.json" 2>&1 | tee "$out/vision.txt"

echo "== super-resolution: PSNR/SSIM vs bicubic, ms per output MP =="
"$venv/bin/catalog" models import --dest "$out/models" > "$out/models-import.txt" 2>&1 || true
timeout 300 "$py" -m bench.superres --device cuda --model-dir "$out/models" \
  --picture "$out/sr_side_by_side.png" --json "$out/superres.json" 2>&1 | tee "$out/superres.txt"
