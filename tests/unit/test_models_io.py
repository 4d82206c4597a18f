"""Model directory round trip, ModelMeta (model.json) and the fine-tuning helpers."""

from __future__ import annotations

import dataclasses
import json
import pickle
import subprocess
import sys

import pytest
import torch

from medres.errors import ModelError
from medres.models import (
    ModelMeta,
    backbone_parameters,
    build_model,
    head_parameters,
    load_model_dir,
    param_groups,
    read_model_meta,
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
    out = save_model_dir(tmp_path / "run" / "model", model, ModelMeta.for_model(model, **META))
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "weights.safetensors"]
    doc = json.loads((out / "model.json").read_text())
    assert doc["format"] == "medres-model/1" and doc["medres_version"]
    assert (doc["arch"], doc["dims"], doc["in_channels"], doc["num_classes"], doc["stem"]) == (
        "resnet18", dims, 1, 2, stem,
    )  # fmt: skip
    assert doc["preprocessing"]["weights"]["mean"] == [0.449]
    for where in (out, tmp_path / "run"):  # the model dir or its run dir
        loaded, meta = load_model_dir(where)
        assert not loaded.training and meta.classes == ("0", "1")
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_save_rejects_contradicting_meta_and_non_json(tmp_path):
    model = build_model("resnet18", 2, 1, 2, stem="small")
    with pytest.raises(ModelError, match="'arch'"):
        save_model_dir(
            tmp_path / "m", model, dataclasses.replace(ModelMeta.for_model(model), arch="resnet50")
        )
    with pytest.raises(ModelError, match="JSON"):
        save_model_dir(
            tmp_path / "m2",
            model,
            ModelMeta.for_model(
                model, preprocessing={"x": torch.zeros(1)}, extra={"n": float("nan")}
            ),
        )


def test_load_errors_are_model_errors(tmp_path):
    model = build_model("resnet18", 2, 1, 2, stem="small")
    out = save_model_dir(tmp_path / "m", model, ModelMeta.for_model(model))
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
    model = build_model("resnet18", 2, 1, 2, stem="small")
    out = save_model_dir(tmp_path / "m", model, ModelMeta.for_model(model))
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


# --- model.json as ModelMeta ----------------------------------------------------------------

#: model.json exactly as medres 0.1.0 (before ModelMeta) wrote it from `medres train`.
RELEASED_MODEL_JSON = {
    "format": "medres-model/1",
    "medres_version": "0.1.0",
    "arch": "resnet18",
    "dims": 2,
    "in_channels": 1,
    "num_classes": 2,
    "stem": "small",
    "task": "binary",
    "classes": ["0", "1"],
    "label_columns": ["label"],
    "weights_source": "imagenet",
    "preprocessing": {
        "format": "medres-preprocessing/1",
        "dims": 2,
        "in_channels": 1,
        "orientation": "RAS",
        "spacing": [],
        "intensity": "range",
        "ct_window": [40.0, 400.0],
        "percentiles": [0.5, 99.5],
        "image_size": [24, 24],
        "resize_mode": "resize",
        "slice_mode": "none",
        "slice_axis": 2,
        "mean": [],
        "std": [],
        "augment": False,
        "flip_prob": 0.5,
        "flip_axes": [0],
        "affine_prob": 0.5,
        "rotate_deg": 10.0,
        "scale": 0.1,
        "intensity_prob": 0.5,
        "intensity_jitter": 0.1,
        "noise_prob": 0.2,
        "noise_std": 0.02,
        "weights": {
            "source": "imagenet",
            "tag": "IMAGENET1K_V1",
            "file": "resnet18-f37072fd.pth",
            "url": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
            "normalization": "mean_std",
            "mean": [0.449],
            "std": [0.226],
            "value_range": [0.0, 1.0],
            "channels": 3,
            "in_channels": 1,
            "input_size": [224, 224],
            "note": "scale intensities to [0, 1] (CT: apply a window first), then "
            "(x - mean) / std per channel",
        },
    },
    "threshold": 0.5,
    "best_epoch": 2,
    "val_auc": None,
    "positive_class": "1",
    "weights_sha256": "to be replaced by the test",
}


def _released_model_dir(tmp_path, doc=RELEASED_MODEL_JSON):
    """A model dir whose model.json is the released dict, with real weights beside it."""
    from safetensors.torch import save_file

    from medres.io import sha256_file

    torch.manual_seed(3)
    model = build_model("resnet18", 2, 1, 2, stem="small").eval()
    folder = tmp_path / "released" / "model"
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "weights.safetensors"
    )
    doc = {**doc, "weights_sha256": sha256_file(folder / "weights.safetensors")}
    (folder / "model.json").write_text(json.dumps(doc, indent=2))
    return model, folder, doc


def test_model_dir_written_by_the_released_format_loads(tmp_path):
    model, folder, doc = _released_model_dir(tmp_path)
    loaded, meta = load_model_dir(folder.parent)  # the run dir
    assert isinstance(meta, ModelMeta)
    assert (meta.arch, meta.dims, meta.in_channels, meta.num_classes, meta.stem) == (
        "resnet18", 2, 1, 2, "small",
    )  # fmt: skip
    assert meta.task == "binary" and meta.classes == ("0", "1") and meta.positive_class == "1"
    assert meta.label_columns == ("label",) and meta.weights_source == "imagenet"
    assert meta.threshold == 0.5 and meta.best_epoch == 2 and meta.val_auc is None
    assert meta.medres_version == "0.1.0" and meta.weights_sha256 == doc["weights_sha256"]
    assert meta.preprocessing["image_size"] == (24, 24)
    assert meta.preprocessing["weights"]["mean"] == (0.449,)
    assert read_model_meta(folder) == meta
    # to_json gives the same document back (a null val_auc is left out)
    assert meta.to_json() == {k: v for k, v in doc.items() if v is not None}
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_model_meta_is_frozen_and_keeps_unknown_keys(tmp_path):
    doc = {**RELEASED_MODEL_JSON, "site_notes": {"method": "platt", "a": [1.0, 2.0]}}
    meta = ModelMeta.from_json(doc, source="x/model.json")
    assert meta.extra == {"site_notes": {"method": "platt", "a": (1.0, 2.0)}}
    assert meta.to_json()["site_notes"] == {"method": "platt", "a": [1.0, 2.0]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.task = "multiclass"  # type: ignore[misc]
    with pytest.raises(TypeError):
        meta.preprocessing["dims"] = 3  # type: ignore[index]
    again = pickle.loads(pickle.dumps(meta))  # scoring workers receive the preprocessing
    assert again == meta and again.preprocessing == meta.preprocessing
    # a re-save keeps the unknown key and the recorded fields
    model = build_model("resnet18", 2, 1, 2, stem="small")
    out = save_model_dir(tmp_path / "m", model, meta)
    assert read_model_meta(out).extra == meta.extra
    assert read_model_meta(out).preprocessing == meta.preprocessing


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": "medres-model/2"}, r"format 'medres-model/2'.*medres-model/1"),
        ({"num_classes": None}, r"lacks the field 'num_classes'"),
        ({"dims": 4}, r"field 'dims' is 4: expected 2\.\.3"),
        ({"dims": "two"}, r"field 'dims' is 'two': expected an integer"),
        ({"in_channels": 0}, r"field 'in_channels' is 0"),
        ({"arch": "resnet9"}, r"field 'arch' is 'resnet9': not a known architecture \(resnet18"),
        ({"stem": "auto"}, r"field 'stem' is 'auto': expected one of standard, small"),
        ({"classes": "0,1"}, r"field 'classes' is '0,1': expected a list"),
        ({"preprocessing": [1]}, r"field 'preprocessing' is \[1\]: expected a JSON object"),
        ({"threshold": "high"}, r"field 'threshold' is 'high': expected a number"),
    ],
)
def test_broken_model_json_is_a_clear_error(tmp_path, change, match):
    _, folder, doc = _released_model_dir(tmp_path)
    broken = {k: v for k, v in {**doc, **change}.items() if v is not None}
    (folder / "model.json").write_text(json.dumps(broken))
    for read in (read_model_meta, load_model_dir):
        with pytest.raises(ModelError, match=match) as exc:
            read(folder)
        msg = str(exc.value)
        assert str(folder / "model.json") in msg  # names the file
        assert "re-save" in msg  # and the fix


def test_reading_model_meta_does_not_import_torch(tmp_path):
    _, folder, _ = _released_model_dir(tmp_path)
    code = (
        "import sys\n"
        "from medres.models.modeldir import read_model_meta\n"
        f"meta = read_model_meta({str(folder)!r})\n"
        "assert meta.classes == ('0', '1')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
