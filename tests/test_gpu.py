"""GPU tests with thresholds (`pytest -m gpu`; part of `make gpu-test`). Collected everywhere, skipped with
the reason when CUDA is absent. Thresholds: benchmarks/thresholds.py (OPSD_THRESHOLD_SCALE scales them;
anchors in docs/performance.md).

* the fused loss in bf16 against the float64 reference, values and gradients, at TP = 1 and per vocabulary
  shard (two shards combined exactly as the TP collectives do, on one GPU);
* the fused path's peak extra CUDA memory at the anchor shape;
* a bf16 OPSD train step under Megatron's distributed optimizer against an fp32 step on the same batch;
* Transformer Engine layer-spec logits against transformers (when TE imports);
* the tiny Qwen3-MoE on CUDA: logits against transformers, a bf16 step against fp32 (router loss included);
* Megatron distributed checkpoint save/load of model + distributed-optimizer state;
* `rollout.offload_train_state`: gradients and distributed-optimizer state to host memory and back, bit for
  bit, freeing device memory meanwhile.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from thresholds import limit  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `make gpu-test` on one)"),
]
TEMP, CLIP = 1.1, 0.05


def _inputs(t, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(t, h, generator=g)
    ws = torch.randn(v, h, generator=g) * 2 / h**0.5
    ht = hs + 0.3 * torch.randn(t, h, generator=g)
    wt = ws + 0.5 / h**0.5 * torch.randn(v, h, generator=g)
    return [x.to("cuda", dtype) for x in (hs, ws, ht, wt)]


def _reference(hs, ws, ht, wt, go, kind="forward_kl", mask=None):
    """float64 reference for bf16 inputs: the logits as the bf16 GEMMs give them, everything after in float64
    (loss, its logit gradient, and the gradient GEMMs): loss, dh, dW."""
    from opsd_megatron.losses import vocab_parallel_divergence

    ls = (hs @ ws.t()).double().requires_grad_(True)
    ref = vocab_parallel_divergence(ls, (ht @ wt.t()).double(), kind=kind, beta=0.5, temperature=TEMP,
                                    clip=CLIP, loss_mask=mask)  # fmt: skip
    (ref * go).sum().backward()
    return ref.detach(), ls.grad @ ws.double(), ls.grad.t() @ hs.double()


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_fused_loss_bf16_matches_float64(kind):
    from opsd_megatron.losses import fused_linear_divergence

    t, h, v = 1000, 256, 5003
    hs, ws, ht, wt = _inputs(t, h, v, torch.bfloat16)
    mask = torch.rand(t, device="cuda") > 0.2
    go = torch.rand(t, device="cuda", dtype=torch.float64)
    for weights in ("uniform", "weighted"):
        g = torch.full_like(go, 1 / t) if weights == "uniform" else go
        x = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
        loss = fused_linear_divergence(x[0], x[1], ht, wt, kind=kind, beta=0.5, temperature=TEMP, clip=CLIP,
                                       loss_mask=mask, chunk_size=384)  # fmt: skip
        (loss * g.float()).sum().backward()
        ref = _reference(hs, ws, ht, wt, g, kind, mask)
        errs = [_rel(a, b) for a, b in zip((loss, x[0].grad, x[1].grad), ref)]
        assert max(errs) < 2e-2, f"{kind} {weights}: rel. err loss/dh/dW {errs}"


def test_fused_loss_bf16_per_vocab_shard_matches_float64():
    """Two vocabulary shards, their statistics combined as `global_shift` / the all-reduce do at TP = 2."""
    from opsd_megatron.losses import _phase_math, _phases

    t, h, v = 512, 256, 4096
    hs, ws, ht, wt = _inputs(t, h, v, torch.bfloat16, seed=1)
    go = torch.full((t,), 1 / t, device="cuda", dtype=torch.float64)
    ref_loss, ref_dh, ref_dw = _reference(hs, ws, ht, wt, go)
    shards = [slice(0, v // 2), slice(v // 2, v)]
    ls = [hs @ ws[s].t() for s in shards]  # [t, v/2] bf16 each
    lt = [ht @ wt[s].t() for s in shards]
    stats = torch.stack(
        [_phases._run(_phase_math.phase_stats, "forward_kl", a, b, 1 / TEMP) for a, b in zip(ls, lt)]
    )
    m = stats[:, :, 0].amax(0)
    shift = m + torch.log((stats[:, :, 1] * torch.exp(stats[:, :, 0] - m)).sum(0))  # the all-gather's result
    args = (1 / TEMP, "forward_kl", 0.5, CLIP, False)
    parts = sum(
        _phases._run(_phase_math.phase_terms, "forward_kl", a, b, shift, *args) for a, b in zip(ls, lt)
    )
    assert _rel(parts[0], ref_loss) < 1e-2
    saved = torch.cat([shift, parts[1:2]])
    dh = torch.zeros(t, h, device="cuda", dtype=torch.float64)
    for s, a, b in zip(shards, ls, lt):
        g = _phases.grad_from_saved_(a, b, saved, go.float(), kind="forward_kl", beta=0.5, temperature=TEMP,
                                     clip=CLIP)  # fmt: skip
        assert _rel(g.double().t() @ hs.double(), ref_dw[s]) < 2e-2, f"dW of shard {s}"
        dh += g.double() @ ws[s].double()
    assert _rel(dh, ref_dh) < 2e-2


def test_fused_loss_peak_memory_at_anchor_shape():
    """8192 x 4096 x 151936 bf16, forward KL + clip, forward + backward: peak above the inputs."""
    from opsd_megatron.losses import fused_linear_divergence, token_mean

    hs, ws, ht, wt = _inputs(8192, 4096, 151_936, torch.bfloat16)
    hs.requires_grad_(True)
    ws.requires_grad_(True)
    for _ in range(2):  # the first run compiles the kernels
        hs.grad = ws.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        per = fused_linear_divergence(hs, ws, ht, wt, temperature=TEMP, clip=CLIP)
        token_mean(per, None, hs.shape[0]).backward()
        torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert peak <= limit("gpu_loss_mem_gib"), f"peak extra {peak:.2f} GiB > {limit('gpu_loss_mem_gib')} GiB"


@pytest.fixture(scope="module")
def single_rank_env():
    """World size 1 in this process (the trainer initialises torch.distributed), on a free port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    for k, v in env.items():
        os.environ.setdefault(k, v)


def _trainer(model_dir, out, dtype, tokenizer_dir=None):
    from opsd_megatron.config import config_from_dict
    from opsd_megatron.run.trainer import Trainer

    cfg = config_from_dict({
        "output_dir": str(out), "model": {"path": str(model_dir), "dtype": dtype},
        "data": {"path": "builtin:tiny_math", "answer_field": None},
        "rollout": {"engine": "hf", "max_new_tokens": 24},
        "loss": {"kind": "forward_kl", "clip": 0.05}, "optimizer": {"lr": 1e-4},
        "train": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 2},
        "checkpoint": {"save_interval": 0, "export_hf": False, "resume": False},
        "logging": {"progress_bar": False},
    })  # fmt: skip
    return Trainer(cfg)


def test_bf16_distributed_optimizer_step_matches_fp32(single_rank_env, tiny_qwen3_dir, tmp_path):
    tr32 = _trainer(tiny_qwen3_dir, tmp_path / "fp32", "float32")
    samples, _ = tr32.strategy.rollout(0)
    out32 = tr32.strategy.train(samples)
    tr32.close()
    tr16 = _trainer(tiny_qwen3_dir, tmp_path / "bf16", "bfloat16")
    assert tr16.state.chunks[0].ddp_config.use_distributed_optimizer, (
        "CUDA runs use the distributed optimizer"
    )
    out16 = tr16.strategy.train(samples)
    tr16.close()
    assert out16.update_ok and out32.update_ok
    l32, l16 = (o.sums["loss_sum"] / o.sums["tokens"] for o in (out32, out16))
    assert abs(l16 - l32) <= 2e-2 * abs(l32) + 1e-3, (l16, l32)
    assert abs(out16.grad_norm - out32.grad_norm) <= 5e-2 * out32.grad_norm, (out16, out32)


def test_te_layer_spec_logits_match_transformers(single_rank_env, tiny_qwen3_dir):
    from opsd_megatron.mcore.models import builder

    why = builder.te_import_error()
    if why is not None:
        pytest.skip(f"Transformer Engine does not import here: {why}")
    from transformers import AutoModelForCausalLM

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models import build_model, forward_logits

    parallel.initialize(1, 1)
    chunks = build_model(str(tiny_qwen3_dir), dtype=torch.float32, use_te=True, perform_initialization=False)
    load_hf_weights(chunks, str(tiny_qwen3_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_dir), dtype=torch.float32).cuda().eval()
    x = torch.randint(0, hf.config.vocab_size, (2, 32), device="cuda")
    with torch.no_grad():
        ref = hf(x).logits.float()
        got = forward_logits(chunks, x).float()[..., : ref.shape[-1]]
    assert _rel(got, ref) < 2e-2  # TE kernels run in TF32/fused form: bf16-class tolerance


def test_moe_on_cuda_logits_and_bf16_step(single_rank_env, tiny_models, tmp_path):
    """The tiny Qwen3-MoE on CUDA (alltoall token dispatcher; grouped GEMM when Transformer Engine imports):
    fp32 logits against transformers, then a bf16 OPSD step (distributed optimizer) against the fp32 step on
    the same rollouts, router load-balancing loss included."""
    from transformers import AutoModelForCausalLM

    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models import build_model, builder, forward_logits

    moe_dir = str(tiny_models("qwen3_moe"))
    parallel.initialize(1, 1)
    chunks = build_model(moe_dir, dtype=torch.float32, perform_initialization=False)
    load_hf_weights(chunks, moe_dir)
    hf = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).cuda().eval()
    x = torch.randint(0, hf.config.vocab_size, (2, 32), device="cuda")
    with torch.no_grad():
        ref = hf(x).logits.float()
        got = forward_logits(chunks, x).float()[..., : ref.shape[-1]]
    te = builder.te_import_error() is None  # TE: TF32 / fused kernels, bf16-class tolerance; else fp32
    assert _rel(got, ref) < (2e-2 if te else 1e-4), _rel(got, ref)
    del chunks
    from opsd_megatron.mcore.models.moe import router_loss_metrics

    tr32 = _trainer(moe_dir, tmp_path / "fp32", "float32")
    samples, _ = tr32.strategy.rollout(0)
    out32 = tr32.strategy.train(samples)
    lb32 = router_loss_metrics(4, 2).get("moe/load_balancing_loss")  # 4 layers, 2 micro-batches
    tr32.close()
    tr16 = _trainer(moe_dir, tmp_path / "bf16", "bfloat16")
    out16 = tr16.strategy.train(samples)
    lb16 = router_loss_metrics(4, 2).get("moe/load_balancing_loss")
    tr16.close()
    assert out16.update_ok and out32.update_ok
    l32, l16 = (o.sums["loss_sum"] / o.sums["tokens"] for o in (out32, out16))
    assert abs(l16 - l32) <= 2e-2 * abs(l32) + 1e-3, (l16, l32)
    assert lb32 and lb16 and abs(lb16 - lb32) <= 2e-2 * lb32, (lb16, lb32)


def test_checkpoint_save_load_with_distributed_optimizer(single_rank_env, tiny_qwen3_dir, tmp_path):
    from opsd_megatron.run.checkpointing import load_checkpoint

    tr = _trainer(tiny_qwen3_dir, tmp_path / "run", "bfloat16")
    samples, _ = tr.strategy.rollout(0)
    tr.strategy.train(samples)
    path = tr.save("test")
    params = {n: p.detach().clone() for n, p in tr.state.chunks[0].named_parameters()}
    opt = _optimizer_tensors(tr.state.optimizer)
    assert opt, "no fp32 main-parameter shards / Adam moments found in the optimizer"
    tr.strategy.train(samples)  # move away from the saved state
    assert any(not torch.equal(p, params[n]) for n, p in tr.state.chunks[0].named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(_optimizer_tensors(tr.state.optimizer), opt))
    load_checkpoint(path, tr.state.chunks, tr.state.optimizer, tr.state.scheduler, teacher=tr.state.teacher)
    for n, p in tr.state.chunks[0].named_parameters():
        assert torch.equal(p, params[n]), f"{n} differs after load"
    after = _optimizer_tensors(tr.state.optimizer)
    assert len(after) == len(opt) and all(torch.equal(a, b) for a, b in zip(after, opt))
    tr.close()


def test_offload_train_state_round_trip_is_exact(single_rank_env, tiny_qwen3_dir, tmp_path):
    from opsd_megatron.step.offload import TrainStateOffload, grad_buffers

    tr = _trainer(tiny_qwen3_dir, tmp_path / "run", "bfloat16")
    samples, _ = tr.strategy.rollout(0)
    tr.strategy.train(samples)  # optimizer state exists
    st = tr.state
    tr.strategy.forward_backward_step(*_step_inputs(tr, samples))  # fresh non-zero gradients
    buffers = grad_buffers(st.chunks)
    grads = [b.grad_data.clone() for b in buffers]
    opt = _optimizer_tensors(st.optimizer)
    assert opt and any(bool(g.abs().sum() > 0) for g in grads)
    off = TrainStateOffload(st.chunks, st.optimizer, enabled=True)
    assert off.active
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with off.during_generation():
        freed = before - torch.cuda.memory_allocated()
        assert all(b.grad_data.untyped_storage().size() == 0 for b in buffers)
        assert not any(t.is_cuda for t in _optimizer_tensors(st.optimizer)), "optimizer state left on GPU"
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    assert freed >= grad_bytes, (freed, grad_bytes)  # the gradient buffers at least (exact sizes known)
    assert all(torch.equal(b.grad_data, g) for b, g in zip(buffers, grads)), "gradients changed"
    after = _optimizer_tensors(st.optimizer)
    assert all(a.is_cuda for a in after)
    assert len(after) == len(opt) and all(torch.equal(a, b) for a, b in zip(after, opt)), "optimizer state"
    assert tr.strategy.train(samples).update_ok  # and training goes on from the restored state
    tr.close()


def _step_inputs(tr, samples):
    from opsd_megatron.step.protocol import global_tokens, pack

    mbs = pack(tr.state, samples)
    return mbs, tr.strategy.teacher_forward(mbs), global_tokens(tr.state, mbs)


def _optimizer_tensors(optimizer) -> list:
    """Copies of the distributed optimizer's fp32 main-parameter shards and Adam moments, in a fixed order."""
    out = []
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in getattr(o, "shard_fp32_from_float16_groups", []):
            out += [p.detach().clone() for p in group]
        inner = getattr(o, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            out += [v.detach().clone() for k, v in sorted(st.items()) if torch.is_tensor(v) and v.dim() > 0]
    return out


def _cp_ranks(rank, world, model_dir, use_te):
    """One rank of a CP2 forward (NCCL; Transformer Engine's context-parallel attention with `use_te`, else
    the local spec's `mcore.models.cp_attention.AllGatherCPAttention`): the final hidden states at
    response-like positions gathered with `step.context_parallel` and summed over the CP group, against
    transformers' final hidden states of the whole sequence."""
    import torch.distributed as dist
    from megatron.core import parallel_state as mps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from transformers import AutoModelForCausalLM

    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models import build_model
    from opsd_megatron.mcore.models.forward import hidden_states_forward
    from opsd_megatron.step.context_parallel import cp_local_index, gather_held, split_for_cp

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    mps.initialize_model_parallel(context_parallel_size=world)
    model_parallel_cuda_manual_seed(0)
    chunks = build_model(model_dir, torch.float32, use_te=use_te, perform_initialization=False)
    load_hf_weights(chunks, model_dir)
    g = torch.Generator().manual_seed(0)
    b, S = 2, 64
    tokens = torch.randint(3, 200, (b, S), generator=g).cuda()
    index = torch.randint(0, S, (b, 9), generator=g).cuda()
    pos = torch.arange(S, device="cuda").expand(b, S)
    cp, r = mps.get_context_parallel_world_size(), mps.get_context_parallel_rank()
    with torch.no_grad():
        out = hidden_states_forward(chunks[0].eval(), split_for_cp(tokens, cp, r), split_for_cp(pos, cp, r))
        local, held = cp_local_index(index, seq_len=S, cp=cp, rank=r)
        rows = gather_held(out.float(), local, held)  # [b, R, h]
        dist.all_reduce(rows, group=mps.get_context_parallel_group())
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
        ref = hf(tokens, output_hidden_states=True).hidden_states[-1].float()  # after the final norm
        ref = torch.gather(ref, 1, index.unsqueeze(-1).expand(b, index.shape[1], ref.shape[-1]))
    dist.destroy_process_group()
    return ((rows - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism needs 2 GPUs")
@pytest.mark.parametrize("use_te", [True, False], ids=["te", "local"])
def test_context_parallel_response_gathers_match_transformers(tiny_qwen3_dir, use_te):
    """`parallel.cp` on the real thing: Megatron's load-balanced 2xCP split through TE's context-parallel
    attention (te) or the local spec's all-gather CP attention (local), response positions gathered with
    `step.context_parallel`, against transformers. The full OPSD step at CP2 is checked on CPU
    (tests/test_step_cp.py, test_trainer.py::test_cp2_equals_cp1_on_the_same_rollouts)."""
    from dist_utils import run_distributed

    from opsd_megatron.mcore.models import builder

    why = builder.te_import_error()
    if use_te and why is not None:
        pytest.skip(f"context parallelism with Transformer Engine: Transformer Engine does not import: {why}")
    errs = run_distributed(_cp_ranks, 2, str(tiny_qwen3_dir), use_te, timeout=600)
    assert max(errs) < 2e-2, errs  # TE kernels (TF32 / fused attention): bf16-class tolerance


class _Recorder:
    """Stands in for a vLLM engine rank of TP 1 on the receiving side (the lent GPU image may have no vLLM;
    vLLM's own loading of the shards is covered on CPU by tests/test_async.py): keeps what arrives."""

    def __init__(self) -> None:
        self.got: dict[str, torch.Tensor] = {}
        self.devices: set[str] = set()

    def shard_info(self) -> tuple[int, int]:
        return (1, 0)

    def load_shards(self, named) -> dict[str, float]:
        for name, t in named:
            self.devices.add(t.device.type)
            self.got[name] = t.detach().cpu().clone()
        return {}


def _nccl_refresh(rank, world, model_dir):
    """Job rank 0: a trainer (its own 1-rank world, Megatron TP1 on cuda:0) that also computes the colocated
    refresh's targets as the reference; job rank 1: an engine rank on cuda:1 receiving over the WeightLink."""
    import torch.distributed as dist

    from opsd_megatron.rollout.link import WeightLink
    from opsd_megatron.rollout.refresh.shard_sync import ShardSyncer

    torch.cuda.set_device(rank)
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, world, True, wait_for_workers=False) if rank == 0 else None
    link = WeightLink(rank, world, timeout_s=300)
    if rank == 1:
        rec = _Recorder()
        ShardSyncer(rec, bucket_bytes=150_000, dtype=torch.float32, shard_hook=None, comm=link).sync([], rec)
        return {"backend": link.backend, "got": rec.got, "devices": sorted(rec.devices)}
    from opsd_megatron.mcore import parallel
    from opsd_megatron.mcore.conversion import load_hf_weights
    from opsd_megatron.mcore.models.builder import build_model

    os.environ["WORLD_SIZE"] = "1"  # the trainers' own world (as run.separate.narrow_world makes it)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    parallel.initialize(tp=1, pp=1, seed=1234)
    chunks = build_model(model_dir, torch.float32)
    load_hf_weights(chunks, model_dir)
    ShardSyncer(None, bucket_bytes=150_000, dtype=torch.float32, shard_hook=None, comm=link).sync(chunks)
    ref = _Recorder()  # the colocated refresh of the same model into a TP-1 engine rank: the reference
    ShardSyncer(ref, bucket_bytes=150_000, dtype=torch.float32, shard_hook=None).sync(chunks, ref)
    dist.destroy_process_group()
    del store
    return {"ref": ref.got}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the NCCL weight link needs 2 GPUs")
def test_weight_link_streams_refresh_over_nccl(tiny_qwen3_dir):
    """placement=separate's weight stream on CUDA: the link picks NCCL, the shard-exact plan's buckets go
    trainer -> engine rank as device tensors, and the engine rank receives exactly the colocated refresh's
    targets (bit-equal, fp32)."""
    from dist_utils import run_distributed

    trainer, engine = run_distributed(_nccl_refresh, 2, str(tiny_qwen3_dir), timeout=600)
    assert engine["backend"] == "nccl" and engine["devices"] == ["cuda"]
    assert engine["got"].keys() == trainer["ref"].keys() and engine["got"]
    for name, t in trainer["ref"].items():
        assert torch.equal(engine["got"][name], t), name
