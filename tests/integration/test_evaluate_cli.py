"""`medres evaluate` end to end through the CLI on predictions CSVs and fake run dirs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from medres.cli import app

runner = CliRunner()
N_BOOT = "200"  # keep the suite fast; the default is 2000


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _strict_json(path: Path) -> dict:
    def bad(name: str) -> None:
        raise AssertionError(f"metrics.json contains {name}")

    return json.loads(path.read_text(), parse_constant=bad)


@pytest.fixture
def three_scores_csv(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    n = 240
    y = rng.random(n) < 0.3
    cnn = 1 / (1 + np.exp(-(2.0 * y - 1.2 + rng.normal(0, 1, n))))
    logit = 1.0 * y + rng.normal(0, 1, n)  # not a probability
    reader = np.clip(np.round(2.5 + 1.3 * y + rng.normal(0, 1, n)), 1, 5).astype(int)
    site = np.array(["north", "south", "east"])[rng.integers(0, 3, n)]
    rows = [
        [f"case{i}", "disease" if y[i] else "healthy", cnn[i], logit[i], reader[i], site[i]]
        for i in range(n)
    ]
    path = _write_csv(
        tmp_path / "preds.csv", ["case", "dx", "cnn", "logit", "reader1", "site"], rows
    )
    return path, {"y": y, "cnn": cnn, "logit": logit, "reader1": reader.astype(float)}


def _invoke(*args: str):
    return runner.invoke(app, list(args))


def test_csv_with_three_scores_writes_both_files(three_scores_csv, tmp_path):
    path, data = three_scores_csv
    out = tmp_path / "eval"
    res = _invoke(
        "evaluate", str(path), "--label", "dx", "--positive", "disease",
        "--score", "cnn", "--score", "logit", "--score", "reader1",
        "--by", "site", "--n-boot", N_BOOT, "--threshold", "0.4", "--out", str(out),
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = _strict_json(out / "metrics.json")
    html = (out / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("data:image/png;base64,") >= 4
    y = data["y"]
    assert m["task"] == "binary" and m["n"] == y.size and m["n_positive"] == int(y.sum())
    assert m["positive"] == "disease"
    assert set(m["models"]) == {"cnn", "logit", "reader1"}
    for name, mm in m["models"].items():
        assert mm["auc"] == pytest.approx(roc_auc_score(y, data[name]), abs=1e-12)
        assert mm["auc_ci_method"] == "delong"
        lo, hi = mm["auc_ci"]
        blo, bhi = mm["auc_ci_bootstrap"]
        assert lo < mm["auc"] < hi and blo < mm["auc"] < bhi
        assert {"youden", "sensitivity_0.90", "sensitivity_0.95", "specificity_0.90"} <= set(
            mm["operating_points"]
        )
        for op in mm["operating_points"].values():
            assert {"threshold", "sensitivity", "specificity", "ppv", "npv"} <= set(op)
    # calibration only for probabilities; the user threshold likewise
    assert m["models"]["cnn"]["brier"] is not None and m["models"]["cnn"]["ece"] is not None
    assert "user" in m["models"]["cnn"]["operating_points"]
    for name in ("logit", "reader1"):
        assert m["models"][name]["brier"] is None and m["models"][name]["ece"] is None
        assert "calibration_note" in m["models"][name]
        assert "user" not in m["models"][name]["operating_points"]
    pairs = {(c["a"], c["b"]) for c in m["comparisons"]}
    assert pairs == {("cnn", "logit"), ("cnn", "reader1"), ("logit", "reader1")}
    for c in m["comparisons"]:
        assert c["method"] == "delong_paired" and 0 <= c["p_value"] <= 1
        assert c["auc_diff"] == pytest.approx(
            m["models"][c["a"]]["auc"] - m["models"][c["b"]]["auc"]
        )
        assert c["diff_ci"][0] < c["auc_diff"] < c["diff_ci"][1]
    sites = {r["value"]: r for r in m["subgroups"]["site"]}
    assert set(sites) == {"north", "south", "east"}
    assert sum(r["n"] for r in sites.values()) == y.size
    assert "case0" not in html and "case0" not in (out / "metrics.json").read_text()


def _fake_run_dir(root: Path, task: str, n: int = 120, seed: int = 0) -> Path:
    """A run dir as `medres train` writes it (docs/architecture.md, "Run directory")."""
    rng = np.random.default_rng(seed)
    run = root / f"run_{task}"
    (run / "model").mkdir(parents=True)
    manu = ["GE", "SIEMENS", "PHILIPS"]
    if task == "binary":
        classes = ["normal", "nodule"]
        meta = {
            "task": "binary",
            "classes": classes,
            "positive_class": "nodule",
            "arch": "resnet18",
        }
    elif task == "multiclass":
        classes = ["a", "b", "c"]
        meta = {"task": "multiclass", "classes": classes, "arch": "resnet34"}
    else:
        classes = ["edema", "effusion"]
        meta = {"task": "multilabel", "classes": classes, "arch": "resnet50"}
    meta |= {"format": "medres-model/1", "num_classes": len(classes), "dims": 2}
    (run / "model" / "model.json").write_text(json.dumps(meta))
    for split, m in (("val", n // 2), ("test", n)):
        rows = []
        for i in range(m):
            common = [f"img-{i:016x}", split]
            tail = ["CT", manu[i % 3], "CHEST", "F" if i % 2 else "M", str(30 + i % 50), "pk", "sk"]
            if task == "multilabel":
                lab = rng.random(len(classes)) < 0.4
                prob = np.clip(0.5 * lab + rng.random(len(classes)) * 0.6, 0, 1)
                rows.append([*common, *lab.astype(int), *prob, "", *tail])
            else:
                k = int(rng.integers(0, len(classes)))
                logits = rng.normal(0, 1, len(classes))
                logits[k] += 1.5
                prob = np.exp(logits) / np.exp(logits).sum()
                rows.append([*common, classes[k], *prob, classes[int(np.argmax(prob))], *tail])
        labels = [f"label_{c}" for c in classes] if task == "multilabel" else ["label"]
        header = ["image_id", "split", *labels, *[f"prob_{c}" for c in classes], "pred"]
        header += [
            "modality",
            "manufacturer",
            "body_part",
            "sex",
            "age",
            "patient_key",
            "study_key",
        ]
        _write_csv(run / f"predictions_{split}.csv", header, rows)
    return run


def test_run_dir_binary_with_subgroups(tmp_path):
    run = _fake_run_dir(tmp_path, "binary")
    out = tmp_path / "ev"
    res = _invoke(
        "evaluate",
        str(run),
        "--by",
        "manufacturer",
        "--by",
        "age",
        "--n-boot",
        N_BOOT,
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    m = _strict_json(out / "metrics.json")
    with (run / "predictions_test.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    y = np.array([r["label"] == "nodule" for r in rows])
    s = np.array([float(r["prob_nodule"]) for r in rows])
    assert m["positive"] == "nodule" and list(m["models"]) == ["resnet18"]
    assert m["models"]["resnet18"]["auc"] == pytest.approx(roc_auc_score(y, s))
    assert m["data"]["splits"]["val"]["n"] == 60 and m["data"]["splits"]["test"]["n"] == 120
    assert {r["value"] for r in m["subgroups"]["manufacturer"]} == {"GE", "SIEMENS", "PHILIPS"}
    assert len(m["subgroups"]["age"]) == 4  # quartile bins of a numeric column
    html = (out / "report.html").read_text()
    assert "img-0000" not in html and "AUC by manufacturer" in html
    # the val split is evaluated when asked
    res = _invoke("evaluate", str(run), "--split", "val", "--n-boot", "0", "--out", str(out / "v"))
    assert res.exit_code == 0, res.output
    mv = _strict_json(out / "v" / "metrics.json")
    assert mv["n"] == 60 and mv["models"]["resnet18"]["auc_ci_bootstrap"] is None


def test_run_dir_multiclass(tmp_path):
    run = _fake_run_dir(tmp_path, "multiclass", n=150)
    out = tmp_path / "ev"
    res = _invoke("evaluate", str(run), "--n-boot", N_BOOT, "--by", "sex", "--out", str(out))
    assert res.exit_code == 0, res.output
    m = _strict_json(out / "metrics.json")
    with (run / "predictions_test.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    classes = ["a", "b", "c"]
    y = np.array([classes.index(r["label"]) for r in rows])
    P = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert m["task"] == "multiclass"
    for k, c in enumerate(classes):
        assert m["per_class"][c]["auc"] == pytest.approx(roc_auc_score(y == k, P[:, k]))
        lo, hi = m["per_class"][c]["auc_ci"]
        assert lo < m["per_class"][c]["auc"] < hi
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, P, multi_class="ovr", average="macro"))
    assert m["accuracy"] == pytest.approx(np.mean(P.argmax(1) == y))
    assert np.sum(m["confusion_matrix"]["matrix"]) == len(rows)
    lo, hi = m["macro_auc_ci_bootstrap"]
    assert lo < m["macro_auc"] < hi
    assert {r["value"] for r in m["subgroups"]["sex"]} == {"F", "M"}


def test_run_dir_multilabel(tmp_path):
    run = _fake_run_dir(tmp_path, "multilabel")
    out = tmp_path / "ev"
    res = _invoke("evaluate", str(run), "--n-boot", N_BOOT, "--out", str(out))
    assert res.exit_code == 0, res.output
    m = _strict_json(out / "metrics.json")
    with (run / "predictions_test.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    Y = np.array([[int(r[f"label_{c}"]) for c in ("edema", "effusion")] for r in rows])
    P = np.array([[float(r[f"prob_{c}"]) for c in ("edema", "effusion")] for r in rows])
    assert m["task"] == "multilabel"
    assert m["per_label"]["effusion"]["auc"] == pytest.approx(roc_auc_score(Y[:, 1], P[:, 1]))
    assert m["micro_auc"] == pytest.approx(roc_auc_score(Y.ravel(), P.ravel()))
    assert (out / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("rows", "args", "needle"),
    [
        ([["1", "0.3"], ["0", "0.2"]], ["--score", "nope"], "no column 'nope'"),
        ([["1", "0.3"], ["1", "0.2"]], ["--score", "p"], "AUC needs both classes"),
        ([["1", "0.3"], ["0", "abc"]], ["--score", "p"], "row 3 is not a number"),
        ([["1", "0.3"], ["0", ""], ["0", "0.1"]], ["--score", "p"], "pass --drop-missing"),
        ([["1", "0.3"], ["0", "nan"]], ["--score", "p", "--positive", "2"], "does not occur"),
        ([["1", "0.3"], ["0", "0.1"]], ["--score", "p", "--score", "p"], "given twice"),
        (
            [["1", "0.3"], ["0", "0.1"]],
            ["--score", "p", "--ci-transform", "x"],
            "known: none, logit",
        ),
        ([["1", "0.3"], ["0", "0.1"]], ["--score", "p", "--n-boot", "-1"], "--n-boot"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, rows, args, needle):
    path = _write_csv(tmp_path / "p.csv", ["y", "p"], rows)
    res = _invoke("evaluate", str(path), "--label", "y", *args, "--out", str(tmp_path / "o"))
    assert res.exit_code == 1, res.output
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert needle in err and "Traceback" not in res.output
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_identifier_like_subgroup_column_is_refused(three_scores_csv, tmp_path):
    path, _ = three_scores_csv
    res = _invoke(
        "evaluate", str(path), "--label", "dx", "--positive", "disease", "--score", "cnn",
        "--by", "case", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert res.exit_code == 1
    assert "looks like an identifier" in res.output and "case0" not in res.output


def test_drop_missing_drops_rows(tmp_path):
    rows = [["1", "0.9"], ["0", ""], ["0", "0.1"], ["", "0.5"], ["1", "0.6"], ["0", "0.7"]]
    path = _write_csv(tmp_path / "p.csv", ["y", "p"], rows)
    out = tmp_path / "o"
    res = _invoke(
        "evaluate",
        str(path),
        "--label",
        "y",
        "--score",
        "p",
        "--drop-missing",
        "--n-boot",
        "50",
        "--out",
        str(out),
    )
    assert res.exit_code == 0, res.output
    m = _strict_json(out / "metrics.json")
    assert m["n"] == 4 and m["data"]["n_dropped"] == 2
    assert m["models"]["p"]["auc"] == pytest.approx(
        roc_auc_score([1, 0, 1, 0], [0.9, 0.1, 0.6, 0.7])
    )


def test_missing_split_in_run_dir(tmp_path):
    run = _fake_run_dir(tmp_path, "binary", n=20)
    res = _invoke("evaluate", str(run), "--split", "train", "--out", str(tmp_path / "o"))
    assert res.exit_code == 1
    assert "no predictions_train.csv" in res.output and "predictions_test.csv" in res.output


def test_single_case_class_gives_null_not_nan(tmp_path):
    rows = [["1", "0.9"], ["0", "0.1"], ["0", "0.3"], ["0", "0.95"]]
    path = _write_csv(tmp_path / "p.csv", ["y", "p"], rows)
    out = tmp_path / "o"
    res = _invoke(
        "evaluate", str(path), "--label", "y", "--score", "p", "--n-boot", "20", "--out", str(out)
    )
    assert res.exit_code == 0, res.output
    m = _strict_json(out / "metrics.json")
    assert m["models"]["p"]["auc"] == pytest.approx(2 / 3)
    assert m["models"]["p"]["auc_ci"] is None and m["models"]["p"]["auc_se"] is None
    assert not math.isnan(m["models"]["p"]["brier"])


def test_run_dir_uses_label_columns_recorded_by_training(tmp_path):
    """Multi-label runs whose manifest columns are not label_<class> (data.classes renamed)."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    meta = {"task": "multilabel", "classes": ["x", "y"], "label_columns": ["find_a", "find_b"]}
    (run / "model" / "model.json").write_text(json.dumps(meta))
    rng = np.random.default_rng(4)
    lab = rng.random((80, 2)) < 0.5
    prob = np.clip(0.4 * lab + 0.6 * rng.random((80, 2)), 0, 1)
    rows = [[f"img-{i}", "test", *lab[i].astype(int), *prob[i], ""] for i in range(80)]
    _write_csv(
        run / "predictions_test.csv",
        ["image_id", "split", "find_a", "find_b", "prob_x", "prob_y", "pred"],
        rows,
    )
    out = tmp_path / "o"
    res = _invoke("evaluate", str(run), "--n-boot", "50", "--out", str(out))
    assert res.exit_code == 0, res.output
    m = _strict_json(out / "metrics.json")
    assert m["labels"] == ["x", "y"]
    assert m["per_label"]["y"]["auc"] == pytest.approx(roc_auc_score(lab[:, 1], prob[:, 1]))


def test_run_dir_subgroup_column_joined_from_manifest(tmp_path):
    """A --by column that training did not pass through comes from the run's manifest."""
    run = _fake_run_dir(tmp_path, "binary", n=60)
    with (run / "predictions_test.csv").open() as fh:
        ids = [r["image_id"] for r in csv.DictReader(fh)]
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    rows = [[iid, f"images/{iid}.nii.gz", "test", ["A", "B"][k % 2]] for k, iid in enumerate(ids)]
    _write_csv(dataset / "manifest.csv", ["image_id", "image_path", "split", "site"], rows)
    (run / "pipeline.yaml").write_text(f"data:\n  manifest: {dataset / 'manifest.csv'}\n")
    out = tmp_path / "o"
    res = _invoke("evaluate", str(run), "--by", "site", "--n-boot", "0", "--out", str(out))
    assert res.exit_code == 0, res.output
    m = _strict_json(out / "metrics.json")
    assert {r["value"]: r["n"] for r in m["subgroups"]["site"]} == {"A": 30, "B": 30}
    # a column that exists nowhere is still a one-line error naming it
    res = _invoke("evaluate", str(run), "--by", "scanner_room", "--out", str(out))
    assert res.exit_code == 1 and "no column 'scanner_room'" in res.output


@pytest.mark.reliability
@pytest.mark.parametrize(
    "content",
    [b"", b"y,p\n", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe garbage", b"y,p\n1,0.5\x00\n0,0.2\n"],
)
def test_hostile_files_are_one_line_errors(tmp_path, content):
    path = tmp_path / "p.csv"
    path.write_bytes(content)
    res = _invoke(
        "evaluate", str(path), "--label", "y", "--score", "p", "--out", str(tmp_path / "o")
    )
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and res.output.count("error:") == 1


def test_out_that_is_a_file_is_refused(three_scores_csv, tmp_path):
    path, _ = three_scores_csv
    blocker = tmp_path / "taken"
    blocker.write_text("x")
    res = _invoke(
        "evaluate",
        str(path),
        "--label",
        "dx",
        "--positive",
        "disease",
        "--score",
        "cnn",
        "--n-boot",
        "0",
        "--out",
        str(blocker),
    )
    assert res.exit_code == 1 and "is a file" in res.output
