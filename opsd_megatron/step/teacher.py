"""Which weights play the OPSD teacher: one small interface, four modes.

    teacher = make_teacher(cfg.teacher.mode, student_chunks, build_fn, ema_decay=0.999, offload=False)
    with teacher.forward_context() as chunks:   # model chunks for the teacher forward (eval mode, no grad)
        logits = forward(chunks, teacher_batch)
    optimizer.step(); teacher.after_optimizer_step()
    ckpt["teacher"] = teacher.state_dict()      # this rank's local shards; load_state_dict() on resume
    sd["ema_teacher"] = ema.sharded_state_dict()  # EMA: sharded tensors (reshardable); load_sharded()

Modes
* "frozen"       a separate, non-trainable copy of the student's weights at creation (θ₀; full fine-tuning).
                 `build_fn()` must build this rank's chunks with the student's architecture and parallel
                 layout (e.g. `lambda: build_model(hf_dir, dtype, perform_initialization=False)`); the
                 student's (LoRA-merged) local shards are copied in. `offload=True` keeps the copy on CPU
                 between uses (moved to the student's device inside `forward_context`; a no-op on CPU).
                 With LoRA on the student, "frozen" means "adapters_off" (same weights, no copy).
* "adapters_off" the student's own chunks with every LoRA adapter skipped: the base model θ₀, zero extra
                 weight memory. Needs `opsd_megatron.mcore.lora.apply_lora` first.
* "ema"          a copy updated after each optimizer step: θ_T ← d·θ_T + (1−d)·θ_S (θ_S LoRA-merged).
                 The running average is kept in fp32 (a separate shadow when the model is bf16/fp16, since
                 (1−d)·Δ with d = 0.999 is below bf16 resolution) and cast into the teacher's weights.
* "current"      the student's own weights ("dynamic" teacher), no grad.

Everything is per rank on local shards: a teacher shard lines up with the student shard of the same name,
so no mode needs a collective. On resume, build the teacher as usual, then `load_state_dict` (a frozen
teacher must come back as θ₀, not as a copy of the resumed student).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from opsd_megatron.config import TeacherConfig, choices
from opsd_megatron.mcore.lora import adapters_disabled, has_lora, merged_named_parameters
from opsd_megatron.mcore.lora.api import copy_named_tensors
from opsd_megatron.mcore.models.builder import unwrap

log = logging.getLogger(__name__)

TEACHER_MODES = choices(TeacherConfig, "mode")


@contextlib.contextmanager
def _eval_no_grad(chunks: list[nn.Module]) -> Iterator[list[nn.Module]]:
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()  # no dropout (LoRA's included) in the teacher's scores
    try:
        with torch.no_grad():
            yield chunks
    finally:
        for c, m in zip(chunks, modes):
            c.train(m)


class Teacher:
    """Base: the interface the trainer uses. `chunks` are the model chunks the teacher runs."""

    mode: str = ""

    def __init__(self, student_chunks: list[nn.Module]):
        self.student_chunks = list(student_chunks)

    def forward_context(self) -> contextlib.AbstractContextManager[list[nn.Module]]:
        """`with teacher.forward_context() as chunks:` — chunks in eval mode under torch.no_grad()."""
        return _eval_no_grad(self.student_chunks)

    def after_optimizer_step(self) -> None:
        """Call once after every optimizer step (EMA update; nothing for the other modes)."""

    def state_dict(self) -> dict:
        return {"mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(
                f"teacher checkpoint has mode {state.get('mode')!r}, this run uses {self.mode!r}."
            )


class CurrentTeacher(Teacher):
    """The student's current weights, no grad (reported unstable in the paper; a baseline)."""

    mode = "current"


class AdaptersOffTeacher(Teacher):
    """The student with its LoRA adapters skipped = the frozen base model, with no copy."""

    mode = "adapters_off"

    def __init__(self, student_chunks: list[nn.Module]):
        super().__init__(student_chunks)
        if not has_lora(self.student_chunks):
            raise ValueError("teacher.mode=adapters_off needs LoRA on the student (lora.enabled: true).")

    @contextlib.contextmanager
    def forward_context(self):
        with adapters_disabled(self.student_chunks), _eval_no_grad(self.student_chunks) as chunks:
            yield chunks


class CopyTeacher(Teacher):
    """A separate, non-trainable set of chunks initialised from the student's (merged) weights."""

    mode = "frozen"

    def __init__(self, student_chunks: list[nn.Module], build_fn: Callable[[], list], offload: bool = False):
        super().__init__(student_chunks)
        self.teacher_chunks = list(build_fn())
        if len(self.teacher_chunks) != len(self.student_chunks):
            raise ValueError(
                f"teacher build_fn returned {len(self.teacher_chunks)} chunks, the student has "
                f"{len(self.student_chunks)}."
            )
        self._params: list[dict[str, torch.nn.Parameter]] = []
        for ci, (t, s) in enumerate(zip(self.teacher_chunks, self.student_chunks)):
            tp = dict(unwrap(t).named_parameters())
            sp = dict(merged_named_parameters(unwrap(s)))
            if tp.keys() != sp.keys():
                diff = sorted(set(tp) ^ set(sp))
                raise ValueError(f"teacher chunk {ci} does not match the student's parameters: {diff[:4]}.")
            for n, p in tp.items():
                if p.shape != sp[n].shape:
                    raise ValueError(
                        f"teacher parameter {n} has shape {tuple(p.shape)}, the student's is "
                        f"{tuple(sp[n].shape)}: build_fn must use the student's parallel layout."
                    )
                with torch.no_grad():
                    p.copy_(sp[n])
                p.requires_grad_(False)
            t.eval()
            self._params.append(tp)
        self.device = next(self.student_chunks[0].parameters()).device
        self.offload = offload and self.device.type != "cpu"
        if self.offload:
            self._move(torch.device("cpu"))

    def named_teacher_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for ci, params in enumerate(self._params):
            for n, p in params.items():
                yield f"{ci}.{n}", p

    def _move(self, device: torch.device) -> None:
        for c in self.teacher_chunks:
            for t in list(c.parameters()) + list(c.buffers()):
                t.data = t.data.to(device, non_blocking=True)

    @contextlib.contextmanager
    def forward_context(self):
        if self.offload:
            self._move(self.device)
        try:
            with _eval_no_grad(self.teacher_chunks) as chunks:
                yield chunks
        finally:
            if self.offload:
                self._move(torch.device("cpu"))

    def state_dict(self) -> dict:
        return {"mode": self.mode, "params": {n: p.detach() for n, p in self.named_teacher_parameters()}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        copy_named_tensors(dict(self.named_teacher_parameters()), state["params"], "teacher checkpoint")


class EMATeacher(CopyTeacher):
    """θ_T ← d·θ_T + (1−d)·θ_S after every optimizer step, accumulated in fp32."""

    mode = "ema"

    def __init__(self, student_chunks, build_fn, decay: float = 0.999, offload: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"teacher.ema_decay must be in (0, 1), got {decay}.")
        self.decay = decay
        super().__init__(student_chunks, build_fn, offload=offload)
        # fp32 running average: the teacher weights themselves when fp32, else a separate shadow
        self.shadow = {
            n: (p.data if p.dtype == torch.float32 else p.detach().float().clone())
            for n, p in self.named_teacher_parameters()
        }

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        d = self.decay
        for ci, s in enumerate(self.student_chunks):
            for n, w in merged_named_parameters(unwrap(s)):
                key = f"{ci}.{n}"
                shadow = self.shadow[key]
                shadow.mul_(d).add_(w.to(shadow.device, torch.float32), alpha=1.0 - d)
                p = self._params[ci][n]
                if p.data is not shadow:
                    p.copy_(shadow)

    def state_dict(self) -> dict:
        return {"mode": self.mode, "decay": self.decay, "params": dict(self.shadow)}

    def sharded_state_dict(self, prefix: str = "ema_teacher.") -> dict:
        """The fp32 running average as Megatron sharded tensors keyed `<prefix><the model's key>`, with the
        teacher's (= the student's) sharding, so a distributed checkpoint reshards it across TP/PP like the
        weights (one copy in the checkpoint, not one per DP rank). The entries hold the shadow tensors
        themselves (no copy); after a `dist_checkpointing.load`, `load_sharded` copies the loaded ones in.
        No collective."""
        out = {}
        for ci, chunk in enumerate(self.teacher_chunks):
            by_ptr = {p.data_ptr(): self.shadow[f"{ci}.{n}"] for n, p in self._params[ci].items()}
            for key, sh in unwrap(chunk).sharded_state_dict(prefix=prefix).items():
                data = getattr(sh, "data", None)
                if isinstance(data, torch.Tensor) and data.data_ptr() in by_ptr:
                    shadow = by_ptr.pop(data.data_ptr())
                    extra = {"dtype": shadow.dtype} if hasattr(sh, "dtype") else {}
                    out[key] = dataclasses.replace(sh, data=shadow, **extra)
            if by_ptr:
                raise RuntimeError(f"EMA teacher chunk {ci}: {len(by_ptr)} parameters have no sharded entry.")
        return out

    @torch.no_grad()
    def load_sharded(self, loaded: dict, decay: float, prefix: str = "ema_teacher.") -> None:
        """Take the running average from `loaded` (`dist_checkpointing.load` of `sharded_state_dict()`)."""
        if decay != self.decay:
            log.info(
                "teacher.ema_decay is %s; the checkpoint's EMA teacher was built with %s", self.decay, decay
            )
        targets = self.sharded_state_dict(prefix)
        copy_named_tensors({k: v.data for k, v in targets.items()}, loaded, "EMA teacher checkpoint")
        for key, shadow in self.shadow.items():
            ci, n = key.split(".", 1)
            p = self._params[int(ci)][n]
            if p.data is not shadow:
                p.copy_(shadow)

    def load_state_dict(self, state: dict) -> None:
        Teacher.load_state_dict(self, state)
        copy_named_tensors(self.shadow, state["params"], "EMA teacher checkpoint")
        for key, shadow in self.shadow.items():
            ci, n = key.split(".", 1)
            p = self._params[int(ci)][n]
            if p.data is not shadow:
                with torch.no_grad():
                    p.copy_(shadow)


def make_teacher(
    mode: str,
    student_chunks: list[nn.Module],
    build_fn: Callable[[], list] | None = None,
    *,
    ema_decay: float = 0.999,
    offload: bool = False,
) -> Teacher:
    """The teacher for `mode` (see the module docstring). `build_fn` is needed by "frozen" (without LoRA)
    and "ema"; it must build chunks with the student's architecture and parallel layout (no LoRA)."""
    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher.mode must be one of {list(TEACHER_MODES)}, got {mode!r}.")
    lora = has_lora(student_chunks)
    if mode == "frozen" and lora:
        log.info("teacher.mode=frozen with LoRA: using the adapters-off base model (no weight copy).")
        mode = "adapters_off"
    if mode == "current":
        return CurrentTeacher(student_chunks)
    if mode == "adapters_off":
        return AdaptersOffTeacher(student_chunks)
    if build_fn is None:
        raise ValueError(f"teacher.mode={mode} needs build_fn to build the teacher's copy of the model.")
    if mode == "frozen":
        return CopyTeacher(student_chunks, build_fn, offload=offload)
    return EMATeacher(student_chunks, build_fn, decay=ema_decay, offload=offload)
