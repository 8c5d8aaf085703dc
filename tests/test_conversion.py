"""Foundation checks over real gloo process groups, bundled into ONE spawned 4-rank run (imports dominate).

Per architecture (qwen3 tied + q/k norm, qwen2 qkv bias, llama llama3-rope) at TP x PP in {1,2}^2:
Megatron logits vs transformers (fp32), HF -> Megatron -> HF export bit-identical; TP2xPP2 grads equal
TP1xPP1 grads (Megatron's own pipeline schedule); a dist checkpoint saved at TP2xPP1 loads at TP1xPP2;
save_hf_checkpoint loads in transformers; opsd-convert hf-to-megatron / verify / megatron-to-hf;
the checkpoint error messages; the CPU shim and parallel.initialize.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from dist_utils import error_text, run_distributed

ARCHS = ("qwen3", "qwen2", "llama")
LAYOUTS = ((1, 1, None), (2, 1, None), (1, 2, None), (2, 2, None), (1, 2, [1, 3]))
FP32_TOL = 1e-4


def _megatron_grads(chunks, x, labels):
    """One forward/backward with Megatron's schedule; returns full HF-named grads on every rank."""
    from megatron_utils import lm_forward_backward

    from opsd_megatron.mcore.conversion import export_hf_weights

    for p in chunks[0].parameters():
        p.grad = None
    lm_forward_backward(chunks, x, labels)

    def grad_hook(name, module, shard):
        return getattr(module, name.rsplit(".", 1)[1]).grad

    return {k: v.clone() for k, v in export_hf_weights(chunks, shard_hook=grad_hook)}


def _bundle(rank, world, dirs, refs, x, labels, work, bad_dirs):
    import torch.distributed as dist
    from safetensors.torch import load_file

    from opsd_megatron.cli import convert as cli
    from opsd_megatron.mcore import cpu, parallel
    from opsd_megatron.mcore.conversion import (
        export_hf_weights,
        load_hf_weights,
        load_megatron_checkpoint,
        read_checkpoint_metadata,
        save_hf_checkpoint,
        save_megatron_checkpoint,
    )
    from opsd_megatron.mcore.models import build_model, forward_logits

    t0 = time.time()
    res: dict = {"logits": {}, "export": {}, "grads": {}, "errors": {}, "timing": {}}

    def lap(name):
        nonlocal t0
        res["timing"][name] = round(time.time() - t0, 2)
        t0 = time.time()

    work = Path(work)

    # --- parallel.initialize + CPU shim ---------------------------------------------------------------
    ps = parallel.initialize(2, 2, seed=7)
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tp_rand = torch.rand(3)
    res["parallel"] = dict(
        layout=(ps.tp, ps.pp, ps.dp, ps.tp_rank, ps.pp_rank, ps.dp_rank),
        backend=ps.backend,
        cuda_to_cpu=str(torch.empty(2, device="cuda").device),
        tp_rand=tp_rand,
        default_rand=torch.rand(3),
        shim=cpu.install(),
        same_state=parallel.initialize(2, 2) is ps,
    )
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    res["parallel"]["clipped"] = p.grad.clone()

    lap("startup")
    # --- logits vs transformers and bit-identical export, per arch x layout ---------------------------
    for arch in ARCHS:
        hf_sd = load_file(str(Path(dirs[arch]) / "model.safetensors"))
        for tp, pp, split in LAYOUTS:
            parallel.initialize(tp, pp)
            chunks = build_model(dirs[arch], pipeline_layers=split, perform_initialization=False)
            load_hf_weights(chunks, dirs[arch])
            out = forward_logits(chunks, x)
            key = (arch, tp, pp, str(split))
            if out is not None:
                res["logits"][key] = (out - refs[arch]).abs().max().item()
            exported = dict(export_hf_weights(chunks))
            bad = sorted(k for k in hf_sd if k not in exported or not torch.equal(hf_sd[k], exported[k]))
            res["export"][key] = (bad, sorted(set(exported) - set(hf_sd)))

    lap("logits")
    # --- TP2xPP2 grads == TP1xPP1 grads ---------------------------------------------------------------
    for arch in ("qwen3", "llama"):
        grads = {}
        for tp, pp in ((1, 1), (2, 2)):
            parallel.initialize(tp, pp)
            chunks = build_model(dirs[arch], perform_initialization=False)
            load_hf_weights(chunks, dirs[arch])
            grads[(tp, pp)] = _megatron_grads(chunks, x, labels)
        g1, g2 = grads[(1, 1)], grads[(2, 2)]
        res["grads"][arch] = (
            sorted(g1) == sorted(g2),
            max((g1[k] - g2[k]).abs().max().item() for k in g1),
            max(g.abs().max().item() for g in g1.values()),
        )

    lap("grads")
    # --- opsd-convert hf-to-megatron at TP2xPP1 -> dist checkpoint loads at TP1xPP2 -> verify -> to-hf -----
    ckpt, hf_out = str(work / "ckpt_qwen3"), str(work / "ckpt_qwen3_hf")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rcs = [cli.main(["hf-to-megatron", "--hf", dirs["qwen3"], "--out", ckpt, "--tp", "2", "--pp", "1"])]
    parallel.initialize(2, 1)
    chunks = build_model(dirs["qwen3"], perform_initialization=False)
    load_hf_weights(chunks, dirs["qwen3"])
    logits_saved = forward_logits(chunks, x)
    parallel.initialize(1, 2)
    meta = read_checkpoint_metadata(ckpt)
    chunks = build_model(meta["hf_config"], padded_vocab_size=meta["padded_vocab_size"])
    load_megatron_checkpoint(chunks, ckpt)
    logits_loaded = forward_logits(chunks, x)
    ref_chunks = build_model(dirs["qwen3"], perform_initialization=False)
    load_hf_weights(ref_chunks, dirs["qwen3"])
    logits_direct = forward_logits(ref_chunks, x)
    if logits_loaded is not None:
        res["ckpt"] = (
            (logits_loaded - logits_saved).abs().max().item(),
            torch.equal(logits_loaded, logits_direct),
        )
    # Extra (trainer) state travels with the model in the same dist checkpoint.
    ckpt2 = str(work / "ckpt_extra")
    save_megatron_checkpoint(
        chunks, ckpt2, extra_sharded_state={"trainer": {"step": 3, "rng": torch.arange(4)}}
    )
    template = {"trainer": {"step": 0, "rng": torch.zeros(4, dtype=torch.int64)}}
    res["extra"] = load_megatron_checkpoint(chunks, ckpt2, extra_sharded_state=template)
    llama_chunks = build_model(dirs["llama"], perform_initialization=False)
    res["errors"]["ckpt_arch"] = error_text(lambda: load_megatron_checkpoint(llama_chunks, ckpt))
    res["errors"]["ckpt_layout"] = error_text(
        lambda: load_megatron_checkpoint(chunks, ckpt, strict_layout=True)
    )
    res["errors"]["missing"] = error_text(
        lambda: load_hf_weights(build_model(bad_dirs["missing"]), bad_dirs["missing"])
    )
    res["errors"]["shape"] = error_text(
        lambda: load_hf_weights(build_model(bad_dirs["shape"]), bad_dirs["shape"])
    )
    lap("ckpt")
    with contextlib.redirect_stdout(buf):
        rcs += [
            cli.main(["verify", "--hf", dirs["qwen3"], "--megatron", ckpt, "--tp", "1", "--pp", "2"]),
            cli.main(
                ["verify", "--hf", dirs["llama"], "--megatron", ckpt, "--tp", "2", "--pp", "2", "--tol", "0"]
            ),
            cli.main(["megatron-to-hf", "--megatron", ckpt, "--out", hf_out, "--tp", "2", "--pp", "2"]),
        ]
    res["cli"] = (rcs, buf.getvalue())
    lap("cli")

    # --- save_hf_checkpoint from TP2xPP2 (sharded files) -----------------------------------------------
    chunks = build_model(dirs["qwen2"], perform_initialization=False)
    load_hf_weights(chunks, dirs["qwen2"])
    save_hf_checkpoint(chunks, work / "hf_qwen2", tokenizer_dir=dirs["qwen2"], max_shard_bytes=200_000)
    # ... and our loader reads the sharded (index.json) layout back; bf16 model at TP2xPP2.
    chunks = build_model(str(work / "hf_qwen2"), perform_initialization=False)
    load_hf_weights(chunks, str(work / "hf_qwen2"))
    out = forward_logits(chunks, x)
    bf16 = build_model(dirs["qwen3"], dtype=torch.bfloat16, perform_initialization=False)
    load_hf_weights(bf16, dirs["qwen3"])
    out_bf16 = forward_logits(bf16, x)
    if out is not None:
        res["sharded_load"] = (out - refs["qwen2"]).abs().max().item()
        res["bf16"] = (out_bf16.dtype, (out_bf16.float() - refs["qwen3"]).abs().max().item())
    lap("save_hf")
    dist.barrier()
    return res


@pytest.fixture(scope="module")
def bundle(tiny_models, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    dirs = {a: str(tiny_models(a)) for a in ARCHS}
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 731, (2, 12), generator=gen)
    labels = torch.randint(0, 731, (2, 12), generator=gen)
    refs = {}
    for a in ARCHS:
        m = AutoModelForCausalLM.from_pretrained(dirs[a], dtype=torch.float32).eval()
        with torch.no_grad():
            refs[a] = m(x).logits
    work = tmp_path_factory.mktemp("conversion")
    bad_dirs = _bad_checkpoints(Path(dirs["qwen2"]), work)
    cache = os.environ.get("OPSD_TEST_BUNDLE_CACHE")  # dev aid: reuse one run's results while iterating
    if cache and Path(cache).is_file():
        results, work = torch.load(cache, weights_only=False)
    else:
        results = run_distributed(_bundle, 4, dirs, refs, x, labels, str(work), bad_dirs, timeout=900)
        if cache:
            torch.save((results, work), cache)
    return dict(results=results, dirs=dirs, work=work, ref_scale=refs["qwen3"].abs().max().item())


def _bad_checkpoints(src: Path, work: Path) -> dict:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for kind in ("missing", "shape"):
        d = work / f"bad_{kind}"
        d.mkdir()
        shutil.copy(src / "config.json", d / "config.json")
        bad = dict(sd)
        if kind == "missing":
            bad.pop("model.layers.1.mlp.up_proj.weight")
        else:
            bad["model.layers.0.self_attn.q_proj.weight"] = bad["model.layers.0.self_attn.q_proj.weight"][:-1]
        save_file(bad, str(d / "model.safetensors"))
        out[kind] = str(d)
    return out


def test_parallel_initialize_and_cpu_shim(bundle):
    res = [r["parallel"] for r in bundle["results"]]
    layouts = sorted(r["layout"] for r in res)
    # (tp, pp, dp, tp_rank, pp_rank, dp_rank): Megatron's order puts TP innermost.
    assert layouts == sorted((2, 2, 1, t, p, 0) for p in (0, 1) for t in (0, 1))
    assert all(
        r["backend"] == "gloo" and r["cuda_to_cpu"] == "cpu" and r["shim"] and r["same_state"] for r in res
    )
    by = {r["layout"][3:5]: r for r in res}
    assert not torch.equal(by[(0, 0)]["tp_rand"], by[(1, 0)]["tp_rand"])  # TP ranks: different streams
    assert torch.equal(by[(0, 0)]["tp_rand"], by[(0, 1)]["tp_rand"])  # same TP rank: same stream
    assert torch.equal(by[(0, 0)]["default_rand"], by[(1, 1)]["default_rand"])  # data-parallel seed shared
    assert torch.allclose(res[0]["clipped"], torch.full((4,), 0.5), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(bundle, arch):
    seen = {}
    for r in bundle["results"]:
        for (a, tp, pp, split), diff in r["logits"].items():
            if a == arch:
                seen.setdefault((tp, pp, split), []).append(diff)
    assert len(seen) == len(LAYOUTS), seen
    for layout, diffs in seen.items():
        assert max(diffs) < FP32_TOL, (arch, layout, diffs)


@pytest.mark.parametrize("arch", ARCHS)
def test_export_bit_identical(bundle, arch):
    for r in bundle["results"]:
        for key, (bad, extra) in r["export"].items():
            if key[0] == arch:
                assert bad == [] and extra == [], (key, bad, extra)


def test_grads_tp2pp2_equal_tp1pp1(bundle):
    for arch, (same_names, diff, scale) in bundle["results"][0]["grads"].items():
        assert same_names
        assert scale > 1e-3  # grads are not trivially zero
        assert diff <= 1e-5 * max(1.0, scale), (arch, diff, scale)


def test_dist_checkpoint_reshard(bundle):
    last = [r for r in bundle["results"] if "ckpt" in r]
    assert last
    for r in last:
        diff, identical = r["ckpt"]
        assert diff < FP32_TOL and identical


def test_dist_checkpoint_extra_state(bundle):
    for r in bundle["results"]:
        extra = r["extra"]["trainer"]
        assert extra["step"] == 3 and torch.equal(extra["rng"], torch.arange(4))


def test_sharded_hf_load_and_bf16(bundle):
    last = [r for r in bundle["results"] if "sharded_load" in r]
    assert len(last) == 2  # the two TP ranks of the last stage
    scale = max(1.0, bundle["ref_scale"])
    for r in last:
        assert r["sharded_load"] < FP32_TOL
        dtype, diff = r["bf16"]
        assert dtype == torch.bfloat16 and diff < 6e-2 * scale, (
            diff,
            scale,
        )  # transformers bf16 itself: ~2.3%


def test_save_hf_checkpoint_loads_in_transformers(bundle):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = bundle["work"] / "hf_qwen2"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.json").is_file()
    src = load_file(str(Path(bundle["dirs"]["qwen2"]) / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    sd = model.state_dict()
    assert set(src) <= set(sd)
    for k, v in src.items():
        assert torch.equal(sd[k], v), k


def test_opsd_convert_cli(bundle):
    from safetensors.torch import load_file

    rcs, out = bundle["results"][0]["cli"]
    all_out = "".join(r["cli"][1] for r in bundle["results"])
    assert rcs == [0, 0, 1, 0], all_out
    assert "PASS" in all_out and "FAIL" in all_out and "max |logit diff|" in all_out
    src = load_file(str(Path(bundle["dirs"]["qwen3"]) / "model.safetensors"))
    got = load_file(str(bundle["work"] / "ckpt_qwen3_hf" / "model.safetensors"))
    assert sorted(src) == sorted(got)
    assert all(torch.equal(src[k], got[k]) for k in src)


def test_checkpoint_error_messages(bundle):
    errs = bundle["results"][0]["errors"]
    assert (
        "architecture 'Qwen3ForCausalLM'" in errs["ckpt_arch"] and "'LlamaForCausalLM'" in errs["ckpt_arch"]
    )
    assert "TP=2 x PP=1" in errs["ckpt_layout"] and "TP=1 x PP=2" in errs["ckpt_layout"]
    assert "no tensor 'model.layers.1.mlp.up_proj.weight'" in errs["missing"]
    assert "'model.layers.0.self_attn.q_proj.weight'" in errs["shape"]
    assert "[127, 128]" in errs["shape"] and "[128, 128]" in errs["shape"]
