"""What the user sees: metric sinks and the progress line (`metrics`), rollouts.jsonl (`rollout_log`), PNG
plots (`plots`), did-it-learn summaries (`learning`) and quiet third-party logging (`console`)."""
