"""A train step, as timm's benchmark.py defines one, and its per-phase timing (``vimbench scaling --mode train``).

One step of ``TrainStep``:

    zero_grad(set_to_none=True)                    untimed: before the step's first mark
    forward + loss   (fwd)   model.train(); under torch.autocast with --amp; the loss is
                             head:     cross-entropy of the logits against fixed random labels
                             backbone: mean of the squared features, ``features.float().square().mean()``
                                       (Vim: the (b, D) cls features; DeiT: the (b, M, D) tokens)
    backward         (bwd)   loss.backward(), outside autocast
    optimizer step   (opt)   torch.optim.SGD, momentum 0.9 (timm's default train-benchmark optimizer),
                             lr ``LR``; its momentum buffers are allocated by the first step

The step time is the sum of the three phases (one call of ``core.time_phases``); each phase's median is
reported beside the step's (``time_fwd_ms``, ``time_bwd_ms``, ``time_opt_ms``). The loss of every step and
the gradients are checked for NaN/inf after the warm-up and after the timed loop (``check_finite``): a
non-finite step raises ``NonFiniteStep``, which the worker reports as an error row.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vimbench.measure.core import PhaseClock, time_phases
from vimbench.measure.regime import autocast

LR = 1e-4
"""SGD learning rate: small, so that the weights stay finite over any number of timed steps."""
MOMENTUM = 0.9
PHASES = ("fwd", "bwd", "opt")
"""The phases of a step, in order; ``time_<phase>_ms`` are their medians."""


class NonFiniteStep(RuntimeError):
    """A measured train step gave a NaN or infinite loss or gradient."""


class GradCheckpointingUnsupported(ValueError):
    """The model has no activation checkpointing per block (``set_grad_checkpointing``)."""


def enable_grad_checkpointing(model: torch.nn.Module) -> None:
    """Turns on activation checkpointing per block (timm's ``set_grad_checkpointing(True)``; Vim's own, see
    ``models.vim``); ``GradCheckpointingUnsupported`` naming the model for one that has none (no such
    method, or a timm model whose method refuses)."""
    name = getattr(model, "vimbench_name", type(model).__name__)
    setter = getattr(model, "set_grad_checkpointing", None)
    if setter is None:
        raise GradCheckpointingUnsupported(f"{name} has no activation checkpointing (set_grad_checkpointing)")
    try:
        setter(True)
    except (AssertionError, NotImplementedError) as e:
        raise GradCheckpointingUnsupported(f"{name} does not support activation checkpointing"
                                           f"{': ' + str(e) if str(e) else ''}") from None


def train_loss(out: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The scalar a step backpropagates: cross-entropy of logits ``out`` (b, classes) against ``labels`` (b,),
    or with ``labels`` None (backbone) the mean of the squared features, in float32."""
    if labels is not None:
        return F.cross_entropy(out.float(), labels)
    return out.float().square().mean()


class TrainStep:
    """Train steps of ``model`` on input ``x`` (b, 3, img, img): see the module docstring. ``head``: the
    loss is on the classifier's logits (random labels, fixed at construction), else on the features of
    ``forward_features``. ``amp``: ``regime.AMP_DTYPES``. Puts ``model`` in train mode."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, head: bool, amp: str):
        self.model, self.x, self.amp = model.train(), x, amp
        self.labels = torch.randint(0, model.num_classes, (x.shape[0],), device=x.device) if head else None
        self.optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        self.losses: list[torch.Tensor] = []

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, forward, clock: PhaseClock | None = None) -> None:
        """One step through ``forward`` (the model's forward or forward_features, maybe compiled), its
        phases marked on ``clock`` when given; the loss is kept for ``check_finite``."""
        mark = clock.mark if clock is not None else (lambda: None)
        self.zero_grad()
        mark()
        with autocast(self.x.device, self.amp):
            loss = train_loss(forward(self.x), self.labels)
        mark()
        loss.backward()
        mark()
        self.optimizer.step()
        mark()
        self.losses.append(loss.detach())

    def check_finite(self) -> None:
        """``NonFiniteStep`` unless every loss since the last check and every gradient now is finite (one
        device sync); clears the kept losses."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        losses, self.losses = self.losses, []
        bad_loss = bool(losses) and not torch.isfinite(torch.stack(losses)).all()
        bad_grad = bool(grads) and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
        if bad_loss or bad_grad:
            what = " and ".join(w for w, bad in (("loss", bad_loss), ("gradient", bad_grad)) if bad)
            raise NonFiniteStep(f"a measured train step gave a non-finite (NaN or inf) {what}")

    def time(self, forward, device, warmup: int, repeats: int, min_time: float) -> dict:
        """Times steps through ``forward`` (``core.time_phases``), checking them (``check_finite``) after the
        warm-up and after the timed loop. Returns the per-step times in ms ("step") and the median of each
        phase ("time_fwd_ms", "time_bwd_ms", "time_opt_ms")."""
        if warmup:
            time_phases(lambda clock: self(forward, clock), device, warmup, 0, 0)
            self.check_finite()
        phases = time_phases(lambda clock: self(forward, clock), device, 0, repeats, min_time)
        self.check_finite()
        per_phase = np.asarray(phases, dtype=float)
        return {"step": per_phase.sum(axis=1).tolist(),
                **{f"time_{p}_ms": float(np.median(per_phase[:, i])) for i, p in enumerate(PHASES)}}
