#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one call of the device tool (a lent H100 or H200):
#   here, once:   .venv/bin/python bench/gpu_prepare.py          (writes .gpu/: wheels and uns-mini)
#   device:       run(command="bash bench/gpu_session.sh", carry=[".gpu"], timeout_s=560)
# Steps, each under its own time limit so that the ones before it always come back in $OUT:
#   card.txt, train_throughput.txt (eager), train_throughput_compile.txt, infer_speed.txt,
#   accuracy.txt and accuracy.json (medseg's default size, 5 subject-grouped folds, ACCURACY_EPOCHS).
# STEPS picks some: STEPS="speed" (about 6 minutes) or STEPS="accuracy" (default both, cut to
# SESSION_LIMIT seconds in all: with 15 minutes of device time, one call of both leaves none to rerun).
# SMOKE=1 runs every step at toy sizes on whatever machine this is, with PYTHON (default python3), to
# check the plumbing.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-session}
STEPS=${STEPS:-speed accuracy}
ACCURACY_EPOCHS=${ACCURACY_EPOCHS:-40}
SESSION_LIMIT=${SESSION_LIMIT:-540}  # seconds; the accuracy step gets what is left of it, at most 420
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [ -d .gpu/wheels ] && [ -z "${SMOKE:-}" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ ! -d .gpu/data/uns-mini ]; then
    echo "error: .gpu/data/uns-mini missing; run .venv/bin/python bench/gpu_prepare.py here and carry .gpu" >&2
    exit 2
fi

if [ -n "${SMOKE:-}" ]; then
    THROUGHPUT="--cpu --steps 1 --warmup 1"
    INFER="--batch 1 --gpu-batch 2 --repeats 1"
    ACCURACY="--preset cpu --folds 2 --set trainer.max_epochs=1 --set input.height=64 --set input.width=96"
else
    THROUGHPUT=""
    INFER=""
    ACCURACY="--preset default --set trainer.max_epochs=$ACCURACY_EPOCHS"
fi

step() {  # step SECONDS FILE COMMAND...: run COMMAND under a time limit, its output into $OUT/FILE too
    local seconds=$1 file=$2
    shift 2
    echo "== $* (limit ${seconds} s)" | tee "$OUT/$file"
    timeout "$seconds" "$@" 2>&1 | tee -a "$OUT/$file"
    echo "== exit ${PIPESTATUS[0]} after ${SECONDS} s of the session" | tee -a "$OUT/$file"
}

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/card.txt" 2>&1
else
    echo "no nvidia-smi" > "$OUT/card.txt"
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >> "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"

if [[ " $STEPS " == *" speed "* ]]; then
    step 150 train_throughput.txt "$PYTHON" bench/train_throughput.py --data .gpu/data/uns-mini $THROUGHPUT
    if [ -z "${SMOKE:-}" ]; then  # compiling on a small CPU takes minutes and tells nothing
        step 200 train_throughput_compile.txt "$PYTHON" bench/train_throughput.py --data .gpu/data/uns-mini --compile
    fi
    step 120 infer_speed.txt "$PYTHON" bench/infer_speed.py $INFER
fi
if [[ " $STEPS " == *" accuracy "* ]]; then
    left=$((SESSION_LIMIT - SECONDS - 15))
    step $((left < 420 ? left : 420)) accuracy.txt "$PYTHON" bench/accuracy.py $ACCURACY --datasets uns-mini --arms medseg --data-root .gpu/data \
        --set model.encoder_weights=none --out /tmp/gpu-accuracy
    cp /tmp/gpu-accuracy/accuracy.json "$OUT/" 2>/dev/null || true
fi
