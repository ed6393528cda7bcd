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


class BackgroundHasher:
    def __init__(self, files: list[str]) -> None:
        self._files = files
        self._stop = threading.Event()
        self._digest: Optional[str] = None
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        h = hashlib.sha256()
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        try:
            for path in self._files:
                with open(path, "rb", buffering=0) as f:
                    while not self._stop.is_set():
                        n = f.readinto(buf)
                        if not n:
                            break
                        h.update(view[:n])
            if not self._stop.is_set():
                self._digest = h.hexdigest()
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
