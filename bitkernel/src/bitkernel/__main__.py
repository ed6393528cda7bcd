"""`python -m bitkernel` prints what this build supports."""

import json

from . import info

print(json.dumps(info(), indent=2))
