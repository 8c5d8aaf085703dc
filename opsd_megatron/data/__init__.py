"""Training data: problems with worked solutions (`load_problems`) in a fixed order (`PromptSampler`)."""

from opsd_megatron.data.loading import BUILTIN, DataError, Problem, load_problems, read_rows
from opsd_megatron.data.sampler import PromptSampler

__all__ = ["BUILTIN", "DataError", "Problem", "PromptSampler", "load_problems", "read_rows"]
