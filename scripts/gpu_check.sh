#!/usr/bin/env bash
# GPU checks of issue 15: the tests marked `gpu` (CUDA vs CPU, fp32 and bf16, a CUDA OOM trial;
# issue 28: a trial process forked by the warm worker initialises CUDA on its assigned device)
# and the trial-loop timing bench/gpu_smoke.py (steps/s CPU vs GPU, fp32 vs bf16). Under 5 minutes
# on one GPU. Without a GPU the tests are skipped and the timing runs its CPU part, saying so.
#   bash scripts/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SMOKE="--steps 20 --repeats 3"
SMOKE_LIMIT=140
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -c "import torch; print('gpu_check: CUDA', torch.version.cuda, '-', torch.cuda.device_count(), 'device(s):', torch.cuda.get_device_name(0))"
else
    echo "gpu_check: NO GPU FOUND (torch.cuda.is_available() is False): the gpu tests will be skipped and only the CPU part of the timing runs"
    # The CPU part alone, kept small (bf16 on a CPU without bf16 instructions is slow); the five
    # minutes are for a GPU machine.
    SMOKE="--steps 2 --repeats 1 --warmup-steps 1 --batch-size 16"
    SMOKE_LIMIT=900
fi
status=0
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py || status=$?
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_warm_worker.py || status=$?
timeout "$SMOKE_LIMIT" "$PY" bench/gpu_smoke.py --out bench/results/gpu_smoke $SMOKE || status=$?
exit $status
