"""Federated algorithms: each a small class overriding what differs from FedAvg."""

from fedmpi.algorithms.base import ClientResult, FedAvg
from fedmpi.algorithms.fednova import FedNova
from fedmpi.algorithms.fedprox import FedProx
from fedmpi.algorithms.fedsgd import FedSGD
from fedmpi.algorithms.scaffold import Scaffold

REGISTRY = {"fedavg": FedAvg, "fedsgd": FedSGD, "fedprox": FedProx, "fednova": FedNova,
            "scaffold": Scaffold}


def make(cfg, model):
    return REGISTRY[cfg.algorithm](cfg, model)


__all__ = ["ClientResult", "FedAvg", "FedNova", "FedProx", "FedSGD", "REGISTRY", "Scaffold", "make"]
