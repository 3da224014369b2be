#!/usr/bin/env python
"""A plain one-thread PyTorch FedAvg loop: the baseline bench_run.py compares fedmpi with.

The same protocol as bench_run.py's job, written the way a user would write
it without a simulator: the FedAvg paper's Fashion-MNIST setting, 100 clients
(IID: the shuffled training set cut into equal parts), 10 sampled per round,
one local epoch of minibatch SGD (B=10, lr 0.05, cross-entropy) on the
784-200-200-10 MLP from the global model, the sample-size-weighted mean of
the clients' models as the next global model, and the test accuracy on the
10,000 test samples after every round. One process, one thread
(torch.set_num_threads(1)); the data come from fedmpi's loader so both read
the same arrays at the same cost. Not bitwise comparable with fedmpi (its own
initialisation, sampling and shuffling); the final accuracy is printed as a
sanity check that it learns as much.

    python benchmarks/fedavg_torch.py [--rounds 30] [--data-dir DIR]

Prints one line per round, ``round R/N seconds S test_accuracy A`` (S from
the round's start to the end of its evaluation), then a ``summary:`` line of
JSON. Exits with status 3 and a message when torch is not importable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread, like one fedmpi rank

import numpy as np

NO_TORCH = 3  # exit status when torch is missing (bench_run.py skips the comparison)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    args = p.parse_args()
    t_start = time.perf_counter()
    try:
        import torch
    except ImportError:
        print("fedavg_torch: torch is not importable (pip install torch)", file=sys.stderr)
        return NO_TORCH
    from torch import nn

    from fedmpi.data import load_dataset

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir, seed=args.seed,
                        num_clients=args.clients)
    x_train = torch.from_numpy(data.x_train.astype(np.float32) * np.float32(data.x_scale))
    y_train = torch.from_numpy(data.y_train.astype(np.int64))
    x_test = torch.from_numpy(data.x_test.astype(np.float32) * np.float32(data.x_scale))
    y_test = torch.from_numpy(data.y_test.astype(np.int64))
    rng = np.random.default_rng(args.seed)
    parts = np.array_split(rng.permutation(x_train.shape[0]), args.clients)

    model = nn.Sequential(nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                          nn.Linear(200, data.num_classes))
    loss_fn = nn.CrossEntropyLoss()
    global_vec = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    t_ready = time.perf_counter()
    seconds, accuracy = [], []
    for rnd in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        clients = rng.choice(args.clients, args.clients_per_round, replace=False)
        total = sum(len(parts[c]) for c in clients)
        new_vec = torch.zeros_like(global_vec)
        for c in clients:
            nn.utils.vector_to_parameters(global_vec, model.parameters())
            opt = torch.optim.SGD(model.parameters(), lr=args.lr)
            idx = torch.from_numpy(parts[c])
            for _ in range(args.local_epochs):
                order = idx[torch.randperm(idx.shape[0])]
                for s in range(0, order.shape[0], args.batch_size):
                    rows = order[s:s + args.batch_size]
                    opt.zero_grad()
                    loss_fn(model(x_train[rows]), y_train[rows]).backward()
                    opt.step()
            with torch.no_grad():
                new_vec += nn.utils.parameters_to_vector(model.parameters()) * (len(parts[c]) / total)
        global_vec = new_vec
        with torch.no_grad():
            nn.utils.vector_to_parameters(global_vec, model.parameters())
            correct = sum(int((model(x_test[s:s + 1000]).argmax(1) == y_test[s:s + 1000]).sum())
                          for s in range(0, x_test.shape[0], 1000))
        seconds.append(time.perf_counter() - t0)
        accuracy.append(correct / x_test.shape[0])
        print(f"round {rnd}/{args.rounds} seconds {seconds[-1]:.4f} "
              f"test_accuracy {accuracy[-1]:.4f}", flush=True)
    print("summary: " + json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "setup_seconds": t_ready - t_start, "round_seconds": seconds,
        "final_accuracy": accuracy[-1], "total_seconds": time.perf_counter() - t_start}),
        flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
