"""`catalog`: the one command-line entry point for every process of the system.

One module per command group; :mod:`worker.cli.main` assembles them. Nothing outside this
package imports it.
"""

from worker.cli.main import main

__all__ = ["main"]
