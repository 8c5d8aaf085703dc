"""Benchmark of the self-distillation loss over the LM head: time and peak extra memory, a table with ratios
to baselines measured in the same run, and pass/fail thresholds (docs/performance.md; exit 1 on a miss or if
our own kernel raises; Liger's absence is only reported).

    .venv/bin/python benchmarks/bench_loss.py     # CPU check (2 threads): time at 1024 x 256 x 32768 and
                                                  # peak memory at 4096 x 256 x 32768, fp32
    python3 benchmarks/bench_loss.py              # GPU (auto): 8192 x 4096 x 151936 bf16 (the anchor shape)
    python3 benchmarks/bench_loss.py --tokens 2048 --vocab 32000 --hidden 512   # any other shape
    .venv/bin/python benchmarks/bench_loss.py --smoke   # tiny CPU shapes, in one process, thresholds not
                                                        # enforced (make test: tests/test_benchmarks_smoke.py)

CPU thresholds: fused time <= 1.5x the 4 plain GEMMs, fused peak extra memory <= 0.05x naive autograd.
GPU thresholds: fused time <= 1.15x the 4 GEMMs, fused peak extra memory <= 2.5 GiB (benchmarks/thresholds.py;
OPSD_THRESHOLD_SCALE=0.01 shows a failing run). A baseline row that a threshold is measured against (floor,
naive; on the GPU every row but Liger when liger-kernel is not installed) that errors fails the run: a ratio
that cannot be formed is a failure, not a skip.

Timed work (as docs/performance.md): student forward + teacher forward + backward to the student hidden states
and the LM-head weight; forward KL KL(p_T || p_S), temperature 1.1, pointwise clip 0.05 unless the row says
otherwise. Variants: `floor` = the 4 plain GEMMs of these shapes (arithmetic floor), `naive` = full [T, V]
fp32 log-softmax in PyTorch, `liger` = Liger-Kernel's LigerFusedLinearJSD(jsd_beta=0) (no clip; GPU, when
importable), `unfused` = ours on full logits, `fused` = ours from hidden states (`fused_linear_divergence`).
GPU: CUDA events, median of 5 after 2 warm-ups (the first warm-up compiles the Triton kernels), peak =
max_memory_allocated above the inputs. CPU: time = median of `--repeat` rounds after one warm-up, all timed
variants in ONE process taking turns (floor, naive, fused, floor, ...: load from other processes hits all
alike); memory = one run per variant in its own fresh process, peak RSS above the RSS after building inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from thresholds import check  # noqa: E402

TEMPERATURE, CLIP = 1.1, 0.05
OURS = "ours fused, clip"


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hs = rnd(n, h)
    ws = rnd(v, h, scale=2.0 / h**0.5)
    ht = (hs.float() + rnd(n, h, scale=0.3).float()).to(dtype)
    wt = (ws.float() + rnd(v, h, scale=0.5 / h**0.5).float()).to(dtype)
    return hs.requires_grad_(True), ws.requires_grad_(True), ht, wt


def run_floor(hs, ws, ht, wt):
    with torch.no_grad():
        ls = hs @ ws.t()  # (T, V): the student logits, reused as their own gradient stand-in
        lt = ht @ wt.t()
        gh = ls @ ws
        gw = ls.t() @ hs
    return (lt[0, 0] + gh[0, 0] + gw[0, 0]).float()


def run_naive(hs, ws, ht, wt, clip=CLIP):
    ls = (hs @ ws.t()).float() / TEMPERATURE
    with torch.no_grad():
        lpt = torch.log_softmax((ht @ wt.t()).float() / TEMPERATURE, -1)
    terms = lpt.exp() * (lpt - torch.log_softmax(ls, -1))
    if clip is not None:
        terms = terms.clamp(max=clip)
    loss = terms.sum() / hs.shape[0]
    loss.backward()
    return loss.detach()


def run_liger(hs, ws, ht, wt):
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)(hs, ws, ht, wt, None)
    loss.backward()
    return loss.detach()


def run_unfused(hs, ws, ht, wt, clip=CLIP):
    from opsd_megatron.losses import token_mean, vocab_parallel_divergence

    with torch.no_grad():
        lt = ht @ wt.t()
    per_tok = vocab_parallel_divergence(
        hs @ ws.t(), lt, kind="forward_kl", temperature=TEMPERATURE, clip=clip
    )
    loss = token_mean(per_tok, None, hs.shape[0])
    loss.backward()
    return loss.detach()


def run_fused(hs, ws, ht, wt, clip=CLIP, kind="forward_kl"):
    from opsd_megatron.losses import fused_linear_divergence, token_mean

    per_tok = fused_linear_divergence(hs, ws, ht, wt, kind=kind, beta=0.5, temperature=TEMPERATURE, clip=clip)
    loss = token_mean(per_tok, None, hs.shape[0])
    loss.backward()
    return loss.detach()


VARIANTS = {
    "floor (4 GEMMs)": run_floor,
    "naive, clip": run_naive,
    "naive, no clip": lambda *a: run_naive(*a, clip=None),
    "liger jsd_beta=0 (no clip)": run_liger,
    "ours unfused, clip": run_unfused,
    "ours fused, clip": run_fused,
    "ours fused, no clip": lambda *a: run_fused(*a, clip=None),
    "ours fused, reverse KL clip": lambda *a: run_fused(*a, kind="reverse_kl"),
    "ours fused, JSD(0.5) clip": lambda *a: run_fused(*a, kind="jsd"),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_grads(inp) -> None:
    for x in inp[:2]:
        x.grad = None


def measure_cpu_memory(name, n, h, v):
    """In this (fresh) process: one run of `name`; peak RSS above the inputs (GiB) and the loss."""
    inp = make_inputs(n, h, v, torch.float32, "cpu")
    base = _rss_bytes()
    val = VARIANTS[name](*inp)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"gib": max(peak - base, 0) / 2**30, "loss": float(val)}


def measure_cpu_times(names, n, h, v, repeat):
    """In this process: the variants take turns, one warm-up round then `repeat` rounds; median ms each."""
    inp = make_inputs(n, h, v, torch.float32, "cpu")
    times = {k: [] for k in names}
    out = {}
    for i in range(repeat + 1):
        for name in names:
            _reset_grads(inp)
            t0 = time.perf_counter()
            try:
                val = VARIANTS[name](*inp)
            except Exception as e:  # reported as this row's error
                out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
                continue
            if i:
                times[name].append(time.perf_counter() - t0)
            out[name] = {"loss": float(val)}
    for name in names:
        if times[name]:
            out[name]["ms"] = 1e3 * statistics.median(times[name])
    return out


def measure_gpu(name, inp, warmup=2, repeat=5):
    times, val = [], None
    torch.cuda.synchronize()
    for i in range(warmup + repeat):
        _reset_grads(inp)
        torch.cuda.synchronize()
        if i == warmup:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        val = VARIANTS[name](*inp)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated() - base
    _reset_grads(inp)
    return {"ms": statistics.median(times), "gib": peak / 2**30, "loss": float(val)}


def _fmt(x, spec):
    return format(x, spec) if x is not None else f"{'-':>{spec.split('.')[0]}}"


def print_table(title, rows):
    """One row per variant: ms, x floor, x naive, x liger (time), peak GiB, x naive (memory), loss."""
    ref = {k: rows.get(k, {}) for k in ("floor (4 GEMMs)", "naive, clip", "liger jsd_beta=0 (no clip)")}
    print(f"\n{title}")
    hdr = f"{'variant':<30} {'time ms':>9} {'x floor':>8} {'x naive':>8} {'x liger':>8} {'peak GiB':>9}"
    hdr += f" {'mem x naive':>11} {'loss':>10}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<30} error: {r['error']}")
            continue
        ms, gib = r.get("ms"), r.get("gib")
        t_ratios = [ms / x["ms"] if ms and x.get("ms") else None for x in ref.values()]
        naive_gib = ref["naive, clip"].get("gib")
        m_ratio = gib / naive_gib if gib is not None and naive_gib else None
        loss = "-" if name.startswith("floor") else f"{r['loss']:10.6f}"
        print(
            f"{name:<30} {_fmt(ms, '9.1f')} " + " ".join(_fmt(x, "8.2f") for x in t_ratios)
            + f" {_fmt(gib, '9.3f')} {_fmt(m_ratio, '11.3f')} {loss:>10}"
        )  # fmt: skip


def _child(args, mode, name):
    if args.smoke:  # smoke: in this process (the numbers mean nothing at tiny shapes; the code paths run)
        n, h, v = args.tokens_mem if mode == "mem" else args.tokens_time, args.hidden, args.vocab
        try:
            if mode == "mem":
                return measure_cpu_memory(name, n, h, v)
            return measure_cpu_times(name.split(";"), n, h, v, args.repeat)
        except Exception as e:
            return {"error": f"{type(e).__name__}: {e}"}
    cmd = [sys.executable, __file__, "--device", "cpu", "--hidden", str(args.hidden or 256)]
    cmd += ["--tokens", str(args.tokens_mem if mode == "mem" else args.tokens_time)]
    cmd += ["--vocab", str(args.vocab or 32768), "--repeat", str(args.repeat), "--_child", f"{mode}:{name}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:100]}


def cpu_check(args) -> list[str]:
    """The CPU targets: time at --tokens-time, peak memory at --tokens-mem; returns the missed checks."""
    h, v = args.hidden or 256, args.vocab or 32768
    failures: list[str] = []
    timed = ["floor (4 GEMMs)", "naive, clip", OURS]
    rows = _child(args, "time", ";".join(timed))
    print(f"  timed: {rows}", file=sys.stderr, flush=True)
    title = (
        f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}: {args.tokens_time} x {h} x {v}"
    )
    print_table(title + f" fp32, time (median of {args.repeat}, variants taking turns)", rows)
    mem = {}
    for name in ("naive, clip", OURS):
        mem[name] = _child(args, "mem", name)
        print(f"  memory {name}: {mem[name]}", file=sys.stderr, flush=True)
    print_table(f"CPU: {args.tokens_mem} x {h} x {v} fp32, peak RSS above the inputs (one run each)", mem)
    failures += row_errors(rows, timed) + row_errors(mem, list(mem))
    if "error" in rows:  # the timing process itself failed
        failures.append(f"timed variants: {rows['error']}")
    floor, ours = rows.get("floor (4 GEMMs)", {}).get("ms"), rows.get(OURS, {}).get("ms")
    naive, ours_m = mem.get("naive, clip", {}).get("gib"), mem.get(OURS, {}).get("gib")
    if args.smoke:  # tiny shapes: the ratios are printed, not held against the thresholds
        print(f"smoke: thresholds not enforced (time x floor {_ratio(ours, floor)}, memory x naive "
              f"{_ratio(ours_m, naive)})")  # fmt: skip
    elif floor and ours and naive and ours_m is not None:
        print(f"time   {OURS} / floor = {check('cpu_loss_time_x_floor', ours / floor, failures)}")
        print(f"memory {OURS} / naive = {check('cpu_loss_mem_x_naive', ours_m / naive, failures)}")
    elif not failures:
        failures.append(f"no ratio: floor {floor} ms, ours {ours} ms, naive {naive} GiB, ours {ours_m} GiB")
    return failures


def _ratio(a, b) -> str:
    return f"{a / b:.3f}" if a is not None and b else "-"


def row_errors(rows: dict, names: list[str]) -> list[str]:
    """A failure for each of `names` whose row errored or is missing: ours or a baseline, all the same (a
    ratio against an errored baseline cannot be formed, so the run fails instead of skipping the check).
    Only Liger's absence (liger-kernel not installed) is a reported skip."""
    out = []
    for name in names:
        err = rows.get(name, {"error": "no result"}).get("error")
        absent = name.startswith("liger") and str(err).startswith(("ModuleNotFoundError", "ImportError"))
        if err is None or absent:
            continue
        out.append(f"{name} raised: {err}")
    return out


def gpu_check(args, names) -> list[str]:
    n, h, v = args.tokens or 8192, args.hidden or 4096, args.vocab or 151_936
    failures: list[str] = []
    inp = make_inputs(n, h, v, torch.bfloat16, "cuda")
    rows = {}
    for name in names:
        try:
            rows[name] = measure_gpu(name, inp)
        except Exception as e:  # the row's error; a failure below unless liger-kernel is not installed
            if isinstance(e, torch.cuda.OutOfMemoryError) and name.startswith("ours"):
                raise
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
            _reset_grads(inp)
            torch.cuda.empty_cache()
        print(f"  done {name}: {rows[name]}", file=sys.stderr, flush=True)
    dev = torch.cuda.get_device_name()
    title = f"GPU {dev}, torch {torch.__version__}: {n} tokens x {h} hidden x {v} vocab, bf16"
    print_table(title + f", T={TEMPERATURE}, clip {CLIP} where stated", rows)
    failures += row_errors(rows, names)
    from opsd_megatron.losses import _phases

    status = _phases.compiled_status()
    print(f"phases: {status}")
    if status["failed"]:  # a kernel that raised was logged and replaced: our kernel errored
        failures.append(f"fast loss phases fell back: {status['failed']}")
    floor, ours = rows.get("floor (4 GEMMs)", {}).get("ms"), rows.get(OURS, {}).get("ms")
    if floor and ours:
        print(f"time   {OURS} / floor = {check('gpu_loss_time_x_floor', ours / floor, failures)}")
        print(f"memory {OURS} GiB     = {check('gpu_loss_mem_gib', rows[OURS]['gib'], failures)}")
    elif OURS in names and "floor (4 GEMMs)" in names and not failures:
        failures.append(f"no ratio: floor {floor} ms, ours {ours} ms")
    return failures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--tokens", type=int, help="GPU tokens (default 8192)")
    ap.add_argument("--tokens-time", type=int, default=1024, help="CPU timed shape's tokens")
    ap.add_argument("--tokens-mem", type=int, default=4096, help="CPU memory shape's tokens")
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--threads", type=int, default=2, help="CPU intra-op threads")
    ap.add_argument("--repeat", type=int, default=3, help="CPU timed rounds (GPU: 5)")
    ap.add_argument("--variants", help="GPU: semicolon-separated subset of the variant names")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU shapes in one process, thresholds off")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smoke:
        args.device, args.tokens_time, args.tokens_mem, args.hidden, args.vocab = "cpu", 64, 64, 32, 1024
        args.repeat = 1
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if not cuda:
        torch.set_num_threads(args.threads)
    if args._child:  # CPU: measurements in a fresh process
        mode, names = args._child.split(":", 1)
        n, h, v = args.tokens, args.hidden, args.vocab
        if mode == "mem":
            print(json.dumps(measure_cpu_memory(names, n, h, v)))
        else:
            print(json.dumps(measure_cpu_times(names.split(";"), n, h, v, args.repeat)))
        return 0
    if cuda:
        names = args.variants.split(";") if args.variants else [k for k in VARIANTS if "unfused" not in k]
        failures = gpu_check(args, names)
    else:
        failures = cpu_check(args)
    print("FAIL: " + "; ".join(failures) if failures else "PASS")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
