"""Where a deployed message's time goes: wall-clock timestamps per phase, for the benchmark.

Off unless the environment variable ``FEDSSL_FLOWER_TRACE`` names a file (the SuperLink's,
the SuperNodes' and their workers' environments pass it on to every process they start).
Each process appends one JSON line per event to it (one ``write`` of a short line on a file
opened for appending: lines of concurrent processes do not interleave). The server side
(:mod:`fedssl.engines.flower.link`) writes when it pushes a message and when its reply
arrives; the node side (the ClientApp and the worker) writes the phases of each message it
handles, keyed by Flower's message id. ``benchmarks/flower_overhead.py`` reads them back and
prints the breakdown. Timestamps are ``time.time()``: comparable across the processes of one
machine only.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRACE_ENV = "FEDSSL_FLOWER_TRACE"  # file to append the trace to; unset = no tracing
_app_imports: tuple[float, float] | None = None  # when the ClientApp module began and ended its imports
_fresh = True  # this process has handled no message yet


class Phases:
    """The timestamps of one message's handling on a node: ``mark(name)`` after each phase."""

    def __init__(self, message_id: str, message_type: str, where: str) -> None:
        self.fields: dict[str, object] = {"event": "node", "mid": message_id, "type": message_type, "where": where,
                                          "pid": os.getpid()}
        self.marks: dict[str, float] = {}

    def mark(self, phase: str, at: float | None = None) -> None:
        self.marks[phase] = time.time() if at is None else at

    def write(self) -> None:
        record({**self.fields, "marks": self.marks})


_current: Phases | None = None  # the message this process is handling (one at a time on a node)


def enabled() -> bool:
    return bool(os.environ.get(TRACE_ENV))


def start(message_id: str, message_type: str, where: str) -> Phases | None:
    """Begin tracing one message (None when tracing is off); later :func:`mark` calls go to it."""
    global _current
    _current = Phases(message_id, message_type, where) if enabled() else None
    return _current


def current_or_start(message_id: str, message_type: str, where: str) -> Phases | None:
    """The message already being traced (the worker began it), else a new trace of it."""
    return _current if _current is not None and _current.fields["mid"] == message_id else start(
        message_id, message_type, where)


def mark(phase: str) -> None:
    """Timestamp the end of ``phase`` of the message being handled (nothing when tracing is off)."""
    if _current is not None:
        _current.mark(phase)


def finish() -> None:
    """Write the message's phases and stop tracing it."""
    global _current
    if _current is not None:
        _current.write()
    _current = None


def imports_took(began: float, ended: float) -> None:
    """The ClientApp module's imports (time stamps), for the first message's trace."""
    global _app_imports
    _app_imports = (began, ended)


def traced(handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """A ClientApp handler whose phases are traced; a process's first message also gets when the process
    started and how long the app's imports took."""

    @functools.wraps(handler)
    def run(message: Any, context: Any) -> Any:  # (Message, Context) -> Message
        global _fresh
        phases = current_or_start(message.metadata.message_id, message.metadata.message_type, "clientapp")
        fresh, _fresh = _fresh, False
        if phases is not None and fresh and phases.fields["where"] == "clientapp":
            phases.mark("process_start", process_start_time())
            if _app_imports is not None:
                phases.mark("import_start", _app_imports[0])
                phases.mark("import_end", _app_imports[1])
        mark("handler_start")
        try:
            return handler(message, context)
        finally:
            mark("handler_end")
            if phases is not None and phases.fields["where"] == "clientapp":
                finish()

    return run


def record(fields: dict[str, object]) -> None:
    """Append one event (a JSON line, with its time) to the trace file."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    line = json.dumps({"t": time.time(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def process_start_time() -> float | None:
    """When this process was started (wall clock, to 10 ms; Linux ``/proc``); None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, AttributeError):
        return None
    return time.time() - age


def read_trace(path: str | Path) -> list[dict]:
    """The events of a trace file, in file order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
