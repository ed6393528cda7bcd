"""Writing a file so that its name points either at the old file or at the complete new one."""

from __future__ import annotations

import contextlib
import os
import re
from typing import Callable


def partial_name(path: str) -> str:
    """Where this process writes `path` before it is complete: hidden, in the same folder (so the rename
    stays within one filesystem), with the writer's pid (so a later run can tell a dead writer's file)."""
    folder = os.path.dirname(os.path.abspath(path))
    return os.path.join(folder, f".{os.path.basename(path)}.partial-{os.getpid()}")


def remove_stale_partials(path: str) -> None:
    """Removes the temporary files of `path` left by writers that were killed (SIGKILL, power loss)."""
    folder, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    pattern = re.compile(rf"^\.{re.escape(base)}\.partial-(\d+)$")
    for name in os.listdir(folder):
        m = pattern.match(name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
        except OSError:
            pass  # alive, owned by someone else


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls write(tmp) on partial_name(path), flushes it to disk, then renames it to `path`; on any
    failure, Ctrl-C included, the temporary file goes."""
    tmp = partial_name(path)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the data must be on disk before the name points to it
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
