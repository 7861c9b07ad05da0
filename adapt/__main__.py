"""``python -m adapt`` runs ``fsseg-adapt``."""

import sys

from adapt.cli import main

sys.exit(main())
