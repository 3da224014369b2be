"""fedmpi: a federated-learning simulator for HPC machines.

Rank 0 of an MPI job is the aggregator; the other ranks host simulated
clients that train a multilayer perceptron with numba kernels.
"""

__version__ = "0.1.0"
