"""report.html in a real headless Chromium: loads offline, no console errors, plots visible."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from medres.evaluate.evaluate import EvaluateConfig, run_evaluate

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=10000",
]
# Sets data-probe on <body> once the page has loaded: every image's natural size.
PROBE = """<script>window.addEventListener('load', function () {
  var imgs = Array.prototype.map.call(document.images, function (i) {
    return {alt: i.alt, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight};
  });
  document.body.setAttribute('data-probe', JSON.stringify(imgs));
});</script>"""
CONSOLE = re.compile(r":CONSOLE[:(]|Uncaught|console", re.IGNORECASE)


def _chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    if CHROMIUM is None:
        pytest.skip("chromium not installed: `apt-get install chromium` (done by .ci/run)")
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *extra, url]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"chromium did not finish within 120 s: {' '.join(cmd)}")


def _console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if CONSOLE.search(ln) and "dbus" not in ln.lower()]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if CHROMIUM is None:
        pytest.skip("chromium not installed: `apt-get install chromium` (done by .ci/run)")
    tmp = tmp_path_factory.mktemp("browser")
    rng = np.random.default_rng(3)
    n = 150
    y = rng.random(n) < 0.35
    a = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1, n))))
    b = 1 / (1 + np.exp(-(y - 0.5 + rng.normal(0, 1, n))))
    with (tmp / "preds.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["y", "model_a", "model_b", "site"])
        w.writerows(zip(y.astype(int), a, b, np.array(["s1", "s2"])[np.arange(n) % 2], strict=True))
    cfg = EvaluateConfig(
        target=tmp / "preds.csv",
        out=tmp / "out",
        label="y",
        scores=("model_a", "model_b"),
        by=("site",),
        n_boot=200,
    )
    return run_evaluate(cfg).report_path


def test_page_loads_without_console_errors_and_images_decode(report, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    res = _chromium(tmp_path, probed.as_uri(), "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    assert not _console_lines(res.stderr), _console_lines(res.stderr)
    m = re.search(r'data-probe="([^"]*)"', res.stdout)
    assert m, "the load event never fired: " + res.stdout[:500]
    imgs = json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    alts = {i["alt"] for i in imgs}
    assert {
        "ROC curve",
        "Precision-recall curve",
        "Reliability diagram",
        "Confusion matrix",
    } <= alts
    for i in imgs:
        assert i["complete"] and i["w"] > 100 and i["h"] > 100, i


def test_console_error_detection_works(tmp_path):
    """Negative control: a page that throws must be caught by the same check."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><script>throw new Error('boom')</script></body></html>"
    )
    res = _chromium(tmp_path, bad.as_uri(), "--dump-dom")
    assert any("boom" in ln for ln in _console_lines(res.stderr)), res.stderr[-2000:]


def test_screenshot_shows_plots(report, tmp_path):
    png = tmp_path / "shot.png"
    res = _chromium(tmp_path, report.as_uri(), f"--screenshot={png}", "--window-size=1200,2000")
    assert png.is_file(), res.stderr[-2000:]
    assert not _console_lines(res.stderr), _console_lines(res.stderr)
    img = imread(png)[..., :3]
    assert img.shape[:2] == (2000, 1200)
    non_white = np.mean(np.any(img < 0.94, axis=-1))
    assert non_white > 0.08, f"screenshot is nearly blank ({non_white:.3f} non-white)"
    # the ROC/PR curves of model_a are drawn in #1f77b4 and model_b in #d62728
    for rgb in ((0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)):
        close = np.all(np.abs(img * 255 - np.array(rgb)) < 40, axis=-1)
        assert close.sum() > 500, f"curve colour {rgb} barely present ({close.sum()} px)"
