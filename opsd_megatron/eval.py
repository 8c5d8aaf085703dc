"""`python -m opsd_megatron.eval --model DIR ...`: kept stable; the command line lives in
`opsd_megatron.cli.eval` (also installed as `opsd-eval`)."""

import sys

from opsd_megatron.cli.eval import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
