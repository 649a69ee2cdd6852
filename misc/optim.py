"""Poly learning-rate SGD as used by IRNet (spec 3.3), and step-decay Nesterov SGD (RCA, rca spec 7)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def poly_lr(base_lr: float, step: int, max_step: int, power: float = 0.9) -> float:
    """``base_lr * (1 - step/max_step)^power``; frozen at the last value once ``step >= max_step``."""
    step = min(step, max_step - 1)
    return base_lr * (1 - step / max_step) ** power


class ScheduledSGD(torch.optim.SGD):
    """SGD whose groups' learning rates are ``lr0_g * lr_factor(t)`` at step ``t``; the step count is part of the
    state dict, so a resumed run continues the schedule (``misc.train``). Each group dict may carry its own
    ``lr`` (e.g. 10x for a head) and ``weight_decay``."""

    def __init__(self, groups: Iterable[dict], **sgd: object) -> None:
        super().__init__(list(groups), **sgd)
        self.global_step = 0
        self.initial_lrs = [g["lr"] for g in self.param_groups]

    def lr_factor(self, step: int) -> float | None:
        """The schedule's multiplier of the base learning rates at ``step``; None leaves them as they are."""
        raise NotImplementedError

    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        factor = self.lr_factor(self.global_step)
        if factor is not None:
            for group, lr0 in zip(self.param_groups, self.initial_lrs, strict=True):
                group["lr"] = lr0 * factor
        loss = super().step(closure)
        self.global_step += 1
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["global_step"] = self.global_step
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.global_step = state_dict.pop("global_step")
        super().load_state_dict(state_dict)


class PolyOptimizer(ScheduledSGD):
    """SGD whose groups follow the poly schedule, stepping ``lr_g = lr0_g * (1 - t/T)^0.9``.

    ``momentum=None`` reproduces the reference: it passed the weight decay positionally into SGD's
    momentum slot, so the effective momentum equals the weight decay (1e-4, i.e. plain SGD). The
    published numbers were obtained that way; pass ``momentum=0.9`` for textbook SGD (not validated).
    """

    def __init__(
        self,
        groups: Iterable[dict],
        lr: float,
        weight_decay: float,
        max_step: int,
        momentum: float | None = None,
        power: float = 0.9,
    ) -> None:
        super().__init__(groups, lr=lr, weight_decay=weight_decay,
                         momentum=weight_decay if momentum is None else momentum)
        self.max_step = max_step
        self.power = power

    def lr_factor(self, step: int) -> float | None:
        # Past the schedule's end the rates stay where they were (a stage longer than its poly length).
        return poly_lr(1.0, step, self.max_step, self.power) if step < self.max_step else None


class StepSGD(ScheduledSGD):
    """Nesterov SGD whose groups' learning rates are multiplied by ``gamma`` at each of ``milestones`` (steps).

    Each group keeps its own base ``lr`` (RCA's 1x / 2x / 10x / 20x groups).
    """

    def __init__(self, groups: Iterable[dict], lr: float, weight_decay: float, momentum: float,
                 milestones: Iterable[int], gamma: float = 0.1) -> None:
        super().__init__(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True)
        self.milestones = sorted(milestones)
        self.gamma = gamma

    def lr_factor(self, step: int) -> float:
        return self.gamma ** sum(step >= m for m in self.milestones)
