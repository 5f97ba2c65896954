#!/usr/bin/env bash
# The checks only a GPU can run, in about 7 minutes, on a machine with torch, triton, transformers and pytest but
# no Ray, no gRPC extras and no network (the lent H100/H200): run from the repository root, it writes every log
# and JSON file under $OUT (8 files: a log per stage, two JSON files, summary.txt with the machine and each
# stage's exit) and prints a summary last.
#
#   1. the fused elementwise kernels and the fused small-batch projections (tests/engine/test_triton_ops.py,
#      test_triton_projections.py) against the torch ops, compiled, the projections at Llama-3.1-8B's shapes;
#   2. the `gpu`-marked CUDA-graph tests, each way of running the small-batch projections (separate ops, fused,
#      fused and chained): graph decode vs eager vs HF (float32 tokens equal; the bfloat16 agreement rate),
#      LoRA adapters' graphs vs HF on the merged weights, and prefixes copied back from the pinned host tier;
#   3. `tandem bench engine --device cuda --random-weights llama-3.1-8b`: decode and prefill against the roofline,
#      offline throughput against HF transformers, a batch-1 decode step's kernels by time beside its graph
#      replayed alone, and the batch-1 graph each way of running the small-batch projections (the engine keeps
#      the fastest);
#   4. `tandem bench kernels`: decode attention vs the torch backend vs the roofline;
#   5. the Triton attention kernels' full grid against the torch backend (last: the longest, and the least likely
#      to change between runs).
#
# The benches run as `python -m`/`python -c` on their own modules: `python -m cluster.cli` would import the gRPC
# client, whose packages such a machine lacks. Each stage has its own time limit; a stage that fails or runs out
# leaves its log and the next stage still runs. The exit status is the number of failed stages.
#
#   DEVICE=cpu RANDOM_WEIGHTS=tiny OUT=/tmp/out deploy/gpu-checks.sh   # the same stages on a CPU, to check this file

set -u
OUT=${OUT:?set OUT to the folder for logs and results}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
RANDOM_WEIGHTS=${RANDOM_WEIGHTS:-llama-3.1-8b}
# The 8B model's 16 GB of random weights are written once and read twice (HF, then the engine): from memory
# where the machine has a tmpfs, rather than from its disk.
cache=/tmp/tandem-cache
[ -d /dev/shm ] && [ -w /dev/shm ] && cache=/dev/shm/tandem-cache
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TANDEM_CACHE_DIR=${TANDEM_CACHE_DIR:-$cache}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$OUT"
failed=0
summary=()

stage() {  # stage NAME SECONDS LINES COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log, and
           # prints the log's last LINES lines
    local name=$1 limit=$2 lines=$3 started=$SECONDS status
    shift 3
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    status=$?
    [ "$status" -ne 0 ] && failed=$((failed + 1))
    summary+=("$name: exit $status after $((SECONDS - started))s$([ "$status" -eq 124 ] && echo ' (time limit)')")
    tail -n "$lines" "$OUT/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
    "$PYTHON" -c "import sys, torch, triton, transformers; print(sys.version); print('torch', torch.__version__,
'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(0)); print('triton',
triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

pytest=("$PYTHON" -m pytest -p no:cacheprovider -rA -s --durations=15)
stage fused-ops 120 8 "${pytest[@]}" tests/engine/test_triton_ops.py tests/engine/test_triton_projections.py
stage gpu-tests 130 20 "${pytest[@]}" -m gpu tests/engine/test_cuda_graphs.py
stage bench-engine 210 64 "$PYTHON" -m cluster.bench.engine --device "$DEVICE" --random-weights "$RANDOM_WEIGHTS" \
    --json "$OUT/engine.json"
stage bench-kernels 40 14 "$PYTHON" -c "import argparse, sys
from cluster.bench import kernels
parser = argparse.ArgumentParser()
kernels.add_arguments(parser)
sys.exit(kernels.run(parser.parse_args(sys.argv[1:])))" --json "$OUT/kernels.json"
stage attention-grid 100 20 "${pytest[@]}" -m gpu tests/engine/test_triton_attention.py

echo "== summary"
printf '%s\n' "${summary[@]}" | tee -a "$OUT/summary.txt"
exit "$failed"
