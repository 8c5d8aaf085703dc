"""What the command-line tools print: our own messages at the chosen level, third-party noise quiet.

    setup_logging("info", verbose=False, rank=0)   # before vLLM / Megatron / transformers are imported

By default vLLM, Megatron-core, transformers, torch and tokenizers log errors only, Python warnings raised
inside installed packages are hidden, and vLLM's, torch's C++ and the hub's chatter is turned down with their
environment variables (VLLM_LOGGING_LEVEL, TORCH_CPP_LOG_LEVEL, HF_HUB_DISABLE_PROGRESS_BARS; values a user
set win). `verbose=True` (or level "debug") leaves every library at its own default. Ranks other than 0 show
warnings and errors only, and third-party warnings only on rank 0 (vLLM's NUMA / CPU notes, Python warnings
such as Transformer Engine's): once per job, not once per rank (VLLM_LOGGING_LEVEL is ERROR there even when
set).
"""

from __future__ import annotations

import logging
import os
import warnings

from opsd_megatron.mcore.layout import env_rank

THIRD_PARTY = ("vllm", "megatron", "transformers", "torch", "datasets", "huggingface_hub", "urllib3",
               "filelock", "tokenizers", "math_verify", "numexpr")  # fmt: skip
_QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "ERROR",
    "TORCH_CPP_LOG_LEVEL": "ERROR",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def setup_logging(level: str = "info", *, verbose: bool = False, rank: int | None = None) -> None:
    """Configure the root logger once per process (see the module docstring)."""
    rank = env_rank() if rank is None else rank
    verbose = verbose or level == "debug"
    ours = getattr(logging, level.upper(), logging.INFO) if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    logging.getLogger("opsd_megatron").setLevel(ours)
    if verbose:
        logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO dumps whole configs
        return
    for k, v in _QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if rank != 0:  # third-party warnings once per job: rank 0 shows them
        os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
        warnings.simplefilter("ignore")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"(megatron|vllm|transformers|torch|triton|datasets)(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
