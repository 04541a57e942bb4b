"""Fetching official dataset files: atomic, MD5-checked downloads and safe tar extraction.

Every failure a user can fix (no network, a truncated download, a broken archive) raises
:class:`DataError` naming what is missing and what to do instead.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from fedssl.errors import DataError

OpenUrl = Callable[..., object]  # urllib.request.urlopen(url, timeout=...) or a stand-in


def md5_of(path: Path) -> str:
    """Hex MD5 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str, missing: str, fix: str, *, open_url: OpenUrl) -> Path:
    """Download ``url`` with ``open_url`` to ``dest`` atomically (temp file, MD5 check, ``os.replace``).

    ``missing`` says what was not found (``"cifar10 not found in /x"``) and ``fix``
    what the user can do instead; both go into the error when the download fails.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as err:
        raise DataError(f"{missing} and {dest.parent} is not writable for the download ({err}): {fix}") from err
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, open_url(url, timeout=60) as response:  # type: ignore[attr-defined]
            shutil.copyfileobj(response, out, 1 << 20)
        got = md5_of(tmp)
        if got != md5:
            raise DataError(f"{missing} and the download of {url} has MD5 {got}, not {md5} (truncated or tampered): retry, or {fix}")
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException) as err:  # URLError, timeouts and resets are OSErrors
        raise DataError(f"{missing} and the download of {url} failed ({_reason(err)}): {fix}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _reason(err: BaseException) -> str:
    """What went wrong, in words: a URLError's reason, else the error's text, else its type."""
    reason = getattr(err, "reason", None) or err
    return str(reason) or type(err).__name__


def extract_tar(archive: Path, member: str, root: Path) -> Path:
    """Extract ``archive`` into a temp folder, then move its top folder ``member`` to ``root/member``."""
    target = root / member
    with tempfile.TemporaryDirectory(dir=root, prefix=".extract.") as tmp:
        try:
            with tarfile.open(archive) as tar:
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12: refuse absolute paths and links out
                    tar.extractall(tmp, filter="data")
                else:
                    tar.extractall(tmp)
        except (tarfile.TarError, OSError) as err:
            raise DataError(f"{archive} is not a valid tar.gz archive ({err}): delete it so it is downloaded again") from err
        extracted = Path(tmp) / member
        if not extracted.is_dir():
            raise DataError(f"{archive} has no {member}/ folder: delete it so the official archive is downloaded again")
        try:
            os.replace(extracted, target)
        except OSError:
            if not target.is_dir():  # else another process extracted it first: use that
                raise
    return target
