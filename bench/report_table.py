"""The benchmarks' shared ending: print the Markdown table, and save it (with the command that made it) when asked."""

from __future__ import annotations

import os
import sys
from typing import Optional


def command_line() -> str:
    """`python3 bench/NAME.py ARGS`, without the --out argument (where the table went is not how it was made)."""
    args, out = sys.argv[1:], []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if not a.startswith("--out="):
            out.append(a)
    return " ".join(["python3", f"bench/{os.path.basename(sys.argv[0])}", *out])


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: header row, separator, one line per row (no trailing newline)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def emit(table: str, path: Optional[str], quiet: bool = False) -> None:
    if not quiet:
        print("\n" + table)
    if path:
        with open(path, "w") as f:
            f.write(f"Command: `{command_line()}`\n\n{table}")
