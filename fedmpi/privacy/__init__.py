"""Privacy transforms: pure functions and small classes, no MPI and no I/O.

dp, accounting -- differential privacy of the aggregate (clipping, noise, accounting)
shamir         -- t-of-n secret sharing over a prime field
secagg         -- secure aggregation (Bonawitz et al. 2017) and SecAgg+ (Bell et al. 2020)
he             -- additively homomorphic aggregation (BFV through TenSEAL, optional extra)
"""
