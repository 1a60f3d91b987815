#!/usr/bin/env bash
# The GPU checks of the batched step, as one prepared command for a lent GPU machine with no network
# (see ../shared/gpu/README.md for the wheels in .whl/; run from the project root with OUT set to the
# folder whose files come back). Each stage has its own time limit and writes its results as it goes.
# FAMILY=voxcpm2 runs the same checks on a full-size random VoxCPM2 (default: VoxCPM-1.5).
#   OUT=/path [FAMILY=voxcpm2] bash bench/gpu_check.sh
set -u
: "${OUT:?set OUT to the folder for results}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
P=$(python3 -c 'import sys; print(sys.executable)')
# The tests' worker launcher runs the gunicorn beside sys.executable.
[ -x "$(dirname "$P")/gunicorn" ] || { printf '#!/bin/sh\nexec %s -m gunicorn "$@"\n' "$P" > "$(dirname "$P")/gunicorn"; chmod +x "$(dirname "$P")/gunicorn"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null
FAMILY=${FAMILY:-voxcpm}
CK=/tmp/ck-full-$FAMILY
[ -f $CK/config.json ] || timeout 300 python3 -m tests.support.voxcpm_checkpoint $CK --size full --family "$FAMILY"
timeout 200 python3 bench/step_profile.py --model-dir $CK --batches 1,8,64,128 --steps 20 2>&1 \
  | grep -v -i -e warn -e 'it/s' | tee "$OUT/step_profile.txt"
# The same with the inductor-compiled step (VOXCPM_COMPILE_STEP), caches kept for a second run.
TORCHINDUCTOR_CACHE_DIR=/tmp/inductor timeout 300 python3 bench/step_profile.py --model-dir $CK --batches 1,64 \
  --steps 20 --compile --package-tokens 8 2>&1 | grep -v -i -e warn -e 'it/s' | tee "$OUT/step_profile_compiled.txt"
timeout 480 python3 bench/serving_batch_vs_serial.py --model-dir $CK --batch auto --levels 1,16,64,128 \
  --requests-per-level 32 --fixed-tokens 32 --json "$OUT/serving.json" 2>&1 | tee "$OUT/serving.txt"
