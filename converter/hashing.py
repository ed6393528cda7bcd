"""sha256 of the source, computed on a background thread while the conversion runs.

Hashing 23.8 GB takes about a minute; reading it alongside the conversion's
own reads hides most of that (hashlib releases the GIL on large buffers). A
multi-file (sharded) source hashes its files' bytes concatenated in the order
given (shard name order).
"""

from __future__ import annotations

import hashlib
import threading
from typing import Optional

_CHUNK = 8 << 20


def sha256_files(files: list[str], stop: Optional[threading.Event] = None) -> Optional[str]:
    """sha256 of the files' bytes concatenated; None if `stop` was set before the end."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while not (stop is not None and stop.is_set()):
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
    return None if stop is not None and stop.is_set() else h.hexdigest()


class BackgroundHasher:
    def __init__(self, files: list[str]) -> None:
        self._files = files
        self._stop = threading.Event()
        self._digest: Optional[str] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._digest = sha256_files(self._files, self._stop)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self) -> str:
        """The hex digest (waits for the thread); re-raises a read error."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._digest is None:
            raise RuntimeError("hashing was cancelled")
        return self._digest

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()
