#!/usr/bin/env bash
# Issue 8 on one CUDA GPU: inference speed of hard routing, training overhead of routing, and a
# short ResNet-110 training (the real trainer, cifar10-5k, 50 % FLOPs target). 3.4 min on an H200;
# the per-step time limits sum to 7.5 min.
# Needs python3 with torch + torchvision only (no install: PYTHONPATH=.). JSON and logs go to $OUT.
#
#   OUT=/tmp/drn-gpu DATA=../shared/data/cifar10-5k bash bench/gpu.sh
#   SMOKE=1 OUT=/tmp/drn-smoke DATA=../shared/data/cifar10-5k bash bench/gpu.sh   # same steps, tiny, on CPU
set -u -o pipefail
: "${OUT:?set OUT to an output folder}" "${DATA:?set DATA to the cifar10-5k ImageFolder folder}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$SECONDS
STATUS=()

if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu
  INF=(--arch resnet8 --batches 1 16 --repeats 2)
  OVH=(--archs resnet8 --batches 8 --warmup 1 --repeats 2)
  PROF=(--archs resnet8 --batches 8)
  TRAIN=(--arch resnet8 --epochs 1 --finetune-epochs 1 --batch-size 64)
  T_INF=120 T_OVH=120 T_PROF=60 T_TRAIN=180
else
  DEV=cuda
  INF=(--arch resnet110 --batches 1 64 256 1024 --repeats 15)
  OVH=(--archs resnet20 resnet56 resnet110 --batches 128 512)
  PROF=(--archs resnet110 --batches 128)
  TRAIN=(--arch resnet110 --epochs 8 --finetune-epochs 2)
  T_INF=${T_INF:-120} T_OVH=${T_OVH:-120} T_PROF=${T_PROF:-40} T_TRAIN=${T_TRAIN:-170}
fi

step() {  # step NAME TIMEOUT CMD...: run with a time limit, log to $OUT/NAME.log, never abort the script
  local name=$1 limit=$2 t=$SECONDS rc
  shift 2
  echo "== $name (limit ${limit}s) at +$((SECONDS - T0))s: $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  [ $rc = 124 ] && echo "== $name TIMED OUT after ${limit}s"
  echo "== $name: rc $rc, $((SECONDS - t))s"
  STATUS+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - t))}")
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $PY -c "import torch, torchvision, platform; print('python', platform.python_version(), 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())"
} | tee "$OUT/env.txt"

step inference_speed "$T_INF" $PY bench/inference_speed.py --device $DEV "${INF[@]}" --out "$OUT/inference_speed-$DEV.json"
step train_overhead "$T_OVH" $PY bench/train_overhead.py --device $DEV "${OVH[@]}" --out "$OUT/train_overhead-$DEV.json"
step train_profile "$T_PROF" $PY bench/train_overhead.py --device $DEV "${PROF[@]}" --profile
rm -rf "$OUT/train-run"
# drn-train without an install: the console script's entry point, drn.cli:train_main
step train_run "$T_TRAIN" $PY -c 'import sys; from drn.cli import train_main; sys.exit(train_main(sys.argv[1:]))' \
  "${TRAIN[@]}" --dataset imagefolder --data-dir "$DATA" --target-flops 50% --device $DEV \
  --out "$OUT/train-run" --json
tail -n 1 "$OUT/train_run.log" | grep '^{' > "$OUT/train_run.json" || echo "== train_run: no final metrics line"
rm -f "$OUT/train-run/checkpoint.pt"  # 7 MB; the log (one line per epoch) and the metrics are kept

IFS=,; echo "{${STATUS[*]}, \"total_seconds\": $((SECONDS - T0))}" > "$OUT/summary.json"; unset IFS
echo "== done in $((SECONDS - T0))s: $(cat "$OUT/summary.json")"
