"""The ``tierplan`` command line: ``commands.main`` parses and dispatches; each command that prints more
than a plan report has its text in a module of its own here (``pack``, ``remat``, ``whatif``)."""
from tierplan.cli.commands import INTERNAL_ERROR, USAGE_ERROR, main

__all__ = ["INTERNAL_ERROR", "USAGE_ERROR", "main"]
