#!/usr/bin/env bash
# SCAFFOLD (Karimireddy et al., ICML 2020) against FedAvg under label skew: Fashion-MNIST split
# into 200 label-sorted shards, 2 per client (the FedAvg paper's pathological non-IID), 100
# clients, 10 per round, E = 1, B = 10 (60 local steps), lr 0.05, 2NN 784-200-200-10, ROUNDS
# rounds, test accuracy every 2 rounds, one run per seed. Every client holds 600 samples, so
# sample weighting equals the paper's uniform 1/|S|. The table gives the first round each run
# reaches TARGET test accuracy; the plot averages the seeds (min-max band).
# Usage: benchmarks/scaffold_shards.sh [OUTDIR] [ROUNDS] [TARGET] [SEEDS...]
#        (a run of 150 rounds takes about a minute on one core)
set -euo pipefail
out=${1:-results/scaffold_shards}
rounds=${2:-150}
target=${3:-0.75}
shift $(( $# > 3 ? 3 : $# )) || true
seeds=("${@:-0 1 2}")
read -r -a seeds <<< "${seeds[*]}"
mkdir -p "$out"
common=(--dataset fashion-mnist --partition shards --shards-per-client 2 --clients 100
        --clients-per-round 10 --local-epochs 1 --batch-size 10 --lr 0.05 --rounds "$rounds"
        --eval-every 2 --checkpoint-every 1000 --overwrite)
for s in "${seeds[@]}"; do
    for a in fedavg scaffold; do
        python -m fedmpi "${common[@]}" --seed "$s" --algorithm "$a" --out "$out/${a}_s$s.h5"
    done
done
fedmpi-report summary "$out"/*.h5 --target "$target" --markdown
fedmpi-report plot "$out" --group-by algorithm --y test_accuracy --out "$out/accuracy.png" \
    --title "Fashion-MNIST, 2 label shards per client: SCAFFOLD vs FedAvg"
