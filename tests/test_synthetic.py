"""Synthetic task generator, control prompts, accuracy CIs and plots (all single-process and fast)."""

from __future__ import annotations

import json
import re

import pytest

from opsd_megatron.demo.synthetic import (
    SyntheticTaskError,
    addition_solution,
    generate,
    is_heldout,
    split_of,
    subtraction_solution,
    write_splits,
)


@pytest.mark.parametrize("task", ["addition", "subtraction"])
def test_splits_are_disjoint_unique_and_deterministic(task):
    train = generate(task, 3000, split="train", seed=1, min_digits=2, max_digits=3)
    dev = generate(task, 100, split="dev", seed=2, min_digits=2, max_digits=3)
    test = generate(task, 100, split="test", seed=2, min_digits=2, max_digits=3)
    tp, dp, sp = ({r["problem"] for r in rows} for rows in (train, dev, test))
    assert len(tp) == 3000 and len(dp) == 100 and len(sp) == 100
    assert not tp & dp and not tp & sp and not dp & sp
    for split, rows in (("dev", dev), ("test", test)):
        for r in rows[:50]:
            a, b = map(int, re.findall(r"\d+", r["problem"]))
            assert split_of(task, a, b) == split and is_heldout(task, a, b)
    assert generate(task, 5, split="train", seed=1, min_digits=2, max_digits=3) == train[:5]
    assert generate(task, 5, split="train", seed=3, min_digits=2, max_digits=3) != train[:5]


def test_worked_solutions_are_right():
    assert addition_solution(4728, 3915) == "8+5=13\n2+1+1=4\n7+9=16\n4+3+1=8\n\\boxed{8643}"
    assert subtraction_solution(52, 25) == "12-5=7\n5-1-2=2\n\\boxed{27}"
    for a, b in [(0, 0), (999, 1), (5, 12345), (100000, 99999)]:
        assert addition_solution(a, b).endswith(f"\\boxed{{{a + b}}}")
        hi, lo = max(a, b), min(a, b)
        assert subtraction_solution(hi, lo).endswith(f"\\boxed{{{hi - lo}}}")


def test_grade_marks_the_generators_own_solutions_correct():
    from opsd_megatron.evaluation import default_pool

    rows = generate("addition", 8, seed=0) + generate("subtraction", 8, split="test", seed=0)
    verdicts = default_pool().grade_many([(r["solution"], r["answer"]) for r in rows])
    assert all(v.correct for v in verdicts)
    wrong = default_pool().grade_many([(r["solution"], str(int(r["answer"]) + 1)) for r in rows[:4]])
    assert not any(v.correct for v in wrong)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(task="multiplication"), "task"),
        (dict(min_digits=0), "min_digits"),
        (dict(min_digits=4, max_digits=3), "max_digits"),
        (dict(max_digits=13), "max_digits"),
        (dict(split="heldout"), "split"),
        (dict(n=100, min_digits=1, max_digits=1), "n=100"),  # 100 one-digit pairs in all: impossible
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = dict(task="addition", n=10, min_digits=3, max_digits=4) | kwargs
    with pytest.raises(SyntheticTaskError, match=field):
        generate(args.pop("task"), args.pop("n"), **args)


def test_rows_load_as_training_data(tmp_path):
    from opsd_megatron.config import DataConfig
    from opsd_megatron.data import load_problems

    paths = write_splits(tmp_path, "addition", n_train=20, n_heldout=5)
    assert sorted(paths) == ["dev", "test", "train"]
    probs, stats = load_problems(DataConfig(path=str(paths["train"])))
    assert len(probs) == 20 and probs[0].answer and stats["skipped"] == 0
    assert len(load_problems(DataConfig(path=str(paths["test"])))[0]) == 5


def test_control_teacher_prompt_is_the_student_prompt(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from opsd_megatron.config import PromptConfig
    from opsd_megatron.data.prompts import render_pair

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    s, t = render_pair(tok, "What is 1 + 2?", "1+2=3\n\\boxed{3}", PromptConfig())
    s0, t0 = render_pair(tok, "What is 1 + 2?", "1+2=3\n\\boxed{3}", PromptConfig(), privileged=False)
    assert s0 == s and t0 == s and t != s


def test_derangement_has_no_fixed_point_and_is_deterministic():
    from opsd_megatron.data.prompts import derangement

    for n in (2, 3, 10, 4000):
        perm = derangement(n, seed=7)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
    assert derangement(50, 1) == derangement(50, 1) != derangement(50, 2)
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, 0)


def test_shuffled_and_blank_controls_keep_the_teacher_template(tiny_tokenizer_dir):
    """shuffled: teacher template + thinking switch with ANOTHER problem's solution; blank: an empty one;
    both differ from the student prompt (so the loss at θ₀ is not 0: a control that can fail)."""
    from transformers import AutoTokenizer

    from opsd_megatron.config import ConfigError, PromptConfig
    from opsd_megatron.data import Problem
    from opsd_megatron.data.prompts import fill_template, render_chat
    from opsd_megatron.rollout.collect import PromptCache

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    cfg = PromptConfig()
    rows = generate("addition", 6, seed=0)
    probs = [Problem(problem=r["problem"], solution=r["solution"], answer=r["answer"], row=i)
             for i, r in enumerate(rows)]  # fmt: skip

    def teacher(problem, solution):
        text = render_chat(
            tok, fill_template(cfg.teacher_template, problem, solution), thinking=cfg.teacher_thinking
        )
        return list(tok.encode(text, add_special_tokens=False))

    own = PromptCache(tok, probs, cfg, privileged=True, seed=3)
    shuf = PromptCache(tok, probs, cfg, privileged="shuffled", seed=3)
    blank = PromptCache(tok, probs, cfg, privileged="blank", seed=3)
    shown = []
    for i, p in enumerate(probs):
        assert own(i)[1] == teacher(p.problem, p.solution)
        assert blank(i)[1] == teacher(p.problem, "") and blank(i)[0] == own(i)[0]
        s, t = shuf(i)
        assert s == own(i)[0] and t != own(i)[1] and t != s
        j = [k for k in range(len(probs)) if t == teacher(p.problem, probs[k].solution)]
        assert len(j) == 1 and j[0] != i  # another problem's solution, never its own
        shown.append(j[0])
    assert sorted(shown) == list(range(len(probs)))  # each solution shown exactly once
    assert [shuf(i) for i in range(6)] == [PromptCache(tok, probs, cfg, privileged="shuffled", seed=3)(i)
                                          for i in range(6)]  # fmt: skip
    with pytest.raises(ConfigError, match="at least 2 training problems"):
        PromptCache(tok, probs[:1], cfg, privileged="shuffled")


def test_privileged_config_values():
    from opsd_megatron.config import ConfigError
    from opsd_megatron.config.load import apply_overrides, config_from_dict

    base = {"model": {"path": "m"}, "data": {"path": "d.jsonl"}}
    for raw, want in (("true", True), ("false", False), ("shuffled", "shuffled"), ("blank", "blank")):
        cfg = config_from_dict(apply_overrides(dict(base), [f"teacher.privileged={raw}"]))
        assert cfg.teacher.privileged == want
    with pytest.raises(ConfigError, match="'teacher.privileged'.*shuffled"):
        config_from_dict({**base, "teacher": {"privileged": "other"}})


def _write_eval(d, scores):
    d.mkdir(parents=True)
    recs = [{"benchmark": "h", "key": str(i), "sample": j, "correct": bool(c[j]), "answer": "1"}
            for i, c in enumerate(scores) for j in range(len(c))]  # fmt: skip
    (d / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (d / "summary.json").write_text("{}")


def test_paired_difference_and_plots(tmp_path):
    from opsd_megatron.evaluation.paired import accuracy_ci, paired_difference
    from opsd_megatron.observe.plots import plot_run

    run = tmp_path / "run"
    before = [[0, 0]] * 10 + [[1, 0]] * 10
    after = [[1, 0]] * 10 + [[1, 1]] * 10
    _write_eval(run / "eval" / "step_000000", before)
    _write_eval(run / "eval" / "step_000004", after)
    mean, half = accuracy_ci(run / "eval" / "step_000000")
    assert mean == pytest.approx(0.25) and 0 < half < 0.25
    d = paired_difference(run / "eval" / "step_000000", run / "eval" / "step_000004")
    assert d["diff"] == pytest.approx(0.5) and d["half"] == pytest.approx(0.0) and d["num_problems"] == 20
    rows = [
        {"step": s, "loss": 1.0 / s, "divergence": 0.5 / s, "rollout/accuracy": 0.1 * s} for s in (1, 2, 3, 4)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = plot_run(run, compare={"itself": run})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "nothing")


def test_learning_summary_refuses_evaluations_that_cannot_be_compared(tmp_path):
    """The before row must be step 0, both evaluations the same problems with the same fingerprint
    (sampling settings and seed, template, ...); `--require-gain` exits 1 when the gain's CI includes 0."""
    from opsd_megatron.observe.learning import LearningCheckError, gain_failure, learning_summary, main

    fp = {"model": "a", "n": 2, "sampling": {"temperature": 1.0, "seed": 0}, "template": "t",
          "thinking": False, "chat": True}  # fmt: skip

    def make(run, steps_scores, fps=None):
        for i, (step, scores) in enumerate(steps_scores):
            d = run / "test" / f"step_{step:06d}"
            _write_eval(d, scores)
            (d / "run_config.json").write_text(json.dumps((fps or {}).get(i, fp)))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 0.1}) + "\n")

    same = [[1, 0]] * 10 + [[0, 0]] * 10
    make(tmp_path / "ok", [(0, [[0, 0]] * 20), (4, [[1, 1]] * 20)])
    s = learning_summary(tmp_path / "ok", evals="test")
    assert s["diff"] == pytest.approx(1.0) and gain_failure(s) is None
    make(tmp_path / "flat", [(0, same), (4, same)])
    assert "includes 0" in gain_failure(learning_summary(tmp_path / "flat", evals="test"))
    assert main(["--evals", "test", "--require-gain", f"lr0={tmp_path / 'flat'}"]) == 1  # nothing learned
    assert main(["--evals", "test", "--require-gain", f"OPSD={tmp_path / 'ok'}"]) == 0
    make(tmp_path / "late", [(2, same), (4, same)])
    with pytest.raises(LearningCheckError, match="is step 2, not step 0"):
        learning_summary(tmp_path / "late", evals="test")
    make(tmp_path / "fewer", [(0, same), (4, same[:-1])])
    with pytest.raises(LearningCheckError, match="different problems"):
        learning_summary(tmp_path / "fewer", evals="test")
    other = {**fp, "sampling": {"temperature": 1.0, "seed": 1}}
    make(tmp_path / "seed", [(0, same), (4, same)], fps={1: other})
    with pytest.raises(LearningCheckError, match="different settings: sampling"):
        learning_summary(tmp_path / "seed", evals="test")
    make(tmp_path / "tmpl", [(0, same), (4, same)], fps={1: {**fp, "template": "u"}})
    with pytest.raises(LearningCheckError, match="template"):
        learning_summary(tmp_path / "tmpl", evals="test")
    assert main(["--evals", "test", f"x={tmp_path / 'tmpl'}"]) == 2
