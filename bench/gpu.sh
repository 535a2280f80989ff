#!/usr/bin/env bash
# The goals of BENCHMARKS.md, "GPU speed", on one CUDA GPU: the routed training step against the plain
# one under the same treatment (eager; CUDA graphs of the eager kernels; inductor + CUDA graphs), and
# the static-shape hard forward (capacity) against the gathered one and the full network. Per-step
# limits sum to 6.5 min.
# Needs python3 with torch + torchvision only (no install: PYTHONPATH=.). JSON and logs go to $OUT.
#
#   OUT=/tmp/drn-gpu DATA=../shared/data/cifar10-5k bash bench/gpu.sh
#   SMOKE=1 OUT=/tmp/drn-smoke DATA=../shared/data/cifar10-5k bash bench/gpu.sh   # the same steps, tiny, on CPU
#
# Goals (BENCHMARKS.md, "GPU speed"): routed step <= 1.2 x plain at batch 128 for ResNet-20/56/110;
# ResNet-110 at 50 % FLOPs hard-routed >= 1.5 x faster than full at batch 256 and >= 0.8 of the
# FLOPs ratio at 1024; ResNet-50 at 64x64 the same way.
set -u -o pipefail
: "${OUT:?set OUT to an output folder}" "${DATA:?set DATA to the cifar10-5k ImageFolder folder}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$SECONDS
STATUS=()

if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu
  OVH=(--archs resnet8 --batches 8 --warmup 1 --repeats 2)
  OVH_CG=("${OVH[@]}")                      # cudagraphs is CUDA only: inductor stands in on CPU
  CG=inductor
  OVH_IND=(--archs resnet8 --batches 8 --warmup 3 --repeats 2)
  CAP=(--archs resnet8 --batches 16 --repeats 2 --capture eager compile)
  TRAIN=(--arch resnet8 --epochs 1 --finetune-epochs 1 --batch-size 32 --compile inductor)
  T_OVH=120 T_CG=240 T_IND=240 T_CAP=240 T_TRAIN=240
else
  DEV=cuda
  OVH=(--archs resnet20 resnet56 resnet110 --batches 128)
  OVH_CG=(--archs resnet20 resnet56 resnet110 --batches 128 --warmup 5 --repeats 30)
  CG=cudagraphs
  OVH_IND=(--archs resnet20 resnet110 --batches 128 --warmup 5 --repeats 30)
  CAP=(--archs resnet110 resnet50 --batches 256 1024 --capture eager cudagraph)
  TRAIN=(--arch resnet20 --epochs 2 --finetune-epochs 1 --compile cudagraphs)
  T_OVH=${T_OVH:-60} T_CG=${T_CG:-90} T_IND=${T_IND:-120} T_CAP=${T_CAP:-60} T_TRAIN=${T_TRAIN:-60}
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
  git log -1 --format='commit %H' 2>/dev/null; git status --short 2>/dev/null | head -20
} | tee "$OUT/env.txt"

# 1. the training step, routed vs plain, each treatment on both sides (the first goal of "GPU speed": <= 1.2x at batch 128)
step train_eager "$T_OVH" $PY bench/train_overhead.py --device $DEV "${OVH[@]}" --out "$OUT/train_overhead-eager.json"
step train_$CG "$T_CG" $PY bench/train_overhead.py --device $DEV "${OVH_CG[@]}" --compile $CG \
  --out "$OUT/train_overhead-$CG.json"
[ "$CG" != inductor ] && step train_inductor "$T_IND" $PY bench/train_overhead.py --device $DEV "${OVH_IND[@]}" \
  --compile inductor --out "$OUT/train_overhead-inductor.json"
# 2. the hard forward: full vs gather vs capacity, eager and captured (the second and third goals)
step capacity_speed "$T_CAP" $PY bench/capacity.py --time --device $DEV "${CAP[@]}" --out "$OUT/capacity-speed-$DEV.json"
# 3. the trainer itself with a captured step (a few epochs on the real images: it runs and lands)
rm -rf "$OUT/train-run"
step train_run "$T_TRAIN" $PY -c 'import sys; from drn.cli import train_main; sys.exit(train_main(sys.argv[1:]))' \
  "${TRAIN[@]}" --dataset imagefolder --data-dir "$DATA" --target-flops 50% --device $DEV \
  --out "$OUT/train-run" --json
tail -n 1 "$OUT/train_run.log" | grep '^{' > "$OUT/train_run.json" || echo "== train_run: no final metrics line"
rm -f "$OUT/train-run/checkpoint.pt"

IFS=,; echo "{${STATUS[*]}, \"total_seconds\": $((SECONDS - T0))}" > "$OUT/summary.json"; unset IFS
echo "== done in $((SECONDS - T0))s: $(cat "$OUT/summary.json")"
