"""``python -m cifarlab`` and ``torchrun -m cifarlab ...``."""
import sys

from .cli import main

sys.exit(main())
