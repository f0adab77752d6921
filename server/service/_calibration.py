"""Recalibration, freezing and adaptation on live data: the math over a session's state.

- **Recalibration** (precise batch norm): calibration batches fold their exact per-channel moments
  (``ops.moments``: count, mean, M2 in float64) into an accumulator with Chan's merge
  (``ops.merge_moments``), every value weighing the same; a commit replaces the running mean with
  the population mean and the running variance with the unbiased population variance
  M2 / (count - 1).
- **Adaptation** (prediction-time batch norm, Schneider et al. 2020): an EVAL batch normalized with
  ``(1 - a) * prior + a * batch`` for mean and (biased) variance alike; optionally folded into
  adapted statistics kept apart from the running ones.

Batch-norm kinds with running statistics only: batch norm, batch renorm, ghost batch norm (one
population over all samples: virtual batches are a TRAIN-time device) and recurrent batch norm
(one accumulator and one adapted row per time-step slot).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from normserve.server import ops
from normserve.server.service._config import Kind, SessionConfig
from normserve.server.service._errors import FailedPrecondition, InvalidArgument
from normserve.server.service._state import Adapted, Calibration, SessionState
from normserve.server.service.kinds._base import describe

__all__ = [
    "SUPPORTED",
    "Adaptation",
    "adapt_fold",
    "batch_moments",
    "check_count",
    "check_supported",
    "committed",
    "fold",
    "mixed",
    "new_calibration",
    "slot_of",
]

#: The kinds whose running statistics are a per-channel population mean and variance.
SUPPORTED = (
    Kind.BATCH_NORM,
    Kind.BATCH_RENORM,
    Kind.GHOST_BATCH_NORM,
    Kind.RECURRENT_BATCH_NORM,
)


@dataclass(frozen=True)
class Adaptation:
    """An EVAL call's adaptation: the batch's weight ``a`` in [0, 1] in the mix, and whether the
    batch is folded into the session's adapted statistics."""

    batch_weight: float
    accumulate: bool = False

    def check(self) -> None:
        a = self.batch_weight
        if not 0.0 <= a <= 1.0:  # NaN fails too
            raise InvalidArgument("adaptation.batch_weight", f"must be in [0, 1], got {a}")


def check_supported(session_id: str, config: SessionConfig, what: str) -> None:
    """FailedPrecondition unless the session is a batch-norm kind with running statistics."""
    if config.kind not in SUPPORTED:
        why = (
            "its running statistics average per-instance statistics, which have no population "
            "form to recalibrate or adapt"
            if config.kind is Kind.INSTANCE_NORM
            else "it keeps no running statistics"
        )
        raise FailedPrecondition(
            f"session {session_id!r} ({config.kind.title}): {what} needs batch norm, "
            f"batch renorm, ghost batch norm or recurrent batch norm ({why})"
        )
    if not config.track_running_stats:
        raise FailedPrecondition(
            f"session {session_id!r} keeps no running statistics (track_running_stats is "
            f"false): {what} needs them"
        )


def slot_of(config: SessionConfig, time_step: int) -> int | None:
    """Recurrent batch norm: the row of the running statistics a batch of ``time_step`` uses."""
    if config.kind is not Kind.RECURRENT_BATCH_NORM:
        return None
    return min(time_step, config.time_steps - 1)


def batch_moments(x: torch.Tensor, field: str = "input") -> ops.Moments:
    """The batch's per-channel moments (float64); a batch needs more than 1 value a channel."""
    check_count(x.numel() // x.shape[1] if x.shape[1] else 0, x.shape, field)
    return ops.moments(x)


def check_count(count: int, shape: torch.Size | list[int], field: str = "input") -> None:
    """InvalidArgument unless a batch of ``shape`` has more than 1 value per channel."""
    if count < 2:
        raise InvalidArgument(
            f"{field}.shape",
            f"batch statistics need more than 1 value per channel, got input size "
            f"{describe(torch.Size(shape))}; nothing was applied",
        )


def new_calibration(running_mean: torch.Tensor, now: float) -> Calibration:
    """An empty accumulator for running statistics shaped as ``running_mean``."""
    shape = tuple(running_mean.shape)
    zeros = torch.zeros(shape, dtype=torch.float64)
    return Calibration(
        count=torch.zeros(shape[:-1], dtype=torch.int64),
        mean=zeros,
        m2=zeros.clone(),
        batches=0,
        samples=0,
        start_time=now,
    )


def fold(cal: Calibration, m: ops.Moments, slot: int | None, rows: int) -> Calibration:
    """``cal`` with a batch's moments merged in (Chan), in slot ``slot`` (None: the only one)."""
    idx = () if slot is None else (slot,)
    before = ops.Moments(int(cal.count[idx]), cal.mean[idx], cal.m2[idx])
    # the accumulator lives on the CPU: [C]-sized float64, kept by every store as it is
    batch = ops.Moments(m.count, m.mean.double().cpu(), m.m2.double().cpu())
    merged = ops.merge_moments(before, batch)
    count, mean, m2 = cal.count.clone(), cal.mean.clone(), cal.m2.clone()
    count[idx] = merged.count
    mean[idx] = merged.mean.to(torch.float64)
    m2[idx] = merged.m2.to(torch.float64)
    return replace(
        cal, count=count, mean=mean, m2=m2, batches=cal.batches + 1, samples=cal.samples + rows
    )


def committed(
    session_id: str, cal: Calibration, state: SessionState
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running statistics a commit installs: each slot that received data gets its
    population mean and unbiased variance; FailedPrecondition if some slot has < 2 values."""
    rm, rv = state.running_mean, state.running_var
    assert rm is not None and rv is not None
    counts = cal.count.reshape(-1)
    got = counts > 0
    if not bool(got.any()):
        raise FailedPrecondition(
            f"session {session_id!r}: no calibration batch was accumulated; send MODE_CALIBRATE "
            "batches before CommitCalibration (or AbortCalibration)"
        )
    if bool((counts == 1).any()):
        raise FailedPrecondition(
            f"session {session_id!r}: a slot has 1 calibration value per channel, and a "
            "variance needs at least 2; send more calibration batches (or AbortCalibration)"
        )
    mean = cal.mean.to(rm.device, torch.float32)
    var = (cal.m2 / (cal.count.clamp_min(2) - 1).unsqueeze(-1).to(torch.float64)).to(
        rv.device, torch.float32
    )
    keep = got.reshape(cal.count.shape).unsqueeze(-1).to(rm.device)
    return torch.where(keep, mean, rm), torch.where(keep, var, rv)


def prior(state: SessionState) -> tuple[torch.Tensor, torch.Tensor]:
    """What adaptation mixes the batch with: the adapted statistics, or the running ones."""
    if state.adapted is not None:
        return state.adapted.mean, state.adapted.var
    rm, rv = state.running_mean, state.running_var
    assert rm is not None and rv is not None
    return rm, rv


def mixed(
    mean: torch.Tensor, var: torch.Tensor, m: ops.Moments, a: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1 - a) * prior + a * batch`` for the mean and the biased variance, in float64."""
    dev = mean.device
    mix_mean = (1.0 - a) * mean.double() + a * m.mean.to(dev)
    mix_var = (1.0 - a) * var.double() + a * m.var.to(dev)
    return mix_mean, mix_var


def adapt_fold(
    config: SessionConfig, state: SessionState, m: ops.Moments, slot: int | None
) -> Adapted:
    """The adapted statistics with a batch folded in, as a TRAIN update folds into the running
    ones: factor momentum (or 1 / batches, cumulative, without one), unbiased batch variance."""
    am, av = prior(state)
    batches = state.adapted.batches + 1 if state.adapted is not None else 1
    factor = ops.ema_factor(config.momentum, batches)
    idx = () if slot is None else (slot,)
    new_m, new_v = ops.update_running(
        am[idx], av[idx], m.mean.to(am.device), m.var.to(am.device), m.count, factor
    )
    mean, var = am.clone(), av.clone()
    mean[idx], var[idx] = new_m, new_v
    return Adapted(mean, var, batches)
