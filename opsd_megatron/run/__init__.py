"""How a run lives: the one training loop, its set-up, resume (checkpoints, the index, start-up checks) and
survival (stop signals, the job watchdog, helper-process lifelines)."""
