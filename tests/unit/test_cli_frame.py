from typer.testing import CliRunner

from medres import __version__
from medres.cli import app
from medres.errors import MedresError
from medres.io import atomic_write_text
from medres.phi import load_or_create_key, pseudonym

runner = CliRunner()


def test_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0
    assert __version__ in r.output


def test_help_lists_mission_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("ingest", "train", "evaluate", "score", "synth", "demo"):
        assert cmd in r.output


def test_medres_error_is_one_line():
    err = MedresError("bad\nthing   happened")
    assert str(err) == "bad thing happened"


def test_pseudonym_is_keyed_and_stable(tmp_path):
    key = load_or_create_key(tmp_path)
    assert load_or_create_key(tmp_path) == key
    assert (tmp_path / ".medres_key").stat().st_mode & 0o077 == 0
    a = pseudonym("PAT-001", key)
    assert a == pseudonym("PAT-001", key)
    assert a != pseudonym("PAT-001", b"other-key")
    assert "PAT-001" not in a
    assert pseudonym("", key) == ""


def test_atomic_write_replaces(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert [f.name for f in tmp_path.iterdir()] == ["x.txt"]
