"""``python -m fedmpi``: one federated training job (see --help)."""

import os

# One compute thread per rank unless the user says otherwise: with several
# ranks per node, numba/OpenBLAS/OpenMP's default of one thread per core
# would oversubscribe the cores. Must be set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from fedmpi.runtime import exit_process, main  # noqa: E402

if __name__ == "__main__":
    exit_process(main())
