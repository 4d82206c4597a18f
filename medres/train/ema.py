"""An exponential moving average (EMA) of a model's weights, for robust model selection.

:class:`WeightEma` keeps a copy of the network whose floating-point parameters **and
floating-point buffers** (BatchNorm ``running_mean``/``running_var``) follow

    ema = d * ema + (1 - d) * live,    d = min(decay, (1 + n) / (10 + n))

after every optimizer step ``n`` (the warm-up term, as in TensorFlow's
``ExponentialMovingAverage`` with ``num_updates``, lets short runs average over their own
length instead of over the random initialisation). Integer buffers
(``num_batches_tracked``) are copied. Averaging the BatchNorm statistics the same way as
the weights is the approximation timm's ``ModelEmaV2`` makes: the statistics then
describe activations of recent weights, which is close to those of the averaged weights
when the decay horizon spans a few hundred steps or less; recomputing them with the EMA
weights (``torch.optim.swa_utils.update_bn``) would cost an extra pass over the training
data each epoch.

The EMA is updated in float32 on the training device, is never wrapped by DDP (every rank
holds the same parameters, and the buffers are broadcast from rank 0 with the live
model's), and its state is checkpointed in ``last.pt`` so ``--resume`` continues it
exactly. Imports torch only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["WeightEma", "ema_decay_at"]


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay used for update number ``updates`` (0-based): ``min(decay, (1+n)/(10+n))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class WeightEma:
    """The moving average of ``model``'s weights and buffers (see the module docs)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (the unwrapped live network) into the EMA."""
        d = ema_decay_at(self.decay, self.updates)
        live = model.state_dict()
        for name, avg in self.module.state_dict().items():
            src = live[name].detach()
            if avg.is_floating_point():
                avg.mul_(d).add_(src.to(avg.dtype), alpha=1.0 - d)
            else:
                avg.copy_(src)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """``{"model": tensors, "updates": n, "decay": d}`` (loads with weights_only=True)."""
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (strict: the same architecture)."""
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])

    def broadcast_buffers(self) -> None:
        """DDP: give every rank rank 0's averaged buffers (call where the live ones are synced)."""
        import torch.distributed as dist

        for b in self.module.buffers():
            dist.broadcast(b.data, 0)
