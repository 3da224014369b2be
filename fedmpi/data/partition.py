"""Splitting a training set among simulated clients.

A partition is stored as one permutation of the training indices, ``order``,
plus CSR-style ``offsets``: client c owns ``order[offsets[c]:offsets[c+1]]``.
Two flat arrays rather than a list of arrays because that is what gets
scattered over MPI and written to HDF5, and it makes "every sample is used
exactly once" a property of the representation.

Methods:

* ``natural`` -- the data set's own split (Synthetic, h5 files' users), consecutive ranges.
* ``iid`` -- a random permutation cut into near-equal parts.
* ``shards`` -- McMahan et al., AISTATS 2017: sort by label, cut into
  ``num_clients * shards_per_client`` equal shards, deal each client
  ``shards_per_client`` random shards, so each client sees few classes.
* ``dirichlet`` -- label skew, per class (the variant of NIID-Bench, Li et al.
  ICDE 2022, and most later work; not Hsu et al.'s): for each class,
  proportions over the clients are drawn from Dir(alpha * 1) and that class's
  shuffled samples are cut accordingly; client sizes vary, a whole draw is
  repeated until every client has at least one sample, and there is no cap.
  Small alpha -> each class lands on few clients.
* ``dirichlet_clients`` -- label skew, per client (Hsu et al. 2019, "Measuring
  the effects of non-identical data distribution"): every client gets the
  same number of samples (as iid) and its class proportions q ~ Dir(alpha * p),
  p the classes' share of the training set; its samples are drawn class by
  class from what is left, a class that runs out passing its share to the
  others in proportion to q.

All randomness comes from ``SeedSequence([seed, PARTITION_PURPOSE, attempt])``,
never from global state, so a partition is a pure function of its arguments.
Indices within a client are sorted, which makes the partition canonical: two
equal partitions compare equal array for array.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmpi.errors import UserError

METHODS = ("natural", "iid", "shards", "dirichlet", "dirichlet_clients")

# Second word of the seed sequence ("PART" in ASCII); it keeps partition
# randomness independent of other streams drawn from the same --seed.
PARTITION_PURPOSE = 0x50415254

# Dirichlet draws that leave a client empty are retried with the next attempt
# number; at small alpha with many clients empty clients are likely, and
# beyond this many tries the settings are hopeless.
MAX_DIRICHLET_ATTEMPTS = 100


@dataclass(frozen=True)
class Partition:
    order: np.ndarray  # int64 sample indices, a permutation of range(n_train)
    offsets: np.ndarray  # int64, length num_clients + 1, offsets[0] = 0

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        """Number of training samples of each client (int64)."""
        return np.diff(self.offsets)

    def indices(self, c: int) -> np.ndarray:
        """Training-sample indices of client `c`, ascending."""
        return self.order[self.offsets[c]:self.offsets[c + 1]]

    def label_histogram(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """(num_clients, num_classes) int64 counts of each label at each client."""
        client = np.repeat(np.arange(self.num_clients, dtype=np.int64), self.sizes)
        flat = client * num_classes + np.asarray(labels, dtype=np.int64)[self.order]
        counts = np.bincount(flat, minlength=self.num_clients * num_classes)
        return counts.reshape(self.num_clients, num_classes)


def _rng(seed: int, attempt: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, PARTITION_PURPOSE, attempt]))


def _from_groups(groups: list[np.ndarray]) -> Partition:
    """Build a canonical Partition from one index array per client."""
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    offsets = np.zeros(len(groups) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    order = np.concatenate([np.sort(g) for g in groups]).astype(np.int64, copy=False)
    return Partition(order=order, offsets=offsets)


def _natural(n: int, num_clients: int, natural_sizes) -> Partition:
    if natural_sizes is None:
        raise UserError(
            "--partition natural needs a data set with a natural client split "
            "(synthetic and h5 data sets have one); use --partition iid, shards or dirichlet"
        )
    sizes = np.asarray(natural_sizes, dtype=np.int64)
    if len(sizes) != num_clients:
        raise UserError(
            f"the data set's natural split has {len(sizes)} clients but --clients is "
            f"{num_clients}; with --partition natural they must be equal"
        )
    if sizes.sum() != n or (sizes < 0).any():
        raise UserError(
            f"the data set's natural client sizes add up to {int(sizes.sum())} "
            f"but it has {n} training samples"
        )
    if (sizes == 0).any():
        raise UserError(f"in the data set's natural split, client {int(np.argmin(sizes))} has no samples")
    offsets = np.zeros(num_clients + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return Partition(order=np.arange(n, dtype=np.int64), offsets=offsets)


def _iid(n: int, num_clients: int, seed: int) -> Partition:
    return _from_groups(np.array_split(_rng(seed).permutation(n), num_clients))


def _shards(labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int) -> Partition:
    n = len(labels)
    num_shards = num_clients * shards_per_client
    if n < num_shards:
        raise UserError(
            f"the data set has {n} training samples, too few for {num_clients} clients x "
            f"{shards_per_client} shards = {num_shards} shards; use a smaller "
            f"--shards-per-client or fewer --clients"
        )
    # A stable sort breaks ties by index, so the shard contents do not depend
    # on the sort algorithm numpy happens to pick.
    by_label = np.argsort(labels, kind="stable")
    shards = np.array_split(by_label, num_shards)
    deal = _rng(seed).permutation(num_shards).reshape(num_clients, shards_per_client)
    return _from_groups([np.concatenate([shards[s] for s in row]) for row in deal])


def _dirichlet(labels: np.ndarray, num_clients: int, seed: int, alpha: float) -> Partition:
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == k) for k in classes]
    for attempt in range(MAX_DIRICHLET_ATTEMPTS):
        rng = _rng(seed, attempt)
        pieces: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            # Cut points from the cumulative proportions: the counts always add
            # up to the class size, unlike rounding each share separately.
            cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for c, piece in enumerate(np.split(idx, cuts)):
                pieces[c].append(piece)
        groups = [np.concatenate(p) for p in pieces]
        if all(len(g) > 0 for g in groups):
            return _from_groups(groups)
    raise UserError(
        f"--partition dirichlet with --alpha {alpha} left some of the {num_clients} clients "
        f"without samples in {MAX_DIRICHLET_ATTEMPTS} attempts; use a larger --alpha or fewer --clients"
    )


def _dirichlet_clients(labels: np.ndarray, num_clients: int, seed: int,
                       alpha: float) -> Partition:
    classes, counts = np.unique(labels, return_counts=True)
    rng = _rng(seed)
    left = [list(rng.permutation(np.flatnonzero(labels == k))) for k in classes]
    remaining = counts.astype(np.int64).copy()
    prior = counts / counts.sum()
    sizes = [len(part) for part in np.array_split(np.arange(len(labels)), num_clients)]
    groups = []
    for size in sizes:
        q = rng.dirichlet(alpha * prior)
        take = np.zeros(len(classes), np.int64)
        need = size
        while need > 0:  # classes that run out pass their share on, in proportion to q
            open_ = remaining - take > 0
            w = np.where(open_, q, 0.0)
            w = w / w.sum() if w.sum() > 0 else open_ / open_.sum()
            draw = np.minimum(rng.multinomial(need, w), remaining - take)
            take += draw
            need -= int(draw.sum())
        group = []
        for k in np.flatnonzero(take):
            group.extend(left[k][:take[k]])
            del left[k][:take[k]]
        remaining -= take
        groups.append(np.asarray(group, np.int64))
    return _from_groups(groups)


def make_partition(
    method: str,
    labels: np.ndarray,
    num_clients: int,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    natural_sizes=None,
) -> Partition:
    """Split the training samples with `labels` among `num_clients` clients.

    Every training index is given to exactly one client and every client gets
    at least one sample.  Raises `UserError` for an unknown method or settings
    that cannot be met.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if method not in METHODS:
        raise UserError(f"unknown partition method {method!r}; choose one of {', '.join(METHODS)}")
    if num_clients < 1:
        raise UserError(f"--clients must be at least 1 (got {num_clients})")
    if seed < 0:
        raise UserError(f"--seed must be a non-negative integer (got {seed})")
    if n < num_clients:
        raise UserError(
            f"the data set has {n} training samples but --clients is {num_clients}: "
            f"use at most {n} clients"
        )

    if method == "natural":
        return _natural(n, num_clients, natural_sizes)
    if method == "iid":
        return _iid(n, num_clients, seed)
    if method == "shards":
        if shards_per_client < 1:
            raise UserError(f"--shards-per-client must be at least 1 (got {shards_per_client})")
        return _shards(labels, num_clients, seed, shards_per_client)
    if not (np.isfinite(alpha) and alpha > 0):
        raise UserError(f"--alpha must be a positive number (got {alpha})")
    if method == "dirichlet_clients":
        return _dirichlet_clients(labels, num_clients, seed, alpha)
    return _dirichlet(labels, num_clients, seed, alpha)
