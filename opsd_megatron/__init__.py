"""opsd_megatron: On-Policy Self-Distillation (OPSD) of LLMs on Megatron-core.

One network is both student (sees the problem, samples with vLLM) and teacher (sees the problem plus a
verified reference solution, scores the student's tokens). Training minimises a vocabulary-parallel
per-token divergence between the two next-token distributions. See docs/architecture.md for the data flow.

Importing this package is cheap and needs neither CUDA, Transformer Engine, apex nor vLLM: heavy imports
happen inside the modules that use them.
"""

__version__ = "0.1.0"
