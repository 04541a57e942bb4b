"""Runs of a comparison trained several at once, each in its own process (``fedssl bench compare --jobs N``).

Each worker is a spawned Python process (it trains one setting after another) with the machine's cores
shared out, running the comparison's task (:func:`fedssl.compare.ensure_run`): the same resumable run
directory as one at a time, so what the comparison reads back does not depend on how many ran together.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Sequence

from fedssl.errors import FedSSLError
from fedssl.parent_watch import exit_with_parent

Task = Callable[[Any, Path], Any]  # (setting, root) -> anything: a module-level function (it is pickled)


def check_jobs(jobs: int) -> None:
    """``--jobs`` must be 1 or more (one clear message otherwise)."""
    if jobs < 1:
        raise FedSSLError(f"--jobs {jobs}: give the number of runs to train at once, 1 or more")


def threads_per_job(jobs: int) -> int:
    """torch threads for each of ``jobs`` runs at once: the machine's cores shared out (at least one each)."""
    return max(1, (os.cpu_count() or 1) // jobs)


def _task_in_worker(task: Task, setting: Any, root: Path, threads: int) -> float:
    """One setting's task in a worker process; the seconds it took. A run's own ``threads`` key, when set,
    wins over ``threads`` (:func:`fedssl.engines.loop.torch_threads`)."""
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    task(setting, root)
    return time.perf_counter() - started


def run_in_processes(task: Task, settings: Sequence[Any], root: Path, jobs: int, *,
                     progress: Callable[[int, Any], Any] | None = None,
                     finished: Callable[[int, Any, float], None] | None = None) -> None:
    """``task(setting, root)`` for every setting, ``jobs`` at a time in ``jobs`` spawned worker processes, started
    in the settings' order; a worker ends by itself when this process is killed (:func:`fedssl.parent_watch`).

    The first failure cancels the settings not yet started and is raised once the running ones have stopped;
    what finished stays finished and an interrupted run resumes from its checkpoint on the next call.
    """
    queue = list(enumerate(settings))
    running: dict[Future[float], tuple[int, Any]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, context, initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    index, setting = queue.pop(0)
                    if progress is not None:
                        progress(index, setting)
                    future = pool.submit(_task_in_worker, task, setting, root, threads_per_job(jobs))
                    running[future] = (index, setting)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index, setting = running.pop(future)
                    seconds = future.result()  # a worker's error (a FedSSLError names its fix) ends the comparison
                    if finished is not None:
                        finished(index, setting, seconds)
        except BaseException:
            queue.clear()
            pool.shutdown(wait=True, cancel_futures=True)
            raise


__all__ = ["check_jobs", "run_in_processes", "threads_per_job"]
