"""``python -m ellava_lib.cli``: the ``ellava`` command."""

import sys

from ellava_lib.cli import main

sys.exit(main())
