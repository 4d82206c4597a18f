"""The scoring ledger: exactly-once commits, export, shards, merge."""

from __future__ import annotations

import csv
import sqlite3
from pathlib import Path

import pytest

from medres.errors import ScoringError
from medres.score.ledger import (
    Ledger,
    ModelInfo,
    Record,
    aggregate_study,
    export_csvs,
    merge_ledgers,
    parse_shard,
    predict_label,
    shard_of,
)

H = "ab" * 32
CLASSES = ("0", "1")


def _ok(i: int, p: float = 0.25, study: str = "") -> Record:
    return Record(
        item_key=f"img-{i:04d}",
        image_id=f"img-{i:04d}",
        source=f"dir/{i}.nii.gz",
        status="ok",
        scores=(1 - p, p),
        pred=predict_label((1 - p, p), CLASSES),
        study_key=study,
    )


def _err(i: int) -> Record:
    return Record(
        item_key=f"img-{i:04d}",
        image_id=f"img-{i:04d}",
        source=f"dir/{i}.dcm",
        status="error",
        code="decode_failed",
        message="corrupt",
    )


def _ledger(path: Path) -> Ledger:
    led = Ledger(path)
    led.register_model(ModelInfo(H, CLASSES, "binary"))
    return led


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_wal_mode_and_commit_roundtrip_is_bit_identical(tmp_path: Path) -> None:
    p = 0.1 + 1e-12  # needs the full repr to round-trip
    with _ledger(tmp_path / "l.sqlite") as led:
        assert led.commit(H, [_ok(1, p), _ok(2)]) == 2
        recs = {r.item_key: r for r in led.records(H)}
    assert recs["img-0001"].scores == (1 - p, p)
    mode = sqlite3.connect(tmp_path / "l.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_ok_rows_are_never_overwritten_but_errors_are(tmp_path: Path) -> None:
    with _ledger(tmp_path / "l.sqlite") as led:
        led.commit(H, [_ok(1, 0.3), _err(2)])
        # a second commit of the same keys: ok stays, error is replaced (retry)
        written = led.commit(H, [_ok(1, 0.9), _ok(2, 0.7)])
        assert written == 1
        recs = {r.item_key: r for r in led.records(H)}
        assert recs["img-0001"].scores[1] == pytest.approx(0.3)
        assert recs["img-0002"].status == "ok"
        assert led.counts(H) == {"ok": 2, "error": 0}
        assert led.done_keys(H) == {"img-0001", "img-0002"}


def test_done_keys_without_errors_for_retry(tmp_path: Path) -> None:
    with _ledger(tmp_path / "l.sqlite") as led:
        led.commit(H, [_ok(1), _err(2)])
        assert led.done_keys(H, include_errors=False) == {"img-0001"}
        assert led.done_keys("other") == set()


def test_a_failing_batch_commits_nothing(tmp_path: Path) -> None:
    with _ledger(tmp_path / "l.sqlite") as led:
        bad = Record("img-x", "img-x", "s", status="weird")
        with pytest.raises(ValueError):
            led.commit(H, [_ok(1), bad])
        assert led.done_keys(H) == set()


def test_export_one_row_per_item_and_errors_csv(tmp_path: Path) -> None:
    with _ledger(tmp_path / "l.sqlite") as led:
        led.commit(H, [_ok(i) for i in range(5)] + [_err(9)])
        led.commit(H, [_ok(i) for i in range(3)])  # re-commit: no duplicates
        paths = export_csvs(led, tmp_path, H)
    rows = _rows(paths["scores"])
    assert list(rows[0]) == ["image_id", "source", "prob_0", "prob_1", "pred", "status"]
    assert [r["image_id"] for r in rows] == sorted({r["image_id"] for r in rows})
    assert len(rows) == 6
    assert {r["status"] for r in rows} == {"ok", "error"}
    errs = _rows(paths["errors"])
    assert [(e["image_id"], e["code"]) for e in errs] == [("img-0009", "decode_failed")]
    assert not list(tmp_path.glob(".*.tmp"))


def test_raw_ids_only_with_keep_ids(tmp_path: Path) -> None:
    rec = Record("img-1", "img-1", "s", "ok", (0.5, 0.5), "0", study_uid="1.2.3", accession="A9")
    with _ledger(tmp_path / "l.sqlite") as led:
        led.commit(H, [rec])
        plain = export_csvs(led, tmp_path / "a", H)
        kept = export_csvs(led, tmp_path / "b", H, keep_ids=True)
    assert "1.2.3" not in plain["scores"].read_text()
    row = _rows(kept["scores"])[0]
    assert (row["StudyInstanceUID"], row["AccessionNumber"]) == ("1.2.3", "A9")


def test_study_aggregation(tmp_path: Path) -> None:
    recs = [_ok(1, 0.2, "s1"), _ok(2, 0.9, "s1"), _ok(3, 0.4, "s2"), _err(4)]
    agg = aggregate_study(recs, 2, "max")
    assert agg["s1"] == ([0.8, 0.9], 2)
    assert agg["s2"][1] == 1
    mean = aggregate_study(recs, 2, "mean")
    assert mean["s1"][0][1] == pytest.approx(0.55)
    with pytest.raises(ScoringError, match="max"):
        aggregate_study(recs, 2, "median")
    with _ledger(tmp_path / "l.sqlite") as led:
        led.commit(H, recs)
        paths = export_csvs(led, tmp_path, H, aggregate="max")
    rows = {r["study_key"]: r for r in _rows(paths["scores_study"])}
    assert rows["s1"]["pred"] == "1" and rows["s2"]["pred"] == "0"


def test_predict_label_tasks() -> None:
    assert predict_label([0.2, 0.7, 0.1], ["a", "b", "c"], "multiclass") == "b"
    assert predict_label([0.6, 0.1, 0.9], ["a", "b", "c"], "multilabel") == "a;c"
    assert predict_label([], ["a"]) == ""


@pytest.mark.parametrize("text,expected", [("0/2", (0, 2)), ("1/2", (1, 2)), (None, (0, 1))])
def test_parse_shard(text: str | None, expected: tuple[int, int]) -> None:
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_parse_shard_rejects(text: str) -> None:
    with pytest.raises(ScoringError, match="--shard"):
        parse_shard(text)


def test_shards_partition_keys_stably_and_evenly() -> None:
    keys = [f"nifti\x00dir/{i}.nii.gz\x00{100 + i}" for i in range(2000)]
    parts = [shard_of(k, 3) for k in keys]
    assert parts == [shard_of(k, 3) for k in keys]  # deterministic
    counts = [parts.count(s) for s in range(3)]
    assert min(counts) > 550  # roughly balanced (expected 667 each)
    assert all(shard_of(k, 1) == 0 for k in keys[:10])


def test_merge_unites_and_checks_conflicts(tmp_path: Path) -> None:
    a, b, dest = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "m.sqlite"
    with _ledger(a) as led:
        led.set_meta("key_fingerprint", "k1")
        led.commit(H, [_ok(1), _ok(2), _err(3)])
    with _ledger(b) as led:
        led.set_meta("key_fingerprint", "k1")
        led.commit(H, [_ok(2), _ok(3), _ok(4)])
    rep = merge_ledgers(dest, [a, b])
    assert (rep.inserted, rep.identical, rep.replaced_errors) == (4, 1, 1)
    with Ledger(dest) as led:
        assert led.counts(H) == {"ok": 4, "error": 0}
    # merging again is idempotent
    rep2 = merge_ledgers(dest, [a, b])
    assert rep2.inserted == 0
    # a disagreeing ledger aborts and changes nothing
    c = tmp_path / "c.sqlite"
    with _ledger(c) as led:
        led.set_meta("key_fingerprint", "k1")
        led.commit(H, [_ok(1, 0.99), _ok(7)])
    with pytest.raises(ScoringError, match="disagree"):
        merge_ledgers(dest, [c])
    with Ledger(dest) as led:
        assert "img-0007" not in led.done_keys(H)


def test_merge_refuses_different_keys_and_missing_ledger(tmp_path: Path) -> None:
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    for p, fp in ((a, "k1"), (b, "k2")):
        with _ledger(p) as led:
            led.set_meta("key_fingerprint", fp)
    with pytest.raises(ScoringError, match="medres_key"):
        merge_ledgers(tmp_path / "m.sqlite", [a, b])
    with pytest.raises(ScoringError, match="no ledger"):
        merge_ledgers(tmp_path / "m2.sqlite", [tmp_path / "missing.sqlite"])


def test_model_class_mismatch_and_corrupt_ledger(tmp_path: Path) -> None:
    with _ledger(tmp_path / "l.sqlite") as led:
        with pytest.raises(ScoringError, match="classes"):
            led.register_model(ModelInfo(H, ("a", "b", "c")))
        with pytest.raises(ScoringError, match="key_fingerprint"):
            led.set_meta("key_fingerprint", "x")
            led.set_meta("key_fingerprint", "y", check=True)
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ScoringError, match="fresh --out"):
        Ledger(bad)
