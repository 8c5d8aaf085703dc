"""The command lines: `opsd-train` (`train`), `opsd-eval` (`eval`), `opsd-convert` (`convert`, with
`export_lora`). Each checks its arguments before anything heavy starts; user errors are one line, exit 2.

Megatron warns at import time that Transformer Engine / Apex are missing (before a command's `setup_logging`
runs, on every rank): the same filter `observe.console.setup_logging` installs is set here, once, first.
"""

import warnings

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
