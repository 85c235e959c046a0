"""``python -m tierplan``: the ``tierplan`` command."""
import sys

from tierplan.cli import main

sys.exit(main())
