"""Synthetic reasoning tasks with worked solutions: small enough to learn on a CPU, graded like real data.

    rows = generate("addition", n=2000, split="train", seed=0, min_digits=3, max_digits=4)
    # [{"problem": "What is 4728 + 3915?", "solution": "8+5=13\\n2+1+1=4\\n...", "answer": "8643"}]
    write_splits("runs/task", "addition", n_train=4000, n_heldout=200)   # train, dev, test .jsonl

Rows have the fields of real data (problem, solution, answer), so `load_problems`, the prompts, `grade()` and
`opsd-eval` serve them unchanged. Tasks (`TASKS`):

* "addition": a + b with `min_digits..max_digits` digits each. The solution adds column by column from the
  right, one line per column with the incoming carry as a third term ("9+9+1=19"), then `\\boxed{sum}`.
* "subtraction": a - b with a >= b, column by column; a borrow is a leading 1 ("12-5=7"), repaid in the
  next column ("5-1-2=2").

Three splits that never overlap: train (to learn from), dev (to choose settings: the demo's periodic
evaluation) and test (reported, never used to choose anything: the before/after table). A problem's split is a
pure function of its operands (a hash, `split_of`), so no split can ever draw another's problem, whatever the
seeds and sizes. Within a split problems are unique. The train split is what it was when there was one
"heldout" split (dev and test share the hash range that split had).
An unknown task, impossible digits, or more problems than the split can hold raise `SyntheticTaskError`
naming the argument.

    python -m opsd_megatron.demo.synthetic OUT_DIR --task addition --n-train 4000 --n-heldout 200
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path

SPLITS = ("train", "dev", "test")
MAX_DIGITS = 12
HELDOUT_FRACTION = 0.1
"""Share of the problem space reserved for dev + test (by operand hash); half of it each."""


class SyntheticTaskError(ValueError):
    """A bad argument to the synthetic task generator (message names the argument)."""


def _digits(n: int) -> list[int]:
    """Decimal digits of n >= 0, least significant first."""
    return [int(c) for c in reversed(str(n))]


def addition_solution(a: int, b: int) -> str:
    """Worked column addition of a + b (a, b >= 0): one line per column from the right, the carry in as a
    third term ("9+9+1=19"), then `\\boxed{a+b}`."""
    da, db = _digits(a), _digits(b)
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    lines.append(f"\\boxed{{{a + b}}}")
    return "\n".join(lines)


def subtraction_solution(a: int, b: int) -> str:
    """Worked column subtraction of a - b (a >= b >= 0): one line per column from the right, a borrow shown
    as a leading 1 ("12-5=7") and repaid in the next column ("5-1-2=2"), then `\\boxed{a-b}`."""
    da, db = _digits(a), _digits(b)
    lines, borrow = [], 0
    for i in range(len(da)):
        y = db[i] if i < len(db) else 0
        x = da[i] - borrow
        head = f"{da[i]}-1" if borrow else f"{da[i]}"
        borrow = int(x < y)
        lines.append(("1" if borrow else "") + f"{head}-{y}={x + 10 * borrow - y}")
    lines.append(f"\\boxed{{{a - b}}}")
    return "\n".join(lines)


def _addition(a: int, b: int) -> dict:
    return {"problem": f"What is {a} + {b}?", "solution": addition_solution(a, b), "answer": str(a + b)}


def _subtraction(a: int, b: int) -> dict:
    a, b = max(a, b), min(a, b)
    return {"problem": f"What is {a} - {b}?", "solution": subtraction_solution(a, b), "answer": str(a - b)}


TASKS: dict[str, Callable[[int, int], dict]] = {"addition": _addition, "subtraction": _subtraction}
"""Task name -> row builder from two operands."""


def split_of(task: str, a: int, b: int) -> str:
    """The split ("train", "dev" or "test") of the problem (task, a, b): a pure function of the operands."""
    if task == "subtraction":
        a, b = max(a, b), min(a, b)
    u = int.from_bytes(hashlib.sha1(f"{task}:{a}:{b}".encode()).digest()[:8], "big") / 2**64
    return "train" if u >= HELDOUT_FRACTION else ("dev" if u < HELDOUT_FRACTION / 2 else "test")


def is_heldout(task: str, a: int, b: int) -> bool:
    """Whether the problem (task, a, b) is outside the train split (dev or test)."""
    return split_of(task, a, b) != "train"


def check_args(task: str, n: int, split: str, min_digits: int, max_digits: int) -> None:
    """Raise `SyntheticTaskError` naming the argument that makes the request impossible."""
    if task not in TASKS:
        raise SyntheticTaskError(f"task {task!r} is unknown; expected one of {', '.join(sorted(TASKS))}.")
    if split not in SPLITS:
        raise SyntheticTaskError(f"split {split!r} is unknown; expected one of {', '.join(SPLITS)}.")
    if not 1 <= min_digits <= MAX_DIGITS:
        raise SyntheticTaskError(f"min_digits must be in [1, {MAX_DIGITS}], got {min_digits}.")
    if not min_digits <= max_digits <= MAX_DIGITS:
        raise SyntheticTaskError(
            f"max_digits must be in [min_digits={min_digits}, {MAX_DIGITS}], got {max_digits}."
        )
    if n < 1:
        raise SyntheticTaskError(f"n must be >= 1, got {n}.")
    lo = 0 if min_digits == 1 else 10 ** (min_digits - 1)
    space = (10**max_digits - lo) ** 2
    share = 1 - HELDOUT_FRACTION if split == "train" else HELDOUT_FRACTION / 2
    # Ask for at most a quarter of the expected split size, so rejection sampling ends quickly.
    if n > share * space / 4:
        raise SyntheticTaskError(
            f"n={n} {split} problems is more than {min_digits}-{max_digits} digit operands allow "
            f"(about {int(share * space)} distinct problems in this split; ask for at most a quarter)."
        )


def generate(
    task: str, n: int, *, split: str = "train", seed: int = 0, min_digits: int = 3, max_digits: int = 4
) -> list[dict]:
    """`n` distinct rows {problem, solution, answer} of `split`; deterministic in all arguments.

    Each operand's digit count is uniform in [min_digits, max_digits], then the operand uniform among numbers
    with that many digits.
    """
    check_args(task, n, split, min_digits, max_digits)
    rng = random.Random(f"{task}/{split}/{seed}/{min_digits}/{max_digits}")
    make = TASKS[task]

    def operand() -> int:
        d = rng.randint(min_digits, max_digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    seen: set[tuple[int, int]] = set()
    rows: list[dict] = []
    while len(rows) < n:
        a, b = operand(), operand()
        key = (max(a, b), min(a, b)) if task == "subtraction" else (a, b)
        if key in seen or split_of(task, a, b) != split:
            continue
        seen.add(key)
        rows.append(make(a, b))
    return rows


def write_splits(
    out_dir: str | Path,
    task: str,
    *,
    n_train: int,
    n_heldout: int,
    seed: int = 0,
    min_digits: int = 3,
    max_digits: int = 4,
) -> dict[str, Path]:
    """Write `train.jsonl` (n_train rows), `dev.jsonl` and `test.jsonl` (n_heldout rows each) to `out_dir`;
    returns {split: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train", n_train), ("dev", n_heldout), ("test", n_heldout)):
        rows = generate(task, n, split=split, seed=seed, min_digits=min_digits, max_digits=max_digits)
        p = out / f"{split}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths[split] = p
    return paths


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write train/dev/test splits of a synthetic task as jsonl.")
    ap.add_argument("out_dir")
    ap.add_argument("--task", default="addition")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-heldout", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-digits", type=int, default=3)
    ap.add_argument("--max-digits", type=int, default=4)
    a = ap.parse_args(argv)
    try:
        paths = write_splits(a.out_dir, a.task, n_train=a.n_train, n_heldout=a.n_heldout, seed=a.seed,
                             min_digits=a.min_digits, max_digits=a.max_digits)  # fmt: skip
    except SyntheticTaskError as e:
        raise SystemExit(f"synthetic: {e}") from None
    for split, p in paths.items():
        print(f"{split}: {p}")


if __name__ == "__main__":
    main()
