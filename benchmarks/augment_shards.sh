#!/usr/bin/env bash
# --augment on label-skewed Fashion-MNIST: McMahan et al.'s pathological non-IID split (sorted by
# label, 2 shards of 300 samples per client: most clients see 2 classes), 100 clients, 10 per
# round, E = 1, B = 10, lr 0.05, 2NN (784-200-200-10), ROUNDS rounds. Three runs per seed:
# no augmentation, --augment shift (each visited sample moved by its own (dy, dx) in -2..2
# pixels), and shift plus --augment-noise 0.1 (N(0, 0.1^2) on every scaled pixel).
# Then each final model's test accuracy on the test images as they are and shifted by +-2 pixels.
# Usage: benchmarks/augment_shards.sh [OUTDIR] [ROUNDS] [SEEDS...]
#        EXTRA="--partition iid" benchmarks/augment_shards.sh ...   (flags added to every run)
#        (about 15-30 s a run of 50 rounds on one core; the noise run is the slowest: noised
#        inputs are never zero, so layer 1 cannot skip pixels)
set -euo pipefail
out=${1:-results/augment_shards}
rounds=${2:-50}
shift $(( $# > 2 ? 2 : $# )) || true
seeds=("${@:-0}")
mkdir -p "$out"
common=(--dataset fashion-mnist --partition shards --shards-per-client 2 --clients 100
        --clients-per-round 10 --local-epochs 1 --batch-size 10 --lr 0.05 --hidden 200,200
        --rounds "$rounds" --checkpoint-every 1000 --overwrite ${EXTRA:-})
for s in "${seeds[@]}"; do
    python -m fedmpi "${common[@]}" --seed "$s" --out "$out/plain_s$s.h5"
    python -m fedmpi "${common[@]}" --seed "$s" --augment shift --out "$out/shift_s$s.h5"
    python -m fedmpi "${common[@]}" --seed "$s" --augment shift --augment-noise 0.1 \
        --out "$out/shift_noise_s$s.h5"
done
fedmpi-report summary "$out"/*.h5 --markdown
python benchmarks/shifted_accuracy.py "$out"/*.h5
fedmpi-report plot "$out" --y test_accuracy --out "$out/accuracy.png" \
    --title "Fashion-MNIST, 2 shards per client: test accuracy with and without --augment"
