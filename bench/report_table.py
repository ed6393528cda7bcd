"""The benchmarks' shared ending: print the Markdown table, and save it when asked."""

from __future__ import annotations

from typing import Optional


def emit(table: str, path: Optional[str]) -> None:
    print("\n" + table)
    if path:
        with open(path, "w") as f:
            f.write(table)
