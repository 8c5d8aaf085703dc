"""Lean LoRA training checkpoints (SFT with LoRA on the task model, real Megatron, one gloo rank): the
checkpoint holds the adapters and their optimizer state, not the frozen base, plus `lora_base.json` (path +
content hash); a resume from it continues bit-identically; a resume after the base's weights changed is
refused with one error naming the checkpoint, both hashes and model.path; the checkpoint still exports
(`opsd-convert megatron-to-hf` path: `load_training_model`, LoRA merged) to the run's own final weights."""

from __future__ import annotations

import json
import shutil

import pytest
from dist_utils import run_distributed
from test_sft import _sft_cfg


def _train(rank, world_size, cfg_dict):
    from dist_utils import error_text

    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import Trainer

    out = {}

    def go():
        trainer = Trainer(config_from_dict(cfg_dict))
        try:
            out["rows"], out["start"] = trainer.train(), trainer.start_step
        finally:
            trainer.close()

    out["error"] = error_text(go)
    return out


def _export(rank, world_size, step_dir, out_dir):
    from opsd_megatron.mcore.conversion import save_hf_checkpoint
    from opsd_megatron.run.training_checkpoint import load_training_model, training_shard_hook

    chunks, cfg = load_training_model(step_dir)
    save_hf_checkpoint(chunks, out_dir, shard_hook=training_shard_hook(cfg))


@pytest.fixture(scope="module")
def lora_task(tmp_path_factory):
    from opsd_megatron.demo.synthetic import write_splits
    from opsd_megatron.demo.task_model import make_task_model

    d = tmp_path_factory.mktemp("lora_ckpt")
    model = make_task_model(d / "model", hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    return model, write_splits(d / "task", "addition", n_train=16, n_heldout=4)["train"]


def test_lora_checkpoint_holds_adapters_and_refuses_a_changed_base(lora_task, tmp_path):
    import torch
    from run_utils import deterministic_view
    from safetensors.torch import load_file, save_file
    from torch.distributed.checkpoint import FileSystemReader

    model, data = lora_task
    base = tmp_path / "base"
    shutil.copytree(model, base)
    lora = {"enabled": True, "rank": 4, "alpha": 8.0}
    cfg = _sft_cfg(base, data, tmp_path / "run", parallel={"tp": 1}, train={"steps": 2},
                   checkpoint={"resume": True, "save_interval": 1, "export_hf": True})  # fmt: skip
    cfg["lora"] = lora
    ref = run_distributed(_train, 1, cfg, timeout=400)[0]
    assert ref["error"] == "no error" and [r["step"] for r in ref["rows"]] == [1, 2]
    step2 = tmp_path / "run" / "checkpoints" / "step_000002"
    keys = list(FileSystemReader(str(step2)).read_metadata().state_dict_metadata)
    # megatron-core 0.19 also indexes the common (non-tensor) state as "common_state/..."
    model_keys = [k for k in keys if not k.startswith(("optimizer.", "rng_state", "common_state/"))]
    assert model_keys and all(".lora.lora_" in k for k in model_keys), model_keys  # no base weight
    assert all(".lora.lora_" in k for k in keys if k.startswith("optimizer."))  # the adapters' Adam state
    assert any(k.startswith("optimizer.state.exp_avg.") for k in keys)
    saved = json.loads((step2 / "lora_base.json").read_text())
    assert saved["path"] == str(base) and len(saved["hash"]) == 32

    # The saved adapters + the base from model.path export to the run's own final (LoRA-merged) weights.
    run_distributed(_export, 1, step2, str(tmp_path / "export"), timeout=300)
    ours, theirs = (
        load_file(tmp_path / "export" / "model.safetensors"),
        load_file(tmp_path / "run" / "hf" / "model.safetensors"),
    )
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    shutil.rmtree(step2)  # resume from step 1's lean checkpoint: step 2 again, bit-identical
    res = run_distributed(_train, 1, cfg, timeout=400)[0]
    assert res["error"] == "no error" and res["start"] == 1
    assert [deterministic_view(r) for r in res["rows"]] == [deterministic_view(r) for r in ref["rows"][1:]]

    weights = load_file(base / "model.safetensors")  # the base changes under the same path
    name = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_000002")
    bad = run_distributed(_train, 1, cfg, timeout=400)[0]["error"]
    assert bad.startswith("CheckpointError: checkpoint ") and "step_000001" in bad, bad
    assert "base weights changed" in bad and saved["hash"] in bad and str(base) in bad, bad
