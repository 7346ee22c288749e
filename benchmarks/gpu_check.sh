#!/usr/bin/env bash
# The GPU records check, in one call of at most 8 minutes, on the CUDA device PyTorch sees:
#   1. time_to_accuracy.py: `fast` as it resolves on the GPU (batch 1024, recipes.py) at 4 and 10
#      epochs against the plain cnn reference in the same run, 3 seeds, time to 91.73%, 93%, 94%, 95%;
#   2. the same at the CPU's settings (batch 256, 2 epochs): the step before the GPU settings, for
#      the per-epoch time before and after;
#   3. `fast` with --compile (CUDA graphs), 3 seeds: compiled and captured in the untimed warm-up;
#   4. best_accuracy.py: `best` as it resolves on the GPU (WRN-16-4, 64 epochs), one seed.
# Timing is airbench's: what a process pays once (kernels, compilation, graph capture) is spent in an
# untimed warm-up before the first step, and each epoch's clock stops after a device synchronize.
# Each stage has a time limit, so the check ends inside an 8-minute command even on a slower GPU;
# tables, logs and JSON go to ${OUT:-gpu-check}. The dataset is found as everywhere ($FASHIONLAB_DATA,
# the cache, /usr/share/datasets/fashion-mnist). It needs PyTorch, NumPy, safetensors, tqdm, SciPy,
# Pillow and Matplotlib only.
#
#   bash benchmarks/gpu_check.sh                      # from the repository root, on the GPU machine
#   GPU_CHECK_QUICK=1 bash benchmarks/gpu_check.sh    # every stage on 1,024 images for one epoch: the
#                                                     # script runs end to end on a CPU (about a minute)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
targets=(--targets 0.9173 0.93 0.94 0.95)

"$python" - <<'EOF' | tee "$out/device.txt"
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device: the CPU"
print(f"torch {torch.__version__}; {gpu}")
EOF

if [ -n "${GPU_CHECK_QUICK:-}" ]; then
    images=1024  # whole batches of 256: one step shape for the compiled stage to compile
    small=(--subset "$images")
    fast=(--seeds 1 --epochs 1 --max-seconds 30 --reference-epochs 2 "${small[@]}")
    before=(--seeds 1 --epochs 1 --max-seconds 30 --no-reference "${small[@]}" --set batch_size=256 --set lr=1.15)
    compiled=(--seeds 1 --epochs 1 --max-seconds 60 --no-reference "${small[@]}" --set compile=true)
    # The fast net, without moves at test time: best's net and test-time augmentation (25 moves of the
    # 10,000 test images) cost a minute here, and 20 s with the fast net.
    best=(--seeds 1 --set epochs=1 --set 'model="fast"' --set subset="$images" --set tta_shift=0)
    limit=120
else
    fast=(--seeds 3 --epochs 4 10 --max-seconds 40)
    before=(--seeds 3 --epochs 2 --max-seconds 40 --no-reference --set batch_size=256 --set lr=1.15)
    compiled=(--seeds 3 --max-seconds 40 --no-reference --set compile=true)
    best=(--seeds 1)
    limit=200
fi

stage() {  # name, limit in seconds, script and its arguments
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$python" "$@" --json "$out/$name.json" 2>&1 | tee "$out/$name.txt" \
        || echo "# $name: stopped (time limit ${seconds} s or an error; its log is $out/$name.txt)"
}

stage fast 150 benchmarks/time_to_accuracy.py "${fast[@]}" "${targets[@]}"
stage before 60 benchmarks/time_to_accuracy.py "${before[@]}" "${targets[@]}"
stage compiled 120 benchmarks/time_to_accuracy.py "${compiled[@]}" "${targets[@]}"
stage best "$limit" benchmarks/best_accuracy.py "${best[@]}"
