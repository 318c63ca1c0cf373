"""``python -m gradmedic``: the same command line as the ``gradmedic`` script (a venv whose scripts are not on PATH,
a notebook's ``!python -m gradmedic ...``)."""

import sys

from gradmedic.cli import main

sys.exit(main())
