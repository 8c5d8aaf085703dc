"""LoRA adapters out as a PEFT adapter directory that `peft.PeftModel.from_pretrained(base, DIR)` loads.

    tensors = peft_adapter_tensors(chunks)                 # collective (TP all-gather, PP all_gather_object)
    save_peft_adapter(chunks, out_dir, lora_cfg, base_model="Qwen/Qwen3-1.7B")   # collective; rank 0 writes

Files: `adapter_model.safetensors` with PEFT's keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` [r, in] / `.lora_B.weight` [out, r]
(likewise k/v/o_proj, mlp.gate/up/down_proj) and `adapter_config.json` (peft_type LORA, r, lora_alpha,
target_modules, ...). PEFT scales by lora_alpha / r like `LoRAAdapter`, so PEFT's model computes
W x + (alpha/r) B A x per projection = the merged HF export.

Layouts (see adapter.py): per_projection maps one to one (A_p = the p-th r rows of `lora_a`, B_p = the
rows of `lora_b` that belong to projection p, de-interleaved like the base weight by the conversion
transforms). fused writes the shared A under each of q/k/v (gate/up) with that projection's rows of B,
which is exactly the fused update, so PEFT reproduces both layouts.

MoE (Qwen3-MoE, `lora.target_experts`): expert adapters are written per expert under the hub's (transformers
4) names `...mlp.experts.{g}.gate_proj|up_proj|down_proj.lora_A|B.weight`, g the GLOBAL expert index, with
gate/up/down_proj in `target_modules`. PEFT (>= 0.19 with transformers 5) converts exactly these on load to
LoRA on transformers 5's fused 3-D `mlp.experts.gate_up_proj` / `down_proj` (`target_parameters`; gate and up
become one block-diagonal adapter of rank 2r with alpha 2*alpha, so alpha/r is kept and both layouts are
reproduced). Two limits of that conversion: it needs both gate_proj and up_proj (per_projection with only
one adapted: the other is written as a zero adapter, exact), and it maps EVERY gate/up/down_proj name of a
MoE model to the experts, so adapters on dense-layer MLPs of a MoE model (`mlp_only_layers`) cannot be
loaded by PEFT: ValueError naming `lora.export_peft` (`config.checks` refuses it at start-up).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as mps

from opsd_megatron.mcore.conversion.mapping import map_name
from opsd_megatron.mcore.conversion.transforms import shards_to_hf
from opsd_megatron.mcore.files import save_safetensors
from opsd_megatron.mcore.lora.adapter import COLUMN, LoRAAdapter
from opsd_megatron.mcore.lora.api import global_module_name
from opsd_megatron.mcore.models.builder import model_info, unwrap

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


def _gather_tp(t: torch.Tensor, group, tp: int) -> list[torch.Tensor]:
    if tp == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _adapter_tensor(p: torch.nn.Parameter, which: str) -> torch.Tensor:
    t = p.detach() if which == "weight" else getattr(p, "main_grad", None)
    if which == "grad" and t is None:
        t = p.grad
    if t is None:
        raise ValueError("peft_adapter_tensors(which='grad'): a LoRA parameter has no gradient.")
    return t.detach()


def peft_adapter_tensors(model_chunks: list, which: str = "weight") -> dict[str, torch.Tensor]:
    """{PEFT key: full tensor (CPU, parameter dtype)} of every adapter of the whole model, on every rank.

    `which="grad"` gives the gradients in the same layout (for tests). Collectives: per adapter one
    all-gather over TP of the sharded factor (column: B [out/tp, r]; row: A [r, in/tp]); with PP > 1 one
    all_gather_object over the PP group at the end. Every rank of the model must call it.
    """

    info = model_info(model_chunks)
    spec = info.spec
    out: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        model = unwrap(chunk)
        for name, module in model.named_modules():
            ad = getattr(module, "lora", None)
            if not isinstance(ad, LoRAAdapter):
                continue
            hf_names, transform, _ = map_name(f"{global_module_name(model, name)}.weight", spec)
            a, b = _adapter_tensor(ad.lora_a, which), _adapter_tensor(ad.lora_b, which)
            tp_group, tp = ad.tp_group, ad.tp_size  # expert adapters: the expert-TP group
            if ad.parallel_mode == COLUMN:
                bs = shards_to_hf(transform, _gather_tp(b, tp_group, tp), spec)  # one B per HF projection
                if ad.parts is None:
                    pairs = [(n, a, bp) for n, bp in zip(hf_names, bs)]
                else:
                    a_of = dict(zip(ad.active_parts, a.split(ad.rank, dim=0)))
                    pairs = [
                        (n, a_of[part], bp) for n, (part, _, on), bp in zip(hf_names, ad.parts, bs) if on
                    ]
            else:
                pairs = [(hf_names[0], torch.cat(_gather_tp(a, tp_group, tp), dim=1), b)]
            for hf_name, a_p, b_p in pairs:
                stem = PEFT_PREFIX + hf_name.removesuffix(".weight")
                out[f"{stem}.lora_A.weight"] = a_p.cpu().clone()
                out[f"{stem}.lora_B.weight"] = b_p.cpu().clone()
    if spec.is_moe:
        out = moe_expert_tensors(out, info.ep, mps.get_expert_model_parallel_group() if info.ep > 1 else None)
    pp = mps.get_pipeline_model_parallel_world_size()
    if pp > 1:
        stages: list = [None] * pp
        dist.all_gather_object(stages, out, group=mps.get_pipeline_model_parallel_group())
        out = {k: v for s in stages for k, v in s.items()}
    return out


def moe_expert_tensors(out: dict[str, torch.Tensor], ep: int, ep_group) -> dict[str, torch.Tensor]:
    """This stage's tensors with every EP rank's expert adapters (all_gather_object over the EP group when
    ep > 1: each EP rank holds its own experts, the rest is replicated), and a zero adapter for the un-adapted
    one of gate_proj/up_proj of an expert (PEFT's conversion needs both; zero B = no update)."""
    if ep > 1:
        mine = {k: v for k, v in out.items() if ".mlp.experts." in k}
        parts: list = [None] * ep
        dist.all_gather_object(parts, mine, group=ep_group)
        out = dict(out)
        for part in parts:
            out.update(part)
    for key in [k for k in out if ".mlp.experts." in k and k.endswith(".lora_A.weight")]:
        for have, other in (("gate_proj", "up_proj"), ("up_proj", "gate_proj")):
            twin = key.replace(f".{have}.", f".{other}.")
            if f".{have}." in key and twin not in out:
                b = out[key.replace("lora_A", "lora_B")]
                out[twin] = torch.zeros_like(out[key])
                out[twin.replace("lora_A", "lora_B")] = torch.zeros_like(b)
    return out


def adapter_config(lora_cfg, tensors: dict[str, torch.Tensor], base_model: str | None) -> dict:
    """The `adapter_config.json` content (PEFT LoraConfig fields) for the exported tensors. With expert
    adapters `lora_dropout` is 0 (PEFT's adapters on the fused expert parameters take no dropout; the
    adapter is for inference)."""
    experts = any(".mlp.experts." in k for k in tensors)
    modules = sorted(
        {k.removesuffix(".lora_A.weight").rsplit(".", 1)[-1] for k in tensors if k.endswith("lora_A.weight")}
    )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(lora_cfg.rank),
        "lora_alpha": float(lora_cfg.alpha),
        "lora_dropout": 0.0 if experts else float(getattr(lora_cfg, "dropout", 0.0)),
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def save_peft_adapter(model_chunks: list, out_dir: str | Path, lora_cfg, *, base_model: str | None) -> Path:
    """Write `adapter_model.safetensors` + `adapter_config.json` to `out_dir` (global rank 0 writes).
    Collective: every rank of the model must call it (see `peft_adapter_tensors`)."""

    tensors = peft_adapter_tensors(model_chunks)
    dense_mlp = sorted(k for k in tensors if ".mlp." in k and ".mlp.experts." not in k)
    if dense_mlp and model_info(model_chunks).spec.is_moe:
        raise ValueError(
            f"PEFT adapter of a mixture-of-experts model with dense MLP adapters ({dense_mlp[0]}, ..): "
            "peft maps gate_proj/up_proj/down_proj of a MoE model to its experts, so it cannot load them; "
            "set lora.export_peft=false (the merged HF export holds them) or leave the MLP projections out "
            "of lora.target_modules."
        )
    out = Path(out_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_safetensors(
            {k: v.contiguous() for k, v in tensors.items()}, out / ADAPTER_WEIGHTS, {"format": "pt"}
        )
        cfg = adapter_config(lora_cfg, tensors, base_model)
        (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        log.info(
            "wrote PEFT adapter (%d tensors, modules %s) to %s", len(tensors), cfg["target_modules"], out
        )
    if dist.is_initialized():
        dist.barrier()
    return out
