"""Federated algorithms: each a small class overriding what differs from FedAvg."""

from fedmpi.algorithms.base import ClientResult, FedAvg
from fedmpi.algorithms.fedsgd import FedSGD

REGISTRY = {"fedavg": FedAvg, "fedsgd": FedSGD}


def make(cfg, model):
    return REGISTRY[cfg.algorithm](cfg, model)


__all__ = ["ClientResult", "FedAvg", "FedSGD", "REGISTRY", "make"]
