"""Patient identity: keyed pseudonyms and the identifier filter every writer uses.

Raw identifiers (PatientID, StudyInstanceUID, AccessionNumber, ...) never reach a
manifest, log, report or error message. They are replaced by keyed hashes
(HMAC-SHA256, truncated) under a per-dataset secret key stored in the output directory
(``.medres_key``, mode 0600). The same key gives the same pseudonym, so joins across runs
on one dataset work; without the key a pseudonym cannot be reversed or re-derived.

Modules: :mod:`~medres.phi.keys` (key file, :func:`pseudonym`) and
:mod:`~medres.phi.redact` (:class:`PathRedactor`: paths and free text;
:func:`filter_message` and :class:`IdentityLogFilter`: every error line and log record) and
:mod:`~medres.phi.tokens` (the tokens a dataset's runs learned, restored by commands that
read no header). This is a core
package: it imports ``medres.errors`` and ``medres.io`` only.
"""

from medres.phi.keys import KEY_FILE, load_or_create_key, pseudonym
from medres.phi.redact import SOURCE_PATH_MODES, IdentityLogFilter, PathRedactor, filter_message
from medres.phi.tokens import TOKENS_FILE, learn_tokens, save_tokens

__all__ = [
    "KEY_FILE",
    "SOURCE_PATH_MODES",
    "TOKENS_FILE",
    "IdentityLogFilter",
    "PathRedactor",
    "filter_message",
    "learn_tokens",
    "load_or_create_key",
    "pseudonym",
    "save_tokens",
]
