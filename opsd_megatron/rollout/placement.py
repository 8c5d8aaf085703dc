"""Which ranks form which rollout engine, which prompts each engine samples, and with which seeds.

    pl = EnginePlacement(world_size=4, rank=3, engine_tp=2)   # engines {0,1} and {2,3}
    pl.engine, pl.engine_rank, pl.num_engines                   # 1, 1, 2
    lo, hi = pl.prompt_share(8)                                 # this engine's global prompts [4, 8)
    seeds = [request_seed(cfg_seed, step, i) for i in range(lo, hi)]

Engines are formed from consecutive ranks (vLLM's `external_launcher` lays the world out that way): engine
e = ranks [e·T, (e+1)·T) for engine TP T, world / T engines. The step's global batch of prompts is cut into
`num_engines` contiguous shares (engine e gets [n·e/E, n·(e+1)/E)); every rank of one engine generates the
same share with the same per-request seeds. Responses are then gathered over the world in global prompt
order and each data-parallel replica takes its contiguous slice (`opsd_megatron.data.PromptSampler`), so the
placement of engines is independent of the Megatron TP × PP × DP layout.

Seeds: `request_seed(seed, step, i)` is a pure function of (run seed, step, global prompt index i), so
(a) two copies of one prompt in a step are sampled independently, (b) the samples do not depend on how many
engines there are nor on which engine got the prompt, and (c) a resumed run samples exactly what the
uninterrupted run did. `eval_request_seed(seed, name, sample)` is the evaluation's counterpart: a pure
function of (eval seed, problem name = "benchmark/key", sample index), one request per sample, so evaluation
metrics depend neither on the number of engines nor on the chunk size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a bijective 64-bit mix (nearby inputs give unrelated outputs)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def request_seed(seed: int, step: int, prompt_index: int) -> int:
    """Sampling seed of one request: global prompt `prompt_index` (0-based position in the step's global
    batch) at optimizer step `step` of a run seeded `seed`. In [0, 2**31 - 1) (vLLM's seed range)."""
    h = _mix64(_mix64(_mix64(seed & _MASK64) ^ (step & _MASK64)) ^ (prompt_index & _MASK64))
    return h % (2**31 - 1)


def eval_request_seed(seed: int, name: str, sample: int) -> int:
    """Sampling seed of sample `sample` of evaluation problem `name` ("benchmark/key") under eval seed `seed`.
    The name enters through blake2b (stable across processes and Python versions, unlike `hash()`); in
    [0, 2**31 - 1) like `request_seed`."""
    key = int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")
    h = _mix64(_mix64(_mix64(seed & _MASK64) ^ key) ^ (sample & _MASK64))
    return h % (2**31 - 1)


@dataclass(frozen=True)
class EnginePlacement:
    """The rollout layout seen from one rank."""

    world_size: int
    rank: int
    engine_tp: int

    def __post_init__(self) -> None:
        if self.engine_tp < 1 or self.world_size % self.engine_tp != 0:
            raise ValueError(
                f"engine tensor-parallel size {self.engine_tp} does not divide the world size "
                f"{self.world_size}."
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}.")

    @property
    def num_engines(self) -> int:
        """Engine replicas in the world (world / engine TP)."""
        return self.world_size // self.engine_tp

    @property
    def engine(self) -> int:
        """Index of this rank's engine."""
        return self.rank // self.engine_tp

    @property
    def engine_rank(self) -> int:
        """This rank's position inside its engine (vLLM TP rank)."""
        return self.rank % self.engine_tp

    @property
    def is_leader(self) -> bool:
        """The first rank of an engine: it grades and publishes the engine's responses."""
        return self.engine_rank == 0

    def engine_ranks(self, engine: int | None = None) -> list[int]:
        """Global ranks of `engine` (default: this rank's)."""
        e = self.engine if engine is None else engine
        return list(range(e * self.engine_tp, (e + 1) * self.engine_tp))

    def prompt_share(self, n: int, engine: int | None = None) -> tuple[int, int]:
        """[lo, hi) of the `n` global prompts that `engine` (default: this rank's) generates."""
        e = self.engine if engine is None else engine
        return n * e // self.num_engines, n * (e + 1) // self.num_engines

    def request_share(self, n: int, engine: int | None = None, num_engines: int | None = None) -> range:
        """The requests of `n` that `engine` (default: this rank's) generates in a spread evaluation
        (`rollout.engine_group`): e, e + E, e + 2E, ... over E = `num_engines` (default all) engines; strided,
        so every engine gets a like mix of problems and so of response lengths."""
        e = self.engine if engine is None else engine
        return range(e, n, self.num_engines if num_engines is None else num_engines)
