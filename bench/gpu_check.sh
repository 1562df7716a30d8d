#!/bin/bash
# The GPU checks (docs/benchmarks.md, "GPU"), in one command for a GPU machine with no network.
#
#   here:  .venv/bin/python bench/gpu_kit.py                 # wheels and data into .gpukit/ (ignored by git)
#   there: bash bench/gpu_check.sh [STEPS]                   # with .gpukit carried beside the repository
#
# STEPS (default "tests train amp"), each writing into $OUT (or bench/results/gpu-check) as it ends:
#   tests  the tests marked gpu (tests/gpu); without a GPU they fail -> pytest-gpu.log
#   train  bench/gpu.py: time to a validation Dice of $TARGET within $TRAIN_MINUTES, iterations/s, the
#          share of time waiting for batches, GPU utilization, with the default precision -> gpu-default.json
#   amp    the same for $AMP_MINUTES each in float32, float16 and bfloat16 autocast -> gpu-<dtype>.json
#   predict  bench/predict.py on the GPU, with and without TTA, for $PREDICT_TOOLS (medseg: nnU-Net's
#          SimpleITK does not fit in the kit) -> predict.json
# Environment: KIT (.gpukit), PYTHON (python3), TRAIN_MINUTES (3), AMP_MINUTES (1.5), TARGET (0.88),
# PREDICT_TOOLS (medseg), PREDICT_ARGS (more arguments of bench/predict.py; --train-minutes 1).
# Each step's failure is reported and the next step still runs; the exit status is that of the last failure.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.gpukit}
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-bench/results/gpu-check}
TRAIN_MINUTES=${TRAIN_MINUTES:-3}
AMP_MINUTES=${AMP_MINUTES:-1.5}
TARGET=${TARGET:-0.88}
PREDICT_TOOLS=${PREDICT_TOOLS:-medseg}
PREDICT_ARGS=${PREDICT_ARGS:---train-minutes 1}
STEPS=${*:-tests train amp}
mkdir -p "$RESULTS"
if [ ! -d "$KIT/whl" ] || [ ! -f "$KIT/data/hippocampus/dataset.json" ]; then
  echo "gpu_check: expected the kit of bench/gpu_kit.py at $KIT (whl/ and data/hippocampus/), found none" >&2
  exit 2
fi
KIT=$(cd "$KIT" && pwd)
SITE=${SITE:-/tmp/medseg-site}
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$KIT"/whl/*.whl \
  || { echo "gpu_check: installing the kit's wheels into $SITE failed" >&2; exit 2; }
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MEDSEG_DATA="$KIT/data"
{ if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "no nvidia-smi"; fi; "$PYTHON" -c "import torch, monai; print('torch', torch.__version__, 'cuda',
  torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'monai', monai.__version__)"
} 2>&1 | tee "$RESULTS/machine.txt"
status=0
step() {  # name, then the command; its output goes to the terminal and to $RESULTS/<name>.log
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@" 2>&1 | tee "$RESULTS/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=$rc
}
params() {  # bench/gpu.py's defaults with the autocast dtype (none: float32)
  "$PYTHON" -c "import json, sys; sys.path.insert(0, 'bench'); from gpu import GPU_PARAMS
p = dict(GPU_PARAMS); d = sys.argv[1]
p.update({'amp': False} if d == 'float32' else {} if d == 'default' else {'amp': True, 'amp_dtype': d})
print(json.dumps(p))" "$1"
}
for s in $STEPS; do
  case $s in
    tests) step pytest-gpu "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/gpu ;;
    train) step gpu-default "$PYTHON" bench/gpu.py --minutes "$TRAIN_MINUTES" --target "$TARGET" \
             --params "$(params default)" --out "$RESULTS/gpu-default.json" ;;
    amp) for d in float32 float16 bfloat16; do
           step "gpu-$d" "$PYTHON" bench/gpu.py --minutes "$AMP_MINUTES" --target "$TARGET" \
             --params "$(params $d)" --out "$RESULTS/gpu-$d.json"
         done ;;
    predict) # shellcheck disable=SC2086
         step predict "$PYTHON" bench/predict.py --tools $PREDICT_TOOLS --tta both --work "$PWD/data/bench-gpu" \
           --out "$RESULTS/predict.json" $PREDICT_ARGS ;;
    *) echo "gpu_check: unknown step $s (expected tests, train, amp or predict)" >&2; status=2 ;;
  esac
done
exit $status
