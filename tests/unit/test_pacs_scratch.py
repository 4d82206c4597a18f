"""A PACS run keeps on disk only the series in flight, not the whole query.

:func:`medres.score.pacs_items.pacs_items` with a fake PACS client (real DICOM files, real
ledger): every retrieved series' scratch folder is deleted once all its items are
committed, so a query of thousands of studies never fills the disk.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from helpers.models import write_dicom_2d

from medres.ingest.pacs.query import PacsQuery, SeriesRef, parse_source
from medres.score import pacs_items as pi
from medres.score.ledger import Ledger, ModelInfo, Record

ROOT = "1.2.826.0.1.3680043.8.498.7"
N_SERIES = 6


@dataclass
class FakeClient:
    """Serves ``N_SERIES`` one-instance series from a folder of DICOM files."""

    files: dict[str, Path]
    source = parse_source("dicomweb+http://127.0.0.1:1/dicom-web")

    def find_series(self, query: PacsQuery):
        return iter(SeriesRef(f"{ROOT}.{i}", f"{ROOT}.{i}.1", "CR", 1) for i in range(N_SERIES))

    def retrieve_series(self, ref: SeriesRef, dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        p = dest / "i00001.dcm"
        shutil.copy(self.files[ref.series_uid], p)
        return [p]

    def store(self, paths: list[Path]) -> int:
        return 0

    def close(self) -> None:
        pass


def _fake_pacs(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """``N_SERIES`` DICOM files behind a fake client; returns (out, scratch)."""
    src = tmp_path / "src"
    files = {
        f"{ROOT}.{i}.1": write_dicom_2d(
            src / f"{i}.dcm", study_uid=f"{ROOT}.{i}", series_uid=f"{ROOT}.{i}.1", seed=i
        )
        for i in range(N_SERIES)
    }
    monkeypatch.setattr(pi, "open_client", lambda source: FakeClient(files))
    out, scratch = tmp_path / "out", tmp_path / "out" / "scratch"
    scratch.mkdir(parents=True)
    return out, scratch


def test_scratch_holds_only_uncommitted_series(tmp_path: Path, monkeypatch) -> None:
    out, scratch = _fake_pacs(tmp_path, monkeypatch)
    ledger = Ledger(out / "ledger.sqlite")
    ledger.register_model(ModelInfo("m" * 12, ("a", "b")))
    request = pi.PacsRequest("dicomweb+http://127.0.0.1:1/dicom-web", PacsQuery())
    gen = pi.pacs_items(
        request, key=b"k" * 32, scratch=scratch, ledger_path=out / "ledger.sqlite",
        model_hash="m" * 12,
    )  # fmt: skip
    on_disk = []
    n = 0
    for item in gen:
        n += 1
        # the consumer scores and commits each item before asking for the next one
        ledger.commit("m" * 12, [Record(item.key, f"img-{n}", item.source, "ok", (0.5, 0.5))])
        on_disk.append(len([d for d in scratch.iterdir() if d.is_dir()]))
    ledger.close()
    assert n == N_SERIES
    # each series is deleted when the next one has been retrieved: never more than 2 here
    # (without the sweep the folder count grows to N_SERIES)
    assert max(on_disk) <= 2, on_disk
    assert len([d for d in scratch.iterdir() if d.is_dir()]) <= 1


def test_uncommitted_series_are_kept(tmp_path: Path, monkeypatch) -> None:
    """Nothing committed (a consumer that lags behind): every folder stays."""
    out, scratch = _fake_pacs(tmp_path, monkeypatch)
    Ledger(out / "ledger.sqlite").close()
    request = pi.PacsRequest("dicomweb+http://127.0.0.1:1/dicom-web", PacsQuery())
    items = list(
        pi.pacs_items(
            request, key=b"k" * 32, scratch=scratch, ledger_path=out / "ledger.sqlite",
            model_hash="m" * 12,
        )
    )  # fmt: skip
    assert len(items) == N_SERIES
    assert len([d for d in scratch.iterdir() if d.is_dir()]) == N_SERIES
    assert all(Path(it.payload.first.path).is_file() for it in items)
