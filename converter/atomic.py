"""Writing a file so that its name points either at the old file or at the complete new one."""

from __future__ import annotations

import contextlib
import os
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp) on a temporary name in the same folder (so the rename stays within one filesystem),
    flushes it to disk, then renames it to `path`; on any failure, Ctrl-C included, the temporary file goes."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.partial-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the data must be on disk before the name points to it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
