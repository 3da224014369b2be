"""How much memory a job's data will take, estimated before loading it.

A process killed by the kernel's out-of-memory killer takes its MPI job down
with only MPI's generic abort text (``--clients 100000`` once ran for two
minutes to 24 GB before that happened). Estimating first lets a job refuse
with one line saying what it needs, what is free and what to change.

What a node holds at its peak, in the current design: the node leader's
loaded arrays plus their copy in the node's shared-memory window (2x the
data, briefly, while the copy is made), and on each rank the partition's
sample order (int64 per training sample); the rank that writes results also
builds the label histogram from two int64 arrays per training sample. Models
and buffers (a few models' worth) are left out: they are small next to any
data set that could come near the limit. The processes themselves are
already running when the check is made, so MemAvailable accounts for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fedmpi.errors import UserError

GB = 1e9


@dataclass(frozen=True)
class Footprint:
    what: str  # e.g. "synthetic data for 100,000 clients"
    data_bytes: int  # the arrays the loader returns
    train_samples: int
    advice: str = "use a node with more free memory"  # what to change if it does not fit


def estimate(name: str, *, num_clients: int, synthetic_mean_samples: float | None = None
             ) -> Footprint | None:
    """The data's size without loading it, or None where it is not known cheaply.

    Synthetic: from the expected client size (closed form); h5: from the
    file's dataset shapes (features counted as float32, the most they take).
    IDX and npz files are left out: they are held about as large as they are
    on disk, which the user can see.
    """
    if name == "synthetic":
        from fedmpi.data import synthetic as s

        n = num_clients * s.expected_samples(synthetic_mean_samples)
        train = s.TRAIN_FRACTION * n
        test = min(n - train, s.MAX_TEST_SAMPLES)
        per_sample = s.DIM * 4 + 4  # float32 features + int32 label
        return Footprint(f"synthetic data for {num_clients:,} clients",
                         int((train + test) * per_sample + 8 * num_clients), int(train),
                         "use fewer --clients or a smaller --synthetic-mean-samples, or a node "
                         "with more free memory")
    if name.startswith("h5:"):
        from fedmpi.data.tff import estimate_bytes

        return estimate_bytes(name[len("h5:"):])
    return None


def node_need(fp: Footprint, ranks_on_node: int, writes_results: bool) -> int:
    """Peak bytes the job adds on one node (see the module docstring)."""
    need = 2 * fp.data_bytes + ranks_on_node * 8 * fp.train_samples
    if writes_results:
        need += 16 * fp.train_samples
    return need


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def shm_free(path: str = "/dev/shm") -> int | None:
    """Free bytes of the tmpfs that holds MPICH's shared-memory windows; None if absent."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def check(fp: Footprint | None, ranks_on_node: int, writes_results: bool,
          available: int | None = None, shm: int | None = None) -> None:
    """UserError if the job's estimated peak on this node exceeds what is available.

    Two limits: memory (MemAvailable) and the space of /dev/shm, where MPICH
    puts the shared-memory window holding the data (containers often give
    /dev/shm 64 MB; a window larger than that dies with SIGBUS when touched).
    """
    if fp is None:
        return
    available = mem_available() if available is None else available
    need = node_need(fp, ranks_on_node, writes_results)
    if available is not None and need > available:
        raise UserError(
            f"this job needs about {need / GB:.1f} GB on this node ({fp.what}: "
            f"{fp.data_bytes / GB:.1f} GB, held twice while it is moved into shared memory, plus "
            f"{(need - 2 * fp.data_bytes) / GB:.1f} GB of per-rank partition indices for "
            f"{ranks_on_node} rank(s)) but only {available / GB:.1f} GB is available (MemAvailable "
            f"in /proc/meminfo): {fp.advice}")
    shm = shm_free() if shm is None else shm
    if shm is not None and fp.data_bytes > shm:
        raise UserError(
            f"the data ({fp.what}: {fp.data_bytes / GB:.2f} GB) is held in node shared memory, "
            f"but /dev/shm has only {shm / GB:.2f} GB free: enlarge /dev/shm (e.g. docker run "
            f"--shm-size, or mount -o remount,size=... /dev/shm), or {fp.advice}")
