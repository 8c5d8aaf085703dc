"""checkpoint_tools: command-line conversion between Hugging Face checkpoints and Megatron distributed
checkpoints (`opsd-convert`), built on `opsd_megatron.conversion`."""
