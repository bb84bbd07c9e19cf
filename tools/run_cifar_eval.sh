#!/usr/bin/env bash
# Reproduce results/cifar10-resnet20/ and results/cifar10-resnet56/: every `graphlrp evaluate` method on the
# CIFAR-10 dev images of ../shared, with the trained weights there. Usage: tools/run_cifar_eval.sh [20] [56]
# ResNet-20 uses all 1000 images (about 1 hour on 2 CPU cores); ResNet-56 the first 100 (about 17 minutes;
# LIMIT56=1000 for all of them, about 3 hours). Each run writes results.md (with its wall-clock and CPU time),
# results.csv, run.json and the PNGs.
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
depths=("$@")
[ ${#depths[@]} -gt 0 ] || depths=(20 56)
for d in "${depths[@]}"; do
  limit=()
  [ "$d" != 56 ] || limit=(--limit "${LIMIT56:-100}")
  graphlrp evaluate "graphlrp/zoo/cifar.py:resnet$d" \
    --weights "$shared/assets/cifar10-resnet/resnet$d.pt" \
    --data "$shared/assets/cifar10-test-dev.npz" \
    --methods all "${limit[@]}" -o "results/cifar10-resnet$d"
done
