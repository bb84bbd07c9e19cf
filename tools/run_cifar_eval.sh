#!/usr/bin/env bash
# Reproduce results/cifar10-resnet20/ and results/cifar10-resnet56/: every `graphlrp evaluate` method on the 1000
# CIFAR-10 dev images of ../shared, with the trained weights there. Usage: tools/run_cifar_eval.sh [20] [56]
# Each run writes results.md (with its wall-clock and CPU time), results.csv, run.json and the PNGs.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
depths=("$@")
[ ${#depths[@]} -gt 0 ] || depths=(20 56)
for d in "${depths[@]}"; do
  graphlrp evaluate "graphlrp/zoo/cifar.py:resnet$d" \
    --weights "$shared/assets/cifar10-resnet/resnet$d.pt" \
    --data "$shared/assets/cifar10-test-dev.npz" \
    -o "results/cifar10-resnet$d"
done
