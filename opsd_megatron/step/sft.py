"""Supervised fine-tuning (SFT) on the reference solutions: the warm start before self-distillation.

    opsd-train examples/synthetic_sft.yaml                      # a config with `algorithm: sft`
    torchrun --nproc-per-node 2 -m opsd_megatron.train examples/synthetic_sft.yaml parallel.tp=2

Same Megatron stack, data, prompts, batching, checkpoints, metrics and HF export as OPSD
(`opsd_megatron.run.trainer.OPSDTrainer`, which `SFTTrainer` extends); only the step differs and no rollout
engine or teacher copy is built. Each problem of the step's batch gives one sequence per `sft.formats` entry:

* "student": student prompt (problem only) ‖ reference solution ‖ EOS;
* "teacher": teacher prompt (problem + reference solution) ‖ reference solution ‖ EOS.

The packed sequences reuse `opsd_megatron.step.batch.pack_step` with the reference solution in the place of
the
sampled response, so `student_index[j]` is the position predicting `response_ids[:, j]`. Loss: token-mean
cross-entropy over the response tokens (prompt and padding excluded): the last stage stops before the LM
head (`models.forward.hidden_states_forward`), keeps the response positions' hidden states [b, R, h] and
multiplies them with its LM-head shard into vocab-parallel logits [b, R, v/tp] (never [b, S, v]), then
Megatron's `vocab_parallel_cross_entropy`
(all-reduces max, target logit and sum-exp over the TP group); padded vocabulary entries are masked out.
Normalised by the GLOBAL number of response tokens, as OPSD's loss (see the trainer docstring).

Metrics per step: `loss` (mean cross-entropy per response token), `response_tokens`, `grad_norm`, `lr`,
`epoch`, `time/step_s`, `throughput/response_tokens_per_s`.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from opsd_megatron.run.trainer import OPSDTrainer
from opsd_megatron.run.watchdog import ends_job_on_error
from opsd_megatron.step.batch import MicroBatch, Sample, gather_positions, pack_step


def masked_vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, vocab_size: int | None, tp_group=None
) -> torch.Tensor:
    """Per-position cross-entropy of vocab-parallel `logits` [..., v/tp] against global ids `target` [...].

    Entries at global index >= `vocab_size` (Megatron's vocabulary padding) are excluded from the softmax.
    Collectives: three all-reduces over the tensor-parallel group (inside Megatron's function).
    """
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from opsd_megatron.losses._math import shard_layout

    _, n_valid = shard_layout(logits.shape[-1], tp_group, vocab_size, None)
    if n_valid < logits.shape[-1]:
        valid = torch.arange(logits.shape[-1], device=logits.device) < n_valid
        logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    else:
        logits = logits.clone()  # Megatron's function subtracts the max in place
    return vocab_parallel_cross_entropy(logits, target)


class SFTTrainer(OPSDTrainer):
    """`algorithm: sft`: cross-entropy on the reference solutions, no rollouts, no teacher copy."""

    def _make_teacher(self, chunks: list):
        from opsd_megatron.step.teacher import make_teacher

        return make_teacher("current", chunks)  # never used for SFT; no weight copy

    def _setup_engine(self) -> None:
        self.engine = None  # SFT samples nothing

    def sync_weights(self) -> dict[str, float]:
        return {}

    def sft_samples(self, step: int) -> list[Sample]:
        """This replica's sequences of `step`: per problem, one per `sft.formats` entry (prompt ‖ solution ‖
        EOS)."""
        eos = self.tokenizer.eos_token_id
        out = []
        for i in self.sampler.replica_slice(step, self.ps.dp_rank, self.dp):
            s, t = self._prompts(i)  # checked against prompts.max_prompt_tokens
            sol = self.tokenizer.encode(self.problems[i].solution, add_special_tokens=False) + [eos]
            for fmt in self.cfg.sft.formats:
                out.append(Sample(s if fmt == "student" else t, [self.pad_id], sol))
        return out

    def _ce_loss(self, mb: MicroBatch, scale: float, weight: torch.Tensor, hidden: torch.Tensor):
        """hidden: the last stage's final hidden states [b, S, h]; weight: the LM-head shard [v/tp, h]."""
        h = gather_positions(hidden, mb.student_index)  # [b, R, h]
        if self.ps.tp > 1 and not self.cfg.parallel.sequence_parallel:
            from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

            h = copy_to_tensor_model_parallel_region(h)  # backward: all-reduce the partial grads over TP
        logits = torch.matmul(h, weight.t())  # [b, R, v/tp]: response positions only
        ce = masked_vocab_parallel_cross_entropy(
            logits, mb.response_ids, vocab_size=self.info.vocab_size, tp_group=self.ps.tp_group
        )  # [b, R]
        loss_sum = (ce * mb.loss_mask).sum()
        sums = {"loss_sum": loss_sum.detach().double(), "tokens": torch.tensor(float(mb.num_tokens)).double()}
        return loss_sum * scale, sums

    def sft_step(self, samples: list[Sample]) -> dict:
        """Forward+backward over this replica's micro-batches, optimizer and schedule step."""
        from opsd_megatron.observe.metrics import reduce_sums

        mbs = pack_step(samples, micro_batch_size=self.cfg.train.micro_batch_size, pad_id=self.pad_id,
                        pad_to_multiple=self.cfg.train.pad_to_multiple)  # fmt: skip
        local = torch.tensor([sum(m.num_tokens for m in mbs)], dtype=torch.long)
        if self.dp > 1:
            import torch.distributed as dist

            dist.all_reduce(local, group=self.ps.dp_group)
        scale = self.dp * len(mbs) / max(int(local.item()), 1)

        from opsd_megatron.mcore.models.forward import hidden_states_forward, output_weight

        weight = output_weight(self.chunks[-1]) if self.ps.is_last_stage else None

        def step_fn(data_iterator, model):
            mb = next(data_iterator)
            out = hidden_states_forward(model, mb.student_tokens, mb.student_position_ids, None,
                                        lengths=mb.student_lengths)  # fmt: skip
            return out, partial(self._ce_loss, mb, scale, weight)

        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        dev = self.ps.device
        store = self._forward_backward(step_fn, [m.to(dev) for m in mbs], self.chunks,
                                       mbs[0].student_tokens.shape[1], False)  # fmt: skip
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        sums = {"loss_sum": 0.0, "tokens": 0.0}
        for d in store if self.ps.is_last_stage else []:
            for k in sums:
                sums[k] += float(d[k])
        # Each TP rank of the last stage holds the same (all-reduced) loss: count it once.
        g = reduce_sums({k: v / self.ps.tp for k, v in sums.items()})
        return {
            "loss": g["loss_sum"] / max(g["tokens"], 1.0),
            "response_tokens": g["tokens"],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "update_ok": float(bool(ok)),
        }

    @ends_job_on_error
    def train(self) -> list[dict]:
        """SFT from `self.step` to `train.steps`; checkpoints (saved before a stop), metrics and HF export as
        OPSD's `train`."""
        from opsd_megatron.step.optim import current_lr

        rows = []
        cfg = self.cfg
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            m = self.sft_step(self.sft_samples(self.step))
            self.step += 1
            m.update(lr=current_lr(self.optimizer), epoch=self.sampler.epoch_of(self.step - 1))
            m["time/step_s"] = time.perf_counter() - t0
            m["throughput/response_tokens_per_s"] = m["response_tokens"] / m["time/step_s"]
            stop = self._stop_requested()
            saved = self._save_step(stop)
            self.metrics.log(self.step, m)
            rows.append({"step": self.step, **m})
            if self.on_step_end is not None:
                self.on_step_end(self, self.step)
            if self._stopping_now(stop, saved):
                return rows
        if cfg.checkpoint.export_hf:
            self.export_hf(self.out / "hf")
        return rows


def make_trainer(cfg, **kwargs) -> OPSDTrainer:
    """The trainer for `cfg.algorithm`: `OPSDTrainer` (opsd) or `SFTTrainer` (sft)."""
    return (SFTTrainer if cfg.algorithm == "sft" else OPSDTrainer)(cfg, **kwargs)
