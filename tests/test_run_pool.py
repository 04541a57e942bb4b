"""Settings run several at once: the workers of ``fedssl bench compare --jobs`` do not outlive the command."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedssl.errors import FedSSLError
from fedssl.run_pool import check_jobs, threads_per_job
from tests.helpers import child_pids, cmdline, running

REPO = Path(__file__).resolve().parents[1]
POOL = ("from pathlib import Path; from fedssl.run_pool import run_in_processes; from tests.helpers import sleep_task; "
        "run_in_processes(sleep_task, [600, 600], Path('.'), 2, progress=lambda i, s: print('started', flush=True))")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc (Linux)")
def test_the_workers_end_when_the_comparison_is_killed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", POOL], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert [proc.stdout.readline().strip() for _ in range(2)] == ["started", "started"]
        deadline = time.monotonic() + 60
        workers: list[int] = []
        while len(workers) < 2 and time.monotonic() < deadline:  # two spawned workers (+ the resource tracker)
            workers = [c for c in child_pids().get(proc.pid, []) if running(c) and "resource_tracker" not in cmdline(c)]
            time.sleep(0.2)
        assert len(workers) == 2, "the pool did not start two workers"
        time.sleep(3)  # the workers are past their start-up: the task is sleeping in them
        proc.kill()  # SIGKILL: no chance for the pool to shut its workers down
        proc.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(running(w) for w in workers), "a worker outlived the killed comparison"
    finally:
        proc.kill()


def test_jobs_are_checked_and_share_out_the_cores() -> None:
    with pytest.raises(FedSSLError, match="--jobs 0"):
        check_jobs(0)
    assert threads_per_job(1) >= threads_per_job(2) >= 1 and threads_per_job(10_000) == 1
