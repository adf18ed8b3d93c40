"""Per-iteration schedules (official DINOv2 semantics).

``CosineScheduler`` precomputes the whole schedule as an array: ``freeze_iters`` zeros,
then a linear warm-up from ``start_warmup_value`` to ``base_value`` over
``warmup_iters``, then a cosine from ``base_value`` to ``final_value``. Indexing past the
end returns ``final_value``.

``Schedules`` bundles the five schedules the training loop needs (lr, weight decay,
teacher momentum, teacher temperature, last-layer lr) and is a pure function of the
training config: ``Schedules.from_config(cfg).at(it)`` gives the same values in a fresh
process as in the run that reached ``it``, so a resumed run only needs (config,
iteration).

An "epoch" here is ``cfg.train.official_epoch_length`` iterations (1250 by default, as
the official ``OFFICIAL_EPOCH_LENGTH``), not a pass over the data.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from model.ssl.config import SSLConfig


class CosineScheduler:
    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) > total_iters ({total_iters})"
            )
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.total_iters = int(total_iters)
        self.warmup_iters = int(warmup_iters)
        self.start_warmup_value = float(start_warmup_value)
        self.freeze_iters = int(freeze_iters)

        freeze_schedule = np.zeros(freeze_iters)
        warmup_schedule = np.linspace(start_warmup_value, base_value, warmup_iters)
        iters = np.arange(total_iters - warmup_iters - freeze_iters)
        n = max(len(iters), 1)
        schedule = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / n))
        self.schedule = np.concatenate((freeze_schedule, warmup_schedule, schedule))
        assert len(self.schedule) == self.total_iters

    def __getitem__(self, it: int) -> float:
        if it < 0:
            raise IndexError(f"negative iteration {it}")
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])

    def __len__(self) -> int:
        return self.total_iters

    def __repr__(self) -> str:
        return (
            f"CosineScheduler(base_value={self.base_value}, final_value={self.final_value}, total_iters={self.total_iters}, "
            f"warmup_iters={self.warmup_iters}, start_warmup_value={self.start_warmup_value}, freeze_iters={self.freeze_iters})"
        )


@dataclass(frozen=True)
class ScheduleValues:
    """The scheduled hyper-parameters at one iteration."""

    iteration: int
    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scaled_lr(base_lr: float, batch_size_total: int, scaling_rule: str) -> float:
    """Official lr scaling: ``sqrt_wrt_1024`` → base_lr·sqrt(B/1024); ``linear_wrt_256`` → base_lr·B/256."""
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(batch_size_total / 1024.0)
    if scaling_rule == "linear_wrt_256":
        return base_lr * batch_size_total / 256.0
    if scaling_rule == "none":
        return base_lr
    raise ValueError(f"unknown scaling_rule {scaling_rule!r}")


class Schedules:
    """lr / wd / momentum / teacher_temp / last_layer_lr schedules built from an ``SSLConfig``.

    ``world_size`` scales the lr with the global batch size (``scaling_rule``); it is part
    of the state so a resumed run needs the same value.
    """

    def __init__(self, cfg: "SSLConfig", world_size: int = 1) -> None:
        self.cfg = cfg
        self.world_size = int(world_size)
        ep = cfg.train.official_epoch_length
        o, t = cfg.optim, cfg.teacher
        self.epoch_length = ep
        self.total_iters = o.epochs * ep
        self.base_lr = cfg.optim.lr if cfg.optim.lr is not None else scaled_lr(
            o.base_lr, cfg.train.batch_size_per_gpu * self.world_size, o.scaling_rule
        )
        lr = dict(
            base_value=self.base_lr,
            final_value=o.min_lr,
            total_iters=o.epochs * ep,
            warmup_iters=o.warmup_epochs * ep,
            start_warmup_value=0.0,
        )
        self.lr = CosineScheduler(**lr)
        self.wd = CosineScheduler(base_value=o.weight_decay, final_value=o.weight_decay_end, total_iters=o.epochs * ep)
        self.momentum = CosineScheduler(
            base_value=t.momentum_teacher, final_value=t.final_momentum_teacher, total_iters=o.epochs * ep
        )
        self.teacher_temp = CosineScheduler(
            base_value=t.teacher_temp,
            final_value=t.teacher_temp,
            total_iters=t.warmup_teacher_temp_epochs * ep,
            warmup_iters=t.warmup_teacher_temp_epochs * ep,
            start_warmup_value=t.warmup_teacher_temp,
        )
        self.last_layer_lr = CosineScheduler(**lr)
        self.freeze_last_layer_iters = o.freeze_last_layer_epochs * ep
        # mimicking the official schedules: last-layer lr is 0 while it is frozen
        self.last_layer_lr.schedule[: self.freeze_last_layer_iters] = 0.0

    @classmethod
    def from_config(cls, cfg: "SSLConfig", world_size: int = 1) -> "Schedules":
        return cls(cfg, world_size=world_size)

    def at(self, it: int) -> ScheduleValues:
        return ScheduleValues(
            iteration=int(it),
            lr=self.lr[it],
            wd=self.wd[it],
            momentum=self.momentum[it],
            teacher_temp=self.teacher_temp[it],
            last_layer_lr=self.last_layer_lr[it],
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild identical schedules (the config and the world size)."""
        return {"config": self.cfg.model_dump(mode="json"), "world_size": self.world_size}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Schedules":
        from model.ssl.config import SSLConfig

        return cls(SSLConfig.model_validate(state["config"]), world_size=state["world_size"])


def apply_optim_scheduler(optimizer: Any, values: ScheduleValues) -> None:
    """Set lr / weight_decay of every param group from its multipliers (official semantics)."""
    for group in optimizer.param_groups:
        base = values.last_layer_lr if group.get("is_last_layer", False) else values.lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = values.wd * group.get("wd_multiplier", 1.0)
