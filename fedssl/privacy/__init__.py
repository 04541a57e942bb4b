"""Privacy of the clients' data: what a run guarantees (``dp``, ``accountant``: client-level differential privacy of
the round-based methods) and what it gives away, measured (``inversion``, ``decoder``: a split server's inversion
attack). Nothing is imported here: each module is imported where it is used (the accountant's library is slow to
import and only DP runs need it)."""
