"""Ensembles with test-time flips as one module: forward, model dir, export, CAM, plan rule."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from medres.errors import ModelError
from medres.models import build_model, load_model_dir, save_model_dir
from medres.models.ensemble import Ensemble, flip_views
from medres.models.modeldir import ModelMeta
from medres.train.ensemble import member_deadline, plan_members, tta_axes
from medres.train.spec import PipelineSpec, apply_overrides


def _net(k: int = 3, flips: tuple[int, ...] = (0,)) -> Ensemble:
    torch.manual_seed(0)
    net = build_model("resnet18", 2, 1, 2, stem="small", ensemble=k, tta_flips=flips)
    assert isinstance(net, Ensemble)
    return net.eval()


def test_forward_is_the_mean_logit_over_members_and_flips():
    net = _net(3, (0, 1))
    x = torch.randn(2, 1, 16, 12)
    views = [(), (2,), (3,), (2, 3)]
    with torch.no_grad():
        want = torch.stack(
            [m(torch.flip(x, v) if v else x) for m in net.members for v in views]
        ).mean(0)
        assert torch.allclose(net(x), want, atol=1e-6)
        assert torch.allclose(net.without_tta()(x), torch.stack([m(x) for m in net.members]).mean(0), atol=1e-6)  # fmt: skip
    assert flip_views([1, 0]) == [(), (0,), (1,), (0, 1)]
    assert all(k.startswith("members.") for k in net.state_dict())


def test_plain_build_is_unchanged_and_bad_members_are_refused():
    plain = build_model("resnet18", 2, 1, 2, stem="small")
    assert not isinstance(plain, Ensemble) and "conv1.weight" in plain.state_dict()
    with pytest.raises(ModelError, match="tta_flips"):
        build_model("resnet18", 2, 1, 2, ensemble=2, tta_flips=(2,))
    with pytest.raises(ModelError, match="differ"):
        Ensemble([build_model("resnet18", 2, 1, 2), build_model("resnet18", 2, 1, 3)])


def test_model_dir_round_trip_records_ensemble_and_flips(tmp_path):
    net = _net(2, (0,))
    meta = ModelMeta.for_model(net, task="binary", classes=("0", "1"))
    save_model_dir(tmp_path / "m", net, meta)
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    assert doc["ensemble"] == 2 and doc["tta_flips"] == [0]
    again, meta2 = load_model_dir(tmp_path / "m")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), net(x))
    assert meta2.ensemble == 2 and meta2.tta_flips == (0,)
    plain = build_model("resnet18", 2, 1, 2, stem="small")
    save_model_dir(tmp_path / "p", plain, ModelMeta.for_model(plain, task="binary"))
    doc = json.loads((tmp_path / "p" / "model.json").read_text())
    assert "ensemble" not in doc and "tta_flips" not in doc  # as older releases wrote
    model, meta3 = load_model_dir(tmp_path / "p")
    assert meta3.ensemble == 1 and not isinstance(model, Ensemble)


def test_a_wrong_ensemble_field_is_one_model_error(tmp_path):
    net = _net(2, ())
    save_model_dir(tmp_path / "m", net, ModelMeta.for_model(net, task="binary"))
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    doc["ensemble"] = 3  # weights hold 2 members
    (tmp_path / "m" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="does not fit the architecture"):
        load_model_dir(tmp_path / "m")
    doc["ensemble"] = 0
    (tmp_path / "m" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="'ensemble'"):
        load_model_dir(tmp_path / "m")


def test_torchscript_export_and_grad_cam_see_the_ensemble(tmp_path):
    from medres.models.export import export_model
    from medres.score.cam import grad_cam

    net = _net(2, (0,))
    meta = ModelMeta.for_model(
        net, task="binary", classes=("0", "1"), preprocessing={"image_size": [16, 16]}
    )
    save_model_dir(tmp_path / "model", net, meta)
    export_model(tmp_path, "torchscript", tmp_path / "m.pt")  # verified against the module
    ts = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(ts(x), net(x), atol=1e-5)
    cam = grad_cam(net, x[0].numpy(), 1)
    assert cam.shape == (16, 16) and float(cam.max()) <= 1.0


def _cand(epoch_s: float, fixed_s: float = 20.0, eval_s: float = 0.001) -> SimpleNamespace:
    return SimpleNamespace(
        epoch_s=lambda fp: epoch_s, fixed_s=lambda fp: fixed_s, timing=SimpleNamespace(eval_s=eval_s)
    )  # fmt: skip


def test_plan_members_counts_full_trainings_in_the_budget():
    fp = SimpleNamespace(n_val=50, n_test=100)
    single = (30, "single")
    k, epochs, why = plan_members(fp, _cand(2.0), 900, 30, single, 2, 1.25)
    assert k == 5 and 30 <= epochs <= 90 and "ensemble of 5" in why  # 13 full ones fit
    k, epochs, why = plan_members(fp, _cand(10.0), 900, 30, single, 2, 1.25)
    assert k == 2 and "ensemble of 2" in why  # 900 * 0.92 = 828 s: two of 303 s
    k, epochs, why = plan_members(fp, _cand(20.0), 900, 30, single, 2, 1.25)
    assert (k, epochs) == (1, 30) and "an ensemble needs 2" in why
    assert plan_members(fp, _cand(2.0), 0.0, 30, single, 2, 1.25)[0] == 1  # no budget


def test_tta_follows_the_training_flips_and_the_deadline_is_shared():
    spec = PipelineSpec()
    assert tta_axes(apply_overrides(spec, {"transforms.flip_axes": [1, 0]})) == (0, 1)
    assert tta_axes(apply_overrides(spec, {"transforms.flip_axes": []})) == ()
    assert tta_axes(apply_overrides(spec, {"transforms.augment": False})) == ()
    assert tta_axes(apply_overrides(spec, {"model.tta": "off"})) == ()
    assert tta_axes(apply_overrides(spec, {"model.tta": "on", "transforms.augment": False})) == (0,)
    assert tta_axes(apply_overrides(spec, {"model.tta": True, "transforms.augment": False})) == (0,)
    assert tta_axes(apply_overrides(spec, {"model.tta": False})) == ()  # YAML's bare off
    assert member_deadline(100.0, 160.0, 3) == pytest.approx(120.0)
    assert member_deadline(100.0, float("inf"), 3) == float("inf")
