#!/usr/bin/env bash
# The GPU records check, in one call of about 9 minutes: on the CUDA device PyTorch sees,
#   1. time_to_accuracy.py: `fast` at 2, 6 and 16 epochs against the plain cnn reference, 3 seeds,
#      time to 91.73%, 93%, 94% and 96%;
#   2. best_accuracy.py: `best` at 100 epochs, one seed, its accuracy and training time (the goal: the
#      best accuracy within 10 minutes).
# The schedule lengths are starting points, not yet measured on a GPU. Each stage has a time limit, so
# the whole check ends inside a 10-minute command; tables, logs and JSON go to ${OUT:-gpu-check}.
#
#   bash benchmarks/gpu_check.sh                      # from the repository root, on the GPU machine
#   GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh    # one epoch on 2,000 images, no reference: the
#                                                     # script runs end to end (minutes on a 2-core CPU)
#
# The dataset is found as everywhere ($FASHIONLAB_DATA, the cache, /usr/share/datasets/fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

"$python" - <<'EOF' | tee "$out/device.txt"
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device: the CPU"
print(f"torch {torch.__version__}; {gpu}")
EOF

if [ -n "${GPU_CHECK_QUICK:-}" ]; then
    fast=(--seeds 1 --epochs 1 --max-seconds 30 --set subset=2000 --no-reference)
    best=(--seeds 1 --set epochs=1 --set subset=2000)
else
    fast=(--seeds 3 --epochs 2 6 16 --max-seconds 120)
    best=(--seeds 1 --set epochs=100)
fi

timeout 270 "$python" benchmarks/time_to_accuracy.py "${fast[@]}" --targets 0.9173 0.93 0.94 0.96 \
    --json "$out/fast.json" 2>&1 | tee "$out/fast.txt"
timeout 270 "$python" benchmarks/best_accuracy.py "${best[@]}" --json "$out/best.json" 2>&1 | tee "$out/best.txt"
