"""``python -m k2l_dist`` is the ``k2l`` command."""

import sys

from k2l_dist.cli import main

sys.exit(main())
