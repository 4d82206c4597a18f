"""medres.dataset.manifest: schema order, round trip, validation errors that name the line."""

from __future__ import annotations

import csv

import pytest

from medres.dataset.manifest import MANIFEST_COLUMNS, column_order, read_manifest, write_manifest
from medres.errors import ManifestError


def _row(i: int, **kw: str) -> dict[str, str]:
    row = {
        "image_id": f"img-{i:016x}",
        "image_path": f"images/img-{i:016x}.nii.gz",
        "source": f"p{i}/ct",
        "dims": "3",
        "channels": "1",
        "shape": "8x8x5",
        "spacing": "0.5x0.5x2",
        "modality": "CT",
        "patient_key": f"pat-{i:04d}",
        "label": str(i % 2),
        "split": "train",
    }
    row.update(kw)
    return row


def _write_raw(path, header, rows):
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_round_trip_keeps_schema_order_and_resolves_paths(tmp_path):
    rows = [_row(1), _row(2, split="test", extra_col="x")]
    path = write_manifest(tmp_path / "manifest.csv", rows)
    header = path.read_text().splitlines()[0].split(",")
    assert header[: len(MANIFEST_COLUMNS)] == list(MANIFEST_COLUMNS)
    assert header[-1] == "extra_col"  # unknown columns are kept, after split
    m = read_manifest(tmp_path)  # the dataset folder works too
    assert m.path == tmp_path / "manifest.csv"
    assert [r["image_id"] for r in m.rows] == [rows[0]["image_id"], rows[1]["image_id"]]
    assert m.rows[1]["extra_col"] == "x"
    assert m.rows[0]["manufacturer"] == ""  # unknown -> empty string
    assert m.resolve(m.rows[0]) == tmp_path / "images" / "img-0000000000000001.nii.gz"
    assert m.label_columns == ("label",)
    assert not m.multilabel
    assert [r["image_id"] for r in m.select("test")] == [rows[1]["image_id"]]


def test_multilabel_columns_take_the_place_of_label(tmp_path):
    rows = [
        {**_row(1), "label_a": "1", "label_b": "0"},
        {**_row(2), "label_a": "0", "label_b": "1"},
    ]
    for r in rows:
        del r["label"]
    write_manifest(tmp_path / "manifest.csv", rows, label_columns=("label_a", "label_b"))
    header = (tmp_path / "manifest.csv").read_text().splitlines()[0].split(",")
    i = header.index("label_a")
    assert header[i : i + 3] == ["label_a", "label_b", "split"]
    m = read_manifest(tmp_path / "manifest.csv")
    assert m.label_columns == ("label_a", "label_b")
    assert m.multilabel
    assert column_order(("label_a",))[-2:] == ["label_a", "split"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"dims": "4"}, "line 3: dims"),
        ({"split": "training"}, "line 3: split"),
        ({"shape": "8by8"}, "line 3: shape"),
        ({"spacing": "0x1"}, "line 3: spacing"),
        ({"image_id": ""}, "line 3: empty image_id"),
        ({"image_path": ""}, "line 3: empty image_path"),
        ({"image_id": "img-0000000000000001"}, "repeats line 2"),
        ({"patient_key": "pat-0001", "split": "test"}, "line 3: patient pat-0001 .*leakage"),
    ],
)
def test_invalid_rows_raise_naming_the_line(tmp_path, change, match):
    rows = [_row(1), _row(2, **change)]
    cols = list(MANIFEST_COLUMNS)
    _write_raw(tmp_path / "m.csv", cols, [[r.get(c, "") for c in cols] for r in rows])
    with pytest.raises(ManifestError, match=match):
        read_manifest(tmp_path / "m.csv")
    # the writer refuses the same rows and leaves no file behind
    with pytest.raises(ManifestError):
        write_manifest(tmp_path / "w.csv", rows)
    assert not (tmp_path / "w.csv").exists()


def test_missing_required_column_and_missing_file(tmp_path):
    _write_raw(tmp_path / "m.csv", ["image_id", "label"], [["a", "1"]])
    with pytest.raises(ManifestError, match=r"missing column.*image_path"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")


def test_multilabel_values_must_be_binary(tmp_path):
    _write_raw(
        tmp_path / "m.csv",
        ["image_id", "image_path", "label_a"],
        [["a", "a.nii", "1"], ["b", "b.nii", "yes"]],
    )
    with pytest.raises(ManifestError, match="line 3: multi-label column label_a"):
        read_manifest(tmp_path / "m.csv")


def test_check_files_reports_missing_image(tmp_path):
    write_manifest(tmp_path / "manifest.csv", [_row(1)])
    read_manifest(tmp_path / "manifest.csv")  # fine without the check
    with pytest.raises(ManifestError, match=r"line 2: image file .* missing"):
        read_manifest(tmp_path / "manifest.csv", check_files=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "img-0000000000000001.nii.gz").write_bytes(b"x")
    assert len(read_manifest(tmp_path / "manifest.csv", check_files=True).rows) == 1


def test_hand_made_manifest_with_bom_and_absolute_path(tmp_path):
    img = tmp_path / "elsewhere" / "a.nii.gz"
    text = f"\ufeffimage_id,image_path,label\nA,{img},1\n"
    (tmp_path / "m.csv").write_text(text, encoding="utf-8")
    m = read_manifest(tmp_path / "m.csv")
    assert m.rows[0]["image_id"] == "A"
    assert m.resolve(m.rows[0]) == img


def test_documented_examples_are_valid(tmp_path):
    """data_manifests/example_*.csv follow the schema that the code enforces."""
    from pathlib import Path

    from medres.ingest.labels import read_labels

    docs = Path(__file__).resolve().parents[2] / "data_manifests"
    m = read_manifest(docs / "example_manifest.csv")
    assert m.columns == MANIFEST_COLUMNS
    assert {r["split"] for r in m.rows} == {"train", "val", "test"}
    readme = (docs / "README.md").read_text()
    for col in MANIFEST_COLUMNS:
        assert f"| `{col}` |" in readme
    from medres.ingest.codes import Code

    for code in Code:  # every errors.csv code is documented
        assert f"| `{code.value}` |" in readme
    assert read_labels(docs / "example_labels.csv", b"k").label_columns == ("label",)
    multi = read_labels(docs / "example_labels_multilabel.csv", b"k")
    assert multi.label_columns == ("label_nodule", "label_effusion")
