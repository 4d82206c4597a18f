"""Pipeline specs: YAML round trip, strict fields, CLI overrides, README in sync."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from medres.errors import ConfigError
from medres.train.spec import (
    SECTIONS,
    PipelineSpec,
    TransformSpec,
    apply_overrides,
    dump_pipeline,
    fields_markdown,
    load_pipeline,
    parse_set_options,
    spec_field_names,
)

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines"


def test_yaml_round_trip_of_non_default_spec(tmp_path):
    spec = apply_overrides(
        PipelineSpec(),
        {
            "transforms.image_size": [64, 64, 32],
            "transforms.spacing": [1.5, 1.5, 2.0],
            "model.arch": "resnet50",
            "train.lr": 0.05,
            "train.deterministic": True,
            "data.classes": ["neg", "pos"],
        },
    )
    path = tmp_path / "p.yaml"
    dump_pipeline(spec, path)
    back = load_pipeline(path)
    assert back == spec
    assert back.transforms.image_size == (64, 64, 32)
    assert isinstance(back.transforms.spacing[0], float)


def test_partial_yaml_keeps_defaults(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("train:\n  epochs: 3\n")
    spec = load_pipeline(p)
    assert spec.train.epochs == 3
    assert spec.model == PipelineSpec().model


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("trian:\n  epochs: 3\n", "known sections: data, transforms, model, train, eval"),
        ("train:\n  epoch: 3\n", "known fields: epochs"),
        ("train:\n  epochs: three\n", "train.epochs: expected an integer"),
        ("train:\n  epochs: 2.5\n", "expected an integer"),
        ("train:\n  deterministic: maybe\n", "expected true or false"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("train: [1, 2]\n", "must be a mapping"),
        ("train: {epochs: 3\n", "not valid YAML"),
        ("model: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ],
)
def test_bad_yaml_is_one_line_config_error(tmp_path, text, needle):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_pipeline(p)
    assert needle in str(ei.value)
    assert "\n" not in str(ei.value)


def test_missing_pipeline_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline(tmp_path / "nope.yaml")


def test_set_options_parse_yaml_values_and_coerce():
    ov = parse_set_options(
        [
            "train.lr=3e-4",
            "transforms.image_size=64x64x32",
            "transforms.flip_axes=[0,1]",
            "train.deterministic=true",
            "data.label_columns=label_a,label_x",
        ]
    )
    spec = apply_overrides(PipelineSpec(), ov)
    assert spec.train.lr == pytest.approx(3e-4)
    assert spec.transforms.image_size == (64, 64, 32)
    assert spec.transforms.flip_axes == (0, 1)
    assert spec.train.deterministic is True
    # the 'x' separator applies to numbers only, never to names
    assert spec.data.label_columns == ("label_a", "label_x")
    assert PipelineSpec().train.lr != spec.train.lr  # the original is untouched (frozen)


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("train.lr", "expected section.field=value"),
        ("nosection=1", "expected section.field"),
        ("train.learning_rate=1", "known fields"),
        ("train.epochs=abc", "expected an integer"),
    ],
)
def test_bad_overrides(item, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(PipelineSpec(), parse_set_options([item]))


def test_specs_are_frozen():
    spec = PipelineSpec()
    with pytest.raises(AttributeError):
        spec.train.epochs = 5  # type: ignore[misc]


@pytest.mark.parametrize("name", ["radiograph_2d.yaml", "ct_3d.yaml", "small_2d.yaml"])
def test_shipped_pipelines_load(name):
    spec = load_pipeline(PIPELINES / name)
    assert spec.model.arch.startswith("resnet")
    assert spec.model.dims in (2, 3)
    assert len(spec.transforms.image_size) == spec.model.dims


def test_readme_documents_exactly_the_dataclass_fields():
    text = (PIPELINES / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", text, flags=re.M))
    actual = {f"{s}.{f}" for s, names in spec_field_names().items() for f in names}
    assert documented == actual, (
        f"README only: {sorted(documented - actual)}; code only: {sorted(actual - documented)}"
    )
    # and the descriptions/defaults are the generated ones (regenerate with fields_markdown())
    assert fields_markdown() in text


def test_every_field_has_a_docstring():
    from medres.train.spec import field_docs

    missing = [f"{s}.{n}" for s, rows in field_docs().items() for n, _, doc in rows if not doc]
    assert not missing
    assert set(SECTIONS) == {f.name for f in fields(PipelineSpec)}
    assert "image_size" in {f.name for f in fields(TransformSpec)}


def test_the_train_plan_line_names_what_the_command_line_set():
    from medres.cli.train import _overridden
    from medres.train.spec import PipelineSpec, apply_overrides

    planned = apply_overrides(PipelineSpec(), {"transforms.image_size": [64, 64]})
    used = apply_overrides(planned, {"transforms.image_size": [32, 32], "train.epochs": 2})
    assert _overridden(planned, used) == ["transforms.image_size=32x32", "train.epochs=2"]
    assert _overridden(planned, planned) == []
