"""What a fedmpi results file looks like: names, units and the flat-parameter layout.

Shared by the writer (fedmpi.results) and the readers (fedmpi.reading,
fedmpi.analysis), so that neither has to import the other for it. No I/O here.
"""

from __future__ import annotations

import numpy as np

# Bump when the layout changes in a way readers must know about.
LAYOUT_VERSION = 1

# name -> (units, description). Written as attributes on each dataset so the
# file explains itself without this source code. Keys not listed here are
# still accepted (units and description then empty) so the runtime can add a
# metric without touching this module.
ROUND_FIELDS: dict[str, tuple[str, str]] = {
    "round": ("", "Federated round index, as counted by the runtime"),
    "test_accuracy": (
        "1",
        "Accuracy of the global model on the test set after this round, a "
        "fraction in [0, 1]; NaN in rounds without evaluation",
    ),
    "test_loss": (
        "nats",
        "Mean cross-entropy of the global model on the test set after this "
        "round; NaN in rounds without evaluation",
    ),
    "train_loss": (
        "nats",
        "Training loss of this round's clients, mean weighted by their "
        "num_samples",
    ),
    "num_clients": ("clients", "Number of clients that trained in this round"),
    "num_samples": (
        "samples", "Total training samples of the clients of this round"),
    "seconds": ("s", "Wall-clock duration of the round, measured on rank 0"),
    "bytes_up": (
        "bytes", "Bytes of model updates sent from clients to rank 0"),
    "bytes_down": (
        "bytes", "Bytes of global model sent from rank 0 to clients"),
}

CLIENT_FIELDS: dict[str, tuple[str, str]] = {
    "round": ("", "Round of this row; matches /rounds/round"),
    "client_id": (
        "", "Client index; row of /partition/num_samples and label_histogram"),
    "rank": ("", "MPI rank that simulated the client in this round"),
    "num_samples": ("samples", "Training samples held by the client"),
    "train_loss": ("nats", "Client's mean training loss in this round"),
    "seconds": ("s", "Wall-clock time of the client's local training"),
}

FLAT_LAYOUT = (
    "Flat float32 vector of all layers in order; for layer l: W_l of shape "
    "(layer_sizes[l], layer_sizes[l+1]) in row-major (C) order, then b_l of "
    "shape (layer_sizes[l+1],). See fedmpi.results.layers_from_flat."
)

# "best-effort": take HDF5's advisory lock (so two jobs can't both write one
# file) but don't fail on file systems without flock support (some Lustre
# and NFS mounts), where strict locking would make every run fail.
WRITER_LOCKING = "best-effort"

# Real paths of files a ResultsWriter in this process has open. HDF5 refuses
# to open a file already open in the same process with different locking
# settings ("file locking flag values don't match"), so readers must use the
# writer's setting for these rather than locking=False.
OPEN_WRITERS: set[str] = set()


def num_params(layer_sizes) -> int:
    """Length of the flat parameter vector of an MLP with these layer sizes."""
    return sum(a * b + b for a, b in zip(layer_sizes[:-1], layer_sizes[1:]))


def layers_from_flat(params: np.ndarray,
                     layer_sizes) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split a flat parameter vector into per-layer (W, b) views.

    W_l has shape (layer_sizes[l], layer_sizes[l+1]), b_l (layer_sizes[l+1],);
    the layout written by ResultsWriter.write_params. No data is copied.
    """
    flat = np.asarray(params)
    sizes = [int(s) for s in layer_sizes]
    expected = num_params(sizes)
    if flat.ndim != 1 or flat.size != expected:
        raise ValueError(f"expected a flat vector of {expected} values for "
                         f"layer sizes {sizes}, got shape {flat.shape}")
    layers = []
    offset = 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        w = flat[offset:offset + n_in * n_out].reshape(n_in, n_out)
        offset += n_in * n_out
        b = flat[offset:offset + n_out]
        offset += n_out
        layers.append((w, b))
    return layers
