"""The per-dataset secret key and keyed pseudonyms of patient identity.

Raw identifiers (PatientID, StudyInstanceUID, AccessionNumber, ...) are replaced by keyed
hashes (HMAC-SHA256, truncated) under a secret key stored in the output directory
(``.medres_key``, mode 0600). The same key gives the same pseudonym, so joins across runs
on one dataset work; without the key a pseudonym cannot be reversed or re-derived.

Owns: :data:`KEY_FILE`, :data:`PSEUDONYM_HEX`, :func:`load_or_create_key`, :func:`pseudonym`. Imports: stdlib only.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = ".medres_key"
PSEUDONYM_HEX = 16  # hex digits of a pseudonym (64 bits of the HMAC)


def load_or_create_key(out_dir: str | os.PathLike[str]) -> bytes:
    """Return the dataset's secret key, creating ``out_dir/.medres_key`` on first use."""
    path = Path(out_dir) / KEY_FILE
    if path.exists():
        return bytes.fromhex(path.read_text().strip())
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key.hex() + "\n")
    return key


def pseudonym(value: object, key: bytes, prefix: str = "") -> str:
    """Keyed hash of ``value`` (empty string for missing values)."""
    if value is None or str(value).strip() == "":
        return ""
    digest = hmac.new(key, str(value).strip().encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{prefix}{digest[:PSEUDONYM_HEX]}"
