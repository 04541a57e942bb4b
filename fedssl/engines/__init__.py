"""The engines that run a method: in this process (``local``) or on Flower (``flower``), and which made a run.

``start`` / ``resume`` pick the engine; a run directory records the engine that made it
(``engine.json``, written by the Flower engine; absent = in-process), so that ``fedssl
run --resume RUN_DIR`` continues a run where it ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedssl.engines.observer import SilentObserver
from fedssl.errors import FedSSLError
from fedssl.run_dir import ENGINE_FILE, read_engine  # noqa: F401 (re-exported)

ENGINES = ("local", "flower")


def start(cfg: Any, path: str | Path, *, engine: str = "local", observer: Any = None) -> Any:
    """A new run on ``engine``: ``local`` (in-process) or ``flower`` (Flower's simulation runtime)."""
    if engine not in ENGINES:
        raise FedSSLError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "flower":
        from fedssl.engines.flower.runs import start_simulation

        return start_simulation(cfg, path, observer=observer or SilentObserver())
    from fedssl.engines.local import start_run

    return start_run(cfg, path, observer=observer)


def resume(path: str | Path, *, observer: Any = None) -> Any:
    """Continue a run on the engine that made it."""
    made = read_engine(path)
    if made["engine"] != "flower":
        from fedssl.engines.local import resume_run

        return resume_run(path, observer=observer)
    if made.get("runtime") == "deployment":
        raise FedSSLError(f"{path} ran on a Flower deployment; continue it there: "
                          f"flwr run . <federation> --run-config 'resume=\"{Path(path).resolve()}\"'")
    from fedssl.engines.flower.runs import resume_simulation

    return resume_simulation(path, observer=observer or SilentObserver())
