"""``python -m pretrain`` (and ``torchrun --nproc_per_node=N -m pretrain``) runs ``fsseg-pretrain``."""

import sys

from pretrain.cli import main

sys.exit(main())
