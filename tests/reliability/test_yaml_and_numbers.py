"""Hostile pipeline YAML and absurd numbers: one line, never a traceback or a hang (#16).

A pipeline file nested 100 000 levels deep (PyYAML's composer recurses: RecursionError), a
"billion laughs" document (aliases of aliases: a walk over the result costs 10^9), an
oversized file, and the same through ``--set`` are refused by
:func:`medres.train.spec.check_yaml_shape` before anything is built. ``--lr 1e38`` used to
overflow AdamW's step (``RuntimeError``); it, huge epochs and a seed past 64 bits are
refused by the range check, each with a line naming the field.
"""

from __future__ import annotations

import time

import pytest
from train_data import make_dataset
from typer.testing import CliRunner

from medres.cli import app
from medres.errors import ConfigError
from medres.train import spec as S

pytestmark = pytest.mark.reliability

runner = CliRunner()


def _laughs(levels: int = 9, fan: int = 10) -> str:
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * fan) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return f"data:\n  label_columns: *a{levels - 1}\n" + "\n".join(lines) + "\n"


HOSTILE = {
    "deep_flow": ("[" * 100_000 + "]" * 100_000, "nested deeper"),
    "deep_block": ("".join("  " * i + f"k{i}:\n" for i in range(200)), "nested deeper"),
    "deep_mapping_flow": ("{a: " * 5000 + "1" + "}" * 5000, "nested deeper"),
    "billion_laughs": (_laughs(), "expands to more than"),
    "wide_aliases": (
        "x: &x [" + ",".join(["1"] * 200) + "]\ny: [" + ",".join(["*x"] * 200) + "]\n",
        "expands to more than",
    ),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_pipeline_yaml_is_refused_fast(name, tmp_path):
    text, needle = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=needle) as info:
        S.load_pipeline(path)
    assert time.monotonic() - t0 < 5
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_oversized_pipeline_file_is_refused(tmp_path):
    path = tmp_path / "huge.yaml"
    path.write_text("# padding\n" * (S.MAX_YAML_BYTES // 10 + 10))
    with pytest.raises(ConfigError, match="more than a pipeline file can be"):
        S.load_pipeline(path)


def test_ordinary_yaml_with_a_few_aliases_still_loads(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("train: &t\n  epochs: 3\n  lr: 0.01\ntransforms:\n  image_size: [16, 16]\n")
    spec = S.load_pipeline(path)
    assert spec.train.epochs == 3 and spec.transforms.image_size == (16, 16)


def test_hostile_set_value_is_refused():
    with pytest.raises(ConfigError, match=r"--set data.label_columns: YAML nested deeper"):
        S.parse_set_options(["data.label_columns=" + "[" * 1000 + "]" * 1000])


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("numbers") / "ds", n=10, size=16)


def _error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_deep_pipeline_file_through_the_cli(manifest, tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text(HOSTILE["deep_flow"][0])
    r = runner.invoke(app, ["-q", "train", str(path), "--manifest", str(manifest),
                            "--out", str(tmp_path / "run")])  # fmt: skip
    assert "nested deeper" in _error(r)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flag", "value", "field"),
    [
        ("--lr", "1e38", "train.lr"),
        ("--lr", "1e300", "train.lr"),
        ("--lr", "1e400", "train.lr"),  # parses as inf
        ("--epochs", "100000000000000000000", "train.epochs"),
        ("--seed", "99999999999999999999", "train.seed"),
        ("--set", "train.lr=.inf", "train.lr"),
    ],
)
def test_absurd_numbers_are_one_line(manifest, tmp_path, flag, value, field):
    r = runner.invoke(app, ["-q", "train", "--manifest", str(manifest), "--out",
                            str(tmp_path / "run"), "--device", "cpu", flag, value])  # fmt: skip
    line = _error(r)
    assert field in line and "must be" in line, line
    assert not (tmp_path / "run").exists()
