"""Run an evaluation: render prompts, generate n samples per problem, grade, write, resume, summarise.

    from opsd_megatron.evaluation.runner import evaluate
    summary = evaluate(engine, tokenizer, ["aime24=/data/aime24.jsonl"], n=12,
                       sampling=SamplingConfig(temperature=1.0, top_p=0.95, max_new_tokens=38912),
                       out_dir="runs/eval/step100", thinking=True)

`engine` is any `opsd_megatron.rollout.RolloutEngine` (the trainer passes its own colocated engine after a
weight sync; `opsd-eval` builds one with `make_engine`). Problems are generated in chunks of `chunk_size`
prompts; after each chunk the samples are graded (`GraderPool`, parallel worker processes) and appended to
`out_dir/generations.jsonl` (one line per sample, flushed and fsynced per chunk). Re-running with the same
`out_dir` skips every problem whose n samples are already there (a torn last line from a crash is dropped),
so a preempted evaluation resumes where it stopped. The settings that change results (n, sampling, prompt,
thinking, model and `model_hash`, a hash of the model directory's weight files' names, sizes and mtimes)
are kept in `out_dir/run_config.json`; resuming with different ones (e.g. the weights in the same --model
directory changed) is an error unless `overwrite=True`, and a resume is announced with what was reused.
At the end `out_dir/summary.json` holds per-benchmark and overall metrics (see `metrics`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from opsd_megatron.data.prompts import ANSWER_INSTRUCTION, fill_template, render_chat
from opsd_megatron.evaluation.benchmarks import Benchmark, EvalItem, load_benchmark
from opsd_megatron.evaluation.grader import DEFAULT_TIMEOUT_S, GraderPool
from opsd_megatron.evaluation.report import format_table, write_json_atomic
from opsd_megatron.evaluation.scores import SampleVerdict, benchmark_metrics, overall_metrics
from opsd_megatron.rollout.base import RolloutEngine, SamplingConfig
from opsd_megatron.rollout.placement import eval_request_seed

logger = logging.getLogger(__name__)

EVAL_TEMPLATE = "Problem: {problem}\n\n" + ANSWER_INSTRUCTION
"""Default evaluation user turn: the paper's instruction, as in the student's training prompt."""
GENERATIONS = "generations.jsonl"
SUMMARY = "summary.json"
RUN_CONFIG = "run_config.json"
_RECORD_FIELDS = ("benchmark", "key", "sample", "correct", "answer")


def render_prompt_ids(
    tokenizer: Any,
    problem: str,
    *,
    template: str = EVAL_TEMPLATE,
    thinking: bool = True,
    chat: bool = True,
    solution: str | None = None,
) -> list[int]:
    """Prompt token ids of one problem: `{problem}` (and `{solution}`: the teacher's template, `opsd-eval
    --privileged`) filled in, then the chat template (`enable_thinking`)."""
    text = fill_template(template, problem, solution)
    if chat:
        text = render_chat(tokenizer, text, thinking=thinking)
    return list(tokenizer.encode(text, add_special_tokens=False))


def longest_prompt(tokenizer: Any, items: Any, **render: Any) -> tuple[int, str | None]:
    """(token count, key) of the longest rendered prompt among benchmark `items` ((0, None) when empty);
    `render`: `render_prompt_ids`'s keywords."""
    best: tuple[int, str | None] = (0, None)
    for item in items:
        n = len(render_prompt_ids(tokenizer, item.problem, solution=item.solution, **render))
        if n > best[0]:
            best = (n, item.key)
    return best


def _load_finished(path: Path, n: int) -> dict[tuple[str, str], list[dict]]:
    """Complete problems already in `path`: (benchmark, key) -> its n records sorted by sample index.

    Lines that do not parse (a write torn by a crash) and problems with fewer than n samples are dropped
    and the file is rewritten without them, so later appends never follow half a line.
    """
    if not path.exists():
        return {}
    groups: dict[tuple[str, str], dict[int, dict]] = {}
    kept_lines = bad = 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or any(k not in rec for k in _RECORD_FIELDS):
                    raise ValueError
            except ValueError:
                bad += 1
                continue
            groups.setdefault((rec["benchmark"], rec["key"]), {})[int(rec["sample"])] = rec
            kept_lines += 1
    done = {g: [recs[i] for i in range(n)] for g, recs in groups.items() if set(recs) == set(range(n))}
    if bad or len(done) != len(groups):
        logger.warning(
            "%s: dropping %d unreadable line(s) and %d incomplete problem(s) before resuming",
            path,
            bad,
            len(groups) - len(done),
        )
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for recs in done.values():
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        os.replace(tmp, path)
    return done


def _check_run_config(out_dir: Path, fingerprint: dict, overwrite: bool) -> None:
    path = out_dir / RUN_CONFIG
    if path.exists() and not overwrite:
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in fingerprint if k in old and old[k] != fingerprint[k]]
        if diff:
            k = diff[0]
            if k == "model_hash":
                raise ValueError(
                    f"out_dir {str(out_dir)!r} holds results of other weights: the model files changed since "
                    f"they were generated (hash {old[k]} -> {fingerprint[k]}); use another out_dir, or "
                    "overwrite=True (--overwrite) to evaluate again."
                )
            raise ValueError(
                f"out_dir {str(out_dir)!r} holds an evaluation with {k}={old[k]!r}, this one has "
                f"{k}={fingerprint[k]!r}; use another out_dir, or overwrite=True (--overwrite) to restart."
            )
    if overwrite:
        (out_dir / GENERATIONS).unlink(missing_ok=True)
        (out_dir / SUMMARY).unlink(missing_ok=True)
    write_json_atomic(path, fingerprint)


def _summarise(benchmarks: list[Benchmark], done: dict, n: int) -> dict:
    per: dict[str, dict] = {}
    for b in benchmarks:
        groups = [done[(b.name, it.key)] for it in b.items if (b.name, it.key) in done]
        m = benchmark_metrics([[SampleVerdict(r["correct"], r["answer"]) for r in g] for g in groups])
        recs = [r for g in groups for r in g]
        if recs:
            m["no_answer_rate"] = sum(r["answer"] is None for r in recs) / len(recs)
            m["truncated_rate"] = sum(r.get("finish_reason") == "length" for r in recs) / len(recs)
            m["timeout_rate"] = sum(r.get("status") == "timeout" for r in recs) / len(recs)
            m["mean_response_tokens"] = sum(r.get("num_tokens", 0) for r in recs) / len(recs)
        per[b.name] = m
    return {"n": n, "benchmarks": per, "overall": overall_metrics(per)}


def evaluate(
    engine: RolloutEngine | Callable[[], RolloutEngine],
    tokenizer: Any,
    benchmarks: Sequence[Benchmark | str],
    n: int,
    sampling: SamplingConfig,
    out_dir: str | Path,
    *,
    template: str = EVAL_TEMPLATE,
    thinking: bool = True,
    chat: bool = True,
    chunk_size: int = 64,
    grader_timeout_s: float = DEFAULT_TIMEOUT_S,
    grader_workers: int | None = None,
    grader: GraderPool | None = None,
    model_name: str | None = None,
    overwrite: bool = False,
    model_hash: str | None = None,
) -> dict:
    """Evaluate `engine` on `benchmarks` with `n` samples per problem; returns the summary dict.

    Args:
        engine: a RolloutEngine (weights already loaded), or a zero-argument factory called only when
            some problem still needs samples (a fully resumed run then starts no engine at all).
        tokenizer: the model's HF tokenizer (chat template, encode/decode).
        benchmarks: loaded `Benchmark`s or specs for `load_benchmark` ("aime24=FILE", "FILE", ...).
        n: samples per problem (overrides `sampling.n`).
        sampling: temperature, top-p/k, min-p, max new tokens, seed.
        out_dir: generations.jsonl / summary.json / run_config.json live here; reused to resume.
        template: user turn with `{problem}`; thinking: `enable_thinking` of the chat template;
        chat: False sends the filled template as raw text (base models).
        chunk_size: prompts per `engine.generate` call (= resume granularity).
        grader_timeout_s: per-answer math-verify wall-clock limit (also applied to a passed-in `grader`);
        grader_workers: worker processes of the pool made here when `grader` is None;
        grader: an existing pool to reuse (the trainer keeps one across evaluations).
        model_name: recorded in run_config.json and checked on resume.
        model_hash: content hash of the weights (`evaluation.model.model_fingerprint`); checked on resume.
        overwrite: discard earlier results in `out_dir` instead of resuming.

    Returns:
        {"n", "benchmarks": {name: metrics}, "overall": metrics, "num_generated", "num_resumed",
         "seconds", "out_dir"}; metrics as in `opsd_megatron.evaluation.scores` plus no_answer_rate,
        truncated_rate, timeout_rate and mean_response_tokens.
    """
    if n < 1:
        raise ValueError(f"n (samples per problem) must be >= 1, got {n}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    t0 = time.monotonic()
    benches = _load_benchmarks(benchmarks)
    sampling = replace(sampling, n=n)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(model_name, model_hash, sampling, template, thinking, chat)
    _check_run_config(out, fingerprint, overwrite)
    gen_path = out / GENERATIONS
    done = _load_finished(gen_path, n)
    todo = _pending(benches, done, n, out)
    render = dict(template=template, thinking=thinking, chat=chat)

    if todo and not hasattr(engine, "generate"):
        engine = engine()
    own_pool = grader is None
    pool = grader or GraderPool(num_workers=grader_workers, timeout_s=grader_timeout_s)
    try:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start : start + chunk_size]
            records = _generate_and_grade(engine, tokenizer, chunk, sampling, pool, grader_timeout_s, render)
            done.update(records)
            _append_records(gen_path, [r for recs in records.values() for r in recs])
            logger.info(
                "evaluation: %d / %d problems generated (%.0f s)",
                start + len(chunk), len(todo), time.monotonic() - t0,
            )  # fmt: skip
    finally:
        if own_pool:
            pool.close()
    total = sum(len(b.items) for b in benches)
    return _write_summary(
        benches, done, n, out, num_generated=len(todo), num_resumed=total - len(todo), t0=t0
    )


def _load_benchmarks(benchmarks: Sequence[Benchmark | str]) -> list[Benchmark]:
    """The `Benchmark`s (specs loaded with `load_benchmark`); their names must be distinct."""
    benches = [b if isinstance(b, Benchmark) else load_benchmark(b) for b in benchmarks]
    names = [b.name for b in benches]
    if len(set(names)) != len(names):
        raise ValueError(f"benchmark names must be distinct, got {names}.")
    return benches


def _fingerprint(model_name, model_hash, sampling: SamplingConfig, template: str, thinking: bool, chat: bool):
    """The settings that change results (kept in run_config.json), in the JSON form they are stored in
    (lists, not tuples), so that a resume compares like with like."""
    fingerprint = {
        "model": model_name,
        "model_hash": model_hash,
        "n": sampling.n,
        "sampling": {k: v for k, v in asdict(sampling).items() if k != "n"},
        "template": template,
        "thinking": thinking,
        "chat": chat,
    }
    return json.loads(json.dumps(fingerprint))


def _pending(benches: list[Benchmark], done: dict, n: int, out: Path) -> list[tuple[Benchmark, EvalItem]]:
    """The problems still without their n samples, in benchmark order (a resume is announced)."""
    todo = [(b, it) for b in benches for it in b.items if (b.name, it.key) not in done]
    total = sum(len(b.items) for b in benches)
    if total - len(todo):
        logger.warning(
            "resuming: %d of %d problems already done in %s (same model files and sampling settings); "
            "--overwrite starts over", total - len(todo), total, out,
        )  # fmt: skip
    logger.info("evaluation: %d problems x %d samples, %d to generate", total, n, len(todo))
    return todo


def _generate_and_grade(
    engine: RolloutEngine,
    tokenizer: Any,
    chunk: list[tuple[Benchmark, EvalItem]],
    sampling: SamplingConfig,
    pool: GraderPool,
    timeout_s: float,
    render: dict,
) -> dict[tuple[str, str], list[dict]]:
    """Generate `sampling.n` samples for each problem of `chunk` and grade them:
    (benchmark, key) -> the problem's n records (the lines of generations.jsonl).

    One request per (problem, sample), seeded `eval_request_seed(sampling.seed, "bench/key", sample)`: a
    sample does not depend on which other requests share its batch, engine or chunk (with
    `sampling.seed` None the requests are unseeded)."""
    n = sampling.n
    prompts = [render_prompt_ids(tokenizer, it.problem, solution=it.solution, **render) for _, it in chunk]
    seeds = None
    if sampling.seed is not None:
        seeds = [
            eval_request_seed(sampling.seed, f"{b.name}/{it.key}", s) for b, it in chunk for s in range(n)
        ]
    outs = engine.generate([p for p in prompts for _ in range(n)], replace(sampling, n=1), seeds=seeds)
    if len(outs) != len(chunk) * n or any(len(o) != 1 for o in outs):
        raise RuntimeError(
            f"rollout engine returned {[len(o) for o in outs]} samples for {len(chunk) * n} requests; "
            "expected 1 per request."
        )
    samples = [o[0] for o in outs]  # request j * n + s: sample s of problem j
    texts = [tokenizer.decode(x.token_ids, skip_special_tokens=True) for x in samples]
    refs = [it.answer for _, it in chunk for _ in range(n)]
    grades = pool.grade_many(list(zip(texts, refs)), timeout_s=timeout_s)
    records = {}
    for j, (b, it) in enumerate(chunk):
        recs = []
        for s in range(n):
            g, sample = grades[j * n + s], samples[j * n + s]
            recs.append({
                "benchmark": b.name, "key": it.key, "sample": s, "problem": it.problem,
                "reference": it.answer, "response": texts[j * n + s], "answer": g.answer,
                "correct": g.correct, "status": g.status, "finish_reason": sample.finish_reason,
                "num_tokens": len(sample.token_ids),
            })  # fmt: skip
        records[(b.name, it.key)] = recs
    return records


def _append_records(path: Path, records: list[dict]) -> None:
    """Append one JSON line per record to `path`, flushed and fsynced (the resume point)."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def _write_summary(
    benches, done: dict, n: int, out: Path, *, num_generated: int, num_resumed: int, t0: float
):
    """Summarise, write `out/summary.json`, log the per-benchmark Avg@n; returns the summary."""
    summary = _summarise(benches, done, n)
    summary.update(
        num_generated=num_generated,
        num_resumed=num_resumed,
        seconds=time.monotonic() - t0,
        out_dir=str(out),
    )
    write_json_atomic(out / SUMMARY, summary)
    logger.info(
        "evaluation done in %.0f s: %s",
        summary["seconds"],
        ", ".join(
            f"{k} avg@{n}={100 * m.get(f'avg@{n}', 0.0):.1f}%" for k, m in summary["benchmarks"].items()
        ),
    )
    logger.debug("evaluation results (%%):\n%s", format_table(summary))
    return summary
