"""``python -m lrofw``: the ``lrofw`` command (see ``lrofw.cli``)."""

import sys

from .cli import main

sys.exit(main())
