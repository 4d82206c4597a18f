"""Dataset exporters: MONAI Decathlon datalist and nnU-Net v2 raw dataset."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medres.cli import app
from medres.dataset.export import class_order, export_dataset, export_monai_datalist, export_nnunet
from medres.dataset.manifest import write_manifest
from medres.errors import ConfigError, ManifestError

runner = CliRunner()

# (image_id, split, label, file suffix)
ROWS = [
    ("img-000000000000000a", "train", "pos", ".nii.gz"),
    ("img-000000000000000b", "train", "neg", ".nii.gz"),
    ("img-000000000000000c", "train", "pos", ".nii"),
    ("img-000000000000000d", "train", "", ".nii.gz"),  # unlabelled
    ("img-000000000000000e", "val", "neg", ".nii.gz"),
    ("img-000000000000000f", "val", "pos", ".nii.gz"),
    ("img-0000000000000010", "test", "neg", ".nii.gz"),
    ("img-0000000000000011", "test", "pos", ".nii.gz"),
]


def _write_image(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([0.7, 0.7, 2.5, 1.0])), str(path))


def _dataset(root: Path, *, dims: int = 3, channels: int = 1, multilabel: bool = False) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i, (iid, split, label, suffix) in enumerate(ROWS):
        shape = (6, 5, 4) if dims == 3 else (6, 5)
        if channels > 1:
            shape = (*shape, channels)
        arr = (rng.normal(size=shape) * 100 + i).astype(np.int16)
        rel = f"images/{iid}{suffix}"
        _write_image(root / rel, arr)
        row = {
            "image_id": iid,
            "image_path": rel,
            "dims": str(dims),
            "channels": str(channels),
            "modality": "CT",
            "patient_key": f"pat-{i}",
            "split": split,
        }
        if multilabel:
            row["label_effusion"] = "" if label == "" else str(i % 2)
            row["label_nodule"] = "" if label == "" else str((i // 2) % 2)
        else:
            row["label"] = label
        rows.append(row)
    labels = ("label_effusion", "label_nodule") if multilabel else ("label",)
    return write_manifest(root / "manifest.csv", rows, label_columns=labels)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return _dataset(tmp_path / "ds")


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


# --- MONAI datalist ----------------------------------------------------------------------
@pytest.mark.parametrize("is_segmentation", [False, True])
def test_datalist_loads_with_monai(manifest: Path, tmp_path: Path, is_segmentation: bool):
    from monai.data import load_decathlon_datalist

    out = tmp_path / "export" / "datalist.json"
    res = export_monai_datalist(manifest, out)
    assert res.counts == {"training": 3, "validation": 2, "test": 2}
    assert res.skipped_unlabelled == 1
    assert res.classes == ("neg", "pos")
    expected = {iid: lab for iid, _s, lab, _x in ROWS}
    for key, split in (("training", "train"), ("validation", "val")):
        items = load_decathlon_datalist(str(out), is_segmentation, key)
        assert {it["image_id"] for it in items} == {
            iid for iid, s, lab, _ in ROWS if s == split and lab
        }
        for it in items:
            img = Path(it["image"])
            assert img.is_absolute() and img.is_file()
            assert img.name.startswith(it["image_id"])
            assert it["label"] == res.classes.index(expected[it["image_id"]])
    test = load_decathlon_datalist(str(out), is_segmentation, "test")
    assert [Path(t["image"]).is_file() for t in test] == [True, True]
    assert all("label" not in t for t in test)
    # paths are stored relative to the JSON's folder, so the default base_dir works
    raw = json.loads(out.read_text())
    assert not os.path.isabs(raw["training"][0]["image"])
    assert raw["task"] == "binary"


def test_datalist_absolute_paths_and_folder_out(manifest: Path, tmp_path: Path):
    out_dir = tmp_path / "dl"
    out_dir.mkdir()
    res = export_monai_datalist(manifest, out_dir, absolute_paths=True)
    assert res.path == out_dir / "datalist.json"
    raw = json.loads(res.path.read_text())
    assert all(os.path.isabs(e["image"]) for e in raw["training"] + raw["test"])


def test_datalist_class_order_override(manifest: Path, tmp_path: Path):
    res = export_monai_datalist(manifest, tmp_path / "d.json", classes=["pos", "neg"])
    raw = json.loads(res.path.read_text())
    by_id = {e["image_id"]: e["label"] for e in raw["training"]}
    assert by_id["img-000000000000000a"] == 0  # pos first now
    assert by_id["img-000000000000000b"] == 1
    with pytest.raises(ConfigError, match="not in --classes"):
        export_monai_datalist(manifest, tmp_path / "e.json", classes=["pos"])


def test_datalist_multilabel(tmp_path: Path):
    from monai.data import load_decathlon_datalist

    m = _dataset(tmp_path / "ml", multilabel=True)
    res = export_monai_datalist(m, tmp_path / "ml.json")
    assert res.label_names == ("effusion", "nodule")
    items = load_decathlon_datalist(str(res.path), False, "training")
    by_id = {it["image_id"]: it["label"] for it in items}
    assert by_id["img-000000000000000a"] == [0, 0]
    assert by_id["img-000000000000000b"] == [1, 0]
    assert by_id["img-000000000000000c"] == [0, 1]
    assert json.loads(res.path.read_text())["task"] == "multilabel"


def _rewrite(manifest: Path, **changes: dict[str, str]) -> Path:
    """Rewrite rows of ``manifest``: ``changes[image_id] = {column: value}``."""
    from medres.dataset.manifest import read_manifest

    m = read_manifest(manifest)
    rows = [{**r, **changes.get(r["image_id"], {})} for r in m.rows]
    return write_manifest(manifest, rows, label_columns=m.label_columns)


def test_datalist_unsplit_rows_go_to_training(manifest: Path, tmp_path: Path, caplog):
    _rewrite(manifest, **{"img-0000000000000010": {"split": ""}})
    with caplog.at_level("WARNING", logger="medres.dataset.export"):
        res = export_monai_datalist(manifest, tmp_path / "u.json")
    assert res.counts == {"training": 4, "validation": 2, "test": 1}
    assert "1 manifest row(s) have no split" in caplog.text


def test_nnunet_rejects_mixed_channel_counts(manifest: Path, tmp_path: Path):
    _rewrite(manifest, **{"img-000000000000000b": {"channels": "3"}})
    with pytest.raises(ManifestError, match="different channel counts"):
        export_nnunet(manifest, tmp_path / "Dataset507_Mixed")


def test_class_order():
    assert class_order(["10", "2", "", "1", "2"]) == ("1", "2", "10")
    assert class_order(["1.5", "0.25", "10"]) == ("0.25", "1.5", "10")
    assert class_order(["b", "a", "10"]) == ("10", "a", "b")


@pytest.mark.parametrize("drop", ["split", "label"])
def test_missing_column_is_one_line_error(manifest: Path, tmp_path: Path, drop: str):
    with manifest.open() as fh:
        rows = list(csv.DictReader(fh))
    bad = manifest.parent / "bad.csv"
    with bad.open("w", newline="") as fh:
        cols = [c for c in rows[0] if c != drop]
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ManifestError) as exc:
        export_monai_datalist(bad, tmp_path / "x.json")
    msg = str(exc.value)
    assert "bad.csv" in msg and drop in msg and "\n" not in msg
    assert not (tmp_path / "x.json").exists()


def test_unknown_format_lists_names(manifest: Path, tmp_path: Path):
    with pytest.raises(ConfigError, match="monai-datalist, nnunet"):
        export_dataset(manifest, "decathlon", tmp_path / "x")


# --- nnU-Net -----------------------------------------------------------------------------
def test_nnunet_layout_and_contents(manifest: Path, tmp_path: Path):
    out = tmp_path / "Dataset501_Tiny"
    res = export_nnunet(manifest, out)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT"}
    assert ds["labels"] == {"background": 0}
    assert ds["file_ending"] == ".nii.gz"
    train_ids = [iid for iid, s, _l, _x in ROWS if s in ("train", "val")]
    test_ids = [iid for iid, s, _l, _x in ROWS if s == "test"]
    assert ds["numTraining"] == len(train_ids) == len(list((out / "imagesTr").iterdir()))
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [
        f"{i}_0000.nii.gz" for i in test_ids
    ]
    for iid, _s, _l, suffix in ROWS:
        sub = "imagesTs" if iid in test_ids else "imagesTr"
        dst = out / sub / f"{iid}_0000.nii.gz"
        np.testing.assert_array_equal(
            _array(dst), _array(manifest.parent / f"images/{iid}{suffix}")
        )
        assert dst.read_bytes()[:2] == b"\x1f\x8b"  # gzip, also for the .nii source
    with (out / "classification_labels.csv").open() as fh:
        side = {r["case"]: r for r in csv.DictReader(fh)}
    assert side["img-000000000000000a"]["label"] == "pos"
    assert side["img-000000000000000a"]["label_index"] == str(res.classes.index("pos"))
    assert side["img-0000000000000010"]["split"] == "test"
    fold = json.loads((out / "splits_final.json").read_text())
    assert sorted(fold[0]["val"]) == ["img-000000000000000e", "img-000000000000000f"]
    assert len(fold[0]["train"]) == 4


@pytest.mark.parametrize("link", ["copy", "hardlink", "symlink"])
def test_nnunet_link_modes(manifest: Path, tmp_path: Path, link: str):
    out = tmp_path / "Dataset502_Links"
    export_nnunet(manifest, out, link=link)
    src = manifest.parent / "images" / "img-000000000000000a.nii.gz"
    dst = out / "imagesTr" / "img-000000000000000a_0000.nii.gz"
    assert dst.is_symlink() == (link == "symlink")
    same_inode = os.stat(dst).st_ino == os.stat(src).st_ino
    assert same_inode == (link in ("hardlink", "symlink"))
    np.testing.assert_array_equal(_array(dst), _array(src))


def test_nnunet_splits_channels(tmp_path: Path):
    m = _dataset(tmp_path / "rgb", dims=2, channels=3)
    out = tmp_path / "Dataset503_Rgb"
    export_nnunet(m, out)
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    src = _array(m.parent / "images" / "img-000000000000000b.nii.gz")
    for c in range(3):
        part = _array(out / "imagesTr" / f"img-000000000000000b_{c:04d}.nii.gz")
        np.testing.assert_array_equal(part, src[..., c])


def test_nnunet_refuses_foreign_folder_and_reexports(manifest: Path, tmp_path: Path):
    out = tmp_path / "Dataset504_Again"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_nnunet(manifest, out)
    (out / "notes.txt").unlink()
    export_nnunet(manifest, out)
    stale = out / "imagesTr" / "img-stale_0000.nii.gz"
    stale.write_bytes(b"x")
    export_nnunet(manifest, out)  # a previous medres export is replaced
    assert not stale.exists()
    with pytest.raises(ConfigError, match="copy, hardlink, symlink"):
        export_nnunet(manifest, out, link="reflink")


def test_nnunet_missing_image_names_row(manifest: Path, tmp_path: Path):
    (manifest.parent / "images" / "img-000000000000000b.nii.gz").unlink()
    with pytest.raises(ManifestError, match="img-000000000000000b"):
        export_nnunet(manifest, tmp_path / "Dataset505_Missing")


# --- CLI ---------------------------------------------------------------------------------
def test_cli_export(manifest: Path, tmp_path: Path):
    out = tmp_path / "dl.json"
    r = runner.invoke(
        app, ["export", str(manifest), "--format", "monai-datalist", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "training 3" in r.output
    assert json.loads(out.read_text())["numTraining"] == 3
    r = runner.invoke(
        app, ["export", str(manifest.parent), "-f", "nnunet", "-o", str(tmp_path / "Dataset506_C")]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "Dataset506_C" / "dataset.json").is_file()


def test_cli_export_bad_input_exit_1(tmp_path: Path):
    r = runner.invoke(
        app, ["export", str(tmp_path / "nope.csv"), "-f", "nnunet", "-o", str(tmp_path / "o")]
    )
    assert r.exit_code == 1
    assert "Traceback" not in r.output
    assert "manifest" in r.output
