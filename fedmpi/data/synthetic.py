"""Synthetic(alpha, beta): the heterogeneous data set of FedProx.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020,
section 5.1, following the generator ``data/synthetic_*/generate_synthetic.py``
in github.com/litian96/FedProx.  Each client has its own softmax-regression
"teacher" and its own input distribution; ``alpha`` controls how much the
teachers (the models) differ between clients and ``beta`` how much the inputs
differ.  Alpha = beta = 0 still leaves clients different, because every
client draws its own W_k, b_k and v_k around the shared means.

Recipe, with d = 60 features and C = 10 classes, for client k:

* n_k = int(lognormal(mean=4, sigma=2)) + 50 samples (a power law, so a few
  clients are very large), capped at ``MAX_CLIENT_SAMPLES`` = 5000: the tail
  of this lognormal reaches hundreds of thousands, which with many clients
  would not fit in memory and would make one client dominate the run time;
* u_k ~ N(0, alpha) and B_k ~ N(0, beta);
* W_k (d x C) with entries ~ N(u_k, 1), and b_k (C) with entries ~ N(u_k, 1);
* v_k (d) with entries ~ N(B_k, 1);
* x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^(-1.2) for j = 1..d;
* y = argmax(softmax(W_k^T x + b_k)).

As in the reference code, alpha and beta are used as standard deviations
(``np.random.normal(0, alpha)``), although the paper writes them as the second
parameter of N(., .).  For the usual values 0, 0.5 and 1 the distinction only
matters at 0.5.

Each client's samples are split 80/20 into its training and test parts (the
reference code uses 90/10).  Training parts are concatenated in client order
and their sizes are the data set's natural client split; test parts are
concatenated into one global test set.

Randomness: client k's data come from its own generator seeded by
``SeedSequence([seed, SYNTHETIC_PURPOSE, k])``, so they depend only on the seed
and k -- not on the number of clients, nor on how the other clients' data were
drawn.  With 10 clients one gets exactly the first 10 clients of a 100-client
data set.
"""

from __future__ import annotations

import numpy as np

from fedmpi.errors import UserError

DIM = 60
NUM_CLASSES = 10
MIN_CLIENT_SAMPLES = 50
MAX_CLIENT_SAMPLES = 5000
TRAIN_FRACTION = 0.8

# Second word of every seed sequence used here ("SYNT" in ASCII); it keeps
# these streams apart from those of other consumers of the same --seed.
SYNTHETIC_PURPOSE = 0x53594E54

# Per-feature standard deviations of x: sqrt of Sigma_jj = j^(-1.2).
_X_STD = np.arange(1, DIM + 1, dtype=np.float64) ** -0.6


def client_rng(seed: int, k: int) -> np.random.Generator:
    """Generator for client k's data; depends on nothing but (seed, k)."""
    return np.random.default_rng(np.random.SeedSequence([seed, SYNTHETIC_PURPOSE, k]))


def generate_client(rng: np.random.Generator, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """All samples (x float64 (n, DIM), y int32 (n,)) of one client."""
    n = min(int(rng.lognormal(4.0, 2.0)) + MIN_CLIENT_SAMPLES, MAX_CLIENT_SAMPLES)
    u = rng.normal(0.0, alpha)
    big_b = rng.normal(0.0, beta)
    w = rng.normal(u, 1.0, size=(DIM, NUM_CLASSES))
    b = rng.normal(u, 1.0, size=NUM_CLASSES)
    v = rng.normal(big_b, 1.0, size=DIM)
    # Sigma is diagonal, so N(v, Sigma) is v plus independently scaled normals.
    x = v + _X_STD * rng.standard_normal((n, DIM))
    # softmax is monotonic: the argmax of the logits is the argmax of softmax,
    # and skipping exp() avoids overflow for large logits.
    y = np.argmax(x @ w + b, axis=1).astype(np.int32)
    return x, y


def load_synthetic(num_clients: int, seed: int, alpha: float = 1.0, beta: float = 1.0):
    """Synthetic(alpha, beta) data for `num_clients` clients as a `fedmpi.data.Dataset`."""
    from fedmpi.data import Dataset  # late import: the package imports this module

    if num_clients < 1:
        raise UserError(f"--clients must be at least 1 (got {num_clients})")
    for flag, value in (("alpha", alpha), ("beta", beta)):
        if not (np.isfinite(value) and value >= 0):
            raise UserError(f"synthetic {flag} must be a finite number >= 0 (got {value})")

    x_train, y_train, x_test, y_test, sizes = [], [], [], [], []
    for k in range(num_clients):
        x, y = generate_client(client_rng(seed, k), alpha, beta)
        # Samples are i.i.d. within a client, so the first 80% is as good a
        # random training subset as any.
        n_train = int(TRAIN_FRACTION * len(x))
        x_train.append(x[:n_train])
        y_train.append(y[:n_train])
        x_test.append(x[n_train:])
        y_test.append(y[n_train:])
        sizes.append(n_train)

    return Dataset(
        name="synthetic",
        x_train=np.concatenate(x_train).astype(np.float32),
        y_train=np.concatenate(y_train),
        x_test=np.concatenate(x_test).astype(np.float32),
        y_test=np.concatenate(y_test),
        num_classes=NUM_CLASSES,
        x_scale=1.0,
        natural_sizes=np.asarray(sizes, dtype=np.int64),
    )
