"""`torchrun -m opsd_megatron.train CONFIG.yaml [key=value ...]`: the documented launch, kept stable.

The command line itself lives in `opsd_megatron.cli.train` (also installed as `opsd-train`).
"""

import sys

from opsd_megatron.cli.train import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
