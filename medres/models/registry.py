"""The architecture registry: ResNet depths by name, the stem rule and reference costs.

This module is plain data (no torch import) so that ``medres models`` and option
validation stay instant. Architectures are registered with :func:`register_arch`; an
unknown name raises :class:`~medres.errors.ModelError` listing the known ones.

Choices made here:

* **Names** are torchvision's (``resnet18`` ... ``resnet152``); every name exists in 2D
  and 3D.
* **Reference cost** is counted at 224x224 with 3 channels (2D, ImageNet's size) and at
  128x128x128 with 1 channel (3D, a typical down-sampled CT volume), for a 2-class head.
  FLOPs are ``torch.utils.flop_counter`` FLOPs (2 per multiply-add); torchvision's tables
  list multiply-adds, half these figures (resnet18: 1.81 GMACs = 3.63 GFLOPs). The figures
  are cached in :data:`REFERENCE_COST` and checked against a live count by the tests.
* **Stem rule** (``stem="auto"``): the small stem (3x3 stride-1 convolution, no max-pool)
  is chosen when the smallest spatial side of ``image_size`` is below
  :data:`SMALL_STEM_BELOW` (64 px/voxels); otherwise the standard stem (7x7 stride 2 plus
  a stride-2 max-pool, total stride 32). At 28 px the standard stem would leave a 1x1 map
  after layer4; the small stem (total stride 8) leaves 4x4. Without ``image_size`` the
  standard stem is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from medres.errors import ModelError

#: ``stem="auto"`` picks the small stem when min(image_size) is below this.
SMALL_STEM_BELOW = 64
STEMS = ("auto", "standard", "small")
#: (spatial size, input channels) at which :data:`REFERENCE_COST` is counted.
REFERENCE_INPUT = {2: (224, 3), 3: (128, 1)}
REFERENCE_CLASSES = 2


@dataclass(frozen=True)
class ArchSpec:
    """One ResNet depth: block type and the number of blocks per stage.

    ``block`` is ``"basic"`` (two 3x3 convs) or ``"bottleneck"`` (1x1-3x3-1x1, stride on
    the 3x3 as in torchvision's v1.5). ``feature_dim`` is the width of the pooled features
    that the classifier head sees.
    """

    name: str
    block: str
    layers: tuple[int, int, int, int]

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def feature_dim(self) -> int:
        return 512 * self.expansion


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(name: str) -> Callable[[Callable[[], ArchSpec]], Callable[[], ArchSpec]]:
    """Decorator registering the :class:`ArchSpec` returned by the decorated factory."""

    def deco(fn: Callable[[], ArchSpec]) -> Callable[[], ArchSpec]:
        spec = fn()
        if spec.name != name:
            raise ValueError(f"architecture factory for {name!r} returned {spec.name!r}")
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} registered twice")
        _ARCHS[name] = spec
        return fn

    return deco


@register_arch("resnet18")
def _resnet18() -> ArchSpec:
    return ArchSpec("resnet18", "basic", (2, 2, 2, 2))


@register_arch("resnet34")
def _resnet34() -> ArchSpec:
    return ArchSpec("resnet34", "basic", (3, 4, 6, 3))


@register_arch("resnet50")
def _resnet50() -> ArchSpec:
    return ArchSpec("resnet50", "bottleneck", (3, 4, 6, 3))


@register_arch("resnet101")
def _resnet101() -> ArchSpec:
    return ArchSpec("resnet101", "bottleneck", (3, 4, 23, 3))


@register_arch("resnet152")
def _resnet152() -> ArchSpec:
    return ArchSpec("resnet152", "bottleneck", (3, 8, 36, 3))


def list_archs() -> list[str]:
    """Registered architecture names, shallowest first."""
    return list(_ARCHS)


def get_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` for ``name``; an unknown name lists the known ones."""
    key = str(name).strip().lower()
    if key not in _ARCHS:
        raise ModelError(
            f"unknown architecture {name!r}: choose one of {', '.join(_ARCHS)} "
            "(see `medres models`)"
        )
    return _ARCHS[key]


def check_dims(dims: int) -> int:
    """Validate the number of spatial dimensions (2 or 3)."""
    if dims not in (2, 3):
        raise ModelError(f"dims={dims!r} is not supported: use 2 (images) or 3 (volumes)")
    return int(dims)


def resolve_stem(stem: str, image_size: int | Sequence[int] | None = None) -> str:
    """Turn ``"auto"`` into ``"standard"`` or ``"small"`` by the documented rule.

    ``image_size`` is one int or one per spatial axis. The small stem is chosen when the
    smallest side is below :data:`SMALL_STEM_BELOW`; ``"standard"``/``"small"`` are kept.
    """
    if stem not in STEMS:
        raise ModelError(f"unknown stem {stem!r}: choose one of {', '.join(STEMS)}")
    if stem != "auto":
        return stem
    if image_size is None:
        return "standard"
    sizes = [int(image_size)] if isinstance(image_size, int) else [int(s) for s in image_size]
    if not sizes or min(sizes) <= 0:
        raise ModelError(f"image_size={image_size!r} is invalid: give positive sizes")
    return "small" if min(sizes) < SMALL_STEM_BELOW else "standard"


#: (arch, dims) -> (parameters, GFLOPs) at :data:`REFERENCE_INPUT`, standard stem, 2 classes.
#: Counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
#: (``medres.models.resnet.count_cost``); ``tests/unit/test_models_registry.py`` re-counts.
REFERENCE_COST: dict[tuple[str, int], tuple[int, float]] = {
    ("resnet18", 2): (11177538, 3.63),
    ("resnet34", 2): (21285698, 7.33),
    ("resnet50", 2): (23512130, 8.17),
    ("resnet101", 2): (42504258, 15.60),
    ("resnet152", 2): (58147906, 23.02),
    ("resnet18", 3): (33161026, 62.81),
    ("resnet34", 3): (63470658, 108.11),
    ("resnet50", 3): (46159170, 81.07),
    ("resnet101", 3): (85205314, 121.00),
    ("resnet152", 3): (117364034, 170.32),
}
