"""Dataset exporters: move an ingested manifest to the neighbouring tools.

Two formats, chosen by name from :data:`DATASET_EXPORTERS`:

``monai-datalist``
    One JSON file in MONAI's Decathlon datalist layout, readable with
    ``monai.data.load_decathlon_datalist(path, data_list_key="training")``::

        {"training":   [{"image": "images/img-....nii.gz", "label": 1, "image_id": "img-..."}],
         "validation": [...],
         "test":       [{"image": "...", "image_id": "img-..."}],
         "classes": ["0", "1"], "task": "binary", ...}

    Choices: ``train``/``val``/``test`` split rows go to ``training``/``validation``/
    ``test``; rows with an empty split go to ``training`` (a warning says how many).
    Image paths are written relative to the JSON file's folder, which is
    ``load_decathlon_datalist``'s default ``base_dir`` (``absolute_paths=True`` writes
    absolute paths instead). ``label`` is the class *index* into ``classes`` (an int);
    multi-label manifests (``label_<name>`` columns) give a list of 0/1 ints in the order
    of ``label_names``. Test entries carry no label, as in the Decathlon convention;
    labelled training/validation rows without a label are skipped with a warning.
    Class order: numeric labels sort numerically, others alphabetically (as ``medres
    train`` orders them), unless ``classes`` is given (pass a model's ``classes``).

``nnunet``
    An nnU-Net v2 raw-dataset folder: ``dataset.json`` (``channel_names``, ``labels``,
    ``numTraining``, ``file_ending``), ``imagesTr/<case>_0000.nii.gz`` for the train and
    val rows, ``imagesTs/<case>_0000.nii.gz`` for the test rows. nnU-Net trains
    segmentation, and a medres manifest holds image-level classes, so only the imaging side
    is exported: there is no ``labelsTr/``, ``labels`` holds only ``background``, and the
    class labels go to a side file ``classification_labels.csv`` (case, image_id, split,
    label / label_<name>). ``splits_final.json`` holds medres's train/val split as one
    nnU-Net fold (copy it to ``nnUNet_preprocessed/DatasetXXX_Name/`` to use it).
    Case ids are the manifest's PHI-free ``image_id``. Multi-channel (colour) images are
    split into ``_0000``, ``_0001``, ... files because nnU-Net wants one file per channel.
    Files are copied by default (self-contained and safe to move); ``link="hardlink"``
    saves space on the same file system (falls back to a copy across devices) and
    ``link="symlink"`` writes absolute symlinks. Uncompressed ``.nii`` sources are gzipped
    on the way so that every case has the single ``file_ending`` ``.nii.gz``.

Owns the exporters and their registry. Manifests are read with
:func:`medres.dataset.manifest.read_manifest` and the class order is
:func:`medres.dataset.manifest.class_order`. May import: the core and
:mod:`medres.dataset.manifest` (nibabel/numpy lazily, to split colour channels).
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medres import progress
from medres.dataset.manifest import Manifest, class_order, read_manifest
from medres.errors import ConfigError, ManifestError
from medres.io import atomic_open, atomic_write_json, csv_dict_writer

__all__ = [
    "DATASET_EXPORTERS",
    "DatasetExportResult",
    "class_order",
    "export_dataset",
    "export_monai_datalist",
    "export_nnunet",
]

log = logging.getLogger(__name__)

SPLIT_KEYS = {"train": "training", "val": "validation", "test": "test"}
LINK_MODES = ("copy", "hardlink", "symlink")
REQUIRED_COLUMNS = ("image_id", "image_path", "split")
NNUNET_MARKER = "medres_export"


@dataclass(frozen=True)
class DatasetExportResult:
    """Summary of one dataset export."""

    format: str
    path: Path
    counts: dict[str, int]
    classes: tuple[str, ...] = ()
    label_names: tuple[str, ...] = ()
    skipped_unlabelled: int = 0
    files: tuple[Path, ...] = field(default_factory=tuple)


# --- manifest access ---------------------------------------------------------------------
def _read_exportable(path: str | os.PathLike[str]) -> Manifest:
    """Read ``manifest.csv`` (or a dataset folder holding one) for export.

    Parsing and row validation are :func:`~medres.dataset.manifest.read_manifest`'s; on top,
    the exporters need ``split`` and either ``label`` or ``label_<name>`` columns, and rows.
    """
    m = read_manifest(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in m.columns]
    if not m.label_columns:
        missing.append("label (or label_<name>)")
    if missing:
        raise ManifestError(
            f"{m.path}: missing column(s) {', '.join(missing)}; re-run `medres ingest` "
            "(with --labels for labels) or add the column(s) to the CSV"
        )
    if not m.rows:
        raise ManifestError(f"{m.path}: the manifest has no rows; ingest some images first")
    return m


# --- labels ------------------------------------------------------------------------------
def _label_names(label_columns: Sequence[str]) -> tuple[str, ...]:
    return tuple(c[len("label_") :] for c in label_columns)


def _row_label(m: Manifest, row: dict[str, str], index: dict[str, int]) -> Any:
    """The datalist label of one row: class index, list of 0/1, or None when unlabelled."""
    if m.multilabel_columns:
        values = [row.get(c, "") for c in m.multilabel_columns]
        if any(v == "" for v in values):
            return None
        out = []
        for c, v in zip(m.multilabel_columns, values, strict=True):
            if v not in ("0", "1"):
                raise ManifestError(
                    f"{m.path}: {row['image_id']} has {c}={v!r}; multi-label columns hold 0 or 1"
                )
            out.append(int(v))
        return out
    lab = row.get("label", "")
    if lab == "":
        return None
    if lab not in index:
        raise ConfigError(
            f"{m.path}: {row['image_id']} has label {lab!r}, which is not in --classes "
            f"({', '.join(index)}); add it to the class list"
        )
    return index[lab]


def _resolve_classes(m: Manifest, classes: Sequence[str] | None) -> tuple[str, ...]:
    if m.multilabel_columns:
        return ()
    if classes:
        dup = [c for c, n in Counter(classes).items() if n > 1]
        if dup:
            raise ConfigError(f"--classes lists {dup[0]!r} twice; give each class once")
        return tuple(classes)
    return class_order([r.get("label", "") for r in m.rows])


def _task(m: Manifest, classes: Sequence[str]) -> str:
    if m.multilabel_columns:
        return "multilabel"
    return "binary" if len(classes) == 2 else "multiclass"


# --- MONAI datalist ----------------------------------------------------------------------
def export_monai_datalist(
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    absolute_paths: bool = False,
) -> DatasetExportResult:
    """Write a MONAI Decathlon-style datalist JSON for ``manifest`` to ``out``.

    ``out`` is a ``.json`` file, or a folder that receives ``datalist.json``. See the
    module docstring for the layout and the choices made.
    """
    m = _read_exportable(manifest)
    out_path = Path(out)
    if out_path.is_dir() or out_path.suffix.lower() != ".json":
        out_path = out_path / "datalist.json"
    base = out_path.parent.resolve()
    cls = _resolve_classes(m, classes)
    index = {c: i for i, c in enumerate(cls)}
    sections: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    skipped = 0
    unsplit = 0
    for row in progress.track(m.rows, "datalist", unit="img"):
        split = row.get("split", "")
        if not split:
            unsplit += 1
        key = SPLIT_KEYS.get(split, "training")
        img = m.resolve(row).resolve()
        image = str(img) if absolute_paths else os.path.relpath(img, base)
        entry: dict[str, Any] = {"image": image}
        if key != "test":
            label = _row_label(m, row, index)
            if label is None:
                skipped += 1
                continue
            entry["label"] = label
        entry["image_id"] = row["image_id"]
        sections[key].append(entry)
    if unsplit:
        log.warning("%d manifest row(s) have no split; exported them as training", unsplit)
    if skipped:
        log.warning("skipped %d unlabelled training/validation row(s)", skipped)
    if not sections["training"]:
        raise ManifestError(
            f"{m.path}: no labelled training rows to export; add labels (ingest --labels) "
            "or a train split"
        )
    doc: dict[str, Any] = {
        "name": m.root.name,
        "description": f"medres export of {m.path.name}",
        "task": _task(m, cls),
        "classes": list(cls),
        "label_names": list(_label_names(m.multilabel_columns)),
        "numTraining": len(sections["training"]),
        "numValidation": len(sections["validation"]),
        "numTest": len(sections["test"]),
        **sections,
    }
    atomic_write_json(out_path, doc)
    counts = {k: len(v) for k, v in sections.items()}
    log.info("wrote %s (%s)", out_path, ", ".join(f"{k}={v}" for k, v in counts.items()))
    return DatasetExportResult(
        format="monai-datalist",
        path=out_path,
        counts=counts,
        classes=cls,
        label_names=_label_names(m.multilabel_columns),
        skipped_unlabelled=skipped,
        files=(out_path,),
    )


# --- nnU-Net -----------------------------------------------------------------------------
_NNUNET_NAME = re.compile(r"^Dataset\d{3}_[A-Za-z0-9_\-]+$")


def _place(src: Path, dst: Path, link: str) -> None:
    """Put ``src`` at ``dst`` (a ``.nii.gz``) by copy, hard link or symlink."""
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if not src.name.lower().endswith(".gz"):
        # nnU-Net wants one file ending for every case: gzip uncompressed NIfTI
        with (
            src.open("rb") as fin,
            atomic_open(dst, "wb") as fout,
            gzip.GzipFile(fileobj=fout, mode="wb", mtime=0) as gz,
        ):
            shutil.copyfileobj(fin, gz, 1 << 20)
        return
    if link == "symlink":
        os.symlink(src.resolve(), dst)
        return
    if link == "hardlink":
        try:
            os.link(src, dst)
            return
        except OSError as exc:
            log.debug("hard link %s failed (%s); copying", dst.name, exc)
    with src.open("rb") as fin, atomic_open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


def _split_channels(src: Path, dsts: Sequence[Path]) -> None:
    """Write each channel of a channel-last image to its own ``.nii.gz``."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(src))
    arr = np.asarray(img.dataobj)
    if arr.shape[-1] != len(dsts):
        raise ManifestError(
            f"{src.name}: the manifest says {len(dsts)} channels but the last axis has "
            f"{arr.shape[-1]}; re-run `medres ingest`"
        )
    for c, dst in enumerate(dsts):
        part = nib.Nifti1Image(np.ascontiguousarray(arr[..., c]), img.affine)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        nib.save(part, str(dst))


def _channels(m: Manifest) -> int:
    counts = {r.get("channels", "") or "1" for r in m.rows}
    if len(counts) > 1:
        raise ManifestError(
            f"{m.path}: rows have different channel counts ({', '.join(sorted(counts))}); "
            "nnU-Net needs one; export a subset of the manifest with one channel count"
        )
    value = counts.pop()
    if not value.isdigit() or int(value) < 1:
        raise ManifestError(f"{m.path}: channels={value!r} is not a positive integer")
    return int(value)


def _channel_names(m: Manifest, n: int) -> dict[str, str]:
    """nnU-Net picks normalisation by channel name: ``CT`` gets CT normalisation."""
    if n == 3:
        return {"0": "R", "1": "G", "2": "B"}
    if n > 1:
        return {str(i): f"channel{i}" for i in range(n)}
    mods = Counter(r.get("modality", "") or "unknown" for r in m.rows)
    if len(mods) > 1:
        log.warning(
            "mixed modalities %s; nnU-Net gets channel name %r",
            dict(mods),
            mods.most_common(1)[0][0],
        )
    return {"0": mods.most_common(1)[0][0]}


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; choose a folder for --out")
    if out.is_dir() and any(out.iterdir()):
        ds = out / "dataset.json"
        previous = False
        if ds.is_file():
            import json

            try:
                previous = NNUNET_MARKER in json.loads(ds.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = False
        if not previous:
            raise ConfigError(
                f"{out}: folder is not empty and holds no earlier medres nnU-Net export; "
                "choose an empty or new folder for --out"
            )
        for sub in ("imagesTr", "imagesTs"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    if not _NNUNET_NAME.match(out.name):
        log.warning(
            "nnU-Net expects the folder name DatasetNNN_Name (e.g. Dataset501_Chest); got %r",
            out.name,
        )


def _export_case(m: Manifest, row: dict[str, str], out_dir: Path, n_ch: int, link: str) -> str:
    """Put one row's image (one file per channel) under imagesTr/ or imagesTs/; its split."""
    src = m.resolve(row)
    if not src.is_file():
        raise ManifestError(
            f"{m.path}: image {row['image_id']} not found at {row['image_path']}; "
            "re-run `medres ingest` or fix image_path"
        )
    split = row.get("split", "") or "train"
    case = row["image_id"]
    target = out_dir / ("imagesTs" if split == "test" else "imagesTr")
    dsts = [target / f"{case}_{c:04d}.nii.gz" for c in range(n_ch)]
    if n_ch == 1:
        _place(src, dsts[0], link)
    else:
        _split_channels(src, dsts)
    return split


def _side_row(
    m: Manifest, row: dict[str, str], split: str, index: dict[str, int]
) -> dict[str, str]:
    """One row of ``classification_labels.csv``."""
    case = row["image_id"]
    side = {"case": case, "image_id": case, "split": split}
    if m.multilabel_columns:
        side.update({c: row.get(c, "") for c in m.multilabel_columns})
    else:
        lab = row.get("label", "")
        side["label"] = lab
        side["label_index"] = str(_row_label(m, row, index)) if lab else ""
    return side


def _dataset_json(
    m: Manifest, out_dir: Path, n_ch: int, cls: tuple[str, ...], counts: dict[str, int], link: str
) -> dict[str, Any]:
    """nnU-Net's ``dataset.json``, with medres's own fields under :data:`NNUNET_MARKER`."""
    return {
        "channel_names": _channel_names(m, n_ch),
        "labels": {"background": 0},
        "numTraining": counts["training"] + counts["validation"],
        "file_ending": ".nii.gz",
        "name": out_dir.name,
        "description": (
            "medres export, imaging side only: image-level class labels are in "
            "classification_labels.csv (nnU-Net segmentation labels are not part of it)"
        ),
        NNUNET_MARKER: {
            "manifest": m.path.name,
            "task": _task(m, cls),
            "classes": list(cls),
            "label_names": list(_label_names(m.multilabel_columns)),
            "numTest": counts["test"],
            "link": link,
        },
    }


def _write_side_file(path: Path, m: Manifest, rows: list[dict[str, str]]) -> None:
    fields = ["case", "image_id", "split"] + (
        list(m.multilabel_columns) if m.multilabel_columns else ["label", "label_index"]
    )
    with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv_dict_writer(fh, fields, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def export_nnunet(
    manifest: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    link: str = "copy",
) -> DatasetExportResult:
    """Write an nnU-Net v2 raw-dataset folder (imaging side) for ``manifest`` to ``out``.

    See the module docstring for the layout and the choices made. Re-exporting into a
    folder that holds an earlier medres export replaces its ``imagesTr``/``imagesTs``.
    """
    if link not in LINK_MODES:
        raise ConfigError(f"unknown link mode {link!r}; choose one of {', '.join(LINK_MODES)}")
    m = _read_exportable(manifest)
    out_dir = Path(out)
    _prepare_out_dir(out_dir)
    n_ch = _channels(m)
    cls = _resolve_classes(m, classes)
    index = {c: i for i, c in enumerate(cls)}
    (out_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "imagesTs").mkdir(parents=True, exist_ok=True)
    counts = {"training": 0, "validation": 0, "test": 0}
    fold: dict[str, list[str]] = {"train": [], "val": []}
    side_rows: list[dict[str, str]] = []
    for row in progress.track(m.rows, "nnU-Net export", unit="img"):
        split = _export_case(m, row, out_dir, n_ch, link)
        counts[SPLIT_KEYS[split]] += 1
        if split != "test":
            fold["val" if split == "val" else "train"].append(row["image_id"])
        side_rows.append(_side_row(m, row, split, index))
    atomic_write_json(out_dir / "dataset.json", _dataset_json(m, out_dir, n_ch, cls, counts, link))
    atomic_write_json(out_dir / "splits_final.json", [fold])
    side_path = out_dir / "classification_labels.csv"
    _write_side_file(side_path, m, side_rows)
    log.info(
        "wrote nnU-Net dataset %s (%d training, %d test)",
        out_dir,
        counts["training"] + counts["validation"],
        counts["test"],
    )
    return DatasetExportResult(
        format="nnunet",
        path=out_dir,
        counts=counts,
        classes=cls,
        label_names=_label_names(m.multilabel_columns),
        files=(out_dir / "dataset.json", out_dir / "splits_final.json", side_path),
    )


# --- registry ----------------------------------------------------------------------------
DATASET_EXPORTERS: dict[str, Callable[..., DatasetExportResult]] = {
    "monai-datalist": export_monai_datalist,
    "nnunet": export_nnunet,
}


def export_dataset(
    manifest: str | os.PathLike[str],
    fmt: str,
    out: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    absolute_paths: bool = False,
    link: str = "copy",
) -> DatasetExportResult:
    """Export ``manifest`` in format ``fmt`` (a name in :data:`DATASET_EXPORTERS`) to ``out``."""
    if fmt not in DATASET_EXPORTERS:
        raise ConfigError(
            f"unknown export format {fmt!r}; choose one of {', '.join(DATASET_EXPORTERS)}"
        )
    if fmt == "monai-datalist":
        return export_monai_datalist(manifest, out, classes=classes, absolute_paths=absolute_paths)
    return export_nnunet(manifest, out, classes=classes, link=link)
