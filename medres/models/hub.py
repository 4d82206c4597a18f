"""Getting published checkpoints onto disk: the cache, downloads, mirrors and checksums.

Cache and verification: files live in ``$TORCH_HOME/hub/checkpoints/`` (torch's own
cache; ``TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch`` or ``~/.cache/torch``) under
their published names. torchvision names carry the first 8 hex digits of the file's
sha256 (``resnet18-f37072fd.pth``); the file is verified against it after download and on
every load. MedicalNet publishes no checksum: the first download's sha256 is pinned in a
``<file>.sha256`` file beside it and later loads are verified against that (trust on first
use, logged).

Downloads use ``urllib`` with a timeout, write to a temp file in the cache folder, verify,
then ``os.replace`` into place: an interrupted or corrupted download never leaves a file
that looks valid. Offline (``MEDRES_OFFLINE=1``, or a network error) the error names the
URL, the exact file name and the folder to put it in.

Air-gapped mirrors: ``MEDRES_WEIGHTS_MIRROR=<base URL>`` fetches ``<base>/<file name>``
for every source (``https://``, ``http://`` or ``file://``); ``MEDRES_WEIGHTS_URL_<KEY>``
overrides one file's URL and ``MEDRES_WEIGHTS_SHA256_<KEY>`` its expected sha256 (full or
prefix), where ``<KEY>`` is e.g. ``RESNET18_IMAGENET``, ``RESNET50_IMAGENET_V2`` or
``RESNET18_MEDICALNET`` (:attr:`medres.models.weights.WeightSpec.env_key`). ``file://``
URLs are local and are allowed while offline.

Owns :func:`fetch_weights`, :func:`download`, :func:`cache_dir` and the URL/checksum
overrides. Imports core only (a :class:`~medres.models.weights.WeightSpec` is passed in);
no torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from medres import progress
from medres.errors import WeightsError
from medres.io import sha256_file

if TYPE_CHECKING:
    from medres.models.weights import WeightSpec

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60.0


def torch_home() -> Path:
    """``$TORCH_HOME``, else ``$XDG_CACHE_HOME/torch``, else ``~/.cache/torch`` (as torch.hub)."""
    env = os.environ.get("TORCH_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "torch"


def cache_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints``: where downloaded or hand-placed weights live."""
    return torch_home() / "hub" / "checkpoints"


def offline() -> bool:
    return os.environ.get("MEDRES_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_url(spec: WeightSpec) -> str:
    """The URL to fetch: ``MEDRES_WEIGHTS_URL_<KEY>``, else the mirror, else the published one."""
    override = os.environ.get(f"MEDRES_WEIGHTS_URL_{spec.env_key}", "").strip()
    if override:
        return override
    mirror = os.environ.get("MEDRES_WEIGHTS_MIRROR", "").strip()
    if mirror:
        return mirror.rstrip("/") + "/" + spec.filename
    return spec.url


def expected_sha256(spec: WeightSpec) -> str | None:
    """``MEDRES_WEIGHTS_SHA256_<KEY>`` if set, else the published digest (prefix) or None."""
    override = os.environ.get(f"MEDRES_WEIGHTS_SHA256_{spec.env_key}", "").strip().lower()
    return override or spec.sha256


def _offline_message(spec: WeightSpec, url: str, dest: Path, cause: str) -> str:
    return (
        f"{spec.source} weights for {spec.arch} are not available ({cause}): download {url} "
        f"and save it as {dest} (the folder $TORCH_HOME/hub/checkpoints/), or set "
        f"MEDRES_WEIGHTS_MIRROR or MEDRES_WEIGHTS_URL_{spec.env_key} to a reachable copy, "
        "or pass --weights PATH"
    )


def _pin_file(dest: Path) -> Path:
    return dest.with_name(dest.name + ".sha256")


def verify_file(path: Path, expected: str | None, *, what: str) -> str:
    """sha256 of ``path``; :class:`WeightsError` if it does not start with ``expected``."""
    digest = sha256_file(path)
    if expected and not digest.startswith(expected.lower()):
        raise WeightsError(
            f"{path} ({what}) has sha256 {digest[:16]}..., expected {expected[:16]}...: the "
            "file is corrupted or not the published one; delete it and download it again"
        )
    return digest


def fetch_weights(spec: WeightSpec) -> Path:
    """Path of the verified checkpoint for ``spec``, downloading it into the cache if needed."""
    dest = cache_dir() / spec.filename
    expected = expected_sha256(spec)
    pin = _pin_file(dest)
    if dest.is_file():
        if expected is None and pin.is_file():
            expected = pin.read_text().strip()
        digest = verify_file(dest, expected, what=f"{spec.source} {spec.arch}")
        if expected is None:
            log.warning(
                "%s has no published checksum; pinning its sha256 %s... for later loads",
                dest,
                digest[:16],
            )
            with contextlib.suppress(OSError):
                pin.write_text(digest + "\n")
        return dest
    url = resolve_url(spec)
    if offline() and not url.startswith("file:"):
        raise WeightsError(_offline_message(spec, url, dest, "offline: MEDRES_OFFLINE is set"))
    try:
        digest = download(url, dest, expected, what=f"{spec.source} {spec.arch}")
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsError(
            _offline_message(spec, url, dest, f"download failed: {reason}")
        ) from None
    if spec.sha256 is None and expected is None:
        log.warning("%s has no published checksum; pinned sha256 %s...", dest, digest[:16])
        with contextlib.suppress(OSError):
            pin.write_text(digest + "\n")
    return dest


def download(
    url: str,
    dest: Path,
    expected: str | None,
    *,
    what: str = "weights",
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> str:
    """Download ``url`` to ``dest`` atomically; returns the sha256.

    Streams into a temp file beside ``dest``, hashes while writing, checks ``expected``
    (a digest or prefix) and only then ``os.replace``-s into place. On any failure the temp
    file is removed. A hash mismatch raises :class:`WeightsError`.
    """
    from medres import __version__

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    log.info("downloading %s -> %s", url, dest)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"medres/{__version__}"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with progress.task(f"download {dest.name}", total=total, unit="B") as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                    bar.advance(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if expected and not digest.startswith(expected.lower()):
            raise WeightsError(
                f"download of {url} ({what}) has sha256 {digest[:16]}..., expected "
                f"{expected[:16]}...: the file is corrupted or was replaced; nothing was "
                f"saved to {dest}; retry, or check the mirror's copy"
            )
        os.replace(tmp, dest)
        return digest
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
