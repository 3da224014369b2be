#!/usr/bin/env bash
# Byzantine robustness on Fashion-MNIST: 20% of the clients (20 of 100, fixed for the run) send
# -SCALE x their update (sign flip). 100 IID clients, 20 per round, E = 1, B = 10, lr 0.05,
# MLP 784-128-64-10, ROUNDS rounds. FedAvg (mean) without and with the attack, then
# coordinate-wise median, trimmed mean (trim 0.2) and Krum (f = 4: 20 > 2f + 2) under attack.
# Usage: benchmarks/signflip_robust.sh [OUTDIR] [ROUNDS] [SCALE]   (about 2 minutes a run)
set -euo pipefail
out=${1:-results/signflip}
rounds=${2:-50}
scale=${3:-1}
mkdir -p "$out"
common=(--dataset fashion-mnist --clients 100 --clients-per-round 20 --rounds "$rounds"
        --eval-every 5 --lr 0.05 --checkpoint-every 1000 --overwrite)
attack=(--attack signflip --attackers 0.2 --attack-scale "$scale")
python -m fedmpi "${common[@]}" --out "$out/fedavg_clean.h5"
python -m fedmpi "${common[@]}" "${attack[@]}" --out "$out/fedavg.h5"
python -m fedmpi "${common[@]}" "${attack[@]}" --aggregator median --out "$out/median.h5"
python -m fedmpi "${common[@]}" "${attack[@]}" --aggregator trimmed_mean --trim 0.2 \
    --out "$out/trimmed_mean.h5"
python -m fedmpi "${common[@]}" "${attack[@]}" --aggregator krum --byzantine 4 --out "$out/krum.h5"
fedmpi-report summary "$out"/*.h5 --markdown
fedmpi-report plot "$out" --y test_accuracy --out "$out/accuracy.png" \
    --title "Fashion-MNIST, 20% sign-flip attackers (scale $scale)"
