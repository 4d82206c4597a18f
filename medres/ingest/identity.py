"""The one rule that turns an image's raw identity into its PHI-free ``image_id``.

Ingest (``manifest.csv``) and score (``scores.csv``, ledger keys) both call it, so the
same DICOM stack or NIfTI file gets the same ``image_id`` under the same dataset key.
Imports: ``medres.phi`` only.
"""

from __future__ import annotations

from typing import Any

from medres.phi import pseudonym

IMAGE_ID_PREFIX = "img-"


def stack_identity(stack: Any) -> str:
    """Raw identity of a DICOM stack (study | series | stack id); never written."""
    return f"dicom\x00{stack.key}"


def nifti_identity(source: str) -> str:
    """Raw identity of a NIfTI input, by its (redaction-free) source path."""
    return f"nifti\x00{source}"


def unique_image_id(identity: str, key: bytes, taken: set[str]) -> tuple[str, str]:
    """``(image_id, identity)``: the keyed pseudonym of ``identity``, made distinct from
    ``taken`` (two stacks of one series) by suffixing the identity; adds it to ``taken``."""
    base, n = identity, 1
    image_id = pseudonym(identity, key, IMAGE_ID_PREFIX)
    while image_id in taken:
        n += 1
        identity = f"{base}\x00{n}"
        image_id = pseudonym(identity, key, IMAGE_ID_PREFIX)
    taken.add(image_id)
    return image_id, identity
