"""An ensemble of ResNets with test-time flips, as one ``nn.Module``.

:class:`Ensemble` holds K :class:`~medres.models.resnet.MedresResNet` members (state-dict
keys ``members.0.*`` ... ``members.{K-1}.*``) and a tuple of spatial axes to flip at test
time. ``forward(x)`` returns the mean logit over every member and every view of ``x``: the
input itself and its flips along each non-empty subset of ``tta_flips`` (axes count from
the first spatial axis, as ``transforms.flip_axes`` does). Because the averaging lives in
the module, everything that runs a model (``score``, ``evaluate``, export, Grad-CAM)
gets the ensemble and the flips without a special case.

Grad-CAM: each member's last feature map is flipped back to the input's orientation and
the maps of all (member, view) pairs are concatenated along the channels and passed through
``layer4`` (an identity, no parameters): the module's ``layer4`` is therefore the
concatenated feature map the averaged logit is a linear function of (global pooling, then
each member's ``fc``), so Grad-CAM on ``layer4`` explains the ensemble's output, flips
included. Pooling makes the logits exact whatever the flip-back alignment.

``model.json`` records ``ensemble: K`` (left out when 1) and ``tta_flips``; a model dir
without them is one plain network (see :mod:`medres.models.modeldir`). Built by
:func:`medres.models.build_model` (``ensemble=``, ``tta_flips=``), which the members
come from (``MedresResNet``: ``config``, ``forward_map``, ``avgpool``, ``fc``). Imports
torch and core only (``medres.models.resnet`` imports this module).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from medres.errors import ModelError

__all__ = ["Ensemble", "flip_views"]


def flip_views(tta_flips: Sequence[int]) -> list[tuple[int, ...]]:
    """Spatial-axis subsets to flip, the identity first: ``[0]`` -> ``[(), (0,)]``."""
    axes = sorted({int(a) for a in tta_flips})
    return [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]


class Ensemble(nn.Module):
    """The mean logit of ``members`` over the test-time flip views (see the module docs)."""

    def __init__(self, members: Sequence[Any], tta_flips: Sequence[int] = ()) -> None:
        super().__init__()
        if not members:
            raise ModelError("an ensemble needs at least one member network")
        first = members[0].config
        for m in members:
            if replace(m.config, ensemble=1, tta_flips=()) != replace(
                first, ensemble=1, tta_flips=()
            ):
                raise ModelError(f"ensemble members differ: {m.config} vs {first}")
        flips = tuple(sorted({int(a) for a in tta_flips}))
        if any(a < 0 or a >= first.dims for a in flips):
            raise ModelError(f"tta_flips {list(flips)} must be spatial axes < {first.dims}")
        self.members = nn.ModuleList(members)
        self.tta_flips = flips
        self.views = flip_views(flips)
        self.layer4 = nn.Identity()  # the Grad-CAM target: the concatenated feature maps
        self.config = replace(first, ensemble=len(members), tta_flips=flips)

    def without_tta(self) -> Ensemble:
        """The same members (shared, not copied) without test-time flips."""
        return Ensemble(list(self.members), ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = []
        for m in self.members:
            for axes in self.views:
                dims = [a + 2 for a in axes]
                f = m.forward_map(torch.flip(x, dims) if dims else x)
                pairs.append((m, torch.flip(f, dims) if dims else f))
        maps = self.layer4(torch.cat([f for _, f in pairs], dim=1))
        chunks = torch.split(maps, [f.shape[1] for _, f in pairs], dim=1)
        logits = [
            m.fc(torch.flatten(m.avgpool(c), 1)) for (m, _), c in zip(pairs, chunks, strict=True)
        ]
        return torch.stack(logits).mean(dim=0)
