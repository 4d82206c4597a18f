"""Labels join (on pseudonyms, never raw IDs) and patient-grouped stratified splits."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from medres.errors import ConfigError, ManifestError
from medres.ingest.labels import (
    assign_splits,
    id_keys,
    join_labels,
    path_candidates,
    read_labels,
)

KEY = b"k" * 32


def _csv(tmp_path, text: str, name: str = "labels.csv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _record(patient_id: str = "", series_uid: str = "", sources=("x/1.dcm",)):
    return {**id_keys(KEY, patient_id=patient_id, series_uid=series_uid), "sources": list(sources)}


def test_join_by_patient_id_uses_pseudonyms_only(tmp_path):
    p = _csv(tmp_path, "patient_id,label,notes\nSMITH-001,1,Smith John\nDOE-002,0,\nGHOST-9,1,\n")
    table = read_labels(p, KEY)
    assert table.key_column == "patient_id"
    assert table.label_columns == ("label",)
    # no raw identifier or free-text column survives parsing
    dumped = repr(table)
    for raw in ("SMITH-001", "DOE-002", "GHOST-9", "Smith John"):
        assert raw not in dumped
    recs = [_record("SMITH-001"), _record("DOE-002"), _record("DOE-002"), _record("NEW-7")]
    res = join_labels(recs, table)
    assert [lab["label"] for lab in res.labels] == ["1", "0", "0", ""]
    assert res.unlabelled_images == 1
    assert res.unmatched_rows == 1  # GHOST-9


def test_join_by_path_matches_files_and_folders_most_specific_first(tmp_path):
    p = _csv(
        tmp_path,
        "path,label\n./p01/,a\np01/ct/5.dcm,b\nbatch.zip!p02,c\np03\\scan.nii.gz,d\n",
    )
    table = read_labels(p, KEY)
    recs = [
        {"sources": ["p01/mr/1.dcm", "p01/mr/2.dcm"]},
        {"sources": ["p01/ct/4.dcm", "p01/ct/5.dcm"]},
        {"sources": ["batch.zip!p02/ct/1.dcm"]},
        {"sources": ["p03/scan.nii.gz"]},
        {"sources": ["p04/x.dcm"]},
    ]
    res = join_labels(recs, table)
    assert [lab["label"] for lab in res.labels] == ["a", "b", "c", "d", ""]
    assert res.unmatched_rows == 0
    assert path_candidates("a.zip!b/c.dcm") == ["a.zip!b/c.dcm", "a.zip!b", "a.zip"]


def test_multilabel_and_split_columns(tmp_path):
    p = _csv(
        tmp_path,
        "series_uid,label_nodule,label_effusion,split\n1.2.3,1,0,train\n1.2.4,0,1,TEST\n",
    )
    table = read_labels(p, KEY)
    assert table.label_columns == ("label_nodule", "label_effusion")
    assert table.has_split
    res = join_labels([_record(series_uid="1.2.4"), _record(series_uid="1.2.3")], table)
    assert res.labels[0] == {"label_nodule": "0", "label_effusion": "1"}
    assert res.given_splits == ["test", "train"]


@pytest.mark.parametrize(
    ("text", "kwargs", "err", "match"),
    [
        ("patient_id,study_uid,label\nA,1,1\n", {}, ManifestError, "several key columns"),
        ("foo,label\nA,1\n", {}, ManifestError, "no key column"),
        ("patient_id,diagnosis\nA,1\n", {}, ManifestError, "no 'label' column"),
        ("patient_id,label,label_x\nA,1,0\n", {}, ManifestError, "both 'label' and"),
        ("patient_id,label_x\nA,2\n", {}, ManifestError, "line 2: multi-label column label_x"),
        ("patient_id,label,split\nA,1,holdout\n", {}, ManifestError, "line 2: split"),
        ("patient_id,label\nSECRET-1,1\nSECRET-1,0\n", {}, ManifestError, "lines 2 and 3"),
        ("patient_id,label\n,1\n", {}, ManifestError, "line 2: empty patient_id"),
        ("patient_id,label\nA,\n", {}, ManifestError, "no labelled rows"),
        ("patient_id,label\nA,1\n", {"key_column": "mrn"}, ConfigError, "--label-key 'mrn'"),
        ("patient_id,label\nA,1\n", {"key_column": "accession"}, ManifestError, "no 'accession'"),
    ],
)
def test_bad_labels_files_raise_one_line_without_raw_ids(tmp_path, text, kwargs, err, match):
    p = _csv(tmp_path, text)
    with pytest.raises(err, match=match) as info:
        read_labels(p, KEY, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert "SECRET-1" not in msg


def test_label_key_chooses_among_several_key_columns(tmp_path):
    p = _csv(tmp_path, "\ufeffpatient_id,accession,label\nP1,ACC1,1\n")  # BOM from Excel
    table = read_labels(p, KEY, key_column="accession")
    res = join_labels([{**id_keys(KEY, accession="ACC1"), "sources": []}], table)
    assert res.labels[0]["label"] == "1"
    with pytest.raises(ManifestError, match="not found"):
        read_labels(tmp_path / "missing.csv", KEY)


def _dataset(n_patients: int, seed: int):
    rng = random.Random(seed)
    groups, strata = [], []
    for p in range(n_patients):
        label = "1" if rng.random() < 0.4 else "0"
        for _ in range(rng.randint(1, 4)):  # several images per patient
            groups.append(f"pat-{p:04d}")
            strata.append(label)
    return groups, strata


@pytest.mark.parametrize("seed", range(8))
def test_a_patient_never_spans_two_splits(seed):
    groups, strata = _dataset(random.Random(seed).randint(1, 60), seed)
    splits = assign_splits(groups, strata, val_frac=0.2, test_frac=0.2, seed=seed)
    per_patient = defaultdict(set)
    for g, s in zip(groups, splits, strict=True):
        per_patient[g].add(s)
    assert all(len(s) == 1 for s in per_patient.values())
    assert set(splits) <= {"train", "val", "test"}
    assert "train" in splits


def test_splits_are_stratified_proportional_and_reproducible():
    groups, strata = _dataset(200, 1)
    a = assign_splits(groups, strata, val_frac=0.15, test_frac=0.25, seed=3)
    assert a == assign_splits(groups, strata, val_frac=0.15, test_frac=0.25, seed=3)
    assert a != assign_splits(groups, strata, val_frac=0.15, test_frac=0.25, seed=4)
    patients = {g: (s, lab) for g, s, lab in zip(groups, a, strata, strict=True)}
    n = Counter(s for s, _ in patients.values())
    assert abs(n["test"] / 200 - 0.25) < 0.02
    assert abs(n["val"] / 200 - 0.15) < 0.02
    for label in ("0", "1"):  # each class keeps the proportions
        sub = [s for s, lab in patients.values() if lab == label]
        assert abs(sub.count("test") / len(sub) - 0.25) < 0.03


def test_small_strata_still_reach_val_and_test():
    groups = [f"p{i}" for i in range(6)]
    strata = ["0", "0", "0", "1", "1", "1"]
    splits = assign_splits(groups, strata, val_frac=0.1, test_frac=0.1, seed=0)
    for label in ("0", "1"):
        got = {s for s, lab in zip(splits, strata, strict=True) if lab == label}
        assert got == {"train", "val", "test"}


def test_given_splits_are_honoured_for_the_whole_patient():
    groups = ["a", "a", "b", "c", "d", "e"]
    strata = ["1", "1", "0", "1", "0", "1"]
    given = ["test", "", "", "", "", ""]
    splits = assign_splits(groups, strata, given, val_frac=0.2, test_frac=0.2, seed=0)
    assert splits[0] == splits[1] == "test"
    with pytest.raises(ManifestError, match=r"patient a .*'test' and 'train'"):
        assign_splits(groups, strata, ["test", "train", "", "", "", ""])


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (1.0, 0.0), (0.2, 1.2)])
def test_bad_fractions_are_config_errors(val, test):
    with pytest.raises(ConfigError, match="--val-frac"):
        assign_splits(["a"], ["0"], val_frac=val, test_frac=test)
