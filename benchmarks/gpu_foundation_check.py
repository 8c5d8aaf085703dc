"""GPU foundation check: Qwen3-1.7B-shaped random model, HF -> Megatron (our loader), logits vs transformers.

    python benchmarks/gpu_foundation_check.py            # or: torchrun --nproc-per-node 1 benchmarks/...
    python benchmarks/gpu_foundation_check.py --layers 4 # quicker smoke run

One GPU, world size 1, no Transformer Engine needed (Megatron's local layer spec is used when TE is
absent), no vLLM. Steps: build a random Qwen3 model with Qwen3-1.7B's shape in transformers (bf16, norms
randomised around 1 so a swapped norm cannot hide), save it as safetensors, load it into a Megatron
GPTModel with `opsd_megatron.mcore.conversion.load_hf_weights`, and compare logits on a few random inputs:

* bf16 Megatron vs bf16 transformers: max|diff|, and both against an fp32 transformers reference of the
  same weights (Megatron's bf16 error must stay within 2x transformers' own bf16 error, plus a floor);
* fp32 Megatron vs fp32 transformers (TF32 off): a tight check that the weight mapping is exact at scale.

Prints a table and a final `PASS` / `FAIL` line (exit code 0 / 1). Finishes in well under 3 minutes on
an H100 (most of it is imports and writing the 3.4 GB checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from opsd_megatron.demo.tiny import QWEN3_1_7B_SHAPE  # noqa: E402

QWEN3_1P7B = dict(
    architectures=["Qwen3ForCausalLM"],
    **QWEN3_1_7B_SHAPE,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
)


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def _versions() -> str:
    import megatron.core
    import transformers

    dev = _device_name()
    return (
        f"device {dev} | torch {torch.__version__} | megatron-core {megatron.core.__version__} | "
        f"transformers {transformers.__version__}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28, help="num_hidden_layers (28 = Qwen3-1.7B)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--workdir", default=None, help="where to write the HF checkpoint (default: a temp dir)")
    ap.add_argument("--skip-fp32", action="store_true", help="skip the fp32 mapping check")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU allowed: checks the script itself")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("FAIL: CUDA is not available; this check needs one GPU (or pass --smoke).")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    t_start = time.time()

    from transformers import AutoConfig, AutoModelForCausalLM

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models import build_model, forward_logits, have_te

    print(_versions(), f"| TE: {have_te()}", flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="opsd_gpu_check_"))
    hf_dir = workdir / "qwen3_1p7b_random"
    fields = dict(QWEN3_1P7B, num_hidden_layers=args.layers)
    if args.smoke:
        fields.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
        fields.update(head_dim=64, vocab_size=1000, num_hidden_layers=min(args.layers, 2))
    cfg = AutoConfig.for_model("qwen3", **fields)
    torch.manual_seed(0)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    hf.eval()
    hf.save_pretrained(str(hf_dir), safe_serialization=True)
    t_saved = time.time()

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=gen).to(device)
    with torch.no_grad():
        ref_bf16 = hf(x).logits.float()
        hf.float()
        ref_fp32 = hf(x).logits.float()
    del hf
    if device == "cuda":
        torch.cuda.empty_cache()

    parallel.initialize(1, 1)
    rows, ok = [], True
    scale = ref_fp32.abs().max().item()
    for dtype in [torch.bfloat16] + ([] if args.skip_fp32 else [torch.float32]):
        t0 = time.time()
        chunks = build_model(str(hf_dir), dtype=dtype, perform_initialization=False)
        load_hf_weights(chunks, str(hf_dir))
        t_load = time.time() - t0
        logits = forward_logits(chunks, x).float()
        del chunks
        if device == "cuda":
            torch.cuda.empty_cache()
        if dtype == torch.bfloat16:
            d_hf = (logits - ref_bf16).abs().max().item()
            err_mg = (logits - ref_fp32).abs().max().item()
            err_hf = (ref_bf16 - ref_fp32).abs().max().item()
            agree = (logits.argmax(-1) == ref_bf16.argmax(-1)).float().mean().item()
            passed = err_mg <= max(2.0 * err_hf, 1e-2 * scale) and d_hf <= 5e-2 + 2e-2 * scale
            rows.append(
                f"bf16  max|meg-hf_bf16|={d_hf:.3e}  max|meg-hf_fp32|={err_mg:.3e}  "
                f"max|hf_bf16-hf_fp32|={err_hf:.3e}  top1 agree={agree:.4f}  load {t_load:.1f}s  "
                f"{'ok' if passed else 'BAD'}"
            )
        else:
            d = (logits - ref_fp32).abs().max().item()
            passed = d <= 1e-3 * max(1.0, scale)
            rows.append(
                f"fp32  max|meg-hf_fp32|={d:.3e}  (tol {1e-3 * max(1.0, scale):.1e})  load {t_load:.1f}s  "
                f"{'ok' if passed else 'BAD'}"
            )
        ok &= passed
    print(
        f"Qwen3-1.7B-shaped random model ({fields['num_hidden_layers']} layers), "
        f"inputs [{args.batch}, {args.seq_len}], "
        f"max|logit| {scale:.3f}; HF build+save {t_saved - t_start:.1f}s"
    )
    for r in rows:
        print("  " + r)
    print(
        f"{'PASS' if ok else 'FAIL'}: Megatron (opsd_megatron loader) vs transformers logits on "
        f"{_device_name()}, total {time.time() - t_start:.1f}s"
    )
    parallel.destroy()
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
