"""Everything that touches Megatron-core (and the private APIs of the libraries we patch): process groups
(`parallel`), the parallel-layout rules (`layout`, torch-free), Megatron on CPU (`cpu`), the registry of
private targets (`patches`), supported versions (`versions`), the dtype-name table (`dtypes`), model
building (`models/`), HF <-> Megatron conversion (`conversion/`) and LoRA (`lora/`).

Named `mcore`, not `megatron`: a folder `opsd_megatron/megatron` would shadow the real `megatron` package for
any script run from inside `opsd_megatron/` (sys.path[0] is the script's folder)."""
