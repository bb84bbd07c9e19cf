#!/usr/bin/env bash
# GPU figures in one call of at most 8 minutes: ResNet-50 and ViT-B/16 at batch 1, 8 and 32, onnxruntime's CUDA
# provider (and TensorRT where installed), Zennit and LXT in PyTorch on the same GPU, and the float16 explainer;
# writes results/benchmark-gpu.md. Options go to tools/gpu_benchmark.py (see --help); `--provider cpu` runs the
# same on the CPU, e.g. the test setting:
#   tools/gpu_benchmark.sh --provider cpu --models resnet18,vit_tiny --size 32 --batches 1 --repeats 1 --warmup 0
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the script stops starting cells after --budget-s (420 s); the hard limit leaves the report it rewrote last
exec timeout --signal=TERM "${GPU_BENCHMARK_TIMEOUT_S:-470}" python tools/gpu_benchmark.py "$@"
