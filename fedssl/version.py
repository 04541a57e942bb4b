"""Which code computed a result: the git commit of this checkout (and whether it had uncommitted changes).

Recorded in every run's final.json, so that a comparison that reuses runs can say when its rows come
from different code (``fedssl.results_page``) instead of mixing them silently.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from importlib.metadata import PackageNotFoundError, version

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.cache
def code_version() -> str:
    """``<12-hex commit>`` (``+dirty`` with uncommitted changes to tracked files), or ``fedssl <version>`` outside
    a git checkout."""
    commit = _git("rev-parse", "--short=12", "HEAD")
    if commit:
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return commit + ("+dirty" if dirty else "")
    try:
        return f"fedssl {version('fedssl')}"
    except PackageNotFoundError:
        return "unknown"
