"""Config loading: defaults, overrides, and one clear, key-naming error for each kind of mistake."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd_megatron.config import (
    ConfigError,
    OPSDConfig,
    load_config,
    validate_context,
    validate_model,
    validate_world,
)
from opsd_megatron.config.schema import loss_beta, loss_clip

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
BASE = "model:\n  path: /m\ndata:\n  path: builtin:tiny_math\n"


def _load(tmp_path, text: str, overrides=None):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return load_config(p, overrides)


def test_defaults_are_the_paper_recipe(tmp_path):
    cfg = _load(tmp_path, BASE)
    assert isinstance(cfg, OPSDConfig)
    r, lo = cfg.rollout, cfg.loss
    assert (r.temperature, r.top_p, r.top_k, r.min_p, r.max_new_tokens) == (1.1, 0.95, 20, 0.0, 1024)
    assert (lo.kind, lo.clip, loss_clip(lo), lo.temperature) == ("forward_kl", "default", 0.05, None)
    assert (cfg.optimizer.lr, cfg.optimizer.clip_grad, cfg.train.global_batch_size) == (5e-6, 0.1, 32)
    assert cfg.teacher.mode == "frozen" and not cfg.prompts.student_thinking and cfg.prompts.teacher_thinking


def test_overrides_and_float_coercion(tmp_path):
    cfg = _load(
        tmp_path,
        BASE + "optimizer:\n  lr: 5e-6\n",  # YAML 1.1 reads 5e-6 as a string
        [
            "parallel.tp=2",
            "loss.clip=null",
            "optimizer.lr=1",
            "lora.target_modules=[q_proj]",
            "data.split=test",
        ],
    )
    assert cfg.parallel.tp == 2 and cfg.loss.clip is None and cfg.optimizer.lr == 1.0
    assert cfg.lora.target_modules == ["q_proj"] and cfg.data.split == "test"


def test_loss_defaults_per_kind(tmp_path):
    """The clip tau = 0.05 is the forward-KL recipe's; the other kinds default to no clip unless set; top_k
    takes beta (the reference's top-k script: JSD 0.5 over the renormalised top-k), jsd requires it."""
    want = {"forward_kl": 0.05, "reverse_kl": None, "jsd": None, "top_k": None, "sampled_token": None}
    extra = {"jsd": ["loss.beta=0.5"], "top_k": ["loss.top_k=16"]}
    for kind, clip in want.items():
        lo = _load(tmp_path, BASE, [f"loss.kind={kind}", *extra.get(kind, [])]).loss
        assert lo.clip == "default" and loss_clip(lo) == clip, kind
        lo = _load(tmp_path, BASE, [f"loss.kind={kind}", "loss.clip=0.02", *extra.get(kind, [])]).loss
        assert loss_clip(lo) == 0.02, kind  # set: used whatever the kind
    assert loss_clip(_load(tmp_path, BASE, ["loss.clip=null"]).loss) is None  # forward KL without the clip
    lo = _load(
        tmp_path, BASE, ["loss.kind=top_k", "loss.top_k=20", "loss.top_k_tail=false", "loss.beta=0.5"]
    ).loss
    assert (lo.beta, loss_beta(lo), lo.top_k_tail, loss_clip(lo)) == (0.5, 0.5, False, None)
    assert loss_beta(_load(tmp_path, BASE, ["loss.kind=top_k", "loss.top_k=20"]).loss) == 0.0  # forward KL
    assert loss_beta(_load(tmp_path, BASE, ["loss.kind=jsd", "loss.beta=0"]).loss) == 0.0  # explicit: allowed


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_examples_load(name):
    cfg = load_config(EXAMPLES / name)
    assert cfg.model.path and cfg.data.path


def test_moe_recipe_fits_qwen3_30b_a3b_on_one_node():
    """examples/qwen3_30b_a3b_opsd.yaml against Qwen3-30B-A3B's config.json fields (tiny.QWEN3_30B_A3B_SHAPE)
    at its launch size: EP8 divides the 128 experts, TP2 with sequence parallelism, engine TP 2 divides the
    heads, and 8 ranks give DP 4 (EP8 x expert-TP 1 spans the node); 4 ranks cannot hold EP8."""
    from opsd_megatron.demo.tiny import QWEN3_30B_A3B_SHAPE

    cfg = load_config(EXAMPLES / "qwen3_30b_a3b_opsd.yaml")
    hf = dict(QWEN3_30B_A3B_SHAPE, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
    validate_model(cfg, hf)
    validate_context(cfg, hf)  # 8192 prompt + 32768 evaluation tokens = Qwen3's 40960
    assert validate_world(cfg, 8) == 4
    with pytest.raises(ConfigError, match="'parallel.ep'"):
        validate_world(cfg, 4)
    assert cfg.lora.enabled and not cfg.lora.target_experts and cfg.parallel.sequence_parallel


BAD = [
    ("optimzer:\n  lr: 1\n", [], "config key 'optimzer' is unknown"),
    ("optimizer:\n  learning_rate: 1\n", [], "config key 'optimizer.learning_rate' is unknown"),
    ("train:\n  steps: ten\n", [], "config key 'train.steps': expected int, got str"),
    ("train:\n  steps: 2.5\n", [], "config key 'train.steps': expected int, got float"),
    ("prompts:\n  student_thinking: 1\n", [], "config key 'prompts.student_thinking': expected bool"),
    ("loss:\n  kind: kl\n", [], "config key 'loss.kind': must be one of forward_kl, reverse_kl, jsd"),
    ("train:\n  global_batch_size: 10\n  micro_batch_size: 4\n", [], "'train.global_batch_size': 10 is not"),
    ("", ["rollout.top_p=1.5"], "config key 'rollout.top_p': must be in (0, 1]"),
    ("", ["rollout.drift_threshold=0"], "config key 'rollout.drift_threshold': must be > 0 or null"),
    ("", ["loss.beta=0.5"], "config key 'loss.beta': is only used with loss.kind=jsd or top_k"),
    ("", ["loss.kind=jsd"], "config key 'loss.beta': is required with loss.kind=jsd"),
    ("", ["loss.clip=off"], "config key 'loss.clip': expected float or one of default or null"),
    ("", ["loss.clip=-1"], "config key 'loss.clip': must be > 0, null (no clip) or default"),
    ("", ["optimizer.lr=-1"], "config key 'optimizer.lr': must be > 0"),
    ("", ["rollout.max_staleness=1"], "config key 'rollout.max_staleness': 1 needs rollout.placement"),
    ("", ["loss.behaviour_correction=truncated", "loss.behaviour_cap=0"], "config key 'loss.behaviour_cap'"),
    ("", ["parallel.sequence_parallel=true"], "config key 'parallel.sequence_parallel': needs tp > 1"),
    ("", ["parallel.timeout_minutes=0"], "config key 'parallel.timeout_minutes': must be > 0, got 0"),
    ("", ["eval.interval=5"], "config key 'eval.path': is required when eval.interval > 0"),
    ("", ["prompts.teacher_template=Problem {problem}"], "must contain the placeholder {solution}"),
    ("", ["teacher.mode=dynamic"], "'teacher.mode': must be one of frozen, adapters_off, ema, current"),
    ("", ["teacher.mode=adapters_off"], "config key 'teacher.mode': adapters_off needs lora.enabled"),
    ("model: 3\n", [], "config key 'model': expected a mapping"),
    ("", ["optimizer.lr_warmup_steps=-1"], "config key 'optimizer.lr_warmup_steps': must be >= 0, got -1"),
    (
        "",
        ["lora.enabled=true", "lora.target_modules=[q_proj, qkv]"],
        "'lora.target_modules': unknown layer 'qkv'",
    ),
    ("", ["train.steps"], "override 'train.steps' must look like key.sub=value"),
    ("", ["lora.target_modules=q_proj"], "config key 'lora.target_modules': expected a list"),
    ("", ["lora.layout=peft"], "config key 'lora.layout': must be one of fused, per_projection, got 'peft'"),
    (
        "",
        ["rollout.lora_refresh=adapters"],
        "'rollout.lora_refresh': adapters cannot be served: lora.enabled",
    ),
    (
        "",
        ["lora.enabled=true", "rollout.engine=hf", "rollout.lora_refresh=adapters"],
        "'rollout.lora_refresh': adapters cannot be served: rollout.engine=hf serves no LoRA adapters",
    ),
]


def test_choices_are_declared_once_as_literal_types():
    """Values set in code (not loaded from YAML) are checked against the same `Literal` types."""
    from opsd_megatron.config import LoraConfig, OptimizerConfig, choices, validate

    assert choices(LoraConfig, "layout") == ("fused", "per_projection")
    assert choices(OptimizerConfig, "lr_decay_style") == ("constant", "linear", "cosine")
    cfg = load_config(EXAMPLES / "tiny_cpu_demo.yaml")
    cfg.loss.kind = "kl"
    with pytest.raises(ConfigError, match="'loss.kind': must be one of forward_kl, reverse_kl, jsd, top_k, "):
        validate(cfg)


@pytest.mark.parametrize("text,overrides,message", BAD)
def test_bad_config_gives_one_line_error(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, BASE + text if not text.startswith(("model:",)) else text, overrides)
    msg = str(e.value)
    assert message in msg and "\n" not in msg, msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        _load(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, "model:\n  path: m\ndata:\n  path: x.jsonl\n   bad: 1\n")
    msg = str(e.value)
    assert "line 5, column 7 is not valid YAML: mapping values are not allowed here" in msg, msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="'model.path': is required"):
        _load(tmp_path, "data:\n  path: x.jsonl\n")


def test_warmup_longer_than_the_run_is_clamped_with_one_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    with caplog.at_level("WARNING", logger="opsd_megatron"):
        cfg = _load(tmp_path, BASE, ["train.steps=6", "optimizer.lr_warmup_steps=10"])
    assert cfg.optimizer.lr_warmup_steps == 6
    warned = [r.getMessage() for r in caplog.records if "lr_warmup_steps" in r.getMessage()]
    assert len(warned) == 1 and "clamped to 6 steps" in warned[0], warned
    caplog.clear()
    monkeypatch.setenv("RANK", "1")  # other ranks: silent (one warning per job)
    with caplog.at_level("WARNING", logger="opsd_megatron"):
        assert (
            _load(tmp_path, BASE, ["train.steps=6", "optimizer.lr_warmup_steps=10"]).optimizer.lr_warmup_steps
            == 6
        )
    assert not [r for r in caplog.records if "lr_warmup_steps" in r.getMessage()]
    assert (
        _load(tmp_path, BASE, ["train.steps=6", "optimizer.lr_warmup_steps=4"]).optimizer.lr_warmup_steps == 4
    )


def test_context_length_is_checked_against_the_model_config(tmp_path):
    (tmp_path / "m").mkdir()
    hf = {
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 4,
        "max_position_embeddings": 1024,
    }
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf))
    text = f"model:\n  path: {tmp_path / 'm'}\ndata:\n  path: builtin:tiny_math\n"
    text += "prompts:\n  max_prompt_tokens: 768\n"
    validate_context(_load(tmp_path, text, ["rollout.max_new_tokens=256"]))  # 1024: fits
    with pytest.raises(ConfigError) as e:
        validate_context(_load(tmp_path, text, ["rollout.max_new_tokens=257"]))
    assert str(e.value).startswith("config key 'rollout.max_new_tokens': prompts.max_prompt_tokens (768) + ")
    assert "= 1025 tokens, more than the model's context of 1024" in str(e.value)
    eval_on = [
        "rollout.max_new_tokens=16",
        "eval.interval=5",
        "eval.path=x.jsonl",
        "eval.max_new_tokens=4096",
    ]
    with pytest.raises(ConfigError, match=r"^config key 'eval.max_new_tokens': .* = 4864 tokens"):
        validate_context(_load(tmp_path, text, eval_on))
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 8.0}  # a scaled context is the longer one
    validate_context(_load(tmp_path, text, eval_on), hf)
    # SFT generates nothing (no engine): the rollout budget does not count against the context.
    validate_context(_load(tmp_path, text, ["algorithm=sft", "rollout.max_new_tokens=4096"]))


def test_model_and_world_checks(tmp_path):
    (tmp_path / "m").mkdir()
    hf = {"num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4}
    (tmp_path / "m" / "config.json").write_text(json.dumps(hf))
    text = f"model:\n  path: {tmp_path / 'm'}\ndata:\n  path: builtin:tiny_math\n"
    assert _load(tmp_path, text, ["parallel.tp=2", "parallel.pp=2"]).parallel.pp == 2
    with pytest.raises(ConfigError, match=r"'parallel.tp': 4 does not divide the model's 2 key/value heads"):
        _load(tmp_path, text, ["parallel.tp=4"])
    with pytest.raises(ConfigError, match=r"'parallel.pp': 3 does not divide the model's 4 layers"):
        _load(tmp_path, text, ["parallel.pp=3"])
    cfg = _load(tmp_path, text, ["train.global_batch_size=8", "train.micro_batch_size=2"])
    assert validate_world(cfg, 2) == 2
    with pytest.raises(ConfigError, match=r"'train.global_batch_size': 8 is not divisible by .* 2 x 3"):
        validate_world(cfg, 3)
    cfg.parallel.tp = 2
    with pytest.raises(ConfigError, match=r"'parallel.pp' = 2 x 1 = 2 do not divide the 3 process"):
        validate_world(cfg, 3)
    validate_model(cfg, {"num_attention_heads": 4})


def test_config_package_imports_without_torch():
    """The CLIs check a config before anything heavy loads: `opsd_megatron.config` must not pull in torch."""
    import subprocess
    import sys

    code = "import sys, opsd_megatron.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_choices_and_defaults_shared_with_the_rollout_factory():
    """Engine kinds and the vLLM memory share are declared once (config.schema) and used by the factory."""
    import inspect
    import typing

    from opsd_megatron.config import GPU_MEMORY_UTILIZATION, EngineKind, RolloutConfig
    from opsd_megatron.rollout import ENGINE_KINDS, make_engine
    from opsd_megatron.rollout.vllm_engine import VLLMEngine

    assert ENGINE_KINDS == typing.get_args(EngineKind) == ("vllm", "hf")
    defaults = [
        RolloutConfig().gpu_memory_utilization,
        inspect.signature(make_engine).parameters["gpu_memory_utilization"].default,
        inspect.signature(VLLMEngine.__init__).parameters["gpu_memory_utilization"].default,
    ]
    assert defaults == [GPU_MEMORY_UTILIZATION] * 3 and GPU_MEMORY_UTILIZATION == 0.3
    with pytest.raises(ValueError, match="'sglang' is not one of"):
        make_engine("sglang", "x")


def test_use_te_is_one_typed_choice(tmp_path):
    """model.use_te is one typed choice (auto, true, false): YAML booleans, a quoted "true" read as one."""
    assert _load(tmp_path, BASE).model.use_te == "auto"
    text = "model:\n  path: /m\n  use_te: true\ndata:\n  path: builtin:tiny_math\n"
    assert _load(tmp_path, text).model.use_te is True
    assert _load(tmp_path, text.replace("true", "'false'")).model.use_te is False
    with pytest.raises(ConfigError, match="'model.use_te': must be one of auto, true, false, got 'maybe'"):
        _load(tmp_path, text.replace("true", "maybe"))
    with pytest.raises(ConfigError, match="'model.use_te': must be one of auto, true, false, got 1"):
        _load(tmp_path, text.replace("true", "1"))


def test_layout_rules_are_declared_once():
    """The config checks and Megatron's start-up (`mcore.layout`) raise the same sentence for one rule."""
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.mcore.layout import LayoutError, check_pipeline_layers, check_world

    base = {"model": {"path": "m"}, "data": {"path": "builtin:tiny_math"}}
    with pytest.raises(LayoutError) as mc:
        check_pipeline_layers([2, 0], 2)
    with pytest.raises(ConfigError) as cf:
        config_from_dict({**base, "parallel": {"pp": 2, "pipeline_layers": [2, 0]}})
    assert str(mc.value) == str(cf.value)
    assert "'parallel.pipeline_layers': has a stage without layers" in str(cf.value)
    with pytest.raises(LayoutError) as mc:
        check_world(3, 2, 1)
    with pytest.raises(ConfigError) as cf:
        validate_world(config_from_dict({**base, "parallel": {"tp": 2}}), 3)
    assert str(mc.value) == str(cf.value)


def test_tiny_demo_lives_outside_the_directory_make_demo_cleans():
    import re

    script = (EXAMPLES.parent / "scripts" / "demo.sh").read_text()
    demo_out = Path(re.search(r"^OUT=\$\{OUT:-(\S+)\}$", script, re.M).group(1))
    removed = re.findall(r"^rm -rf (.+)$", script, re.M)
    assert removed == ['"$OUT/task" "$OUT/warmstart" "$OUT/opsd" "$OUT/control"'], removed  # never "$OUT"
    cfg = load_config(EXAMPLES / "tiny_cpu_demo.yaml")
    for p in (cfg.output_dir, cfg.model.path):
        assert not Path(p).is_relative_to(demo_out), p


def test_lora_refresh_is_adapters_where_the_engine_serves_them_else_merged_with_a_reason(tmp_path):
    from opsd_megatron.config.lora_refresh import lora_refresh_choice, max_lora_rank

    cfg = _load(tmp_path, BASE, ["lora.enabled=true", "lora.rank=12"])
    assert cfg.rollout.lora_refresh == "auto"
    assert lora_refresh_choice(cfg, moe=False) == ("adapters", None)
    assert max_lora_rank(12) == 16 and max_lora_rank(8) == 8 and max_lora_rank(1) == 1
    mode, why = lora_refresh_choice(cfg, moe=True)  # auto on a MoE model: merged, and why
    assert mode == "merged" and "mixture of experts" in why
    cfg.rollout.lora_refresh = "merged"
    assert lora_refresh_choice(cfg, moe=False) == ("merged", None)
    for over, reason in ((["rollout.engine=hf"], "rollout.engine=hf"), (["lora.rank=600"], "lora.rank=600"),
                         (["rollout.placement=separate"], "rollout.placement=separate")):  # fmt: skip
        mode, why = lora_refresh_choice(_load(tmp_path, BASE, ["lora.enabled=true", *over]), moe=False)
        assert mode == "merged" and reason in why, (over, why)
    assert lora_refresh_choice(_load(tmp_path, BASE), moe=False) == ("merged", None)  # no LoRA: no adapters
    (tmp_path / "m").mkdir()  # an explicit `adapters` on a MoE model: refused against its config.json
    (tmp_path / "m" / "config.json").write_text(json.dumps({"num_attention_heads": 4, "num_experts": 4}))
    text = f"model:\n  path: {tmp_path / 'm'}\ndata:\n  path: builtin:tiny_math\n"
    with pytest.raises(
        ConfigError, match=r"'rollout.lora_refresh': adapters cannot be served: the model is a"
    ):
        _load(tmp_path, text, ["lora.enabled=true", "rollout.lora_refresh=adapters"])
