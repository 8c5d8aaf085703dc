"""SFT (algorithm: sft) on the real Megatron stack: the warm-start command at small scale, TP=2 cross-entropy
against transformers, and the errors a user can make."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_utils import run_distributed

from opsd_megatron.config import ConfigError, config_from_dict


def _sft_cfg(model_dir, data_path, out_dir, **over) -> dict:
    cfg = {
        "algorithm": "sft",
        "output_dir": str(out_dir),
        "model": {"path": str(model_dir), "dtype": "float32"},
        "parallel": {"tp": 2},
        "data": {"path": str(data_path)},
        "prompts": {
            "teacher_template": "Problem: {problem}\nReference:\n{solution}\n",
            "max_prompt_tokens": 128,
        },
        "optimizer": {"lr": 3e-3, "clip_grad": 1.0},
        "train": {"steps": 2, "global_batch_size": 4, "micro_batch_size": 2, "seed": 0},
        "checkpoint": {"save_interval": 0, "resume": False, "export_hf": False},
        "logging": {"progress_bar": False},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v}
    return cfg


def run_sft_tp2(rank, world_size, good: dict):
    """Worker: SFT's first loss vs transformers' CE; TP-replicated parameters stay equal."""
    import torch

    from opsd_megatron.run.trainer import make_trainer

    trainer = make_trainer(config_from_dict(good))
    try:
        samples, _ = trainer.strategy.samples(0)
        rows = trainer.train()
        # A parameter replicated over TP (final norm) must stay identical on both ranks: the hidden-state
        # gradient of the vocab-parallel LM head is all-reduced over TP.
        norm = next(p for n, p in trainer.state.chunks[0].named_parameters() if "final_layernorm.weight" in n)
        norm_sum = float(norm.detach().double().sum())
    finally:
        trainer.close()
    ref = None
    if rank == 0:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(good["model"]["path"], dtype=torch.float32).eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for s in samples:
                ids = torch.tensor([s.student_prompt + s.response])
                logits = hf(ids).logits[
                    0, len(s.student_prompt) - 1 : -1
                ]  # positions predicting the response
                ce = torch.nn.functional.cross_entropy(
                    logits.double(), torch.tensor(s.response), reduction="sum"
                )
                total, n = total + float(ce), n + len(s.response)
        ref = total / n
    return {"rows": rows, "ref": ref, "n_samples": len(samples), "norm": norm_sum}


def test_sft_tp2_loss_matches_transformers_and_bad_rows_error(tmp_path):
    from opsd_megatron.demo.synthetic import write_splits
    from opsd_megatron.demo.task_model import make_task_model

    model = make_task_model(tmp_path / "model", hidden_size=64, intermediate_size=96, num_hidden_layers=2)
    paths = write_splits(tmp_path / "task", "addition", n_train=16, n_heldout=4)
    bad_path = tmp_path / "bad.jsonl"
    bad_path.write_text(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    good = _sft_cfg(model, paths["train"], tmp_path / "run")
    bad = _sft_cfg(model, bad_path, tmp_path / "bad_run")
    # The SFT trainer reads its rows with load_problems (before any model work): a row without a solution
    # is one DataError naming the row and the field.
    from opsd_megatron.data import DataError, load_problems

    with pytest.raises(DataError, match="row 0 has no field 'solution'"):
        load_problems(config_from_dict(bad).data)
    res = run_distributed(run_sft_tp2, 2, good, timeout=240)
    r0 = res[0]
    # TP=2, DP=1: the replica gets all 4 problems of the step, one sequence per format.
    assert r0["n_samples"] == 8
    first = r0["rows"][0]["loss"]
    assert first == pytest.approx(r0["ref"], rel=1e-5)  # fp32; Megatron TP=2 vs transformers
    assert res[1]["rows"][0]["loss"] == pytest.approx(first, rel=1e-12)  # every rank logs the global loss
    assert r0["rows"][1]["loss"] < first  # the update helped
    assert res[0]["norm"] == pytest.approx(res[1]["norm"], rel=1e-6)


def test_warmstart_command_small_scale_sft_decreases_loss(tmp_path):
    """`make warmstart` at small scale: task + init model + SFT via opsd-train (one process) + install."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd_megatron.demo.warmstart import main, recipe
    from opsd_megatron.observe.metrics import read_metrics

    over = ["train.global_batch_size=16", "train.micro_batch_size=16", "optimizer.lr_warmup_steps=0"]
    dest = tmp_path / "assets" / "warmstart"
    assert main([str(tmp_path / "ws"), "--steps", "8", "--n-train", "64", "--n-heldout", "8",
                 "--install", str(dest), *over]) == 0  # fmt: skip
    rows = read_metrics(tmp_path / "ws" / "sft")
    assert [r["step"] for r in rows] == list(range(1, 9))
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.7 * losses[0], losses
    meta = json.loads((dest / "warmstart.json").read_text())  # what `make warmstart` writes, at small scale
    assert {k: meta[k] for k in recipe()} == recipe(steps=8, n_train=64, overrides=over)
    assert meta["final_loss"] == losses[-1] and meta["built_by"].startswith("python -m opsd_megatron.demo")
    tok = AutoTokenizer.from_pretrained(str(dest))
    assert tok.convert_ids_to_tokens(tok.encode("1234")) == ["1", "2", "3", "4"]  # one token per digit
    AutoModelForCausalLM.from_pretrained(str(dest))


def test_shipped_warmstart_is_what_make_warmstart_builds_today():
    """The shipped asset's recorded recipe (config content hash, SFT steps, task, train size, overrides) is
    the one `make warmstart` (`python -m opsd_megatron.demo.warmstart ... --install`) uses now: editing the
    SFT config or the task without rebuilding the asset fails here."""
    from opsd_megatron.demo.warmstart import SHIPPED, recipe

    meta = json.loads((SHIPPED / "warmstart.json").read_text())
    assert {k: meta.get(k) for k in recipe()} == recipe(), "rebuild it: make warmstart"
    assert meta["built_by"] == "python -m opsd_megatron.demo.warmstart runs/warmstart --install " + str(
        Path("opsd_megatron/demo/assets/warmstart")
    )
    assert (SHIPPED / "model.safetensors").is_file()


def test_sft_config_errors(tmp_path):
    good = _sft_cfg(tmp_path, tmp_path / "x.jsonl", tmp_path)
    assert config_from_dict(good).sft.formats == ["student", "teacher"]
    cases = [({"algorithm": "dpo"}, "'algorithm'"), ({"sft": {"formats": ["both"]}}, "'sft.formats'"),
             ({"sft": {"formats": []}}, "'sft.formats'")]  # fmt: skip
    for over, key in cases:
        with pytest.raises(ConfigError, match=key):
            config_from_dict({**good, **over})
    with pytest.raises(ConfigError, match="'eval.interval'"):
        config_from_dict({**good, "eval": {"interval": 5, "path": "h.jsonl"}})
    with pytest.raises(ConfigError, match="'teacher.privileged'"):
        config_from_dict({**good, "teacher": {"privileged": "no"}})
