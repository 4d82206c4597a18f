"""Series grouping: headers -> series -> stacks (the main cluster kept, the rest reported).

Owns :func:`group_stacks`: headers grouped by (StudyInstanceUID, SeriesInstanceUID);
within a series repeated SOP instances dropped, slices clustered by orientation and
LOCALIZER image type; the largest cluster kept, the others reported as ``extra_stack``.
The kept cluster (and each enhanced multi-frame object) goes to :mod:`.volumes`: when slice
positions repeat it is split by ImageType into separate images and each into volumes (one
4D stack); every volume is validated by :mod:`.geometry`. Imports :mod:`.header`,
:mod:`.geometry`, :mod:`.volumes` and numpy.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.ingest.dicom.geometry import single_stack
from medres.ingest.dicom.header import (
    DEFAULT_POLICY,
    DicomHeader,
    GeometryPolicy,
    Rejection,
    Stack,
    as_code,
    reject,
)
from medres.ingest.dicom.mosaic import expand_mosaics
from medres.ingest.dicom.volumes import frame_stacks, series_stacks

log = logging.getLogger(__name__)


def group_stacks(
    headers: Sequence[DicomHeader], policy: GeometryPolicy = DEFAULT_POLICY
) -> tuple[list[Stack], list[Rejection]]:
    """Group headers into stacks and validate each stack's geometry.

    Series are keyed by (StudyInstanceUID, SeriesInstanceUID). Within a series:

    - the same SOPInstanceUID twice -> the later path is ``duplicate_input``;
    - instances without patient geometry, and multi-frame instances, are stacks of their
      own (one image each); in a series that also has a volume they are ``extra_stack``;
    - the remaining slices are clustered by orientation (``orientation_split_deg``) and by
      LOCALIZER image type. The largest cluster is the series' stack; the others are
      ``extra_stack``. When its positions repeat, :mod:`.volumes` splits it by ImageType
      (separate images) and into volumes (4D: temporal position, diffusion, echo, trigger
      time, acquisition number/time, position order), or keeps it as one stack whose
      same-position slices must hold equal pixels (``duplicate_slices`` otherwise);
    - the kept stack is validated (see :class:`GeometryPolicy`); a failing stack becomes a
      rejection with ``mixed_orientation``, ``inconsistent_geometry``, ``missing_slices`` or
      ``too_few_slices``.
    """
    by_series: dict[tuple[str, str], list[DicomHeader]] = defaultdict(list)
    for h in headers:
        by_series[(h.study_uid, h.series_uid)].append(h)
    stacks: list[Stack] = []
    rejections: list[Rejection] = []
    for (study, series), hs in sorted(by_series.items()):
        try:
            s, r = _group_series(study, series, hs, policy)
        except Exception as exc:  # one odd series never aborts the others
            log.debug("grouping failed", exc_info=True)
            why = f"series geometry cannot be read ({type(exc).__name__}); re-export the series"
            s, r = [], [reject(hs, Code.INCONSISTENT_GEOMETRY, why)]
        stacks.extend(s)
        rejections.extend(r)
    return stacks, rejections


def _group_series(
    study: str, series: str, hs: list[DicomHeader], policy: GeometryPolicy
) -> tuple[list[Stack], list[Rejection]]:
    """The stacks and rejections of one series (see :func:`group_stacks`)."""
    unique, rejections = _unique_instances(hs)
    unique = expand_mosaics(unique)  # Siemens mosaic -> one header per tile (.mosaic)
    singles = [h for h in unique if not h.is_slice]
    slices = [h for h in unique if h.is_slice]
    stacks: list[Stack] = []
    clusters = _orientation_clusters(slices, policy)
    # main: largest, non-localizer first
    clusters.sort(key=lambda c: (c[0].is_localizer, -len(c), min(str(h.path) for h in c)))
    if clusters:
        main = clusters[0]
        for extra in clusters[1:]:
            why = (
                f"{len(extra)} slice(s) split off the main stack "
                "(other orientation or localizer); not ingested"
            )
            rejections.append(reject(extra, Code.EXTRA_STACK, why))
        _add_built(series_stacks(study, series, main, policy), stacks, rejections)
        why = "instance without slice geometry or multi-frame beside a volume series; not ingested"
        rejections.extend(reject([h], Code.EXTRA_STACK, why) for h in singles)
        return stacks, rejections
    for h in singles:
        nf = h.number_of_frames
        if nf > 1 and h.image_orientation is not None and len(h.frame_positions) == nf:
            _add_built(frame_stacks(study, series, h, policy), stacks, rejections)
            continue
        try:
            stacks.append(single_stack(study, series, h, policy))
        except IngestError as exc:
            rejections.append(reject([h], as_code(exc.code), str(exc)))
    return stacks, rejections


def _add_built(
    built: list[tuple[list[DicomHeader], Stack | IngestError]],
    stacks: list[Stack],
    rejections: list[Rejection],
) -> None:
    """Sort :mod:`.volumes`' results into stacks and rejections."""
    for headers, out in built:
        if isinstance(out, IngestError):
            rejections.append(reject(headers, as_code(out.code), str(out)))
        else:
            stacks.append(out)


def _unique_instances(hs: list[DicomHeader]) -> tuple[list[DicomHeader], list[Rejection]]:
    """Headers in path order without repeated SOP instances (those are ``duplicate_input``)."""
    rejections: list[Rejection] = []
    seen: dict[str, DicomHeader] = {}
    unique: list[DicomHeader] = []
    for h in sorted(hs, key=lambda h: (str(h.path), h.source)):
        if h.sop_instance_uid and h.sop_instance_uid in seen:
            first = seen[h.sop_instance_uid]
            if _same_pixels(first, h):
                why = f"same SOP instance as {first.source}; copy skipped"
            else:  # not a copy: say so, and which file was kept
                why = (
                    f"same SOP instance as {first.source} but different pixel data; kept "
                    f"{first.source} (first in path order): remove the wrong file and re-run"
                )
                log.warning("%s: %s", h.source, why)
            rejections.append(reject([h], Code.DUPLICATE_INPUT, why))
            continue
        if h.sop_instance_uid:
            seen[h.sop_instance_uid] = h
        unique.append(h)
    return unique, rejections


def _pixel_bytes(h: DicomHeader) -> Iterator[bytes]:
    """The bytes of ``h``'s PixelData value (the whole file when its place is unknown)."""
    start, length = (h.pixel_offset, h.pixel_length)
    if start < 0 or length < 0:
        start, length = 0, -1
    with open(h.path, "rb") as fh:
        fh.seek(start)
        left = length
        while left != 0:
            chunk = fh.read(1 << 20 if left < 0 else min(left, 1 << 20))
            if not chunk:
                return
            left -= len(chunk) if left > 0 else 0
            yield chunk


def _same_pixels(a: DicomHeader, b: DicomHeader) -> bool:
    """Whether two files of one SOP instance hold the same pixel data (read only for such
    repeats, which are rare); unreadable counts as the same (the copy stays skipped)."""
    if a.pixel_length >= 0 and b.pixel_length >= 0 and a.pixel_length != b.pixel_length:
        return False
    try:
        da, db = hashlib.sha256(), hashlib.sha256()
        for chunk in _pixel_bytes(a):
            da.update(chunk)
        for chunk in _pixel_bytes(b):
            db.update(chunk)
    except OSError:
        return True
    return da.digest() == db.digest()


def _orientation_clusters(
    slices: list[DicomHeader], policy: GeometryPolicy
) -> list[list[DicomHeader]]:
    """Slices clustered by orientation (within ``orientation_split_deg`` of a cluster's
    first slice) and by localizer flag, in path order."""
    clusters: list[list[DicomHeader]] = []
    refs: list[tuple[tuple[float, ...], bool]] = []
    for h in sorted(slices, key=lambda h: str(h.path)):
        o = h.image_orientation
        assert o is not None  # has_geometry
        for idx, (ref, loc) in enumerate(refs):
            if loc != h.is_localizer:
                continue
            # the same orientation (the common case) is within any split angle: no numpy
            same = ref == o and any(o[:3]) and any(o[3:])
            if same or _angle_deg(ref, o) <= policy.orientation_split_deg:
                clusters[idx].append(h)
                break
        else:
            refs.append((o, h.is_localizer))
            clusters.append([h])
    return clusters


def _angle_deg(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest angle between the row or column cosines of two orientations."""
    out = 0.0
    for s in (slice(0, 3), slice(3, 6)):
        u, v = np.asarray(a[s], float), np.asarray(b[s], float)
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        if nu == 0 or nv == 0:
            return 180.0
        cos = float(np.clip(np.dot(u, v) / (nu * nv), -1.0, 1.0))
        out = max(out, math.degrees(math.acos(cos)))
    return out
