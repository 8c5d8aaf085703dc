"""The command lines: `opsd-train` (`train`), `opsd-eval` (`eval`), `opsd-convert` (`convert`, with
`export_lora`). Each checks its arguments before anything heavy starts; user errors are one line, exit 2."""
