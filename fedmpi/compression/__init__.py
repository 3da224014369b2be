"""Communication compression: codecs, error feedback, pruning (pure: no MPI, no I/O)."""
