"""``recalibrate(model, batches)``: precise batch norm for a model's remote batch norm layers.

Every ``RemoteBatchNorm*d`` (and its batch renorm, ghost, recurrent and synchronized variants) in
the model starts a recalibration of its session; the batches then run through the model with each
of those layers sending MODE_CALIBRATE calls (normalizing with the batch's own statistics, as in
training, and accumulating exact population statistics); at the end every session commits. If
anything raises before the commits, every calibration started is aborted and the running
statistics stay as they were; a refused commit aborts the layers after it. Layers that share one
session calibrate it once; a layer the batches never reached is aborted, not committed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from normserve.client._common import SessionInfo
from normserve.client._modules import _RemoteBatchNorm

__all__ = ["recalibrate"]


def _key(module: _RemoteBatchNorm) -> tuple[int, str]:
    """A layer's session, as layers sharing one are told apart (client, id)."""
    return id(module.client), module.session_id


def _calibrating(
    module: _RemoteBatchNorm, sent: dict[tuple[int, str], int]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's x -> x_hat step as MODE_CALIBRATE calls (its forward, affine included, stays
    its own; no gradients: a statistics pass), counting the batches each session was sent."""

    def normalize(x: torch.Tensor) -> torch.Tensor:
        options = module._normalize_options()  # a recurrent layer's time step
        result = module.client.normalize(module.session_id, x, mode="calibrate", **options)
        sent[_key(module)] += 1
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
    mode untouched. A layer no batch reached (an unused head) is aborted, keeping its statistics,
    and left out of the answer; if no layer got a batch, every calibration is aborted and
    ValueError raised. An error names the layer it came from; no session is left calibrating."""
    layers: dict[tuple[int, str], tuple[str, _RemoteBatchNorm]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _RemoteBatchNorm):
            module._ensure_session()
            layers.setdefault(_key(module), (name, module))
    if not layers:
        raise ValueError("the model has no remote batch norm layer to recalibrate")
    started: list[_RemoteBatchNorm] = []
    sent = dict.fromkeys(layers, 0)  # batches each session took
    patched: list[nn.Module] = []
    try:
        for _, module in layers.values():
            module.client.start_calibration(module.session_id)
            started.append(module)
        for module in model.modules():
            if isinstance(module, _RemoteBatchNorm):
                module._normalize = _calibrating(module, sent)  # type: ignore[method-assign,assignment]
                patched.append(module)
        with torch.no_grad():
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                if run is not None:
                    run(model, batch)
                else:
                    model(_first(batch))
        # a layer the batches never reached (an unused head; an empty loader) has nothing to
        # commit: it is aborted, keeping its statistics, and left out of the answer
        if not any(sent.values()):
            raise ValueError(
                "recalibrate: no batch reached any remote batch norm layer (the batches were "
                "empty, or max_batches=0); every calibration was aborted, nothing changed"
            )
    except BaseException as err:
        _abort(started, err)
        raise
    finally:
        for module in patched:
            del module._normalize  # the class's own again
    committed: dict[str, SessionInfo] = {}
    pending = [(key, name, module) for key, (name, module) in layers.items()]
    for i, (key, name, module) in enumerate(pending):
        try:
            if sent[key]:
                committed[name] = module.client.commit_calibration(module.session_id)
            else:
                module.client.abort_calibration(module.session_id)
        except BaseException as err:
            err.add_note(
                f"recalibrate: layer {name or '(the model)'!r} (session {module.session_id!r}); "
                f"committed before it: {sorted(committed) or 'none'}; the layers after it were "
                "aborted"
            )
            _abort([m for _, _, m in pending[i + 1 :]], err)
            raise
    return committed


def _abort(modules: list[_RemoteBatchNorm], err: BaseException) -> None:
    """Aborts these layers' calibrations; a failure is noted on ``err``, the error to raise."""
    for module in modules:
        try:
            module.client.abort_calibration(module.session_id)
        except Exception as abort_err:
            err.add_note(f"(aborting session {module.session_id!r} failed: {abort_err})")
