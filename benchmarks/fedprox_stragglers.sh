#!/usr/bin/env bash
# FedProx paper (Li et al., MLSys 2020), Figure 1 setting, 90% stragglers, on the built-in
# Synthetic(1,1): 30 clients, 10 per round, E = 20, B = 10, lr 0.01, multinomial logistic
# regression (--hidden none), 200 rounds. Stragglers (round(0.9*10) = 9 of each round's 10
# clients) do x ~ U{1..19} epochs. FedAvg drops them (--drop-stragglers: only 1 client reports),
# FedProx uses their partial work, with mu = 0 and mu = 1. The paper shows the training loss
# ordering FedAvg(drop) > FedProx(mu=0) > FedProx(mu=1). FedNova (Wang et al. 2020, also
# using the stragglers' partial work) is run beside them.
# Usage: benchmarks/fedprox_stragglers.sh [OUTDIR] [ROUNDS] [SEEDS...]
#        (one run of 200 rounds takes about 30 s on one core)
set -euo pipefail
out=${1:-results/fedprox_stragglers}
rounds=${2:-200}
shift $(( $# > 2 ? 2 : $# )) || true
seeds=("${@:-0}")
mkdir -p "$out"
common=(--dataset synthetic --synthetic-alpha 1 --synthetic-beta 1 --clients 30
        --clients-per-round 10 --local-epochs 20 --batch-size 10 --lr 0.01 --hidden none
        --stragglers 0.9 --rounds "$rounds" --checkpoint-every 1000 --overwrite)
for s in "${seeds[@]}"; do
    python -m fedmpi "${common[@]}" --seed "$s" --algorithm fedavg --drop-stragglers \
        --out "$out/fedavg_drop_s$s.h5"
    python -m fedmpi "${common[@]}" --seed "$s" --algorithm fedprox --prox-mu 0 \
        --out "$out/fedprox_mu0_s$s.h5"
    python -m fedmpi "${common[@]}" --seed "$s" --algorithm fedprox --prox-mu 1 \
        --out "$out/fedprox_mu1_s$s.h5"
    python -m fedmpi "${common[@]}" --seed "$s" --algorithm fednova --out "$out/fednova_s$s.h5"
done
python benchmarks/final_train_loss.py "$out"/*.h5
fedmpi-report plot "$out" --y train_loss --out "$out/train_loss.png" \
    --title "Synthetic(1,1), 90% stragglers: clients' training loss per round"
fedmpi-report plot "$out" --y test_loss --out "$out/test_loss.png" \
    --title "Synthetic(1,1), 90% stragglers: held-out loss (20% of every client)"
