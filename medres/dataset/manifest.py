"""Read, write and validate dataset manifests (``manifest.csv``).

The schema is documented in ``data_manifests/README.md``. Choices made here:

* The file is plain CSV (UTF-8, header row, every value a string; empty = unknown) so that
  spreadsheets, pandas and ``csv`` all read it. Columns are written in the fixed order of
  :data:`MANIFEST_COLUMNS`; label columns (``label`` or ``label_<name>``) take the place of
  ``label``; unknown extra columns are kept, after ``split``. Cells follow the one CSV cell
  rule of :mod:`medres.io` (a text starting with ``= + - @`` is written with a leading
  ``'``, which reading strips again).
* Only ``image_id`` and ``image_path`` are required when *reading*, so hand-made manifests
  work; every column that is present is validated (dims, split names, unique ids, one
  patient in one split). Problems raise :class:`~medres.errors.ManifestError` naming the
  file, the line and the fix.
* ``image_path`` is relative to the manifest's folder (absolute paths are accepted when
  reading hand-made manifests).
* Class order (:func:`sort_classes`, :func:`class_order`): numeric when every label parses
  as a number, else alphabetical. Training, evaluation and the exporters all use it, so a
  class index means the same everywhere.

Owns the manifest schema, its reading, writing and validation, and the class order. May
import: the core only (``medres.errors``, ``medres.io``).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from medres.errors import ManifestError
from medres.io import atomic_write_text, csv_dict_reader, csv_dict_writer

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
MANIFEST_COLUMNS: tuple[str, ...] = (
    "image_id",
    "image_path",
    "source",
    "dims",
    "channels",
    "shape",
    "spacing",
    "modality",
    "manufacturer",
    "body_part",
    "sex",
    "age",
    "patient_key",
    "study_key",
    "series_key",
    "n_slices",
    "n_volumes",
    "volume_axis",
    "warnings",
    "label",
    "split",
)
REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "image_path")
SPLITS: tuple[str, ...] = ("train", "val", "test")
# what the 4th axis of a multi-volume (4D) image holds; empty for 2D/3D images
VOLUME_AXES: tuple[str, ...] = ("time", "diffusion", "echo", "other")


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``rows`` keep every column as a string."""

    path: Path
    rows: list[dict[str, str]]
    columns: tuple[str, ...]
    label_columns: tuple[str, ...]

    @property
    def root(self) -> Path:
        """The folder that ``image_path`` values are relative to."""
        return self.path.parent

    def resolve(self, row: Mapping[str, str]) -> Path:
        """Absolute path of a row's image."""
        p = Path(row["image_path"])
        return p if p.is_absolute() else self.root / p

    def select(self, split: str) -> list[dict[str, str]]:
        """Rows whose ``split`` is ``split``."""
        return [r for r in self.rows if r.get("split", "") == split]

    @property
    def multilabel(self) -> bool:
        return self.label_columns != ("label",) and bool(self.label_columns)

    @property
    def multilabel_columns(self) -> tuple[str, ...]:
        """The ``label_<name>`` columns of a multi-label manifest; ``()`` otherwise."""
        return self.label_columns if self.multilabel else ()


def sort_classes(values: Iterable[str]) -> tuple[str, ...]:
    """Class order used everywhere: numeric when every label is a number, else alphabetical."""
    try:
        return tuple(sorted(values, key=float))
    except ValueError:
        return tuple(sorted(values))


def class_order(labels: Iterable[str]) -> tuple[str, ...]:
    """Distinct non-empty labels in :func:`sort_classes` order (the order ``medres train``
    gives a model's outputs, so indices match a trained model)."""
    return sort_classes({lab for lab in labels if lab != ""})


def label_columns_of(columns: Iterable[str]) -> tuple[str, ...]:
    """``("label",)`` or the ``label_<name>`` columns in file order (multi-label)."""
    cols = list(columns)
    multi = tuple(c for c in cols if c.startswith("label_") and len(c) > len("label_"))
    if "label" in cols:
        return ("label",)
    return multi


def column_order(label_columns: Iterable[str] = ("label",), extra: Iterable[str] = ()) -> list[str]:
    """The written column order: the fixed schema, label columns in place of ``label``."""
    labels = list(label_columns) or ["label"]
    out: list[str] = []
    for c in MANIFEST_COLUMNS:
        out.extend(labels if c == "label" else [c])
    out.extend(c for c in extra if c not in out)
    return out


def manifest_text(
    rows: Iterable[Mapping[str, object]], label_columns: Iterable[str] = ("label",)
) -> str:
    """The CSV text of a manifest (see :func:`write_manifest`)."""
    rows = list(rows)
    base = column_order(label_columns)
    extra: list[str] = []
    for r in rows:
        extra.extend(k for k in r if k not in base and k not in extra)
    cols = base + extra
    buf = io.StringIO()
    w = csv_dict_writer(buf, cols, lineterminator="\n", extrasaction="raise")
    w.writeheader()
    for r in rows:
        w.writerow({c: _cell(r.get(c, "")) for c in cols})
    return buf.getvalue()


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def write_manifest(
    path: str | os.PathLike[str],
    rows: Iterable[Mapping[str, object]],
    label_columns: Iterable[str] = ("label",),
) -> Path:
    """Validate ``rows`` and write them atomically to ``path`` in the schema's column order."""
    path = Path(path)
    text = manifest_text(rows, label_columns)
    # validate what we are about to write, with the same rules readers apply
    _parse(text, path)
    atomic_write_text(path, text)
    return path


def read_manifest(path: str | os.PathLike[str], *, check_files: bool = False) -> Manifest:
    """Read and validate a manifest; ``path`` may be the dataset folder.

    ``check_files``: also require every image file to exist.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{path.name}: manifest not found at the given path; run `medres ingest ... --out DIR` "
            "and pass DIR/manifest.csv"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(
            f"{path.name}: cannot read the manifest ({type(exc).__name__}); it must be UTF-8 CSV"
        ) from None
    m = _parse(text, path)
    if check_files:
        for i, row in enumerate(m.rows, start=2):
            if not m.resolve(row).is_file():
                raise ManifestError(
                    f"{path.name} line {i}: image file {row['image_path']!r} is missing; "
                    "re-run `medres ingest` or fix image_path"
                )
    return m


def _parse(text: str, path: Path) -> Manifest:
    name = path.name
    reader = csv_dict_reader(io.StringIO(text))
    columns = tuple(reader.fieldnames or ())
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(
            f"{name}: missing column(s) {', '.join(missing)}; a manifest needs at least "
            "image_id and image_path (see data_manifests/README.md)"
        )
    dup_cols = sorted({c for c in columns if columns.count(c) > 1})
    if dup_cols:
        raise ManifestError(f"{name}: duplicated column(s) {', '.join(dup_cols)}; keep one of each")
    labels = label_columns_of(columns)
    rows: list[dict[str, str]] = []
    ids: dict[str, int] = {}
    patient_split: dict[str, tuple[str, int]] = {}
    for lineno, raw in enumerate(reader, start=2):
        if None in raw:
            raise ManifestError(f"{name} line {lineno}: more values than columns; check quoting")
        row = {k: (v or "").strip() for k, v in raw.items()}
        _validate_row(row, name, lineno, labels)
        iid = row["image_id"]
        if iid in ids:
            raise ManifestError(
                f"{name} line {lineno}: image_id {iid!r} repeats line {ids[iid]}; ids must be unique"
            )
        ids[iid] = lineno
        pk, sp = row.get("patient_key", ""), row.get("split", "")
        if pk and sp:
            prev = patient_split.setdefault(pk, (sp, lineno))
            if prev[0] != sp:
                raise ManifestError(
                    f"{name} line {lineno}: patient {pk} is in split {sp!r} here and in "
                    f"{prev[0]!r} on line {prev[1]}; a patient must stay in one split (leakage)"
                )
        rows.append(row)
    return Manifest(path=path, rows=rows, columns=columns, label_columns=labels)


def _validate_row(row: dict[str, str], name: str, lineno: int, labels: tuple[str, ...]) -> None:
    where = f"{name} line {lineno}"
    if not row["image_id"]:
        raise ManifestError(f"{where}: empty image_id; every row needs a unique id")
    if not row["image_path"]:
        raise ManifestError(
            f"{where}: empty image_path; give the image file relative to the manifest"
        )
    dims = row.get("dims", "")
    if dims and dims not in ("2", "3"):
        raise ManifestError(f"{where}: dims is {dims!r}; use 2 or 3")
    nvol, axis = row.get("n_volumes", ""), row.get("volume_axis", "")
    if nvol and not (nvol.isdigit() and int(nvol) >= 1):
        raise ManifestError(
            f"{where}: n_volumes is {nvol!r}; use a whole number >= 1 or leave empty"
        )
    if axis and axis not in VOLUME_AXES:
        raise ManifestError(
            f"{where}: volume_axis is {axis!r}; use one of {', '.join(VOLUME_AXES)} or leave empty"
        )
    split = row.get("split", "")
    if split and split not in SPLITS:
        raise ManifestError(
            f"{where}: split is {split!r}; use one of {', '.join(SPLITS)} or leave empty"
        )
    for col in ("shape", "spacing"):
        v = row.get(col, "")
        if v and not _is_x_list(v, integer=(col == "shape")):
            raise ManifestError(f"{where}: {col} is {v!r}; write it as e.g. 256x256x64")
    if labels != ("label",):
        for c in labels:
            v = row.get(c, "")
            if v not in ("", "0", "1"):
                raise ManifestError(
                    f"{where}: multi-label column {c} is {v!r}; use 0, 1 or leave empty"
                )


def _is_x_list(v: str, *, integer: bool) -> bool:
    try:
        vals = [int(p) if integer else float(p) for p in v.split("x")]
    except ValueError:
        return False
    return all(x > 0 for x in vals)
