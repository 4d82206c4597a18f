"""PACS URLs, queries, credentials and retries (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medres.ingest.pacs import PacsError, build_query, is_pacs_url, parse_source, with_retries
from medres.ingest.pacs.auth import calling_aet, credentials_for
from medres.ingest.pacs.query import TransientError


def test_parse_dicomweb_and_dimse_urls() -> None:
    web = parse_source("dicomweb+http://127.0.0.1:8042/dicom-web/")
    assert (web.protocol, web.url) == ("dicomweb", "http://127.0.0.1:8042/dicom-web")
    assert parse_source("dicomweb+https://pacs.example/wado").url == "https://pacs.example:443/wado"
    dimse = parse_source("dimse://ORTHANC@10.0.0.5:4242")
    assert (dimse.protocol, dimse.called_aet, dimse.host, dimse.port) == (
        "dimse", "ORTHANC", "10.0.0.5", 4242,
    )  # fmt: skip
    assert dimse.display == "dimse://ORTHANC@10.0.0.5:4242"
    assert is_pacs_url("DIMSE://A@h:1") and not is_pacs_url("/data/dicom")


@pytest.mark.parametrize(
    "url,needle",
    [
        ("dicomweb+http://me:secret@h:80/x", "credentials in the URL"),
        ("dicomweb+http://me@h:80/x", "credentials in the URL"),
        ("dimse://h:104", "AE title"),
        ("dimse://AET@h", "AE title"),
        ("http://h/x", "not a PACS URL"),
    ],
)
def test_bad_urls_are_pacs_errors_without_the_secret(url: str, needle: str) -> None:
    with pytest.raises(PacsError, match=needle) as exc:
        parse_source(url)
    assert "secret" not in str(exc.value)


def test_query_splits_study_and_series_keys(tmp_path: Path) -> None:
    acc = tmp_path / "acc.txt"
    acc.write_text("# accession numbers\nA1\n\nA2\nA1\n")
    q = build_query(
        ["Modality=CR", "PatientSex=F", "SeriesDescription=PA"],
        study_date="20240101-20241231",
        accessions_file=acc,
        limit=3,
    )
    assert q.series_filters == (("Modality", "CR"), ("SeriesDescription", "PA"))
    searches = q.study_searches()
    assert [s["AccessionNumber"] for s in searches] == ["A1", "A2"]
    assert searches[0]["ModalitiesInStudy"] == "CR" and searches[0]["StudyDate"].startswith("2024")
    assert "A1" not in repr(q)  # accession numbers are identifiers: not in reprs/logs


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"filters": ["Modality"]}, "--query"),
        ({"filters": ["1x=2"]}, "--query"),
        ({"study_date": "2024-01"}, "--study-date"),
        ({"limit": -1}, "--limit"),
        ({"accessions_file": Path("/nonexistent/acc.txt")}, "--accessions"),
    ],
)
def test_bad_query_options_name_the_option(kwargs: dict, needle: str) -> None:
    with pytest.raises(PacsError, match=needle):
        build_query(**kwargs)


def test_credentials_from_env_then_netrc(tmp_path: Path) -> None:
    tok = credentials_for("h", {"MEDRES_PACS_TOKEN": "t0k"})
    assert tok.kind == "bearer" and "t0k" not in repr(tok)
    basic = credentials_for("h", {"MEDRES_PACS_USER": "u", "MEDRES_PACS_PASSWORD": "pw"})
    assert (basic.kind, basic.user, basic.password) == ("basic", "u", "pw")
    rc = tmp_path / "netrc"
    rc.write_text("machine pacs.local login alice password s3cret\n")
    rc.chmod(0o600)
    env = {"MEDRES_PACS_NETRC": str(rc), "HOME": str(tmp_path)}
    assert credentials_for("pacs.local", env).password == "s3cret"
    assert credentials_for("other", env).kind == "none"
    assert credentials_for("h", {"HOME": str(tmp_path)}).kind == "none"
    assert calling_aet({}) == "MEDRES"
    with pytest.raises(PacsError, match="MEDRES_PACS_AET"):
        calling_aet({"MEDRES_PACS_AET": "X" * 17})


def test_retries_back_off_then_give_up_with_the_fix() -> None:
    src = parse_source("dimse://A@h:1")
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("refused")
        return "ok"

    assert with_retries("query", flaky, src, sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 1.0]

    def down() -> None:
        raise TransientError("refused")

    with pytest.raises(PacsError, match=r"after 4 attempts.*re-run"):
        with_retries("query", down, src, sleep=sleeps.append)
