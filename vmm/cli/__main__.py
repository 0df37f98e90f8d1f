"""``python -m vmm.cli ...``: the same as ``pyvmm ...``."""

import sys

from vmm.cli import main

sys.exit(main())
