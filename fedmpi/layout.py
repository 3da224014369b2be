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
        "Mean loss (the run's --loss) of the global model on the test set "
        "after this round; NaN in rounds without evaluation",
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

# Columns that only some runs have (written by the runtime and update-pipeline
# stages); described the same way when they are created.
MORE_ROUND_FIELDS: dict[str, tuple[str, str]] = {
    "num_sampled": (
        "clients", "Clients sampled this round; num_clients of them reported (the others "
        "dropped out, --dropout-rate)"),
    "fixed_point_coarse": (
        "coordinates", "Nonzero update coordinates that the exact fixed-point sum carried with "
        "fewer than 16 significant bits (their block's bound was set by a much larger value); "
        "0 in healthy runs"),
    # differential privacy (--dp-clip)
    "epsilon": (
        "1", "Privacy budget spent after this round at the run's dp_delta (user-level; "
        "accountant in the dp_accountant attribute); inf without noise"),
    "dp_clip_norm": ("1", "L2 clip norm S the clients used in this round"),
    "dp_clipped_fraction": (
        "1", "Fraction of this round's clients whose update was clipped (a diagnostic, "
        "not privatised)"),
    "dp_median_norm": (
        "1", "Median L2 norm of this round's client updates before clipping (a "
        "diagnostic, not privatised)"),
    "dp_noise_std": (
        "1", "Standard deviation of the Gaussian noise per coordinate of the averaged "
        "update (z_update * S / K)"),
    # secure aggregation (--secure-aggregation)
    "secure_skipped": (
        "1", "1 if the round was skipped because too few clients survived to unmask the sum "
        "(fewer than --secagg-threshold share holders); the model did not change"),
    **{f"secure_bytes_{phase}": (
        "bytes", f"Bytes a sampled client sent plus received in the {what}, mean over the "
        "round's sampled clients") for phase, what in (
        ("advertise", "key-advertisement phase (two X25519 public keys out, its peers' in)"),
        ("share", "share-keys phase (AES-GCM-encrypted Shamir shares out and in)"),
        ("masked", "masked-input phase (the masked update out, the survivor list in)"),
        ("unmask", "unmasking phase (revealed shares out)"),
        ("ciphertext", "he upload (the BFV ciphertexts of its update)"))},
    "secure_bytes_decrypt": (
        "bytes", "Bytes of the summed BFV ciphertexts rank 0 sends to the key-holding client "
        "to decrypt (--secure-aggregation he)"),
    "secure_client_seconds": (
        "s", "Seconds all clients of the round spent in secure-aggregation cryptography, summed"),
    "secure_server_seconds": (
        "s", "Seconds rank 0 spent in secure-aggregation cryptography (routing, unmasking, "
        "adding ciphertexts)"),
    # compression (--prune)
    "weight_sparsity": (
        "1", "Fraction of the weights (biases excluded) pruned in the model this round's "
        "clients trained (--prune)"),
}

MORE_CLIENT_FIELDS: dict[str, tuple[str, str]] = {
    "update_norm": ("1", "L2 norm of the client's update before clipping (--dp-clip)"),
    "clipped": ("1", "1 if the client's update was clipped (--dp-clip), else 0"),
    "local_steps": ("steps", "Local optimizer steps the client took (--stragglers)"),
    "straggler": ("1", "1 if the client was a straggler this round and did less local work "
                  "(--stragglers), else 0"),
    "attacker": ("1", "1 if the client is malicious (--attack, fixed for the run), else 0"),
    "secure_seconds": ("s", "Seconds the client spent in secure-aggregation cryptography"),
    "secure_bytes": (
        "bytes", "Bytes the client sent plus received in the secure-aggregation protocol (all "
        "phases; for he, its ciphertexts)"),
    "bytes_up": (
        "bytes", "Length of the client's encoded update, the buffer that crossed MPI "
        "(--compress)"),
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
