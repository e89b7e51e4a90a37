"""`python -m worker.cli`: the same as the `catalog` command."""

import os

from worker.cli.main import main

os.environ.setdefault("PYTHONUNBUFFERED", "1")
main()
