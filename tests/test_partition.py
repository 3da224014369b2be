"""Tests of fedmpi.data.partition (pure numpy, no MPI)."""

import numpy as np
import pytest

from fedmpi.data.partition import Partition, make_partition
from fedmpi.errors import UserError

# The McMahan et al. setting in miniature: 10 balanced classes, 100 clients.
LABELS = np.repeat(np.arange(10), 600).astype(np.int32)


def check_valid(p: Partition, n: int, num_clients: int) -> None:
    assert p.order.dtype == np.int64 and p.offsets.dtype == np.int64
    assert p.num_clients == num_clients
    assert len(p.offsets) == num_clients + 1
    assert p.offsets[0] == 0 and p.offsets[-1] == n
    assert (p.sizes > 0).all()
    np.testing.assert_array_equal(p.sizes, np.diff(p.offsets))
    # every index exactly once
    np.testing.assert_array_equal(np.sort(p.order), np.arange(n))
    for c in range(num_clients):
        idx = p.indices(c)
        assert len(idx) == p.sizes[c]
        assert (np.diff(idx) > 0).all(), "indices within a client must be sorted"


def mean_tv_distance(p: Partition, labels: np.ndarray, num_classes: int) -> float:
    """Mean total-variation distance of client label distributions from the global one."""
    h = p.label_histogram(labels, num_classes).astype(float)
    local = h / h.sum(axis=1, keepdims=True)
    glob = np.bincount(labels, minlength=num_classes) / len(labels)
    return float(0.5 * np.abs(local - glob).sum(axis=1).mean())


@pytest.mark.parametrize("method", ["iid", "shards", "dirichlet"])
@pytest.mark.parametrize("num_clients", [1, 7, 100])
def test_every_index_once(method, num_clients):
    p = make_partition(method, LABELS, num_clients, seed=3, alpha=1.0)
    check_valid(p, len(LABELS), num_clients)


@pytest.mark.parametrize("method", ["iid", "shards", "dirichlet"])
def test_deterministic(method):
    a = make_partition(method, LABELS, 50, seed=11)
    b = make_partition(method, LABELS, 50, seed=11)
    c = make_partition(method, LABELS, 50, seed=12)
    np.testing.assert_array_equal(a.order, b.order)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    assert not (np.array_equal(a.order, c.order) and np.array_equal(a.offsets, c.offsets))


def test_global_random_state_is_ignored():
    np.random.seed(0)
    a = make_partition("dirichlet", LABELS, 20, seed=5)
    np.random.seed(1)
    b = make_partition("dirichlet", LABELS, 20, seed=5)
    np.testing.assert_array_equal(a.order, b.order)


def test_iid_sizes_near_equal():
    n = 1003
    p = make_partition("iid", np.zeros(n, dtype=np.int32), 10, seed=0)
    check_valid(p, n, 10)
    assert p.sizes.max() - p.sizes.min() <= 1


def test_iid_is_shuffled():
    p = make_partition("iid", LABELS, 10, seed=0)
    # a random 600-sample subset of balanced labels should contain all 10 classes
    assert (p.label_histogram(LABELS, 10) > 0).all()


def test_shards_mcmahan_setting():
    # Shuffled labels: were they not sorted first, shards would mix classes (on
    # already sorted labels any contiguous split would pass).
    labels = LABELS[np.random.default_rng(1).permutation(len(LABELS))]
    p = make_partition("shards", labels, 100, seed=0, shards_per_client=2)
    check_valid(p, len(labels), 100)
    h = p.label_histogram(labels, 10)
    assert (p.sizes == 60).all()
    # 200 shards of 30 samples, each of one class (600 per class = 20 whole shards):
    # a client holds 30 or 60 samples of each class it has, at most 2 classes
    assert set(np.unique(h).tolist()) <= {0, 30, 60}
    assert ((h > 0).sum(axis=1) <= 2).all()
    np.testing.assert_array_equal(h.sum(axis=0), 600)
    # the shards are dealt at random: most clients get two classes, some one
    two = ((h > 0).sum(axis=1) == 2).mean()
    assert 0.7 < two < 1.0


def test_shards_per_client_option():
    p = make_partition("shards", LABELS, 20, seed=4, shards_per_client=5)
    check_valid(p, len(LABELS), 20)
    assert ((p.label_histogram(LABELS, 10) > 0).sum(axis=1) <= 5).all()


def test_shards_uneven_sizes():
    labels = np.arange(1001) % 3
    p = make_partition("shards", labels, 10, seed=0, shards_per_client=3)
    check_valid(p, 1001, 10)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skewed = make_partition("dirichlet", LABELS, 50, seed=0, alpha=0.1)
    uniform = make_partition("dirichlet", LABELS, 50, seed=0, alpha=100.0)
    check_valid(skewed, len(LABELS), 50)
    check_valid(uniform, len(LABELS), 50)
    assert mean_tv_distance(skewed, LABELS, 10) > 0.5
    assert mean_tv_distance(uniform, LABELS, 10) < 0.15


def test_dirichlet_gives_up_with_helpful_message():
    # At alpha this small each class lands on one or two clients, so most of
    # the 1000 clients stay empty in every attempt.
    labels = np.repeat(np.arange(2), 600)
    with pytest.raises(UserError, match="larger --alpha or fewer --clients"):
        make_partition("dirichlet", labels, 1000, seed=0, alpha=0.001)


def test_label_histogram():
    p = Partition(order=np.array([2, 0, 1, 3], dtype=np.int64), offsets=np.array([0, 1, 4], dtype=np.int64))
    labels = np.array([0, 1, 1, 2])
    np.testing.assert_array_equal(p.label_histogram(labels, 3), [[0, 1, 0], [1, 1, 1]])
    assert p.num_clients == 2
    np.testing.assert_array_equal(p.sizes, [1, 3])
    np.testing.assert_array_equal(p.indices(1), [0, 1, 3])


def test_natural():
    sizes = np.array([3, 5, 2], dtype=np.int64)
    p = make_partition("natural", np.zeros(10, dtype=np.int32), 3, seed=0, natural_sizes=sizes)
    check_valid(p, 10, 3)
    np.testing.assert_array_equal(p.order, np.arange(10))
    np.testing.assert_array_equal(p.sizes, sizes)


def test_natural_errors():
    labels = np.zeros(10, dtype=np.int32)
    with pytest.raises(UserError, match="natural client split"):
        make_partition("natural", labels, 3, seed=0)
    with pytest.raises(UserError, match="--clients is 4"):
        make_partition("natural", labels, 4, seed=0, natural_sizes=[3, 5, 2])
    with pytest.raises(UserError, match="add up to"):
        make_partition("natural", labels, 3, seed=0, natural_sizes=[3, 5, 3])


def test_too_few_samples():
    with pytest.raises(UserError, match="has 50 training samples but --clients is 100: use at most 50 clients"):
        make_partition("iid", np.zeros(50, dtype=np.int32), 100, seed=0)


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown partition method 'pathological'.*iid"):
        make_partition("pathological", LABELS, 10, seed=0)
    with pytest.raises(UserError, match="--alpha"):
        make_partition("dirichlet", LABELS, 10, seed=0, alpha=0.0)
    with pytest.raises(UserError, match="--shards-per-client"):
        make_partition("shards", LABELS, 10, seed=0, shards_per_client=0)
    with pytest.raises(UserError, match="shards"):
        make_partition("shards", np.zeros(30, dtype=np.int32), 20, seed=0, shards_per_client=2)
    with pytest.raises(UserError, match="--clients"):
        make_partition("iid", LABELS, 0, seed=0)


def test_dirichlet_clients_hsu_et_al():
    labels = LABELS[np.random.default_rng(2).permutation(len(LABELS))]
    for alpha, lo, hi in ((0.1, 0.5, 1.0), (1000.0, 0.0, 0.15)):
        p = make_partition("dirichlet_clients", labels, 50, seed=0, alpha=alpha)
        check_valid(p, len(labels), 50)
        assert (p.sizes == 120).all()  # equal sizes, as iid
        assert lo < mean_tv_distance(p, labels, 10) < hi, alpha
    # E[q] = p: pooled over clients, the classes keep their shares (here every sample
    # is used, so exactly)
    np.testing.assert_array_equal(p.label_histogram(labels, 10).sum(axis=0), 600)


def test_dirichlet_clients_with_unbalanced_classes():
    # class 0 is 10% of the data: the clients whose q favours it exhaust it and the
    # draw passes on to the other classes
    labels = np.concatenate([np.zeros(100, np.int32), np.ones(900, np.int32)])
    p = make_partition("dirichlet_clients", labels, 10, seed=3, alpha=0.05)
    check_valid(p, 1000, 10)
    assert (p.sizes == 100).all()
