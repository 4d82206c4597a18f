"""``medres.train.folds``: the fold assignment and the plan of a ``--folds K`` run."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from medres.dataset.manifest import read_manifest
from medres.errors import ConfigError
from medres.train.calibrate import fit_shift
from medres.train.fingerprint import DataFingerprint, StepTiming
from medres.train.folds import assign_folds, fold_manifest
from medres.train.plan import Candidate, make_plan, size_candidates
from medres.train.resolve import resolve_spec
from medres.train.spec import PipelineSpec, apply_overrides

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from train_data import make_dataset


def _spec(manifest: Path, folds: int, seed: int = 0) -> PipelineSpec:
    return apply_overrides(
        PipelineSpec(), {"data.manifest": str(manifest), "model.folds": folds, "train.seed": seed}
    )


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory):
    path = make_dataset(tmp_path_factory.mktemp("f") / "ds", n=40, size=8)
    return read_manifest(path)


def test_folds_are_deterministic_per_seed_and_cover_train_and_val_only(manifest):
    spec, labels = resolve_spec(_spec(manifest.path, 4), manifest)
    a, b = assign_folds(manifest, spec, labels), assign_folds(manifest, spec, labels)
    assert a.fold == b.fold and a.k == 4 and sorted(set(a.fold.values())) == [0, 1, 2, 3]
    pooled = {i for i, r in enumerate(manifest.rows) if r["split"] in ("train", "val")}
    assert set(a.fold) == pooled
    other = assign_folds(manifest, replace(spec, train=replace(spec.train, seed=7)), labels)
    assert other.fold != a.fold
    m2 = fold_manifest(manifest, a, 2, spec.data)
    for i, (r0, r2) in enumerate(zip(manifest.rows, m2.rows, strict=True)):
        want = r0["split"] if i not in a.fold else ("val" if a.fold[i] == 2 else "train")
        assert r2["split"] == want and r2["image_id"] == r0["image_id"]


def test_a_class_with_fewer_patients_than_folds_is_refused(manifest):
    rows = [dict(r) for r in manifest.rows]
    for r in rows:  # one positive patient left in train+val
        if r["split"] in ("train", "val") and r["label"] == "1":
            r["label"] = "0"
    rows[0]["label"] = "1"
    m = replace(manifest, rows=rows)
    spec, labels = resolve_spec(_spec(manifest.path, 3), m)
    with pytest.raises(ConfigError, match=r"class '1' has 1 patient\(s\).*add cases"):
        assign_folds(m, spec, labels)


def _fp() -> DataFingerprint:
    return DataFingerprint(
        manifest="m.csv", dims=2, channels=1, modality="US", body_part="", median_shape=(28, 28),
        median_spacing=(1.0, 1.0), n_train=546, n_val=78, n_test=156, n_patients=780,
        task="binary", classes=("0", "1"), class_counts=(147, 399),
    )  # fmt: skip


def _cands(fp: DataFingerprint) -> list[Candidate]:
    out = []
    for size, stem in size_candidates(fp, cuda=False):
        t = 2e-5 * size**fp.dims
        timing = StepTiming("resnet18", fp.dims, stem, size, 1, 8, t, t / 3)
        out.append(Candidate("resnet18", size, stem, timing, 0.0, 0.0))
    return out


def test_plan_with_folds_shares_the_budget_and_never_adds_a_seed_ensemble():
    fp = _fp()
    plan = make_plan(fp, _cands(fp), budget_min=60, folds=5)
    assert plan.spec.model.folds == 5 and plan.spec.model.ensemble == 1
    assert "x 5 folds" in plan.summary() and "folds: 5" in plan.to_yaml()
    assert plan.estimated_s <= 60 * 60 * 1.05
    single = make_plan(fp, _cands(fp), budget_min=60)
    assert plan.spec.train.epochs < single.spec.train.epochs  # 1/5 of the time each
    free = make_plan(fp, _cands(fp), folds=3)
    assert free.spec.model.folds == 3 and free.estimated_s > single.epoch_s * 3


def test_fit_shift_aligns_an_offset_and_stays_finite_on_separated_cases():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    d = np.where(y == 1, 1.0, -1.0) + rng.normal(0, 1.0, 100) + 3.0  # offset +3
    z = np.stack([np.zeros(100), d], axis=1)
    c = fit_shift(z, y)
    assert (c[1] - c[0]) == pytest.approx(-3.0, abs=0.6)
    sep = np.stack([np.zeros(10), np.r_[np.full(5, 1.0), np.full(5, 2.0)]], axis=1)
    c = fit_shift(sep, np.repeat([0, 1], 5))  # separable: a finite shift into the gap
    assert np.all(np.isfinite(c)) and -2.0 < c[1] - c[0] < -1.0
    assert not fit_shift(z[:10], np.zeros(10, dtype=int)).any()  # one class: no shift
