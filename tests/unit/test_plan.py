"""The self-configuring plan: fingerprints of tiny manifests, the rules, budgets, plan.yaml."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medres.cli import app
from medres.dataset.manifest import read_manifest
from medres.train.fingerprint import DataFingerprint, StepTiming, data_fingerprint
from medres.train.plan import Candidate, make_plan, size_candidates
from medres.train.spec import load_pipeline

SPLITS = ("train", "train", "train", "val", "test")


def _manifest(
    root: Path,
    *,
    n: int = 20,
    dims: int = 2,
    size: int = 12,
    channels: int = 1,
    modality: str = "DX",
    classes: int = 2,
    labels: list[int] | None = None,
) -> Path:
    """Tiny NIfTI images + manifest.csv (one image per patient)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        lab = labels[i] if labels else i % classes
        shape = (size,) * dims + ((channels,) if channels > 1 else ())
        arr = rng.normal(100, 10, size=shape).astype(np.float32) + 50 * lab
        path = f"images/i{i:03d}.nii"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), root / path)
        rows.append({
            "image_id": f"img-{i:016x}", "image_path": path, "dims": dims,
            "channels": channels, "shape": "x".join([str(size)] * dims),
            "spacing": "x".join(["0.5"] * dims), "modality": modality,
            "patient_key": f"p{i:015x}", "label": lab, "split": SPLITS[i % 5],
        })  # fmt: skip
    path = root / "manifest.csv"
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_fingerprint_2d_binary(tmp_path):
    fp = data_fingerprint(read_manifest(_manifest(tmp_path, size=12, modality="US")))
    assert (fp.dims, fp.channels, fp.modality) == (2, 1, "US")
    assert fp.median_shape == (12, 12) and fp.median_spacing == (0.5, 0.5)
    assert (fp.n_train, fp.n_val, fp.n_test, fp.n_patients) == (12, 4, 4, 20)
    assert fp.task == "binary" and fp.classes == ("0", "1") and fp.class_counts == (6, 6)
    assert fp.imbalance == 1.0 and "US" in fp.summary()


def test_fingerprint_3d_rgb_and_multiclass(tmp_path):
    fp3 = data_fingerprint(read_manifest(_manifest(tmp_path / "a", dims=3, size=8, modality="CT")))
    assert fp3.dims == 3 and fp3.median_shape == (8, 8, 8) and fp3.modality == "CT"
    rgb = _manifest(tmp_path / "b", channels=3, modality="XC", classes=3, n=30)
    fp = data_fingerprint(read_manifest(rgb))
    assert fp.channels == 3 and fp.task == "multiclass" and len(fp.classes) == 3
    assert sum(fp.class_counts) == fp.n_train == 18
    labels = [1] * 16 + [0] * 4  # train: 0 appears in 2 of 12 training rows
    fp_imb = data_fingerprint(read_manifest(_manifest(tmp_path / "c", labels=labels)))
    assert fp_imb.imbalance == pytest.approx(max(fp_imb.class_counts) / min(fp_imb.class_counts))
    assert fp_imb.imbalance > 3


def _fp(**kw) -> DataFingerprint:
    base = dict(
        manifest="m.csv", dims=2, channels=1, modality="US", body_part="", median_shape=(28, 28),
        median_spacing=(1.0, 1.0), n_train=546, n_val=78, n_test=156, n_patients=780,
        task="binary", classes=("0", "1"), class_counts=(147, 399),
    )  # fmt: skip
    base.update(kw)
    return DataFingerprint(**base)


def _cands(fp: DataFingerprint, per_px: float = 2e-5) -> list[Candidate]:
    """Synthetic candidates whose cost grows with the number of pixels."""
    out = []
    for size, stem in size_candidates(fp, cuda=False):
        t = per_px * size**fp.dims
        out.append(
            Candidate(
                "resnet18",
                size,
                stem,
                StepTiming("resnet18", fp.dims, stem, size, 1, 8, t, t / 3),
                0.0,
                0.0,
            )
        )
    return out


def _val(plan, key):
    return {c.key: c.value for c in plan.choices}[key]


@pytest.mark.parametrize(
    ("modality", "channels", "flips"),
    [
        ("DX", 1, []),
        ("CR", 1, []),
        ("US", 1, [0]),
        ("XC", 3, [0, 1]),
        ("", 3, [0, 1]),
        ("MR", 1, [0]),
    ],
)
def test_augmentation_fits_the_modality(modality, channels, flips):
    fp = _fp(modality=modality, channels=channels)
    plan = make_plan(fp, _cands(fp))
    assert list(plan.spec.transforms.flip_axes) == flips
    if modality == "US":
        assert plan.spec.transforms.rotate_deg == 15.0 and plan.spec.transforms.noise_prob == 0


def test_small_images_small_stem_3d_standard_stem_and_imbalance():
    fp = _fp()
    plan = make_plan(fp, _cands(fp), budget_min=60)
    assert plan.spec.model.stem == "small" and plan.spec.model.arch == "resnet18"
    assert plan.spec.data.balance == "none"
    fp3 = _fp(dims=3, median_shape=(64, 64, 64), median_spacing=(1.0,) * 3, modality="CT")
    plan3 = make_plan(fp3, _cands(fp3, 1e-7), budget_min=15)
    assert plan3.spec.model.stem == "standard" and plan3.spec.model.dims == 3
    assert plan3.spec.train.batch_size == 8
    assert make_plan(_fp(class_counts=(50, 300)), _cands(fp)).spec.data.balance == "weights"
    assert make_plan(_fp(class_counts=(10, 500)), _cands(fp)).spec.data.balance == "sampler"


def test_budget_scaling_is_monotone_and_fits():
    fp = _fp()
    cands = _cands(fp)
    plans = [make_plan(fp, cands, budget_min=b) for b in (2, 4, 8, 15, 30, 60)]
    pixels = [p.spec.transforms.image_size[0] ** 2 * p.spec.train.epochs for p in plans]
    assert pixels == sorted(pixels) and pixels[0] < pixels[-1]
    for p in plans:
        assert p.estimated_min <= p.budget_min  # the plan fits the budget
    assert plans[-1].spec.transforms.image_size[0] > plans[0].spec.transforms.image_size[0]


def test_no_budget_uses_the_default_epochs_and_says_so():
    fp = _fp()
    plan = make_plan(fp, _cands(fp))
    assert plan.spec.train.epochs == 37  # 20000 / 546
    reason = {c.key: c.reason for c in plan.choices}["train.epochs"]
    assert "no budget" in reason and "no budget" in plan.to_yaml()
    with pytest.raises(Exception, match="time-budget"):
        make_plan(fp, _cands(fp), budget_min=-1)


def test_plan_yaml_round_trips_through_the_spec_loader(tmp_path):
    fp = _fp(manifest=str(tmp_path / "manifest.csv"))
    plan = make_plan(fp, _cands(fp), budget_min=15)
    text = plan.to_yaml()
    assert "# estimated_minutes:" in text
    body = [ln for ln in text.splitlines() if ln.startswith("  ")]
    assert body and all("  # " in ln for ln in body)  # every choice explained
    (tmp_path / "plan.yaml").write_text(text)
    assert load_pipeline(tmp_path / "plan.yaml") == plan.spec


def test_medres_plan_cli_prints_and_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDRES_CACHE_DIR", str(tmp_path / "cache"))
    manifest = _manifest(tmp_path / "ds", size=8)
    out = tmp_path / "plan.yaml"
    r = CliRunner().invoke(
        app, ["plan", str(manifest), "--time-budget", "1", "--out", str(out), "--device", "cpu"]
    )
    assert r.exit_code == 0, r.output
    assert "estimated" in r.output and "flip_axes: []" in r.output  # DX: no flips
    spec = load_pipeline(out)
    assert spec.data.manifest == str(manifest) and spec.model.stem == "small"
    assert (tmp_path / "cache" / "steptime.json").is_file()
    r = CliRunner().invoke(app, ["plan", str(manifest), "--time-budget", "-2"])
    assert r.exit_code == 1 and "--time-budget" in r.output


def test_candidate_sizes_upsample_small_images_and_cap_3d():
    assert [s for s, _ in size_candidates(_fp(), cuda=False)] == [56, 40, 28]
    fp3 = _fp(dims=3, median_shape=(64, 64, 64))
    assert [s for s, _ in size_candidates(fp3, cuda=False)] == [64, 48, 32]
    big = dataclasses.replace(_fp(), median_shape=(512, 512))
    assert size_candidates(big, cuda=False) == [(64, "standard")]


def test_budget_scheduler_follows_the_clock():
    import time

    import torch

    from medres.train.engine import lr_factor
    from medres.train.plan import budget_scheduler
    from medres.train.spec import TrainSpec

    spec = TrainSpec(epochs=10, warmup_epochs=1.0, lr=1.0, scheduler="cosine")
    p = torch.nn.Parameter(torch.zeros(1))
    far = budget_scheduler(torch.optim.SGD([p], lr=1.0), spec, 10, time.perf_counter() + 1e6)
    assert [far.lr_lambdas[0](s) for s in (0, 20, 50)] == [
        lr_factor(s, 100, 10, "cosine") for s in (0, 20, 50)
    ]
    past = budget_scheduler(torch.optim.SGD([p], lr=1.0), spec, 10, time.perf_counter() + 0.01)
    time.sleep(0.02)
    assert past.lr_lambdas[0](3) == lr_factor(3, 100, 10, "cosine")  # warm-up keeps its steps
    assert past.lr_lambdas[0](20) == pytest.approx(0.0, abs=1e-9)  # time is up: annealed


def test_binary_masks_get_min_max_not_zscore(tmp_path):
    from medres.train.resolve import resolve_spec
    from medres.train.transforms import build_transforms

    path = _manifest(tmp_path, dims=3, size=8, modality="")
    for nii in (tmp_path / "images").glob("*.nii"):  # 0/255 masks, as AdrenalMNIST3D
        mask = (np.arange(512).reshape(8, 8, 8) % 7 == 0).astype(np.uint8) * 255
        nib.save(nib.Nifti1Image(mask, np.eye(4)), nii)
    manifest = read_manifest(path)
    fp = data_fingerprint(manifest)
    assert fp.intensity_levels == 2
    plan = make_plan(fp, _cands(fp, 1e-7), budget_min=5)
    assert plan.spec.transforms.intensity == "range"
    spec, _ = resolve_spec(plan.spec, manifest)
    item = {"image": str(manifest.resolve(manifest.rows[0])), "channels": 1}
    x = build_transforms(spec.transforms, train=False)(item)["image"]
    assert float(x.max()) > 0.5  # the masks survive preprocessing
    normal = data_fingerprint(read_manifest(_manifest(tmp_path / "n", size=8)))
    assert normal.intensity_levels > 2
    assert make_plan(normal, _cands(normal)).spec.transforms.intensity == "auto"
