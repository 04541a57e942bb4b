"""What a user interface sees of a run (the CLI draws progress bars from it), and the faults worth a line."""

from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger("fedssl")


class Observer(Protocol):
    """What a user interface sees of a run (the CLI draws progress bars from it)."""

    def round_started(self, round_index: int, num_clients: int) -> None: ...
    def client_done(self, round_index: int, client_id: int, metrics: dict[str, float]) -> None: ...
    def round_done(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


class SilentObserver:
    def round_started(self, round_index: int, num_clients: int) -> None: ...
    def client_done(self, round_index: int, client_id: int, metrics: dict[str, float]) -> None: ...
    def round_done(self, row: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


def note(observer: Observer, text: str) -> None:
    """A fault worth a line: to the user (observer) and to the run's log (the Flower engine keeps one)."""
    log.info(text)
    observer.message(text)
