"""``python -m flexq``: the same as the ``flexq`` command."""

import sys

from flexq.cli import main

sys.exit(main())
