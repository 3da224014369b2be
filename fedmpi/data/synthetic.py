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
and their sizes are the data set's natural client split.  The test parts are
concatenated into one global test set, in client order, up to
``MAX_TEST_SAMPLES`` = 10,000 samples (what MNIST's test set has): clients are
exchangeable draws, so the first clients' held-out samples are as good a test
set as everyone's, and evaluation no longer grows with the number of clients
(at 10,000 clients the uncapped test set took 0.70 s per evaluation).  Runs with
up to about 170 clients (the default has 100, whose test set has 5,838
samples) are unchanged by the cap.

``mean_samples`` = M (``--synthetic-mean-samples``) replaces the lognormal
size by n_k = 2 + Poisson(M - 2): mean M, at least one training and one test
sample, sizes nearly equal -- a knob for scale experiments (100,000 clients of
20 samples), not part of FedProx's recipe.  The recipe above is otherwise the
same, but drawn for blocks of ``block_clients(M)`` clients at a time from one
generator per block (``SeedSequence([seed, SYNTHETIC_PURPOSE, MEAN_BLOCKS,
block])``): one generator and a handful of NumPy calls per client cost
~50-100 us, i.e. minutes for 10^6 clients; per block it is ~1 us per client.
Client k's data still depend only on (seed, M, k), not on the number of clients.

The arrays are filled in place: a first pass draws every client's size (the
first draw of its generator), the float32 arrays are allocated once, and a
second pass writes the samples into their slices.  Peak memory is the data
set's size plus one client's (or block's) float64 samples; no per-client
arrays are kept.

Randomness: client k's data come from its own generator seeded by
``SeedSequence([seed, SYNTHETIC_PURPOSE, k])``, so they depend only on the seed
and k -- not on the number of clients, nor on how the other clients' data were
drawn.  With 10 clients one gets exactly the first 10 clients of a 100-client
data set.
"""

from __future__ import annotations

import math

import numpy as np

from fedmpi.errors import UserError

DIM = 60
NUM_CLASSES = 10
MIN_CLIENT_SAMPLES = 50
MAX_CLIENT_SAMPLES = 5000
TRAIN_FRACTION = 0.8
MAX_TEST_SAMPLES = 10_000  # cap of the global test set (see above)
MIN_SAMPLES_WITH_MEAN = 2  # --synthetic-mean-samples: one training and one test sample at least
MEAN_BLOCKS = 0x424C4B53  # third seed word of the block generators ("BLKS")

# Second word of every seed sequence used here ("SYNT" in ASCII); it keeps
# these streams apart from those of other consumers of the same --seed.
SYNTHETIC_PURPOSE = 0x53594E54

# Per-feature standard deviations of x: sqrt of Sigma_jj = j^(-1.2).
_X_STD = np.arange(1, DIM + 1, dtype=np.float64) ** -0.6


def client_rng(seed: int, k: int) -> np.random.Generator:
    """Generator for client k's data; depends on nothing but (seed, k)."""
    return np.random.default_rng(np.random.SeedSequence([seed, SYNTHETIC_PURPOSE, k]))


def block_rng(seed: int, block: int) -> np.random.Generator:
    """Generator for block `block` of clients under --synthetic-mean-samples."""
    return np.random.default_rng(np.random.SeedSequence([seed, SYNTHETIC_PURPOSE, MEAN_BLOCKS, block]))


def block_clients(mean_samples: float) -> int:
    """Clients per block: 1024, fewer for large M so a block holds ~32k samples at most."""
    return int(max(1, min(1024, 2 ** math.floor(math.log2(32768 / mean_samples)))))


def num_samples(rng: np.random.Generator, mean_samples: float | None = None) -> int:
    """Client size n_k: the first draw of the client's generator."""
    if mean_samples is None:
        return min(int(rng.lognormal(4.0, 2.0)) + MIN_CLIENT_SAMPLES, MAX_CLIENT_SAMPLES)
    return MIN_SAMPLES_WITH_MEAN + int(rng.poisson(mean_samples - MIN_SAMPLES_WITH_MEAN))


def expected_samples(mean_samples: float | None = None) -> float:
    """E[n_k], in closed form (for memory estimates before generating).

    Default: n = min(floor(X) + 50, 5000) with X ~ LogNormal(4, 2), so
    E[n] = 50 + sum_{j=1}^{4950} P(X >= j), P(X >= j) = erfc((ln j - 4) / (2 sqrt 2)) / 2.
    """
    if mean_samples is not None:
        return float(mean_samples)
    j = np.arange(1, MAX_CLIENT_SAMPLES - MIN_CLIENT_SAMPLES + 1, dtype=np.float64)
    tail = 0.5 * np.array([math.erfc(z) for z in (np.log(j) - 4.0) / (2.0 * math.sqrt(2.0))])
    return MIN_CLIENT_SAMPLES + float(tail.sum())


def generate_client(rng: np.random.Generator, alpha: float, beta: float,
                    mean_samples: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All samples (x float64 (n, DIM), y int32 (n,)) of one client."""
    n = num_samples(rng, mean_samples)
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


def block_sizes(rng: np.random.Generator, mean_samples: float, count: int) -> np.ndarray:
    """Sizes of a block's `count` clients: the first draw of the block's generator."""
    return MIN_SAMPLES_WITH_MEAN + rng.poisson(mean_samples - MIN_SAMPLES_WITH_MEAN, size=count)


def generate_block(rng: np.random.Generator, alpha: float, beta: float, mean_samples: float,
                   count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sizes (count,), x float64 (sum n, DIM), y int32 of a block's clients, rows in client order."""
    n = block_sizes(rng, mean_samples, count)
    u = rng.normal(0.0, alpha, size=count)
    big_b = rng.normal(0.0, beta, size=count)
    w = u[:, None, None] + rng.standard_normal((count, DIM, NUM_CLASSES))
    b = u[:, None] + rng.standard_normal((count, NUM_CLASSES))
    v = big_b[:, None] + rng.standard_normal((count, DIM))
    client = np.repeat(np.arange(count), n)
    x = v[client] + _X_STD * rng.standard_normal((len(client), DIM))
    # each client's logits x @ W_k + b_k as one batched matmul over zero-padded rows
    pos = np.arange(len(client)) - np.repeat(np.cumsum(n) - n, n)
    padded = np.zeros((count, int(n.max()), DIM))
    padded[client, pos] = x
    y = np.argmax(padded @ w + b[:, None, :], axis=2)[client, pos].astype(np.int32)
    return n, x, y


def _client_sizes(num_clients: int, seed: int, mean_samples: float | None) -> np.ndarray:
    if mean_samples is None:
        return np.fromiter((num_samples(client_rng(seed, k)) for k in range(num_clients)),
                           np.int64, count=num_clients)
    per = block_clients(mean_samples)
    blocks = [block_sizes(block_rng(seed, i), mean_samples, per) for i in range(-(-num_clients // per))]
    return np.concatenate(blocks)[:num_clients].astype(np.int64)


def _pieces(num_clients: int, seed: int, alpha: float, beta: float, mean_samples: float | None):
    """(x, y) of consecutive clients -- one client, or one block -- in client order."""
    if mean_samples is None:
        for k in range(num_clients):
            yield generate_client(client_rng(seed, k), alpha, beta)
        return
    per = block_clients(mean_samples)
    for i in range(-(-num_clients // per)):
        n, x, y = generate_block(block_rng(seed, i), alpha, beta, mean_samples, per)
        rows = int(n[:num_clients - i * per].sum())  # the last block may hold extra clients
        yield x[:rows], y[:rows]


def split_sizes(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training, kept test) samples per client for client sizes `sizes`.

    Training: int(0.8 n) (samples are i.i.d. within a client, so the first
    80% is as good a random training subset as any). Test: the rest, until
    the global test set holds MAX_TEST_SAMPLES.
    """
    n_train = (TRAIN_FRACTION * sizes).astype(np.int64)  # = int(0.8 * n) client by client
    n_test = sizes - n_train
    before = np.concatenate([[0], np.cumsum(n_test)[:-1]])
    return n_train, np.clip(MAX_TEST_SAMPLES - before, 0, n_test)


def load_synthetic(num_clients: int, seed: int, alpha: float = 1.0, beta: float = 1.0,
                   mean_samples: float | None = None):
    """Synthetic(alpha, beta) data for `num_clients` clients as a `fedmpi.data.Dataset`."""
    from fedmpi.data import Dataset  # late import: the package imports this module

    if num_clients < 1:
        raise UserError(f"--clients must be at least 1 (got {num_clients})")
    for flag, value in (("alpha", alpha), ("beta", beta)):
        if not (np.isfinite(value) and value >= 0):
            raise UserError(f"synthetic {flag} must be a finite number >= 0 (got {value})")
    if mean_samples is not None and not (np.isfinite(mean_samples)
                                         and mean_samples >= MIN_SAMPLES_WITH_MEAN):
        raise UserError(f"--synthetic-mean-samples must be a number >= {MIN_SAMPLES_WITH_MEAN} "
                        f"(got {mean_samples})")

    sizes = _client_sizes(num_clients, seed, mean_samples)
    n_train, n_test = split_sizes(sizes)
    x_train = np.empty((int(n_train.sum()), DIM), np.float32)
    y_train = np.empty(len(x_train), np.int32)
    x_test = np.empty((int(n_test.sum()), DIM), np.float32)
    y_test = np.empty(len(x_test), np.int32)
    k = tr = te = 0  # next client, next training row, next test row
    for x, y in _pieces(num_clients, seed, alpha, beta, mean_samples):
        if len(x) == sizes[k]:  # one client: plain slices
            a, b = int(n_train[k]), int(n_test[k])
            is_train, is_test = slice(0, a), slice(a, a + b)
            k += 1
        else:  # a block: each client's first n_train rows train, the next n_test test
            m = int(np.searchsorted(np.cumsum(sizes[k:]), len(x))) + 1
            sz, nt, ne = sizes[k:k + m], n_train[k:k + m], n_test[k:k + m]
            pos = np.arange(len(x)) - np.repeat(np.cumsum(sz) - sz, sz)
            nt_row = np.repeat(nt, sz)
            is_train, is_test = pos < nt_row, (pos >= nt_row) & (pos < nt_row + np.repeat(ne, sz))
            a, b = int(nt.sum()), int(ne.sum())
            k += m
        x_train[tr:tr + a] = x[is_train]  # float64 -> float32, as astype would round
        y_train[tr:tr + a] = y[is_train]
        x_test[te:te + b] = x[is_test]
        y_test[te:te + b] = y[is_test]
        tr, te = tr + a, te + b
    assert k == num_clients and tr == len(x_train) and te == len(x_test)

    return Dataset(
        name="synthetic",
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=NUM_CLASSES,
        x_scale=1.0,
        natural_sizes=n_train,
    )
