"""A throwaway Orthanc PACS on free localhost ports, for the PACS tests and benchmark.

``OrthancServer.start(tmp)`` writes a generated config (DICOMweb plugin on, DIMSE port,
no authentication, storage in ``tmp``), starts ``Orthanc`` and waits until its REST API
answers. :func:`orthanc_unavailable` says why it cannot run here (no binary, no plugin,
no client libraries), so tests can skip with that reason. Test machinery only: nothing
in ``medres`` imports this.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
CLIENT_AET = "MEDRESTEST"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plugin() -> str | None:
    for d in PLUGIN_DIRS:
        p = Path(d)
        if p.is_dir():
            for f in sorted(p.glob("libOrthancDicomWeb.so*")):
                return str(f)
    return None


def orthanc_unavailable() -> str | None:
    """None when Orthanc + its DICOMweb plugin + the client libraries are here, else why not."""
    if shutil.which("Orthanc") is None:
        return "Orthanc not installed (apt-get install orthanc orthanc-dicomweb)"
    if _plugin() is None:
        return "Orthanc DICOMweb plugin not installed (apt-get install orthanc-dicomweb)"
    for mod in ("dicomweb_client", "pynetdicom", "highdicom", "requests"):
        try:
            __import__(mod)
        except ImportError:
            return f"{mod} not installed (pip install 'medres[pacs]')"
    return None


@dataclass
class OrthancServer:
    """A running Orthanc: its ports, process and storage folder."""

    root: Path
    http_port: int
    dicom_port: int
    aet: str
    proc: subprocess.Popen | None = None

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse_url(self) -> str:
        return f"dimse://{self.aet}@127.0.0.1:{self.dicom_port}"

    @classmethod
    def start(cls, root: Path, *, timeout_s: float = 30.0) -> OrthancServer:
        """Generate a config under ``root`` and start Orthanc; raises RuntimeError on failure."""
        root.mkdir(parents=True, exist_ok=True)
        srv = cls(root, free_port(), free_port(), "ORTHANC")
        config = {
            "Name": "medres-test",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "HttpPort": srv.http_port,
            "DicomPort": srv.dicom_port,
            "DicomAet": srv.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "DicomModalities": {"medres": [CLIENT_AET, "127.0.0.1", free_port()]},
            "Plugins": [_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "Full"},
            "StableAge": 1,
            "SaveJobs": False,
            "HttpThreadsCount": 8,
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }
        (root / "orthanc.json").write_text(json.dumps(config, indent=1))
        log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
        srv.proc = subprocess.Popen(
            ["Orthanc", str(root / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        srv._wait(timeout_s)
        return srv

    def _wait(self, timeout_s: float) -> None:
        import requests

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.root / "orthanc.log").read_text(errors="replace")[-800:]
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: {tail}")
            try:
                if requests.get(self.rest + "/system", timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} in {timeout_s} s")

    def upload(self, paths: list[Path]) -> None:
        """Store DICOM files through the REST API (not counted as DICOMweb requests)."""
        import requests

        for p in paths:
            r = requests.post(self.rest + "/instances", data=Path(p).read_bytes(), timeout=30)
            r.raise_for_status()

    def statistics(self) -> dict:
        import requests

        return requests.get(self.rest + "/statistics", timeout=10).json()

    def instances(self) -> list[str]:
        import requests

        return requests.get(self.rest + "/instances", timeout=10).json()

    def stop(self) -> None:
        """Kill the server (SIGKILL: its storage is a throwaway folder; a clean shutdown
        takes seconds)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class CountingProxy:
    """A localhost HTTP proxy in front of Orthanc that logs every request (method, path).

    ``fail_next`` answers that many requests with HTTP 503 first (retry tests). Use as a
    context manager; ``dicomweb_url`` is the DICOMweb root through the proxy.
    """

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/")
        self.log: list[tuple[str, str]] = []
        self.fail_next = 0
        self._server = None

    @property
    def dicomweb_url(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"

    def series_retrievals(self) -> list[str]:
        """SeriesInstanceUIDs of the WADO-RS series retrievals logged so far."""
        found = []
        for method, path in self.log:
            parts = path.split("?")[0].strip("/").split("/")
            if (
                method == "GET"
                and len(parts) == 5
                and parts[1] == "studies"
                and parts[3] == "series"
            ):
                found.append(parts[4])
        return found

    def __enter__(self) -> CountingProxy:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        import requests

        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                proxy.log.append((self.command, self.path))
                if proxy.fail_next > 0:
                    proxy.fail_next -= 1
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                r = requests.request(
                    self.command, proxy.target + self.path, headers=headers, data=body,
                    timeout=60,
                )  # fmt: skip
                content = r.content
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "content-encoding",
                        "connection",
                        "keep-alive",
                    ):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
