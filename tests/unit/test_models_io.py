"""Model directory round trip and the fine-tuning helpers (freezing, parameter groups)."""

from __future__ import annotations

import json

import pytest
import torch

from medres.errors import ModelError
from medres.models import (
    backbone_parameters,
    build_model,
    head_parameters,
    load_model_dir,
    param_groups,
    save_model_dir,
    set_backbone_trainable,
    weights_meta,
)

META = {
    "task": "binary",
    "classes": ["0", "1"],
    "positive_class": "1",
    "weights_source": "imagenet",
    "preprocessing": {"spatial_size": [32, 32], "weights": weights_meta("imagenet", "resnet18", 1)},
}


@pytest.mark.parametrize(("dims", "stem"), [(2, "small"), (3, "standard")])
def test_model_dir_round_trip(tmp_path, dims, stem):
    torch.manual_seed(0)
    model = build_model("resnet18", dims, 1, 2, stem=stem)
    x = torch.randn(2, 1, *([16] * dims))
    model.train()
    model(x)  # move BN running statistics away from their init
    model.eval()
    out = save_model_dir(tmp_path / "run" / "model", model, META)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.safetensors"]
    doc = json.loads((out / "model.json").read_text())
    assert doc["format"] == "medres-model/1" and doc["medres_version"]
    assert (doc["arch"], doc["dims"], doc["in_channels"], doc["num_classes"], doc["stem"]) == (
        "resnet18", dims, 1, 2, stem,
    )  # fmt: skip
    assert doc["preprocessing"]["weights"]["mean"] == [0.449]
    for where in (out, tmp_path / "run"):  # the model dir or its run dir
        loaded, meta = load_model_dir(where)
        assert not loaded.training and meta["classes"] == ["0", "1"]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_save_rejects_contradicting_meta_and_non_json(tmp_path):
    model = build_model("resnet18", 2, 1, 2, stem="small")
    with pytest.raises(ModelError, match="'arch'"):
        save_model_dir(tmp_path / "m", model, {"arch": "resnet50"})
    with pytest.raises(ModelError, match="JSON"):
        save_model_dir(
            tmp_path / "m2", model, {"preprocessing": {"x": torch.zeros(1)}, "n": float("nan")}
        )


def test_load_errors_are_model_errors(tmp_path):
    model = build_model("resnet18", 2, 1, 2, stem="small")
    out = save_model_dir(tmp_path / "m", model, {})
    with pytest.raises(ModelError, match=r"model\.json is missing"):
        load_model_dir(tmp_path / "elsewhere")
    # corrupted weights: caught by the sha256 in model.json
    w = out / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model_dir(out)
    # wrong format and missing fields
    doc = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**doc, "format": "other/9"}))
    with pytest.raises(ModelError, match="format"):
        load_model_dir(out)
    (out / "model.json").write_text(json.dumps({"format": "medres-model/1", "arch": "resnet18"}))
    with pytest.raises(ModelError, match="'dims'"):
        load_model_dir(out)
    (out / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_model_dir(out)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    out = save_model_dir(tmp_path / "m", build_model("resnet18", 2, 1, 2, stem="small"), {})
    doc = json.loads((out / "model.json").read_text())
    doc["num_classes"] = 3
    (out / "model.json").write_text(json.dumps(doc))
    with pytest.raises(ModelError, match="does not fit"):
        load_model_dir(out)


def test_parameter_split_covers_everything_once():
    model = build_model("resnet34", 2, 3, 5, stem="small")
    head = list(head_parameters(model))
    backbone = list(backbone_parameters(model))
    assert [tuple(p.shape) for p in head] == [(5, 512), (5,)]
    assert {id(p) for p in head}.isdisjoint({id(p) for p in backbone})
    assert len(head) + len(backbone) == len(list(model.parameters()))


def test_param_groups_lrs_and_decay():
    model = build_model("resnet18", 2, 1, 2, stem="small")
    groups = param_groups(model, 1e-3, backbone_lr_scale=0.1, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert by_name["backbone"]["lr"] == pytest.approx(1e-4) and by_name["head"]["lr"] == 1e-3
    assert (
        by_name["head_no_decay"]["weight_decay"] == 0.0
        and by_name["backbone"]["weight_decay"] == 1e-4
    )
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    torch.optim.AdamW(groups)  # the groups are accepted by a real optimizer


def test_frozen_backbone_is_a_linear_probe_then_unfreezes():
    torch.manual_seed(0)
    model = build_model("resnet18", 2, 1, 2, stem="small")
    set_backbone_trainable(model, False)
    model.train()
    assert not model.bn1.training and not model.layer1[0].bn1.training and model.fc.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 0, 1])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"fc.weight", "fc.bias"}  # no backbone weight and no BN statistic moved
    set_backbone_trainable(model, True)
    model.train()
    assert model.bn1.training and all(p.requires_grad for p in model.parameters())
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
