"""Writing a synthetic study set to disk: :func:`generate` (plan -> render -> write files,
plant junk, write labels/truth/synth.json, pack an archive).

Imports: numpy, ``medres.errors``, ``medres.io``, ``medres.progress`` and, within the
package, every lower synth module (spec, plan, render, truth, writers).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np

from medres import progress
from medres.errors import ConfigError
from medres.io import atomic_write_json
from medres.synth import spec as S
from medres.synth import writers as W
from medres.synth.plan import SeriesPlan, plan_series
from medres.synth.render import render
from medres.synth.spec import SynthSpec
from medres.synth.truth import (
    SynthResult,
    TruthRow,
    truth_row,
    write_labels_csv,
    write_truth_csv,
)

log = logging.getLogger(__name__)


class _Namer:
    """File names: tidy ``folder/IM00001.dcm`` or, with shuffle_names, random nested ones."""

    def __init__(self, root: Path, plan: SeriesPlan, spec: SynthSpec, shuffle: bool) -> None:
        self.root, self.plan, self.shuffle = root, plan, shuffle
        self.rng = np.random.default_rng([spec.seed, 3, plan.noise_key])

    def __call__(self, inst: int, suffix: str) -> Path:
        if self.shuffle:
            h = self.rng.bytes(10).hex()
            return self.root / h[:2] / h[2:4] / h[4:]
        # the second series of a `two_series` study shares the folder: give it its own names
        prefix = "IMB" if self.plan.series_description.endswith(" (2)") else "IM"
        return self.root / self.plan.folder / f"{prefix}{inst:05d}{suffix}.dcm"


def _write_one(spec: SynthSpec, plan: SeriesPlan, root: Path, shuffle: bool) -> list[Path]:
    stored, _ = render(spec, plan)
    namer = _Namer(root, plan, spec, shuffle)
    if spec.kind == "nifti":
        paths = W.write_nifti(
            plan, stored, root / plan.patient_id / f"{plan.patient_id}_study{plan.study_id}.nii.gz"
        )
    elif spec.dims == 3 and spec.multiframe:
        paths = W.write_multiframe(plan, stored, namer, spec.compression)
    elif spec.dims == 3:
        paths = W.write_volume(plan, stored, namer, spec.compression)
    else:
        inst = 2 if plan.series_description.endswith("(2)") else 1
        paths = W.write_2d(plan, stored, namer, spec.compression, inst=inst)
    if plan.defect == "truncated":
        victim = paths[len(paths) // 2]
        data = victim.read_bytes()
        victim.write_bytes(data[: int(len(data) * 0.6)])
    return paths


def _write_junk(spec: SynthSpec, root: Path, plans: list[SeriesPlan], shuffle: bool) -> list[Path]:
    rng = np.random.default_rng([spec.seed, 4])
    folder = (
        root / (plans[0].folder if not shuffle and spec.kind != "nifti" else "") if plans else root
    )
    if spec.kind == "nifti":
        folder = root / plans[0].patient_id
    items = {
        root / "README.TXT": b"Exported by SYNTHETIC PACS viewer. Not for diagnostic use.\r\n",
        root / ".DS_Store": b"\x00\x00\x00\x01Bud1" + rng.bytes(500),
        folder / "Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + rng.bytes(1000),
        folder / "preview.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + rng.bytes(800) + b"\xff\xd9",
        folder / "DATA0001": rng.bytes(2048),
        folder / "EMPTY": b"",
    }
    for path, data in items.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return list(items)


def _archive(data_dir: Path, out_dir: Path, kind: str) -> Path:
    """Pack ``data_dir`` (member names start with its folder name) reproducibly."""
    files = sorted(p for p in data_dir.rglob("*") if p.is_file())
    base = data_dir.name
    if kind == "zip":
        path = out_dir / f"{base}.zip"
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for f in files:
                info = zipfile.ZipInfo(
                    f"{base}/{f.relative_to(data_dir).as_posix()}", date_time=(2020, 1, 1, 0, 0, 0)
                )
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, f.read_bytes())
        return path
    path = out_dir / (f"{base}.tar" if kind == "tar" else f"{base}.tar.gz")
    buf = open(path, "wb")  # noqa: SIM115 - wrapped by gzip below when needed
    import gzip

    fh = (
        gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=1)
        if kind == "tar.gz"
        else buf
    )
    try:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for f in files:
                data = f.read_bytes()
                info = tarfile.TarInfo(f"{base}/{f.relative_to(data_dir).as_posix()}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tf.addfile(info, io.BytesIO(data))
    finally:
        if fh is not buf:
            fh.close()
        buf.close()
    return path


def _prepare_out(out_dir: Path, root: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"synth output {out_dir} is not a folder; pass a folder path to --out")
    produced = [
        root,
        out_dir / "labels.csv",
        out_dir / "truth.csv",
        out_dir / "synth.json",
        *(out_dir / f"{root.name}.{ext}" for ext in S.ARCHIVES),
    ]
    existing = [p for p in produced if p.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"synth output {existing[0]} already exists; choose an empty --out folder or pass --overwrite"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    root.mkdir(parents=True, exist_ok=True)


def generate(
    spec: SynthSpec, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> SynthResult:
    """Write a synthetic study set to ``out_dir`` and return what was written.

    Layout: ``out_dir/dicom/<PatientID>/STnnn/SEnnn/IMnnnnn.dcm`` (``nifti/<PatientID>/*.nii.gz``
    for NIfTI), ``labels.csv`` (patient_id,label; per patient), ``truth.csv`` (one row per
    written series, see :class:`TruthRow`), ``synth.json`` (the spec, counts, junk files) and
    ``dicom.zip``/``.tar``/``.tar.gz`` when ``spec.archive`` is set. Same spec and seed give
    byte-identical files.
    """
    out = Path(out_dir)
    try:
        return _generate(spec.validated(), out, overwrite)
    except OSError as exc:
        raise ConfigError(
            f"synth could not write under {out}: {exc.strerror or exc}; "
            "check free disk space and permissions"
        ) from exc


def _write_series(
    spec: SynthSpec, plans: list[SeriesPlan], root: Path, out: Path
) -> tuple[list[TruthRow], int]:
    """Render and write every planned series; its truth row and the number of files."""
    shuffle = "shuffle_names" in spec.messy
    rows: list[TruthRow] = []
    n_files = 0
    for plan in progress.track(plans, "synth", unit="series"):
        paths = _write_one(spec, plan, root, shuffle)
        n_files += len(paths)
        rows.append(truth_row(spec, plan, paths, out))
    return rows, n_files


def _write_meta(
    spec: SynthSpec,
    out: Path,
    root: Path,
    rows: list[TruthRow],
    n_files: int,
    junk: list[Path],
    archive: Path | None,
) -> None:
    atomic_write_json(
        out / "synth.json",
        {
            "format": "medres-synth/1",
            "spec": spec.to_dict(),
            "n_series": len(rows),
            "n_files": n_files,
            "n_patients": len({r.patient_id for r in rows}),
            "junk": [p.relative_to(out).as_posix() for p in junk],
            "archive": archive.relative_to(out).as_posix() if archive else None,
            "data_dir": root.relative_to(out).as_posix(),
        },
    )


def _generate(spec: SynthSpec, out: Path, overwrite: bool) -> SynthResult:
    t0 = time.perf_counter()
    root = out / ("nifti" if spec.kind == "nifti" else "dicom")
    _prepare_out(out, root, overwrite)
    plans = plan_series(spec)
    rows, n_files = _write_series(spec, plans, root, out)
    shuffle = "shuffle_names" in spec.messy
    junk = _write_junk(spec, root, plans, shuffle) if "junk" in spec.messy else []
    write_labels_csv(out / "labels.csv", plans)
    write_truth_csv(out / "truth.csv", rows)
    archive = _archive(root, out, spec.archive) if spec.archive else None
    seconds = time.perf_counter() - t0
    _write_meta(spec, out, root, rows, n_files, junk, archive)
    log.info("synth: %d series, %d files in %.1f s -> %s", len(rows), n_files, seconds, root)
    return SynthResult(
        spec,
        out,
        root,
        out / "labels.csv",
        out / "truth.csv",
        tuple(rows),
        archive,
        tuple(junk),
        n_files,
        seconds,
    )
