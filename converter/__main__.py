"""`python -m converter ...`: the same command line as converter/convert.py."""

import sys

from converter.cli import main

sys.exit(main())
