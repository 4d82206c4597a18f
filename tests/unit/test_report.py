"""medres.evaluate.report: self-contained HTML with real embedded plots, escaped text, no identifiers."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from medres.evaluate.evaluate import EvaluateConfig, run_evaluate
from medres.evaluate.report import render_report

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')


def _csv(tmp_path: Path, columns: dict[str, list[object]]) -> Path:
    path = tmp_path / "preds.csv"
    names = list(columns)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        w.writerows(zip(*(columns[c] for c in names), strict=True))
    return path


@pytest.fixture(scope="module")
def binary_metrics(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp_path = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(5)
    n = 120
    y = rng.random(n) < 0.4
    p = 1 / (1 + np.exp(-(1.5 * y - 0.7 + rng.normal(0, 1, n))))
    rating = np.clip(np.round(3 + y + rng.normal(0, 1, n)), 1, 5)
    path = _csv(
        tmp_path,
        {
            "patient_name": [f"DOE^JOHN{i}" for i in range(n)],
            "truth": ["pos" if v else "neg" for v in y],
            "<b>cnn</b>": p.tolist(),
            "reader": rating.tolist(),
            "scanner": [["GE", "SIEMENS"][i % 2] for i in range(n)],
        },
    )
    cfg = EvaluateConfig(
        target=path,
        out=tmp_path / "out",
        label="truth",
        positive="pos",
        scores=("<b>cnn</b>", "reader"),
        by=("scanner",),
        n_boot=100,
    )
    return run_evaluate(cfg).metrics


@pytest.fixture(scope="module")
def page(binary_metrics: dict) -> str:
    return render_report(binary_metrics)


def _images(page: str) -> list[tuple[str, np.ndarray]]:
    out = []
    for alt, data in IMG.findall(page):
        raw = base64.b64decode(data)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        out.append((alt, imread(io.BytesIO(raw), format="png")))
    return out


def test_binary_report_embeds_nonblank_plots(page):
    imgs = _images(page)
    alts = [a for a, _ in imgs]
    for needed in (
        "ROC curve",
        "Precision-recall curve",
        "Reliability diagram",
        "Confusion matrix",
    ):
        assert needed in alts, alts
    assert "AUC by scanner" in alts
    assert page.count("<img") == len(imgs)  # every image is an embedded PNG
    for alt, arr in imgs:
        rgb = arr[..., :3]
        assert arr.shape[0] > 100 and arr.shape[1] > 100, alt
        non_white = np.mean(np.any(rgb < 0.95, axis=-1))
        assert non_white > 0.02 and rgb.std() > 0.05, f"{alt} looks blank"


def test_report_is_self_contained_and_escaped(page):
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert "@import" not in page and "url(" not in page
    assert "<b>cnn</b>" not in page and "&lt;b&gt;cnn&lt;/b&gt;" in page
    assert "DOE^JOHN" not in page


def test_report_sections_and_headline(binary_metrics, page):
    m = binary_metrics
    auc = m["models"]["<b>cnn</b>"]["auc"]
    lo, hi = m["models"]["<b>cnn</b>"]["auc_ci"]
    assert f"{auc:.3f}" in page and f"{lo:.3f}–{hi:.3f}" in page
    for heading in (
        "Data summary",
        "Operating points",
        "Comparisons (paired DeLong)",
        "Subgroups",
        "Discrimination and calibration",
        "Methods",
    ):
        assert f"<h2>{heading}</h2>" in page
    assert "prevalence" in page and "optimistic" in page
    # the reader rating is not a probability: noted, not calibrated
    assert "apply to probabilities only" in page


def test_report_renders_from_metrics_json_round_trip(binary_metrics, page):
    text = json.dumps(binary_metrics, allow_nan=False)
    again = render_report(json.loads(text))
    assert again == page


def test_multiclass_report(tmp_path):
    rng = np.random.default_rng(2)
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    classes = ["cat", "dog", "eel"]
    (run / "model" / "model.json").write_text(
        json.dumps({"task": "multiclass", "classes": classes})
    )
    rows = []
    for i in range(90):
        k = i % 3
        z = rng.normal(0, 1, 3)
        z[k] += 1.2
        p = np.exp(z) / np.exp(z).sum()
        rows.append([f"img-{i:016x}", "test", classes[k], *p, classes[int(p.argmax())]])
    with (run / "predictions_test.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_id", "split", "label", *[f"prob_{c}" for c in classes], "pred"])
        w.writerows(rows)
    m = run_evaluate(EvaluateConfig(target=run, out=tmp_path / "o", n_boot=50)).metrics
    page = render_report(m)
    alts = [a for a, _ in _images(page)]
    assert {"ROC curve", "Precision-recall curve", "Confusion matrix"} <= set(alts)
    assert "Per class (one-vs-rest)" in page and "macro AUC" in page
    assert "img-0000" not in page
