"""Global training loss of each run's final model: the mean loss over every client's
training samples (the FedProx paper's "training loss"), recomputed from the results file.

Usage: python benchmarks/final_train_loss.py RUN.h5 ...   (prints a Markdown table)
"""

from __future__ import annotations

import sys

import numpy as np

from fedmpi.config import from_dict
from fedmpi.data import Dataset, load_dataset
from fedmpi.client import LocalTrainer
from fedmpi.model.mlp import MLP
from fedmpi.results import read_run


def final_losses(path: str) -> tuple[dict, float, float]:
    run = read_run(path)
    cfg = run["config"]
    data = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"], seed=cfg["seed"],
                        num_clients=cfg["clients"], synthetic_alpha=cfg["synthetic_alpha"],
                        synthetic_beta=cfg["synthetic_beta"])
    # evaluate on the training set: pose it as the test set of a throwaway Dataset
    train = Dataset(data.name, data.x_train, data.y_train, data.x_train, data.y_train,
                    data.num_classes, data.x_scale)
    model = MLP(tuple(run["layer_sizes"]))
    trainer = LocalTrainer(from_dict({"loss": cfg["loss"]}), model, train)
    loss, correct = trainer.evaluate(np.asarray(run["params"], np.float32), 0,
                                     train.x_test.shape[0])
    n = train.x_test.shape[0]
    return cfg, loss / n, correct / n


def main(paths: list[str]) -> None:
    print("| run | algorithm | prox_mu | drop_stragglers | seed | final train loss | "
          "final train accuracy | final test loss | mean test loss, 2nd half of the rounds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        cfg, loss, acc = final_losses(p)
        rounds = read_run(p)["rounds"]["test_loss"]
        test_loss, late = rounds[-1], float(np.nanmean(rounds[len(rounds) // 2:]))
        mu = cfg["prox_mu"] if cfg["algorithm"] == "fedprox" else "-"
        print(f"| {p} | {cfg['algorithm']} | {mu} | {cfg['drop_stragglers']} | {cfg['seed']} | "
              f"{loss:.4f} | {acc:.4f} | {test_loss:.4f} | {late:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
