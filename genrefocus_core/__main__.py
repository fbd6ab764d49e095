"""``python -m genrefocus_core``: see :mod:`genrefocus_core.cli`."""

import sys

from .cli import main

sys.exit(main())
