"""Flower's object pulls without their one-second first back-off (a deployment's ServerApp, SuperNode and worker).

Flower 1.41 moves a message as an object tree: the receiver learns of the message first and then pulls its
objects. A SuperNode hands a message to its ClientApp (creates the task) *before* it has pulled the message's
objects from the SuperLink, and a reply reaches the SuperLink before its objects do; a pull that comes too
early finds an object "unavailable" and waits ``PULL_INITIAL_BACKOFF`` (1 s), doubling up to 10 s. Measured on
this machine (``benchmarks/flower_overhead.py``): the worker's pull of every message, even a hello of a few
bytes, took 0.9-1.2 s, almost all of it that first wait, and so did the server's pull of each reply.

:func:`cap_pull_backoff` rebinds, in the calling process only, the three pull functions Flower's modules call
(the ServerApp's HTTP Grid, the SuperNode's Fleet loop, the ClientApp's Runtime API input) to the same
functions with a first back-off of ``initial`` s and a cap of ``cap`` s. Flower's own time bound on a pull
(``PULL_MAX_TIME``) stays; the per-object try limit is lifted so that the shorter waits keep that patience.
It patches names inside Flower's modules: recheck it on every Flower upgrade (``tests/engines/test_flower_units.py``
fails when a name is gone).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

PULL_BACKOFF_SECONDS = 0.01  # the first wait after an unavailable object (Flower 1.41: 1 s)
PULL_BACKOFF_CAP_SECONDS = 0.1  # the longest wait between two tries (Flower 1.41: 10 s)
PATCHED = (("flwr.superlink.grid.http_grid", "pull_objects"),  # the ServerApp pulling replies
           ("flwr.supernode.start_client_internal", "pull_objects"),  # the SuperNode pulling messages
           ("flwr.supernode.runtime.run_clientapp", "pull_and_inflate_object_from_tree"))  # the ClientApp's input


def cap_pull_backoff(initial: float = PULL_BACKOFF_SECONDS, cap: float = PULL_BACKOFF_CAP_SECONDS) -> None:
    """Make every object pull of this process wait ``initial`` s first, at most ``cap`` s, between tries."""
    for module_name, name in PATCHED:
        module = importlib.import_module(module_name)
        original: Any = getattr(module, name)
        original = getattr(original, "func", original)  # already capped: re-cap the original
        capped = functools.partial(original, initial_backoff=initial, backoff_cap=cap, max_tries_per_object=None)
        setattr(module, name, capped)
