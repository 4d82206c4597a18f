"""Identifier filter for paths and free text: :class:`PathRedactor`.

Folder and file names (and messages that quote them) often carry a patient's name, ID or
UIDs. The redactor learns those tokens from DICOM headers, keeps only their keyed hashes,
and replaces every path component or word that contains one by ``~`` + a pseudonym.

Matching rule (tokens and compared text alike): Unicode NFKC, then casefold, then every
non-alphanumeric character removed, so NFD names (macOS), full-width digits
(``ＭＲＮ０００９``), ``SMITH^JOHN``, ``Smith_John`` and ``smith john`` all match. A
PatientName is split into ``=`` groups and each group into parts on ``^``, spaces and
commas; a part is a token when it has 3+ characters, or 2+ when it holds a CJK character
(Han, kana, Hangul: such names are often 2 characters a part); each group's parts joined
without separators (in order and reversed) are tokens too. Paths match by containment (a
component holding a token anywhere is replaced whole). Free text matches whole tokens
only: a word is split at punctuation, letter/digit and lower/upper changes, and each CJK
character stands alone; a run of consecutive pieces must equal a token. DICOM tag
notation ``(gggg,eeee)`` is never changed.

Messages (error lines, log records, CLI summaries) pass :func:`filter_message`, the one
filter for text that leaves the process outside a written file: every redactor made in
this process registers itself (the last :data:`_LIVE_MAX`), and each one's
:meth:`PathRedactor.filter_message` replaces path components that contain a token (so an
``--out`` below a folder named after the patient is pseudonymised too) and words that hold
a whole token. It applies in every ``--source-paths`` mode (``keep`` is about the paths
written to the outputs). :class:`IdentityLogFilter` applies it to every log record of the
``medres`` logger; the CLI's error boundary applies it to every error line.

Owns: :data:`SOURCE_PATH_MODES`, :class:`PathRedactor`, :func:`filter_message` and
:class:`IdentityLogFilter`. Imports: ``medres.errors`` and :mod:`medres.phi.keys`.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import re
import unicodedata
from collections.abc import Iterable
from typing import Any

from medres.errors import ConfigError
from medres.phi.keys import PSEUDONYM_HEX, pseudonym

SOURCE_PATH_MODES = ("identity", "all", "keep")
_SEPARATORS = re.compile(r"([/!\\])")
_NOT_ALNUM = re.compile(r"[\W_]+")
_NAME_SPLIT = re.compile(r"[\^\s,]+")
_REDACTED = re.compile(r"~[0-9a-f]{16}")
_TEXT_SPLIT = re.compile(r"""([\s/!\\:;,()\[\]{}<>'"=|]+)""")
_MIN_TOKEN = 3
_MIN_CJK_TOKEN = 2
_CJK = re.compile(
    r"[\u1100-\u11ff\u3040-\u30ff\u3130-\u318f\u3400-\u4dbf\u4e00-\u9fff"
    r"\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff]"
)
_TAG = re.compile(r"(\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\))")
# a path quoted in a message ('...' or "..."), or an unquoted word holding a separator
_PATHLIKE = re.compile(
    r"""'([^'\n]*[/\\][^'\n]*)'|"([^"\n]*[/\\][^"\n]*)"|([^\s'"]*[/\\][^\s'"]*)"""
)
# pieces of a word for whole-token matching: a CJK character, a letter run, a digit run
_PIECE = re.compile(r"[^\W\d_]+|\d+")
# header fields that identify a patient or a study (attributes of ``DicomHeader``)
_ID_FIELDS = (
    "patient_id",
    "accession",
    "birth_date",
    "study_uid",
    "series_uid",
)


def _norm(text: str) -> str:
    return _NOT_ALNUM.sub("", unicodedata.normalize("NFKC", text).casefold())


def _pieces(word: str) -> list[str]:
    """``word`` (NFKC) cut at punctuation, letter/digit and lower->upper changes, each CJK
    character alone; each piece normalised like a token."""
    word = unicodedata.normalize("NFKC", word)
    word = re.sub(r"(?<=[^\W\d_])(?=[A-Z][a-z])|(?<=[a-z])(?=[A-Z])", " ", word)
    word = _CJK.sub(lambda m: f" {m.group(0)} ", word)
    return [_norm(p) for p in _PIECE.findall(word)]


class PathRedactor:
    """Replaces path components that carry patient identity by keyed pseudonyms.

    Choices made:

    * **Tokens** are collected from every DICOM header of a run (:meth:`add_header`):
      PatientID, OtherPatientIDs, AccessionNumber, PatientBirthDate, StudyInstanceUID,
      SeriesInstanceUID as whole values, and each part of PatientName split on ``^``,
      spaces and commas (plus the joined parts). Values are compared after NFKC, casefold
      and removal of non-alphanumerics (module doc); tokens shorter than 3 characters (2
      with a CJK character) are ignored (they would match almost every name).
    * **Tokens are never held in clear**: only their keyed hashes (and lengths) are kept,
      so the redactor's state (:attr:`hashed_tokens`) can be stored next to the data (the
      ingest cache, the scoring ledger) and a resumed run redacts exactly like the first.
    * **A component** (folder name, file name, archive member part after ``!``) that
      contains any token is replaced whole by ``~`` + ``pseudonym(component, key)``; the
      other components stay readable. Mode ``"all"`` replaces every component except the
      base names of the SOURCE roots (``root_names``, when they carry no token); mode
      ``"keep"`` returns paths unchanged and is meant for de-identified data only.
    * **Deterministic**: same key, same tokens and same path give the same output.
      Components already of the form ``~<16 hex>`` are left alone (idempotent).
    """

    def __init__(
        self,
        key: bytes,
        mode: str = "identity",
        root_names: Iterable[str] = (),
    ) -> None:
        if mode not in SOURCE_PATH_MODES:
            raise ConfigError(
                f"--source-paths {mode!r} is not known; use one of {', '.join(SOURCE_PATH_MODES)}"
            )
        self.key = key
        self.mode = mode
        self.root_names = frozenset(root_names)
        self._hashes: set[str] = set()
        self._lengths: set[int] = set()
        self._memo: dict[str, bool] = {}
        self._seen: set[str] = set()
        _LIVE.append(self)  # every message of this process passes it (filter_message)

    # ---- tokens
    def _hash(self, token: str) -> str:
        return hmac.new(self.key, b"path-token\x00" + token.encode(), hashlib.sha256).hexdigest()[
            :PSEUDONYM_HEX
        ]

    def _add_token(self, token: str) -> None:
        token = _norm(token)
        least = _MIN_CJK_TOKEN if _CJK.search(token) else _MIN_TOKEN
        if len(token) < least or token in self._seen:
            return
        self._seen.add(token)  # in memory only (a series repeats its values per file)
        h = self._hash(token)
        if h not in self._hashes:
            self._hashes.add(h)
            self._lengths.add(len(token))
            self._memo.clear()

    def add_values(self, values: Iterable[object] = (), names: Iterable[object] = ()) -> None:
        """Add identifier ``values`` (matched whole) and person ``names`` (split in parts)."""
        for v in values:
            if v is None:
                continue
            items = v if isinstance(v, (list, tuple)) else (v,)
            for item in items:
                self._add_token(str(item))
        for n in names:
            if n is None:
                continue
            for group in unicodedata.normalize("NFKC", str(n)).split("="):
                parts = [p for p in _NAME_SPLIT.split(group) if p]
                for part in parts:
                    self._add_token(part)
                if len(parts) > 1:
                    self._add_token("".join(parts))
                    self._add_token("".join(reversed(parts)))

    def add_header(self, header: Any) -> None:
        """Add the identity tokens of a ``DicomHeader`` (missing fields are ignored)."""
        values = [getattr(header, f, "") for f in _ID_FIELDS]
        values.append(tuple(getattr(header, "other_patient_ids", ()) or ()))
        self.add_values(values, [getattr(header, "patient_name", "")])

    @property
    def hashed_tokens(self) -> list[str]:
        """The PHI-free state, sorted: the keyed hash of each token and ``len:<n>`` for
        each token length (a token itself cannot be recovered from it)."""
        return sorted(self._hashes | {f"len:{n}" for n in self._lengths})

    def add_hashed(self, state: Iterable[str]) -> None:
        """Restore tokens saved from :attr:`hashed_tokens` (unknown entries are ignored)."""
        before = (len(self._hashes), len(self._lengths))
        for s in state:
            s = str(s)
            if s.startswith("len:") and s[4:].isdigit():
                self._lengths.add(int(s[4:]))
            elif re.fullmatch(r"[0-9a-f]{16}", s):
                self._hashes.add(s)
        if (len(self._hashes), len(self._lengths)) != before:
            self._memo.clear()

    def identifies(self, component: str) -> bool:
        """Whether ``component`` contains any token (case and punctuation ignored)."""
        hit = self._memo.get(component)
        if hit is None:
            c = _norm(component)
            hit = any(
                self._hash(c[i : i + n]) in self._hashes
                for n in self._lengths
                for i in range(len(c) - n + 1)
            )
            self._memo[component] = hit
        return hit

    def _has_whole_token(self, word: str) -> bool:
        """Whether a run of consecutive pieces of ``word`` (see :func:`_pieces`) is a token."""
        pieces = _pieces(word)
        longest = max(self._lengths, default=0)
        for i in range(len(pieces)):
            joined = ""
            for piece in pieces[i:]:
                joined += piece
                if len(joined) > longest:
                    break
                if len(joined) in self._lengths and self._hash(joined) in self._hashes:
                    return True
        return False

    def _words(self, text: str) -> str:
        """``text`` with every word holding a whole token pseudonymised; tag notation kept."""
        out = []
        for j, chunk in enumerate(_TAG.split(text)):
            if j % 2:
                out.append(chunk)
                continue
            parts = _TEXT_SPLIT.split(chunk)
            out.extend(
                p
                if i % 2 or not p or _REDACTED.fullmatch(p) or not self._has_whole_token(p)
                else "~" + pseudonym(p, self.key)
                for i, p in enumerate(parts)
            )
        return "".join(out)

    def redact_value(self, value: str) -> str:
        """A free-text header value (Manufacturer, BodyPartExamined, ...) with every word
        that holds a whole token pseudonymised; applied in every mode, ``keep`` included
        (that mode is about paths)."""
        if not value or not self._hashes:
            return value
        return self._words(value)

    def _identity_path(self, path: str) -> str:
        """``path`` with each component that contains a token pseudonymised (any mode)."""
        parts = _SEPARATORS.split(path)
        return "".join(
            p
            if i % 2
            or not p
            or p in (".", "..")
            or _REDACTED.fullmatch(p)
            or not self.identifies(p)
            else "~" + pseudonym(p, self.key)
            for i, p in enumerate(parts)
        )

    def filter_message(self, text: str) -> str:
        """A message (error line, log record) with every path component that contains a
        token and every word that holds a whole token pseudonymised; in every mode."""
        if not text or not self._hashes:
            return text

        def path(m: re.Match[str]) -> str:
            whole, inner = m.group(0), next(g for g in m.groups() if g is not None)
            return whole.replace(inner, self._identity_path(inner))

        return self._words(_PATHLIKE.sub(path, text))

    # ---- redaction
    def _component(self, comp: str, first: bool) -> str:
        if not comp or comp in (".", "..") or _REDACTED.fullmatch(comp):
            return comp
        if self.identifies(comp):
            return "~" + pseudonym(comp, self.key)
        if self.mode == "all" and not (first and comp in self.root_names):
            return "~" + pseudonym(comp, self.key)
        return comp

    def redact(self, source: str) -> str:
        """``source`` with every identifying component pseudonymised (see the class doc)."""
        if self.mode == "keep" or not source:
            return source
        parts = _SEPARATORS.split(source)
        return "".join(p if i % 2 else self._component(p, i == 0) for i, p in enumerate(parts))

    def redact_text(self, text: str, sources: Iterable[str] = ()) -> str:
        """A message with each of ``sources`` replaced by its redacted form, then every
        remaining word that contains a token pseudonymised (mode ``keep``: unchanged)."""
        if self.mode == "keep" or not text:
            return text
        for src in sorted({s for s in sources if s}, key=len, reverse=True):
            if src in text:
                text = text.replace(src, self.redact(src))
        if not self._hashes:
            return text
        return self._words(text)


# the redactors made in this process, newest last: what filter_message applies
_LIVE_MAX = 8
_LIVE: collections.deque[PathRedactor] = collections.deque(maxlen=_LIVE_MAX)


def filter_message(text: str) -> str:
    """``text`` passed through every live redactor's :meth:`PathRedactor.filter_message`:
    the identity filter of every error line, log record and CLI summary."""
    for redactor in list(_LIVE):
        text = redactor.filter_message(text)
    return text


class IdentityLogFilter(logging.Filter):
    """A logging filter that passes each record's message through :func:`filter_message`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = filter_message(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True
