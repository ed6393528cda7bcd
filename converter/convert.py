"""Command-line entry point: `python converter/convert.py CHECKPOINT -o OUT.safetensors [options]`.

A script shim only (run it, don't import it): the package's API is
`converter.convert(...)`, and importing this file as `converter.convert` would
shadow that function.
"""

import os
import sys

if __name__ == "__main__":
    # Run as a script, sys.path[0] is converter/ itself: replace it with the repository root so that
    # `converter` imports as a package and its module names cannot shadow others.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from converter.cli import main

    sys.exit(main())
