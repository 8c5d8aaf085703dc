"""Megatron distributed checkpoints of a training run: model, optimizer, LR schedule, RNG, data position.

    save_checkpoint(ckpt_root, step, chunks, optimizer, scheduler, reason="interval")
    step = load_checkpoint(path, chunks, optimizer, scheduler)       # path from latest_checkpoint(ckpt_root)

Layout: `<ckpt_root>/step_000006/` is a Megatron `dist_checkpointing` directory (reshardable model and
optimizer tensors, per-rank RNG states as ShardedObjects) plus `opsd_state.json` (step, reason, time); with
LoRA the model part is the adapters only (their optimizer state likewise) and `lora_base.json` references
the frozen base (model.path + content hash; a resume on a changed base is refused, `check_lora_base`);
`<ckpt_root>/latest` names the newest COMPLETE checkpoint and is written by rank 0 after a barrier that
follows every rank's save: a run killed mid-save leaves `latest` pointing at the previous one. The data
position is the step itself (the prompt order is a pure function of (seed, step), see `data.sampler`).
The parallel layout (tp, pp, cp, dp, ep, etp) is recorded in the common state (`layout`): a resume at another
layout loads model, optimizer, EMA teacher, scheduler and step resharded, but not the per-rank RNG states
(keyed by layout; logged once); checkpoints saved before the record resume only at their own layout.
Collectives: the ones of `dist_checkpointing.save/load` over the world group, plus barriers.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import random
import signal
import time
from functools import partial
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from opsd_megatron.mcore import patches
from opsd_megatron.mcore.lora import adapter_sharded_state_dict, has_lora
from opsd_megatron.mcore.models.builder import unwrap
from opsd_megatron.run.checkpoint_index import (
    BASE_FILE,
    CHECKSUMS,
    CONFIG_FILE,
    CheckpointError,
    base_problem,
    base_reference,
    checkpoint_problem,
    choose_resume,
    file_checksums,
    file_manifest,
    prune_checkpoints,
)
from opsd_megatron.run.checkpoint_writer import PENDING, write_sharded
from opsd_megatron.run.lifeline import die_with_parent, parent_lifeline

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "opsd_state.json"
LAYOUT = "layout"
"""Common-state key of the parallel layout a checkpoint was saved at (`_layout()`)."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete (verified) checkpoint under `root`, or None; see `checkpoint_index`."""
    return choose_resume(root).path


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _layout() -> dict[str, int]:
    """This rank's parallel layout (sizes): what a checkpoint records under `layout`."""
    from megatron.core import parallel_state as mps

    return {
        "tp": mps.get_tensor_model_parallel_world_size(),
        "pp": mps.get_pipeline_model_parallel_world_size(),
        "cp": mps.get_context_parallel_world_size(),
        "dp": mps.get_data_parallel_world_size(),
        "ep": mps.get_expert_model_parallel_world_size(),
        "etp": mps.get_expert_tensor_parallel_world_size(),
    }


def _layout_text(layout: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in layout.items())


def _ema(teacher: Any) -> Any:
    """The teacher when it is an EMA teacher (the only one that changes during training; θ₀ is rebuilt)."""
    return teacher if teacher is not None and getattr(teacher, "mode", "") == "ema" else None


def _sharded_state_dict(
    chunks: list,
    optimizer: Any,
    *,
    is_loading: bool,
    rng: dict | None,
    teacher: Any = None,
    legacy: bool = False,
    with_rng: bool = True,
) -> dict:
    """Model (adapters only with LoRA), optimizer, RNG and the EMA teacher's running average: sharded
    tensors with the weights' sharding under `ema_teacher.` (+ `ema_teacher_meta` in common.pt). `legacy`:
    the EMA teacher as the per-rank pickled object of checkpoints saved before (loading only). `with_rng`
    False: without the per-rank RNG states (a load at another layout than the save's)."""
    from megatron.core import parallel_state as mps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd: dict = {}
    lean = has_lora(chunks)  # LoRA: the adapters only; the frozen base is referenced (lora_base.json)
    for i, chunk in enumerate(chunks):
        m = unwrap(chunk)
        model_sd[f"model{i}" if len(chunks) > 1 else "model"] = (
            adapter_sharded_state_dict(m) if lean else m.sharded_state_dict()
        )
    flat_model = {}
    for v in model_sd.values():
        flat_model.update(v)
    sd: dict = dict(model_sd)
    sd["optimizer"] = optimizer.sharded_state_dict(flat_model, is_loading=is_loading)
    pp, tp, dp = (  # dp: DP x CP (every rank its own RNG state; the same as DP at parallel.cp 1)
        mps.get_pipeline_model_parallel_world_size(),
        mps.get_tensor_model_parallel_world_size(),
        mps.get_data_parallel_world_size(with_context_parallel=True),
    )
    ranks = (
        mps.get_pipeline_model_parallel_rank(),
        mps.get_tensor_model_parallel_rank(),
        mps.get_data_parallel_rank(with_context_parallel=True),
    )
    if with_rng:
        sd["rng_state"] = ShardedObject("rng_state", rng, (pp, tp, dp), ranks, replica_id=0)
    if _ema(teacher) is not None and legacy:
        sd["teacher_state"] = ShardedObject("teacher_state", None, (pp, tp, dp), ranks, replica_id=0)
    elif _ema(teacher) is not None:
        sd["ema_teacher"] = teacher.sharded_state_dict()
        sd["ema_teacher_meta"] = {"mode": "ema", "decay": teacher.decay}
    return sd


def _start_writer_manager_shielded() -> None:
    """Start Megatron's checkpoint-writer manager process with SIGTERM/SIGUSR1 ignored.

    `dist_checkpointing.save` lazily starts a multiprocessing Manager that inherits the default SIGTERM
    action. On preemption SLURM signals the whole process tree, the Manager dies, and the save-on-signal
    fails with BrokenPipeError/EOFError, losing the step. Started here with both signals ignored, it outlives
    the signal long enough for the trainer's grace-period save, and it dies with its trainer process
    (`opsd_megatron.run.lifeline`). When Megatron's internals moved, the patch registry
    (`opsd_megatron.mcore.patches`)
    warns once and this is a no-op.
    """
    found = patches.target("megatron.checkpoint_writer_queue")
    if found is None or patches.target("megatron.checkpoint_writer_queue_state") is None:
        return
    fa = found[0]
    if fa._results_queue is not None:
        return
    sigs = [s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None), signal.SIGINT) if s is not None]
    try:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in sigs}
    except ValueError:  # not the main thread: nothing to shield
        return
    try:
        # Megatron's `_get_write_results_queue` (0.19: `get_write_results_queue`) with one change: the
        # Manager dies with this process (`opsd_megatron.run.lifeline`), so a SIGKILLed trainer leaves no
        # orphan that ignores SIGTERM.
        manager = SyncManager(ctx=mp.get_context("spawn"))
        manager.start(initializer=die_with_parent, initargs=parent_lifeline())
        fa._results_queue = manager.Queue()  # the queue proxy keeps the manager alive
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def save_checkpoint(
    root: str | Path,
    step: int,
    chunks: list,
    optimizer: Any,
    scheduler: Any,
    *,
    teacher: Any = None,
    reason: str = "interval",
    config: dict | None = None,
    keep_last: int | None = None,
    async_save: bool = False,
) -> Path:
    """Save everything needed to resume after `step` completed optimizer steps; returns the directory.

    `config` (the run's config as a dict) is stored as `config.yaml` in the directory, so a resumed run can
    list what changed and `opsd-convert`/`opsd-eval` can rebuild the model from the checkpoint alone.
    `opsd_state.json`, written last, records every file's size and CRC-32 (checked by `checkpoint_index`).
    The checksums are computed by rank 0 after the barrier that follows every rank's save: Megatron's
    writer decides which rank writes which `.distcp` file, and rank 0 already lists every file for the
    sizes, so this needs no extra collective (cost ~0.5 s per GB, see `checkpoint_index.file_checksum`).
    Then rank 0 removes the checkpoints `keep_last` (default: `checkpoint.keep_last` of `config`; None
    keeps all) does not keep (`checkpoint_index.prune_checkpoints`).

    `async_save`: return once the tensors are handed to a forked writer (`run.checkpoint_writer`); the
    directory becomes complete (opsd_state.json, `latest`, pruning) at a later `poll_saves()` /
    `wait_for_saves()` after every rank's writer finished. A save first waits for the previous one."""
    t0 = time.perf_counter()
    wait_for_saves()
    _start_writer_manager_shielded()
    path = step_dir(root, step)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / STATE_FILE).unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
    sd = _sharded_state_dict(chunks, optimizer, is_loading=False, rng=_rng_state(), teacher=teacher)
    sd["scheduler"] = scheduler.state_dict()
    sd["step"] = step
    sd[LAYOUT] = _layout()
    request = write_sharded(sd, str(path), async_save=async_save)
    if keep_last is None:
        keep_last = ((config or {}).get("checkpoint") or {}).get("keep_last")
    base = ((config or {}).get("model") or {}).get("path") if has_lora(chunks) else None
    if rank == 0 and base is not None:  # hashed once per process (cached); then ~free
        (path / BASE_FILE).write_text(json.dumps(base_reference(base)))
    finish = partial(_finish_save, root, path, step, reason, config, keep_last, t0)
    if request is None:
        finish()
    else:
        PENDING.schedule(request, finish, str(path))
        log.debug(
            "checkpoint %s: async write started, training blocked %.2f s", path, time.perf_counter() - t0
        )
    return path


def _finish_save(
    root: str | Path,
    path: Path,
    step: int,
    reason: str,
    config: dict | None,
    keep_last: int | None,
    t0: float,
) -> None:
    """After every rank's files are written (collective): rank 0 writes config.yaml, then opsd_state.json
    (sizes, CRC-32s) last, moves `latest` and prunes."""
    if dist.is_initialized():
        dist.barrier()
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        if config is not None:
            import yaml

            (path / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        state = {"step": step, "reason": reason, "time": time.time(), "save_s": time.perf_counter() - t0}
        state["files"] = file_manifest(path)
        t1 = time.perf_counter()
        state[CHECKSUMS] = file_checksums(path)
        state["checksum_s"] = time.perf_counter() - t1
        tmp_state = path / (STATE_FILE + ".tmp")
        tmp_state.write_text(json.dumps(state))
        tmp_state.replace(path / STATE_FILE)
        tmp = Path(root) / (LATEST + ".tmp")
        tmp.write_text(path.name)
        tmp.replace(Path(root) / LATEST)
        if keep_last is not None:
            prune_checkpoints(root, keep_last, path)
    if dist.is_initialized():
        dist.barrier()
    level = logging.DEBUG if reason == "interval" else logging.INFO  # one console line per step
    log.log(level, "saved checkpoint %s (%s) in %.1f s", path, reason, time.perf_counter() - t0)


def poll_saves() -> None:
    """Complete an async save whose writers all finished (collective when one is pending; call every step)."""
    PENDING.poll()


def wait_for_saves() -> None:
    """Block until the async save in flight, if any, is complete (collective when one is pending)."""
    PENDING.wait()


def abandon_saves() -> None:
    """Error path (not collective): kill an unfinished async writer; its directory stays incomplete."""
    PENDING.abandon()


def mark_reason(path: str | Path, reason: str) -> None:
    """Rewrite the `reason` recorded in a complete checkpoint's opsd_state.json (rank 0; atomic). Waits for
    an async save in flight first (collective then)."""
    wait_for_saves()
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    p = Path(path) / STATE_FILE
    state = json.loads(p.read_text())
    state["reason"] = reason
    tmp = p.with_name(STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(p)
    log.info("checkpoint %s (%s): the stop request came after this step's save", path, reason)


def check_lora_base(path: Path, chunks: list, base_model: str | Path | None) -> None:
    """A LoRA checkpoint resumes only on the base it was trained on: rank 0 hashes `base_model` and every
    rank raises the same CheckpointError when it differs from the checkpoint's `lora_base.json`."""
    if base_model is None or not has_lora(chunks):
        return
    problem = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        problem[0] = base_problem(path, base_model)
    if dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be resumed: {problem[0]}.")


def load_checkpoint(
    path: str | Path,
    chunks: list,
    optimizer: Any,
    scheduler: Any,
    *,
    teacher: Any = None,
    base_model: str | Path | None = None,
) -> int:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; returns its step. With LoRA only
    the adapters are read (the base comes from `base_model`, checked against the checkpoint's reference).
    Saved at another parallel layout (its recorded `layout`): everything but the RNG states, resharded by
    Megatron (the optimizer's `fully_sharded_model_space` / per-parameter format reshards over TP, PP and
    DP), and rank 0 logs once that the RNG states were not restored; a failure names both layouts."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    problem = checkpoint_problem(path, checksums=False)  # preflight chose it with checksums (every rank)
    if problem is not None:
        raise CheckpointError(f"checkpoint {str(path)!r} cannot be loaded: {problem}.")
    check_lora_base(path, chunks, base_model)
    reshard, saved, current = False, {}, _layout()
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
        legacy = "ema_teacher_meta" not in common  # saved before the EMA teacher was sharded
        saved = common.get(LAYOUT)  # None: saved before layouts were recorded (then same-layout only)
        reshard = saved is not None and saved != current
        sd = _sharded_state_dict(chunks, optimizer, is_loading=True, rng=None, teacher=teacher, legacy=legacy,
                                 with_rng=not reshard)  # fmt: skip
        sd.pop("ema_teacher_meta", None)
        state = dist_checkpointing.load(sd, str(path))
    except Exception as e:  # a damage the size checks cannot see (garbled bytes, mismatched shapes)
        if reshard:
            where = f" saved at layout {_layout_text(saved)}, loaded at {_layout_text(current)};"
        elif saved is None:  # older checkpoints: the RNG states are keyed by the layout they were saved at
            where = " it records no parallel layout (older): resume it at the parallel.* it was saved with;"
        else:
            where = ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be loaded ({type(e).__name__}: {e});{where} remove it to "
            "resume from the previous one, or name another with checkpoint.load."
        ) from e
    for i, chunk in enumerate(chunks):
        unwrap(chunk).load_state_dict(
            state[f"model{i}" if len(chunks) > 1 else "model"], strict=not has_lora(chunks)
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if reshard:
        _log_rng_not_restored(path, saved, current)
    else:
        _set_rng_state(state["rng_state"])
    if "teacher_state" in state:
        teacher.load_state_dict(state["teacher_state"])
    elif "ema_teacher" in state:
        teacher.load_sharded(state["ema_teacher"], decay=common["ema_teacher_meta"]["decay"])
    return int(common["step"])


def _log_rng_not_restored(path: Path, saved: dict, current: dict) -> None:
    """Rank 0, once per load: a resume at another layout keeps the RNG states this run seeded."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    differ = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v)
    log.warning(
        "checkpoint %s was saved at another parallel layout (%s): model, optimizer, EMA teacher, scheduler "
        "and data position were restored resharded; the per-rank RNG states were NOT (they are kept per "
        "(pp, tp, dp x cp) rank), so sampling and dropout streams differ from an uninterrupted run.",
        path,
        differ,
    )
