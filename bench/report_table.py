"""The benchmarks' shared ending: print the Markdown table, and save it (with the command that made it) when asked."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional


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
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(f"Command: `{command_line()}`\n\n{table}")


def write_json(path: str, data: dict[str, Any]) -> None:
    """The benchmark's raw results (anything not JSON-native as its str)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
