"""``python -m rlhf ...`` is the ``rlhf`` command (also what ``torchrun -m rlhf`` runs)."""

import sys

from .cli import main

sys.exit(main())
