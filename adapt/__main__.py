"""``python -m fsseg.adapt`` runs ``fsseg-adapt``."""

import sys

from fsseg.adapt.cli import main

sys.exit(main())
