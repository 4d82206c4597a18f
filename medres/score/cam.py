"""Grad-CAM explanations for scored items (``medres score --cam K``).

Choices:

- MONAI's :class:`monai.visualize.GradCAM` on the ResNet's last stage (``layer4``), for
  the class the item is ranked by: the positive class of a binary model, otherwise the
  predicted class. The map is upsampled to the network input and scaled to [0, 1].
- Only the top ``K`` items by that class's probability are explained (``0`` = all);
  :class:`TopK`, fed by the scoring loop's ``on_scored`` callback, keeps just those
  inputs (a bounded heap), so memory stays flat. The inputs are the model inputs the
  batched preprocessing made (copied to the host), exactly what the model scored.
- One PNG per item, named by its pseudonymous ``image_id`` (``OUT_DIR/cam/<id>.png``):
  the network input (first channel, as the model saw it) in grey with the map as a
  ``jet`` overlay (alpha 0.4). 3D inputs give a montage of the three mid slices
  (sagittal, coronal, axial). Grad-CAM needs gradients, so it runs in fp32 outside
  ``inference_mode``, after scoring.

Imports: numpy, :mod:`medres.errors`; torch, MONAI and matplotlib lazily.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medres.models.modeldir import ModelMeta

log = logging.getLogger(__name__)

TARGET_LAYER = "layer4"


def rank_class(meta: ModelMeta, class_name: str | None = None) -> int | None:
    """Index of the class items are ranked and explained by (``None``: the predicted one)."""
    classes = list(meta.classes)
    if class_name is not None:
        if class_name not in classes:
            from medres.errors import ConfigError

            raise ConfigError(
                f"--cam-class {class_name!r}: not a class of this model; choose one of "
                f"{', '.join(classes)}"
            )
        return classes.index(class_name)
    if meta.task == "binary" and len(classes) == 2:
        pos = meta.positive_class or classes[-1]
        return classes.index(pos) if pos in classes else 1
    return None


class TopK:
    """The ``k`` scored items ranked highest by ``rank_fn(probs)`` (``k == 0``: all).

    Feed it through :func:`medres.score.engine.run_items`'s ``on_scored``. A bounded
    min-heap of ``(rank, order, item, input, probs)``: a new item replaces the lowest kept
    one only when it ranks strictly higher.
    """

    def __init__(self, k: int, rank_fn: Callable[[np.ndarray], float] | None = None) -> None:
        self.k = k
        self.rank_fn = rank_fn or (lambda p: float(np.max(p)))
        self._heap: list[tuple[float, int, Any, np.ndarray, np.ndarray]] = []
        self._seen = 0

    def __call__(self, decoded: Sequence[Any], probs: np.ndarray) -> None:
        """Offer one scored batch (``Decoded`` items holding their model inputs, see
        :func:`medres.score.engine.run_items`, and their probabilities). A kept input is
        copied: a view would keep its whole batch alive."""
        for d, p in zip(decoded, probs, strict=True):
            rank = float(self.rank_fn(p))
            if self.k == 0 or len(self._heap) < self.k:
                heapq.heappush(self._heap, self._entry(rank, d, p))
            elif rank > self._heap[0][0]:
                heapq.heapreplace(self._heap, self._entry(rank, d, p))
            self._seen += 1

    def _entry(self, rank: float, d: Any, p: np.ndarray) -> tuple[Any, ...]:
        x = np.array(d.array, dtype=np.float32, copy=True)
        return (rank, self._seen, d.item, x, np.array(p, copy=True))  # unique order

    def __len__(self) -> int:
        return len(self._heap)

    def top(self) -> list[tuple[Any, np.ndarray, np.ndarray]]:
        """Kept ``(item, input, probs)``, highest rank first."""
        ranked = sorted(self._heap, key=lambda t: (-t[0], t[1]))
        return [(it, x, p) for _, _, it, x, p in ranked]


def rank_fn(meta: ModelMeta, class_name: str | None = None) -> Callable[[np.ndarray], float]:
    """Items are ranked for ``--cam`` by the positive (or chosen) class, else their top class."""
    idx = rank_class(meta, class_name)
    if idx is None:
        return lambda p: float(np.max(p))
    return lambda p: float(p[idx])


def _slices(x: np.ndarray) -> list[np.ndarray]:
    """2D: the image; 3D: the three orthogonal mid slices."""
    if x.ndim == 2:
        return [x]
    cx, cy, cz = (s // 2 for s in x.shape)
    return [x[cx, :, :], x[:, cy, :], x[:, :, cz]]


def overlay_png(image: np.ndarray, cam: np.ndarray, path: Path, title: str = "") -> Path:
    """Write ``image`` (grey) with ``cam`` (jet, alpha 0.4) as a PNG; 3D -> mid-slice montage."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    imgs, cams = _slices(image), _slices(cam)
    fig, axes = plt.subplots(1, len(imgs), figsize=(3 * len(imgs), 3), squeeze=False)
    for ax, im, cm in zip(axes[0], imgs, cams, strict=True):
        # NIfTI order (X, Y): transpose so rows are Y, origin lower like a radiology view
        ax.imshow(im.T, cmap="gray", origin="lower")
        ax.imshow(cm.T, cmap="jet", alpha=0.4, origin="lower", vmin=0, vmax=1)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def grad_cam(model: Any, x: np.ndarray, class_idx: int, device: str = "cpu") -> np.ndarray:
    """The Grad-CAM map of one network input ``x`` (C, *spatial) for ``class_idx``."""
    import torch
    from monai.visualize import GradCAM

    model = model.to(device).float().eval()
    cam = GradCAM(nn_module=model, target_layers=TARGET_LAYER)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(device)
    with torch.enable_grad():
        out = cam(t, class_idx=class_idx)
    return out[0, 0].detach().cpu().numpy()


def write_cams(
    model: Any,
    kept: Sequence[tuple[Any, np.ndarray, Sequence[float]]],
    out_dir: Path,
    *,
    meta: ModelMeta,
    class_name: str | None = None,
    device: str = "cpu",
) -> Path:
    """One overlay PNG per kept ``(item, input, probs)``; returns the folder."""
    fixed = rank_class(meta, class_name)
    classes = list(meta.classes)
    for item, x, probs in kept:
        idx = fixed if fixed is not None else int(np.argmax(probs))
        cmap = grad_cam(model, x, idx, device)
        title = f"{item.key}  p({classes[idx]})={probs[idx]:.3f}"
        overlay_png(np.asarray(x[0]), cmap, out_dir / f"{item.key}.png", title)
    log.info("wrote %d Grad-CAM overlays to %s", len(kept), out_dir)
    return out_dir
