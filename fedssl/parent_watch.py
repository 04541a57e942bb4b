"""A child process that ends when the process that started it is gone.

A pool worker of ``fedssl bench compare --jobs`` or a SuperNode's worker would otherwise live on, orphaned,
when its parent is SIGKILLed or SIGTERMed (only Ctrl+C reaches the whole process group): it would go on
training and writing into a run directory that a rerun of the command then also resumes.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def exit_with_parent(parent_pid: int, every: float = 0.5) -> threading.Thread:
    """End this process (``os._exit``) once ``parent_pid`` is no longer its parent; a daemon thread watches."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every)
        log.info("the process that started this one (pid %d) is gone; stopping", parent_pid)
        os._exit(0)

    thread = threading.Thread(target=watch, name="fedssl-parent-watch", daemon=True)
    thread.start()
    return thread


__all__ = ["exit_with_parent"]
