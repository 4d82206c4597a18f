"""What the CLI imports before and while `medres ingest` of one plain series runs, and
that its pydantic-free option values (medres.cli.params) equal typer's own.

Start-up is most of the wall time of a small ingest (issue 15): typer's pydantic coercion
(60-100 ms) and ``numpy.ma`` (pulled by a first ``np.median``) must stay out, with the ML
stack and the DICOM readers. Each import check runs in a fresh interpreter (this one has
torch loaded by the fixtures).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated

import pytest
import typer
from helpers.dicom_series import write_ct_series
from typer.core import TyperCommand
from typer.testing import CliRunner

FORBIDDEN = (
    "torch",
    "monai",
    "sklearn",
    "scipy",
    "matplotlib",
    "pandas",
    "pydicom",
    "nibabel",
    "pydantic",
    "numpy.ma",
)

_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from medres.cli.app import app
    try:
        app(sys.argv[1:], standalone_mode=False)
        rc = 0
    except SystemExit as exc:
        rc = exc.code or 0
    blas = os.environ.get("OPENBLAS_NUM_THREADS")
    print("@@" + json.dumps({"rc": rc, "modules": sorted(sys.modules), "blas": blas}))
    """
)


def _probe(*args: str) -> dict:
    """``medres ARGS`` in a fresh interpreter (no OPENBLAS_NUM_THREADS set): exit code,
    modules imported, OPENBLAS_NUM_THREADS at the end."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=120, env=env
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    assert line, proc.stderr[-2000:]
    return json.loads(line[-1][2:])


def _imported(*args: str) -> tuple[int, set[str]]:
    """(exit code, forbidden modules imported) of ``medres ARGS`` in a fresh interpreter."""
    res = _probe(*args)
    mods = set(res["modules"])
    bad = {m for m in mods if m in FORBIDDEN or m.split(".")[0] in FORBIDDEN}
    return res["rc"], bad


@pytest.mark.parametrize("args", [("--help",), ("ingest", "--help")])
def test_help_imports_neither_pydantic_nor_the_ml_stack(args):
    rc, bad = _imported(*args)
    assert rc == 0
    assert not bad, sorted(bad)


def test_ingest_of_one_plain_series_imports_only_what_it_uses(tmp_path):
    src = write_ct_series(tmp_path / "ct")
    rc, bad = _imported("-q", "ingest", str(src), "--out", str(tmp_path / "out"), "-j", "2")
    assert rc == 0
    assert not bad, sorted(bad)
    manifest = (tmp_path / "out" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 2 and ",16x16x4," in manifest[1]


def test_ingest_starts_numpy_with_one_blas_thread(tmp_path):
    src = write_ct_series(tmp_path / "ct", n=3)
    res = _probe("-q", "ingest", str(src), "--out", str(tmp_path / "out"))
    assert res["rc"] == 0
    assert res["blas"] == "1"  # OpenBLAS threads cost ~55 ms of numpy's import


# ------------------------------------------------------------------ values equal typer's own


def _echo(
    names: Annotated[list[str], typer.Argument()],
    n: Annotated[int, typer.Option("--n")] = 0,
    f: Annotated[float, typer.Option("--f")] = 64,
    p: Annotated[Path | None, typer.Option("--p")] = None,
    s: Annotated[str | None, typer.Option("--s")] = None,
    q: Annotated[list[Path] | None, typer.Option("--q")] = None,
    flag: Annotated[bool, typer.Option("--flag/--no-flag")] = False,
    ranged: Annotated[int, typer.Option("--ranged", min=0, max=9)] = 1,
) -> None:
    values = {"names": names, "n": n, "f": f, "p": p, "s": s, "q": q, "flag": flag, "r": ranged}
    typer.echo(repr({k: (type(v).__name__, v) for k, v in values.items()}))


def _run(cls: type, args: list[str]) -> tuple[int, str]:
    from medres.cli.app import _MedresGroup

    one = typer.Typer(cls=_MedresGroup)
    one.command("echo", cls=cls)(_echo)
    one.command("other")(lambda: None)  # a group, as medres
    res = CliRunner().invoke(one, ["echo", *args])
    return res.exit_code, res.output


CASES = [
    ["a", "b"],
    ["a", "--n", "7", "--f", "0.15", "--p", "out/dir", "--s", "x y", "--q", "a", "--q", "b"],
    ["a", "--n", "-3", "--f", "2", "--flag", "--ranged", "4"],
    ["a", "--n", "007", "--f", "1e-3", "--p", "-", "--s", ""],
    ["a", "--n", " 5", "--f", ".5"],
    ["a", "--n", "1_000", "--f", "inf"],
    ["a", "--n", "1.0"],
    ["a", "--n", "abc"],
    ["a", "--f", "nanx"],
    ["a", "--ranged", "12"],
    ["a", "--p", ""],
    ["a", "--n", "123456789012345678901234"],
]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
def test_plain_values_and_errors_equal_typers(args):
    from medres.cli.app import _MedresCommand

    assert _run(_MedresCommand, args) == _run(TyperCommand, args)


def test_plain_params_are_installed_on_medres_commands():
    from typer.main import get_command

    from medres.cli import params
    from medres.cli.app import app

    group = get_command(app)
    ingest = group.commands["ingest"]
    ctx = ingest.make_context("ingest", ["x", "--out", "o"])
    if params.RuntimeParam is None:  # pragma: no cover - a typer without pydantic coercion
        pytest.skip("this typer has no pydantic coercion layer")
    kinds = {p.name: type(p._runtime_param).__name__ for p in ingest.get_params(ctx)}
    assert set(kinds.values()) == {"PlainParam"}, kinds
