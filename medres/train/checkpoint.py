"""Full training state on disk: save atomically, load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads
with ``weights_only=True`` (no pickled objects, no code execution). RNG states are stored
as tensors/lists: torch (CPU and every CUDA device), numpy (MT19937 key as an int64
tensor) and Python's ``random``. The sampler position is ``epoch`` (checkpoints are
written at epoch boundaries; the next epoch's order is a function of seed and epoch, see
:mod:`medres.train.data`).

Files in ``RUN_DIR/checkpoints/``: ``last.pt`` (full state, rewritten every epoch) and
``best.pt`` (model weights of the best validation epoch). Writes go to a temp file that is
fsynced and ``os.replace``-d, so a kill at any moment leaves the previous complete file.

Also owns the training-state payload (:func:`state_payload`: weights, optimiser,
schedule, scaler, RNGs, the weight EMA and the best-candidate record) and its restore on
``--resume`` (:func:`restore_state`), including the check that a resumed run shares the
original's model, transforms, data and optimisation settings. Imports
``medres.runtime``, ``medres.io`` and ``medres.errors`` only.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medres.errors import TrainError
from medres.io import atomic_open
from medres.runtime import unwrap

log = logging.getLogger(__name__)

FORMAT = "medres-checkpoint/1"
LAST = "last.pt"
BEST = "best.pt"

__all__ = [
    "BEST",
    "FORMAT",
    "LAST",
    "capture_rng",
    "check_resume",
    "load_checkpoint",
    "non_finite",
    "restore_rng",
    "restore_state",
    "save_checkpoint",
    "state_payload",
]


def capture_rng() -> dict[str, Any]:
    """Every RNG state that training touches, as tensors and lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": int(py_state[0]), "state": list(py_state[1]), "gauss": py_state[2]},
        "cuda": [],
    }
    if torch.cuda.is_available():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def non_finite(tensors: dict[str, Any]) -> str | None:
    """The name of the first floating tensor of ``tensors`` holding NaN/inf, else None."""
    floats = [(k, v) for k, v in tensors.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not floats:
        return None
    ok = torch.stack([torch.isfinite(v).all() for _, v in floats]).cpu()
    bad = [k for (k, _), good in zip(floats, ok.tolist(), strict=True) if not good]
    return bad[0] if bad else None


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (plus the format tag) atomically with ``torch.save``.

    Refuses (TrainError, nothing written) a ``model`` state dict holding NaN/inf, so a
    diverged run never replaces a good checkpoint.
    """
    path = Path(path)
    bad = non_finite(state.get("model") or {})
    if bad:
        raise TrainError(
            f"{path.name}: model weight {bad} is not finite (NaN/inf; training diverged); the "
            "checkpoint was not written; lower --lr, check the input images, or use "
            "--set train.amp=none"
        )
    payload = {"format": FORMAT, **state}
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)
    return path


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(
            f"{path}: checkpoint not found; train without --resume, or point --out at the run to resume"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated / foreign / pickled-object files
        raise TrainError(
            f"{path}: not a readable medres checkpoint ({type(exc).__name__}); delete it and "
            "restart training without --resume"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainError(
            f"{path}: not a {FORMAT} checkpoint; delete it and restart training without --resume"
        )
    return state


# ----------------------------------------------------------------------------- train state
def state_payload(st: Any, spec_dict: dict[str, Any]) -> dict[str, Any]:
    """The full resumable state of a ``TrainState`` after an epoch (``last.pt``)."""
    return {
        "epoch": st.epoch,
        "step": st.step,
        "model": unwrap(st.model).state_dict(),
        "optimizer": st.optimizer.state_dict(),
        "scheduler": st.scheduler.state_dict(),
        "scaler": st.scaler.state_dict() if st.scaler is not None else None,
        "rng": capture_rng(),
        "sampler": {"epoch": st.epoch},
        "best": {
            "score": st.best_metric,
            "epoch": st.best_epoch,
            "bad_epochs": st.bad_epochs,
            "auc": st.best_auc,
            "loss": st.best_loss,
            "max_auc": st.max_auc,
            "source": st.best_source,
        },
        "ema": st.ema.state_dict() if st.ema is not None else None,
        "history": st.history,
        "pipeline": spec_dict,
    }


def _comparable(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """The parts of a resolved spec that a resumed run must share with the original."""
    keep = {"model", "transforms"}
    out = {s: v for s, v in spec_dict.items() if s in keep}
    out["data"] = {
        k: (spec_dict.get("data") or {}).get(k)
        for k in ("task", "label_columns", "classes", "manifest")
    }
    out["train"] = {
        k: (spec_dict.get("train") or {}).get(k)
        for k in ("batch_size", "lr", "optimizer", "scheduler", "seed")
    }
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            d = _diff(a[k], b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


def check_resume(saved: dict[str, Any], spec_dict: dict[str, Any], path: Path) -> None:
    """Refuse (TrainError) resuming ``saved`` with a pipeline that changed what it trains."""
    diff = _diff(_comparable(saved.get("pipeline") or {}), _comparable(spec_dict))
    if diff:
        raise TrainError(
            f"{path}: the run was trained with a different {diff}; resume with the original "
            "pipeline and flags (only train.epochs and runtime options may change)"
        )


def restore_state(st: Any, saved: dict[str, Any], spec_dict: dict[str, Any], path: Path) -> None:
    """Load ``saved`` (a :func:`state_payload`) into ``st``; refuse a changed pipeline."""
    check_resume(saved, spec_dict, path)
    try:
        unwrap(st.model).load_state_dict(saved["model"])
        st.optimizer.load_state_dict(saved["optimizer"])
        st.scheduler.load_state_dict(saved["scheduler"])
        if st.scaler is not None and saved.get("scaler"):
            st.scaler.load_state_dict(saved["scaler"])
        _restore_ema(st, saved.get("ema"), path)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise TrainError(
            f"{path}: checkpoint does not fit this model ({type(exc).__name__}); start a new run without --resume"
        ) from None
    st.epoch, st.step = int(saved["epoch"]), int(saved["step"])
    st.best_metric = float(saved["best"]["score"])
    st.best_epoch = int(saved["best"]["epoch"])
    st.bad_epochs = int(saved["best"]["bad_epochs"])
    best = saved["best"]
    nan = float("nan")
    # checkpoints before the EMA release hold the score only (the AUC, or minus the loss)
    st.best_auc = float(best.get("auc", best["score"] if best["score"] >= 0 else nan))
    st.best_loss = float(best.get("loss", -best["score"] if best["score"] < 0 else nan))
    st.max_auc = float(best.get("max_auc", st.best_auc))
    st.best_source = str(best.get("source", "live"))
    st.history = list(saved["history"])
    restore_rng(saved["rng"])
    log.info("resumed from %s after epoch %d", path, st.epoch)


def _restore_ema(st: Any, ema_state: dict[str, Any] | None, path: Path) -> None:
    """Load the EMA of ``last.pt``; a checkpoint without one restarts it from the weights."""
    if st.ema is None:
        return
    if ema_state is None:
        log.warning("%s holds no weight EMA; it restarts from the resumed weights", path.name)
        st.ema.module.load_state_dict(unwrap(st.model).state_dict())
        return
    st.ema.load_state_dict(ema_state)
