#!/usr/bin/env bash
# Privacy-utility trade-off of DP-FedAvg on Fashion-MNIST (README, "Differential privacy").
# 1000 clients (60 IID samples each), 100 per round with Poisson sampling (q = 0.1),
# 100 rounds, the FedAvg paper's 2NN, E=1, B=10, lr 0.05, clip S = 0.5, delta = 1e-5;
# the noise multiplier is solved for each target epsilon. Then one table and one figure.
# Usage: benchmarks/privacy_utility.sh [OUTDIR]   (about 2 minutes a run at -n 3 on 2 cores)
set -euo pipefail
out=${1:-results/privacy}
mkdir -p "$out"
common=(--dataset fashion-mnist --hidden 200,200 --clients 1000 --clients-per-round 100
        --sampling poisson --rounds 100 --eval-every 10 --overwrite)
mpiexec -n 3 python -m fedmpi "${common[@]}" --out "$out/nodp.h5"
for eps in 1 4 8; do
    mpiexec -n 3 python -m fedmpi "${common[@]}" --dp-clip 0.5 --dp-target-epsilon "$eps" \
        --dp-delta 1e-5 --out "$out/eps$eps.h5"
done
fedmpi-report summary "$out"/*.h5 --markdown
