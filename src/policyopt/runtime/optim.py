"""AdamW with warmup and decay, shared by every recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import get_scheduler

LRSchedule = Literal["linear", "cosine", "constant_with_warmup"]
LR_SCHEDULES = LRSchedule.__args__


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule: one section, the same in every recipe."""

    lr: float = 5e-4  # peak learning rate
    lr_schedule: LRSchedule = "linear"  # decay after warmup: linear or cosine to 0, or constant_with_warmup
    warmup_steps: int = 10  # optimizer steps of linear warmup from 0 to lr
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (never applied to norms and biases)
    max_grad_norm: float = 1.0  # the global gradient norm is clipped to this before each step

    def validate(self) -> None:
        check_optim("optim.", self.lr, self.warmup_steps, self.weight_decay, self.max_grad_norm)

    def build(self, model: torch.nn.Module, total_steps: int):
        """(AdamW over ``model``'s trainable parameters, its scheduler over ``total_steps`` optimizer steps)."""
        optimizer = build_optimizer(model, self.lr, self.weight_decay)
        return optimizer, build_scheduler(optimizer, self.lr_schedule, self.warmup_steps, total_steps)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    # norms and biases are not decayed (the usual transformer practice)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each parameter in one pass: on a 2-core CPU it took 13 ms per step for
    # 20M parameters against 63 ms for the foreach kernels, whose temporaries also raised peak memory
    # by 78 MB. It needs floating-point parameters on a CPU or a GPU; anything else uses foreach.
    params = decay + no_decay
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {"foreach": True}))


def build_scheduler(optimizer, schedule: str, warmup_steps: int, total_steps: int):
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}; got {schedule!r}")
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def check_optim(prefix: str, lr: float, warmup_steps: int, weight_decay: float, max_grad_norm: float) -> None:
    if not lr > 0:
        raise ValueError(f"{prefix}lr must be > 0, got {lr}")
    if warmup_steps < 0:
        raise ValueError(f"{prefix}warmup_steps must be >= 0, got {warmup_steps}")
    if weight_decay < 0:
        raise ValueError(f"{prefix}weight_decay must be >= 0, got {weight_decay}")
    if not max_grad_norm > 0:
        raise ValueError(f"{prefix}max_grad_norm must be > 0, got {max_grad_norm}")


class NonFiniteUpdates(RuntimeError):
    """Too many optimizer updates in a row had a NaN/inf loss or gradient."""


class UpdateGuard:
    """Counts skipped (non-finite) updates in a row and stops the run after ``limit`` of them.

    Its count is part of a checkpoint, so a resumed run stops exactly where the uninterrupted one would.
    """

    def __init__(self, limit: int, checkpoints: str = "the checkpoints directory"):
        self.limit, self.checkpoints, self.bad_in_a_row = limit, checkpoints, 0

    def record(self, applied: bool, where: str) -> None:
        self.bad_in_a_row = 0 if applied else self.bad_in_a_row + 1
        if self.bad_in_a_row >= self.limit:
            raise NonFiniteUpdates(f"{where}: {self.bad_in_a_row} optimizer updates in a row had a non-finite "
                                   f"loss or gradient; stopping. The last good checkpoint is intact in {self.checkpoints}")

    def state_dict(self) -> dict:
        return {"bad_in_a_row": self.bad_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.bad_in_a_row = state["bad_in_a_row"]


def apply_update(model: torch.nn.Module, optimizer, scheduler, loss_value: float, max_grad_norm: float):
    """Clip gradients and step, unless the loss or gradient norm is not finite.

    A non-finite update is skipped (gradients dropped, weights and optimizer moments untouched), so
    one bad batch cannot poison the run. The scheduler still advances, keeping the schedule aligned
    with the step count. Returns (grad_norm, applied).
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    applied = bool(torch.isfinite(grad_norm)) and torch.isfinite(torch.tensor(loss_value)).item()
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(grad_norm), applied
