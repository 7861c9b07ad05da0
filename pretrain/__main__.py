"""``python -m fsseg.pretrain`` (and ``torchrun --nproc_per_node=N -m fsseg.pretrain``) runs ``fsseg-pretrain``."""

import sys

from fsseg.pretrain.cli import main

sys.exit(main())
