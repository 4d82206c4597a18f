"""PACS credentials: from the environment or a netrc-style file, never from the command line.

Order (first found wins):

1. ``MEDRES_PACS_TOKEN``: an HTTP bearer token (DICOMweb).
2. ``MEDRES_PACS_USER`` and ``MEDRES_PACS_PASSWORD``: HTTP basic authentication.
3. A netrc file: ``MEDRES_PACS_NETRC`` or ``~/.netrc``, the ``machine`` entry of the
   PACS host (``login`` / ``password``).

DIMSE has no passwords; its calling AE title is ``MEDRES_PACS_AET`` (default ``MEDRES``).
Credentials are kept in this record only; its ``repr`` hides them and nothing logs them.

Imports: :mod:`medres.ingest.pacs.query` (the error type).
"""

from __future__ import annotations

import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path

from medres.ingest.pacs.query import PacsError

DEFAULT_AET = "MEDRES"


@dataclass(frozen=True)
class Credentials:
    """HTTP credentials (all empty: anonymous). Never printed: the fields are hidden."""

    user: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    token: str = field(default="", repr=False)

    @property
    def kind(self) -> str:
        """``bearer``, ``basic`` or ``none`` (safe to log)."""
        return "bearer" if self.token else "basic" if self.user else "none"


def credentials_for(host: str, env: dict[str, str] | None = None) -> Credentials:
    """The credentials for ``host`` (see the module doc for the order)."""
    env = dict(os.environ) if env is None else env
    if env.get("MEDRES_PACS_TOKEN"):
        return Credentials(token=env["MEDRES_PACS_TOKEN"])
    if env.get("MEDRES_PACS_USER"):
        return Credentials(env["MEDRES_PACS_USER"], env.get("MEDRES_PACS_PASSWORD", ""))
    path = Path(env["MEDRES_PACS_NETRC"]) if env.get("MEDRES_PACS_NETRC") else None
    if path is None:
        home = Path(env.get("HOME", "~")).expanduser() / ".netrc"
        path = home if home.is_file() else None
    if path is None:
        return Credentials()
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError) as exc:
        msg = getattr(exc, "msg", None) or getattr(exc, "strerror", None) or "unreadable"
        raise PacsError(
            f"{path.name}: netrc file cannot be read ({msg}); fix or unset it"
        ) from None
    if entry is None:
        return Credentials()
    login, _, password = entry
    return Credentials(login or "", password or "")


def calling_aet(env: dict[str, str] | None = None) -> str:
    """Our DIMSE AE title: ``MEDRES_PACS_AET`` or ``MEDRES`` (at most 16 characters)."""
    env = dict(os.environ) if env is None else env
    aet = env.get("MEDRES_PACS_AET", DEFAULT_AET).strip()
    if not aet or len(aet) > 16:
        raise PacsError(f"MEDRES_PACS_AET={aet!r}: an AE title has 1 to 16 characters")
    return aet
