"""Pretrained weight sources: the published checkpoints and the preprocessing they expect.

Sources (one ``--weights`` option):

* ``imagenet`` -- torchvision's ``IMAGENET1K_V1`` checkpoints for every depth. V1 is the
  default for 50/101/152 too: one training recipe and one preprocessing for the whole zoo,
  and V1's plain recipe (no label smoothing, mixup or cutmix) gives features that transfer
  better when the backbone is frozen first (Kornblith et al., "Do Better ImageNet Models
  Transfer Better?", 2019). ``imagenet-v2`` selects torchvision's ``IMAGENET1K_V2``
  checkpoints (50/101/152 only; higher ImageNet accuracy). In 3D the 2D kernels are
  inflated (see :mod:`medres.models.adapt`).
* ``medicalnet`` -- Tencent MedicalNet (Med3D) 3D weights, from the Hugging Face mirror
  ``TencentMedicalNet/MedicalNet-Resnet<depth>`` that MONAI also uses; the "23 datasets"
  files for 18/34/50, the 8-dataset files for 101/152.
* ``none`` -- random initialisation; a file or medres model dir path -- see
  :func:`medres.models.pretrained.load_pretrained`.

Each published checkpoint is one frozen :class:`WeightSpec` in :data:`WEIGHTS` (URL,
sha256, the input it was trained on and the normalisation it expects);
:func:`weights_meta` turns a source into the preprocessing metadata that training saves
and the transforms replay. Downloading, the cache and mirrors are :mod:`medres.models.hub`.

Owns the weight table and its lookups. Imports core, :mod:`medres.models.registry` and
:mod:`medres.models.modeldir` (a model dir as a source); no torch, so listing sources stays
instant.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medres.errors import WeightsError
from medres.models.modeldir import MODEL_JSON, read_model_meta, thaw
from medres.models.registry import get_arch, list_archs

log = logging.getLogger(__name__)

TORCHVISION_BASE = "https://download.pytorch.org/models/"
MEDICALNET_BASE = "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth}/resolve/main/"
NAMED_SOURCES = ("imagenet", "imagenet-v2", "medicalnet", "none")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class WeightSpec:
    """One published checkpoint and the preprocessing it expects."""

    arch: str
    source: str  # "imagenet" | "imagenet-v2" | "medicalnet"
    tag: str  # e.g. "IMAGENET1K_V1"
    dims: int  # dims the weights were trained in
    filename: str
    url: str
    sha256: str | None  # full digest or prefix; None: not published (pinned on first use)
    in_channels: int
    normalization: str  # "mean_std" | "zscore_nonzero"
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    value_range: tuple[float, float] | None
    input_size: tuple[int, ...]
    note: str = ""

    @property
    def env_key(self) -> str:
        """Suffix of the ``MEDRES_WEIGHTS_URL_``/``MEDRES_WEIGHTS_SHA256_`` variables."""
        return f"{self.arch}_{self.source}".upper().replace("-", "_")


_TV_V1 = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
}
_TV_V2 = {
    "resnet50": "resnet50-11ad3fa6.pth",
    "resnet101": "resnet101-cd907fc2.pth",
    "resnet152": "resnet152-f82ba261.pth",
}
_MEDICALNET = {
    "resnet18": "resnet_18_23dataset.pth",
    "resnet34": "resnet_34_23dataset.pth",
    "resnet50": "resnet_50_23dataset.pth",
    "resnet101": "resnet_101.pth",
    "resnet152": "resnet_152.pth",
}


def _hash_from_name(filename: str) -> str:
    return filename.rsplit("-", 1)[1].split(".", 1)[0]


def _build_table() -> dict[tuple[str, str], WeightSpec]:
    table: dict[tuple[str, str], WeightSpec] = {}
    for source, files, tag in (
        ("imagenet", _TV_V1, "IMAGENET1K_V1"),
        ("imagenet-v2", _TV_V2, "IMAGENET1K_V2"),
    ):
        for arch, fname in files.items():
            table[(arch, source)] = WeightSpec(
                arch=arch,
                source=source,
                tag=tag,
                dims=2,
                filename=fname,
                url=TORCHVISION_BASE + fname,
                sha256=_hash_from_name(fname),
                in_channels=3,
                normalization="mean_std",
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                value_range=(0.0, 1.0),
                input_size=(224, 224),
                note="scale intensities to [0, 1] (CT: apply a window first), then "
                "(x - mean) / std per channel",
            )
    for arch, fname in _MEDICALNET.items():
        depth = arch.removeprefix("resnet")
        table[(arch, "medicalnet")] = WeightSpec(
            arch=arch,
            source="medicalnet",
            tag="MedicalNet-23datasets" if "23dataset" in fname else "MedicalNet-8datasets",
            dims=3,
            filename=fname,
            url=MEDICALNET_BASE.format(depth=depth) + fname,
            sha256=None,
            in_channels=1,
            normalization="zscore_nonzero",
            mean=None,
            std=None,
            value_range=None,
            input_size=(56, 448, 448),
            note="per volume: (x - mean) / std over voxels > 0 (MedicalNet's "
            "intensity normalisation); trained with dilated layer3/layer4 for segmentation",
        )
    return table


WEIGHTS: dict[tuple[str, str], WeightSpec] = _build_table()


def available_weights(arch: str, dims: int) -> list[str]:
    """Named weight sources usable for ``arch`` in ``dims`` (2D sources inflate to 3D)."""
    out = []
    for (a, source), spec in WEIGHTS.items():
        if a == arch and (spec.dims == dims or (spec.dims == 2 and dims == 3)):
            out.append(source)
    return out


def canonical_source(source: str) -> str:
    """Lower-case a named source; ``imagenet-v1`` is an alias of ``imagenet``."""
    s = str(source).strip().lower()
    return "imagenet" if s == "imagenet-v1" else s


def is_named_source(source: str) -> bool:
    return canonical_source(source) in (*NAMED_SOURCES, "imagenet-v1")


def get_weight_spec(source: str, arch: str) -> WeightSpec:
    """The :class:`WeightSpec` of a named source for ``arch``; errors list what exists."""
    src = canonical_source(source)
    arch = get_arch(arch).name
    if src not in NAMED_SOURCES or src == "none":
        raise WeightsError(
            f"unknown weights source {source!r}: use one of {', '.join(NAMED_SOURCES)} "
            "or the path of a .pth/.safetensors file or medres model dir"
        )
    spec = WEIGHTS.get((arch, src))
    if spec is None:
        have = [a for a in list_archs() if (a, src) in WEIGHTS]
        raise WeightsError(
            f"no {src} weights for {arch}: they exist for {', '.join(have)}; "
            "use --weights imagenet or another --arch"
        )
    return spec


# --- preprocessing metadata ----------------------------------------------------------------


def channel_mixing(in_channels: int, src_channels: int = 3) -> list[list[float]]:
    """Mixing matrix M (in_channels x src_channels) used to adapt a first conv.

    New channel ``i`` gets kernel ``sum_c M[i][c] * W[c]``; every column sums to 1, so an
    input with the same image on every channel gives exactly the original response.
    ``in_channels < src``: source channel ``c`` folds into ``c mod in_channels`` (1 channel:
    the sum of the RGB kernels, as timm). ``in_channels >= src``: kernel ``i mod src`` is
    repeated and divided by the number of copies (timm's "repeat and rescale", made exact
    when ``in_channels`` is not a multiple of 3).
    """
    k, n = int(in_channels), int(src_channels)
    m = [[0.0] * n for _ in range(k)]
    if k < n:
        for c in range(n):
            m[c % k][c] = 1.0
    else:
        copies = [sum(1 for i in range(k) if i % n == c) for c in range(n)]
        for i in range(k):
            m[i][i % n] = 1.0 / copies[i % n]
    return m


def _mix_stats(values: tuple[float, ...], in_channels: int) -> list[float]:
    m = channel_mixing(in_channels, len(values))
    return [round(sum(w * v for w, v in zip(row, values, strict=True)) / sum(row), 6) for row in m]


def weights_meta(source: str, arch: str, in_channels: int | None = None) -> dict[str, Any]:
    """Preprocessing that a weight source expects, for the transforms to replay.

    Keys: ``source``, ``tag``, ``file``, ``url``, ``normalization`` (``"mean_std"``: scale
    to ``value_range`` then ``(x - mean) / std`` per channel; ``"zscore_nonzero"``:
    MedicalNet's per-volume z-score over voxels > 0; ``None``: no constraint), ``mean``,
    ``std`` (lists, one per model input channel when ``in_channels`` is given: adapted with
    :func:`channel_mixing`, e.g. 1 channel -> the RGB averages), ``value_range``,
    ``channels`` (what the weights were trained on), ``in_channels``, ``input_size``, ``note``.
    For a path, the meta of a medres model dir (its ``preprocessing.weights``) or of a
    recognised published file name is returned; otherwise no normalization is implied.
    """
    src = canonical_source(source)
    base: dict[str, Any] = {
        "source": src,
        "tag": None,
        "file": None,
        "url": None,
        "normalization": None,
        "mean": None,
        "std": None,
        "value_range": None,
        "channels": None,
        "in_channels": in_channels,
        "input_size": None,
        "note": "",
    }
    if src == "none":
        base["note"] = "random initialisation: choose any normalisation"
        return base
    if src in NAMED_SOURCES:
        return _spec_meta(get_weight_spec(src, arch), in_channels)
    path = Path(source).expanduser()
    base["source"] = str(path)
    if path.is_dir() and (
        (path / MODEL_JSON).is_file() or (path / "model" / MODEL_JSON).is_file()
    ):  # a model dir, or a run dir holding model/
        wmeta = read_model_meta(path).preprocessing.get("weights")
        if isinstance(wmeta, Mapping):
            base.update({k: thaw(v) for k, v in wmeta.items() if k in base and k != "in_channels"})
            for key in ("mean", "std"):  # the model dir may have had another channel count
                vals = base[key]
                if in_channels and isinstance(vals, list) and vals and len(vals) != in_channels:
                    base[key] = _mix_stats(tuple(float(v) for v in vals), in_channels)
        base["note"] = f"weights of the medres model {path.name}"
        return base
    for spec in WEIGHTS.values():
        if spec.filename == path.name:
            meta = _spec_meta(spec, in_channels)
            meta["source"] = str(path)
            return meta
    base["note"] = "unrecognised weights file: normalisation unknown"
    return base


def _spec_meta(spec: WeightSpec, in_channels: int | None) -> dict[str, Any]:
    mean = list(spec.mean) if spec.mean else None
    std = list(spec.std) if spec.std else None
    if in_channels and mean and std and in_channels != spec.in_channels:
        mean = _mix_stats(spec.mean or (), in_channels)
        std = _mix_stats(spec.std or (), in_channels)
    return {
        "source": spec.source,
        "tag": spec.tag,
        "file": spec.filename,
        "url": spec.url,
        "normalization": spec.normalization,
        "mean": mean,
        "std": std,
        "value_range": list(spec.value_range) if spec.value_range else None,
        "channels": spec.in_channels,
        "in_channels": in_channels,
        "input_size": list(spec.input_size),
        "note": spec.note,
    }


def weights_table() -> list[dict[str, Any]]:
    """One row per published checkpoint (for ``medres models --weights`` style listings)."""
    rows = []
    for arch in list_archs():
        for (a, source), spec in WEIGHTS.items():
            if a == arch:
                rows.append(
                    {
                        "arch": arch,
                        "source": source,
                        "tag": spec.tag,
                        "dims": spec.dims,
                        "file": spec.filename,
                        "url": spec.url,
                        "sha256": spec.sha256,
                        "env_key": spec.env_key,
                    }
                )
    return rows
