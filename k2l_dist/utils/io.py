"""Atomic file writes: a reader never sees a half-written checkpoint, shard or index."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class StorageError(OSError):
    """A write failed for lack of space or permission; the message names the file and the fix."""


def _free_mb(folder: Path) -> str:
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.0f} MB free"
    except OSError:
        return "free space unknown"


def ensure_writable(folder: str | Path, key: str) -> Path:
    """Create ``folder`` and prove a file can be written there, before any work is done."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise StorageError(err.errno, f"{key}={folder} is not writable ({err.strerror or err}); "
                                      f"choose another {key} or fix its permissions") from None
    return folder


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success fsync and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; shards and checkpoints are shared
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            raise StorageError(err.errno, f"disk full writing {path} ({_free_mb(path.parent)}): the file was "
                                          f"left as it was before, with no partial copy; free space and rerun "
                                          f"(a run resumes from its last checkpoint)") from err
        if isinstance(err, OSError) and err.errno == errno.EFBIG:
            raise StorageError(err.errno, f"file too large writing {path}: the file-size limit of this shell "
                                          f"(ulimit -f) is reached; the file was left as it was before; raise the "
                                          f"limit (ulimit -f unlimited) and rerun") from err
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
