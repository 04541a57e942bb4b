"""Weak devices, modelled: device profiles and a run's fleet, the simulated clock, memory budgets.

- ``profiles.py``: the built-in profiles (each number with its source) and the checks of ``[devices]``;
- ``fleet.py``: one profile per client (seeded), availability, the memory budget (``BudgetError``);
- ``clock.py``: a round's simulated seconds from ledger rows and profiles (pure functions);
- ``timeline.py``: the clock over a run (metrics' ``sim_seconds``, final.json's ``devices``);
- ``report.py``: the report's fleet section and the kNN-against-simulated-time plot.

Nothing is imported here: ``fedssl.config`` imports ``profiles`` to validate, and the other modules import it.
"""
