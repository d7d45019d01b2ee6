#!/usr/bin/env bash
# One prepared GPU check of the TensorRT plugins' CUDA kernels (docs/tensorrt.md, "On a GPU"):
# builds kernel_api.cu with the two kernel sources for the local GPU, checks them against
# ssic.ops's references and times them (check_kernels.py), then re-runs a few small cases under
# compute-sanitizer's memcheck and initcheck where that tool is present.
#
#   bash plugins/trt/gpu_check/run.sh [OUT_DIR]     # default OUT_DIR: out/gpu_check
#
# Needs nvcc, an NVIDIA GPU, Python with NumPy and ONNX (PyTorch with CUDA optional: the dense
# cuDNN/cuBLAS rows). Writes OUT_DIR/kernels.json and OUT_DIR/log.txt; exit status non-zero when a
# build, a comparison or a sanitizer run fails.
set -u -o pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
out="${1:-$repo/out/gpu_check}"
mkdir -p "$out"
log="$out/log.txt"
: >"$log"
say() { echo "$@" | tee -a "$log"; }
py="${PYTHON:-python3}"

command -v nvcc >/dev/null || { say "error: nvcc not found"; exit 2; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$log"
nvcc --version | tail -1 | tee -a "$log"
arch="${SSIC_CUDA_ARCH:-native}"
lib="$out/libssic_trt_kernel_api.so"
say "building $lib (-arch=$arch)"
nvcc -O3 -std=c++17 -shared -Xcompiler -fPIC -arch="$arch" -lineinfo \
  -I "$repo/plugins/trt" -I "$repo/plugins/common" \
  "$here/kernel_api.cu" "$repo/plugins/trt/tileGatherPlugin/tileGatherKernel.cu" \
  "$repo/plugins/trt/tileScatterPlugin/tileScatterKernel.cu" -o "$lib" 2>&1 | tee -a "$log" || { say "error: build failed"; exit 1; }

status=0
PYTHONUNBUFFERED=1 "$py" "$here/check_kernels.py" "$lib" --json "$out/kernels.json" 2>&1 | tee -a "$log" || status=1

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck initcheck; do
    say "compute-sanitizer --tool $tool (quick cases)"
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$py" "$here/check_kernels.py" "$lib" --quick 2>&1 \
      | tail -5 | tee -a "$log" || { say "error: compute-sanitizer $tool failed"; status=1; }
  done
else
  say "compute-sanitizer not found: skipped"
fi
say "exit status $status"
exit $status
