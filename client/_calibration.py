"""``recalibrate(model, batches)``: precise batch norm for a model's remote batch norm layers.

Every ``RemoteBatchNorm*d`` (and its batch renorm, ghost, recurrent and synchronized variants) in
the model starts a recalibration of its session; the batches then run through the model with each
of those layers sending MODE_CALIBRATE calls (normalizing with the batch's own statistics, as in
training, and accumulating exact population statistics); at the end every session commits. If
anything raises, every calibration started is aborted and the running statistics stay as they
were. Layers that share one session calibrate it once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from normserve.client._common import SessionInfo
from normserve.client._modules import _RemoteBatchNorm

__all__ = ["recalibrate"]


def _calibrating(module: _RemoteBatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's x -> x_hat step as MODE_CALIBRATE calls (its forward, affine included, stays
    its own; no gradients: a statistics pass)."""

    def normalize(x: torch.Tensor) -> torch.Tensor:
        options = module._normalize_options()  # a recurrent layer's time step
        result = module.client.normalize(module.session_id, x, mode="calibrate", **options)
        x_hat: torch.Tensor = result.output
        return x_hat

    return normalize


def _first(batch: Any) -> Any:
    """A loader's batch as the model's input: the first item of an (input, target) pair."""
    return batch[0] if isinstance(batch, tuple | list) else batch


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    run: Callable[[nn.Module, Any], object] | None = None,
    max_batches: int | None = None,
) -> dict[str, SessionInfo]:
    """Recalibrates every remote batch norm layer of ``model`` on ``batches`` (a DataLoader, or
    any iterable); returns each session's state after the commit, by module name. ``run(model,
    batch)`` feeds one batch (default: ``model(batch)``, or ``model(batch[0])`` for a tuple or
    list); ``max_batches`` stops early. The model runs under ``torch.no_grad``, its training
    mode untouched."""
    layers: dict[tuple[int, str], tuple[str, _RemoteBatchNorm]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _RemoteBatchNorm):
            module._ensure_session()
            layers.setdefault((id(module.client), module.session_id), (name, module))
    if not layers:
        raise ValueError("the model has no remote batch norm layer to recalibrate")
    started: list[_RemoteBatchNorm] = []
    patched: list[nn.Module] = []
    try:
        for _, module in layers.values():
            module.client.start_calibration(module.session_id)
            started.append(module)
        for module in model.modules():
            if isinstance(module, _RemoteBatchNorm):
                module._normalize = _calibrating(module)  # type: ignore[method-assign,assignment]
                patched.append(module)
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                if run is not None:
                    run(model, batch)
                else:
                    model(_first(batch))
    except BaseException:
        for module in started:
            module.client.abort_calibration(module.session_id)
        raise
    finally:
        for module in patched:
            del module._normalize  # the class's own again
    return {
        name: module.client.commit_calibration(module.session_id)
        for name, module in layers.values()
    }
