"""The streamed HF export (`save_hf_checkpoint`, one shard in memory at a time) writes the same files, byte
for byte, as the previous writer that collected every tensor on rank 0 first (reimplemented as the
reference: `collecting_export` of benchmarks/bench_export.py, the same baseline the benchmark measures), on a
tiny dense and a tiny MoE model, with shards small enough to make several (real Megatron
model, one gloo rank)."""

from __future__ import annotations

from pathlib import Path

from dist_utils import run_distributed


def _export_both(rank, world, model_dirs: dict, work: str):
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_export import collecting_export

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights, save_hf_checkpoint
    from opsd_megatron.mcore.models import build_model

    parallel.initialize(1, 1, seed=0)
    out = {}
    for arch, model_dir in model_dirs.items():
        chunks = build_model(model_dir, torch.float32, perform_initialization=False)
        load_hf_weights(chunks, model_dir)
        for limit in (40_000, 1 << 30):  # several shards + index; one model.safetensors
            ref, new = Path(work) / f"{arch}_{limit}_ref", Path(work) / f"{arch}_{limit}_new"
            collecting_export(chunks, ref, limit)
            save_hf_checkpoint(chunks, new, max_shard_bytes=limit)
            out[f"{arch}_{limit}"] = (str(ref), str(new))
    return out


def test_streamed_export_files_equal_the_collecting_writer(tiny_models, tmp_path):
    dirs = {"dense": str(tiny_models("qwen3")), "moe": str(tiny_models("qwen3_moe"))}
    res = run_distributed(_export_both, 1, dirs, str(tmp_path), timeout=300)[0]
    for case, (ref, new) in res.items():
        ref_files = sorted(p.name for p in Path(ref).iterdir())
        weight_files = sorted(p.name for p in Path(new).iterdir() if p.name != "config.json")
        assert weight_files == ref_files, case
        if case.endswith("_40000"):
            assert len(ref_files) > 3, (case, ref_files)  # several shards and an index
        for name in ref_files:
            assert (Path(new) / name).read_bytes() == (Path(ref) / name).read_bytes(), (case, name)
