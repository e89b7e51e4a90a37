#!/usr/bin/env bash
# Every GPU figure in one prepared run, for a lent GPU machine (see docs/benchmarks.md).
#   bash bench/gpu.sh [OUT_DIR]            # < 8 min on one H200-class GPU, plus the venv set-up
#   bash bench/gpu.sh --dry-run [OUT_DIR]  # no GPU needed: the same code on the CPU, tiny counts
# `python -m bench gpu flops` measures the models at batch 8 and 32, the FLOP floor against the
# measured matmul peak, and the end-to-end run (Redis stream -> ingest -> one threads-pool worker
# -> Postgres, batcher at 8 and 32); it needs the local Postgres and Redis (scripts/dev starts
# them). Every figure goes to OUT_DIR: bench-gpu.json, bench-gpu.txt (the table), gpu.txt
# (device), and the log. Each step has its own time limit so one slow step cannot eat the rest.
set -uo pipefail
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$root/bench/out/gpu}}"
mkdir -p "$out"
venv="$("$root/scripts/bootstrap" | tail -n 1)"
py="$venv/bin/python"
cd "$root"
# the local Postgres and Redis the end-to-end part needs (started when they are down)
"$root/scripts/services" >/dev/null 2>&1 || echo "Postgres/Redis could not be started: the end-to-end figures will say so"

if [[ $dry == 1 ]]; then
  # three steps (one torch model, one onnxruntime model): the dry run checks the code path
  echo "dry run: GPU part on the CPU with tiny counts" | tee "$out/gpu.txt"
  timeout 600 "$py" -m bench gpu --gpu-dry-run --smoke --steps metadata,tagging,nsfw -v \
    --out "$out/bench-gpu.json" --table "$out/bench-gpu.txt" 2>&1 | tee "$out/bench-gpu.log"
  exit "${PIPESTATUS[0]}"
fi

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi failed"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/gpu.txt"

echo "== python -m bench gpu (models b8/b32, flops floor, end to end): at most 6 min =="
CATALOG_DEVICE=cuda timeout 360 "$py" -m bench gpu -v \
  --out "$out/bench-gpu.json" --table "$out/bench-gpu.txt" 2>&1 | tee "$out/bench-gpu.log"
status=${PIPESTATUS[0]}

if [[ "${GPU_SUPERRES:-0}" == 1 ]]; then
  echo "== super-resolution on the GPU: at most 90 s =="
  "$venv/bin/catalog" models import --dest "$out/models" > "$out/models-import.txt" 2>&1 || true
  timeout 90 "$py" -m bench.superres --device cuda --model-dir "$out/models" \
    --json "$out/superres.json" 2>&1 | tee "$out/superres.txt"
fi
exit "$status"
