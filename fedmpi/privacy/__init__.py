"""Privacy: differential privacy of the aggregate (clipping, noise, accounting)."""
