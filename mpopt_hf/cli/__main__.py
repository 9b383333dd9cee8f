"""``python -m mpopt_hf.cli``: the ``mpopt`` command."""

import sys

from . import main

sys.exit(main())
