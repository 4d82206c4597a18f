"""Decoding for scoring: where an item is decoded, what decoding returns, and the ordered,
bounded feed of decoded chunks to the scoring loop.

Choices:

- **Decoding returns the raw image**: :class:`MedresDecoder` reads an item with ingest's
  readers (NIfTI through ingest's fast ``.nii`` reader, DICOM through the stack reader)
  and returns a :class:`~medres.train.batched.RawImage` (the array as read, in its dtype,
  its affine and channel count), after the ``wrong_dims`` and 4D-volume checks. The saved
  preprocessing is not run here: the scoring loop runs it on each batch, on the scoring
  device, with :class:`~medres.train.batched.BatchedPreprocess` (the decoder's
  :attr:`~MedresDecoder.batched`), the one scoring path (:mod:`medres.score.engine`).
- **Where a worker-decoded item is preprocessed** (:meth:`MedresDecoder.ship_raw`): what a
  worker sends back is pickled through a pipe, and a raw CT (512x512x300 int16, 150 MB) is
  ~20 times its 128^3 float32 model input (8 MB). Rule: when scoring on an accelerator a
  worker always ships the raw image (the device preprocesses a batch far faster than a
  worker's CPU); when scoring on the CPU it ships it only when it is small (at most
  :data:`SHIP_RAW_BYTES`, 1 MiB, or the size of its model input), else it runs the same
  ``BatchedPreprocess`` on that one item on its own CPU (one path, the worker's core does
  the work, in parallel with the model) and ships the model input. The result does not
  depend on where it was computed beyond float32 rounding (the batched path equals the
  per-item one within 1e-5 either way).
- **Where an item is decoded** is the decoder's call (``decoder.in_process(item)``, when
  it has one). :class:`MedresDecoder` decodes in this process only what is bounded: an
  uncompressed single-file NIfTI-1 (``.nii``) whose header-declared data (``vox_offset``
  plus ``prod(dim) * itemsize`` of its ``datatype``) lies inside the file, and, when a
  worker memory cap is set, whose data is smaller than that cap. Such a file is read by
  nibabel/numpy (no native decoder that can crash the interpreter) and what is read
  cannot exceed the file. It is decoded inline, in this thread, just before its batch:
  on a CPU the model then gets every core and no item pays for inter-process transfer,
  which costs more than decoding a small NIfTI. (A prefetching decode *thread* was
  measured and dropped: its torch ops start a second OpenMP team next to the model's and
  its Python holds the GIL the model's dispatch needs.) Every other item (DICOM,
  compressed, a header that does not match its file, whatever a custom decoder does not
  vouch for) goes to :class:`medres.workers.IsolatedPool`: forkserver workers with a
  per-item timeout, an address-space cap and crash isolation. A hang or an unbounded
  allocation ends as a ``timeout`` error row, a crash as ``decode_failed``.
- **The pool** starts before discovery (``_Decoders.start``) when items are expected to
  need it, else on the first item that does. Each worker receives the decoder once (the
  pool's ``initializer``, which marks it ``in_worker``) and uses one torch thread.
  Chunks are submitted ahead: at most ``max(workers * prefetch, chunks per batch +
  workers)`` chunks are in flight (inline chunks count too, they keep the order), which
  bounds memory and keeps the model fed while it computes. Results come back in
  submission order, so a run is deterministic. ``workers=0`` decodes every item inline.
- **Dimensionality**: an image whose dims differ from the model's saved ``dims`` (a 2D
  radiograph for a 3D model, a CT volume for a 2D model) is a ``wrong_dims`` row naming
  both; no 2D image is stretched into a volume, and a volume is cut to its centre slice
  only for a 2D model whose saved ``slice_mode`` is not ``none`` (trained that way).
- **Per-item failures are data, not exceptions**: :func:`decode_one` turns a decoder
  failure into a coded :class:`~medres.score.items.Decoded` (``decode_failed`` unless the
  reader raised an ``IngestError`` with its own code; ``timeout`` when decoding ran out
  of memory, also where a reader re-coded the MemoryError, as the pool reports it).
  ``Decoded.array`` holds the ``RawImage`` or, from a custom decoder or a worker that
  preprocessed, the model input array.

Imports: :mod:`medres.workers`, :mod:`medres.ingest` (codes; nifti/dicom readers lazily),
:mod:`medres.train.batched` and :mod:`medres.train.transforms` lazily,
:mod:`medres.score.items`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medres.errors import IngestError
from medres.ingest.codes import Code
from medres.score.items import Decoded, ScoreItem
from medres.workers import Failure, IsolatedPool

log = logging.getLogger(__name__)

# what the forkserver imports once for scoring's workers (readers, torch, the preprocessing)
PRELOAD = ("medres.score.decode", "medres.ingest.nifti", "medres.train.batched")
# a worker on CPU scoring ships a raw image back when it is at most this large (or at most
# its preprocessed size); a larger one is preprocessed in the worker (module docstring)
SHIP_RAW_BYTES = 1 << 20


def decode_one(decoder: Callable[[ScoreItem], Any], item: ScoreItem) -> Decoded:
    """Decode one item, turning any failure into a coded error (never raises).

    A decoder returns a raw image (``RawImage``, kept as it is: the batch preprocesses it)
    or the model input itself (an array, kept as contiguous float32)."""
    if item.kind == "error":
        return Decoded(item, code=item.code, message=item.message)
    try:
        arr = decoder(item)
        if hasattr(arr, "affine") and hasattr(arr, "channels"):  # a RawImage
            return Decoded(item, arr)
        return Decoded(item, np.ascontiguousarray(arr, dtype=np.float32))
    except IngestError as exc:
        if _out_of_memory(exc):
            return _over_memory(item)
        return Decoded(item, code=str(exc.code), message=str(exc))
    except MemoryError:
        return _over_memory(item)
    except BaseException as exc:  # decoders raise non-Exception panics
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        # the exception's text may hold absolute paths (PHI in folder names): type only
        return Decoded(
            item,
            code=Code.DECODE_FAILED.value,
            message=f"{item.source}: decoding failed ({type(exc).__name__}); "
            "the file may be corrupt, re-export it",
        )


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while handling a MemoryError (a reader that re-codes every
    failure of its decoder still ran out of memory: that is the memory limit's failure)."""
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, MemoryError):
            return True
        seen = seen.__context__
    return False


def _over_memory(item: ScoreItem) -> Decoded:
    return Decoded(
        item,
        code=Code.TIMEOUT.value,
        message=f"{item.source}: decoding exceeded the memory limit; the file is corrupt or "
        "far larger than its header says (raise --worker-memory-mb if it is genuine)",
    )


# an in-process NIfTI at least this large is read ahead by the kernel when it is routed
# (chunks are routed before they are decoded: see _Decoders.max_inflight)
READAHEAD_BYTES = 4 << 20


def _readahead(fd: int) -> None:
    """Ask the kernel to start reading the whole file ``fd`` now (where supported)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, 0, 0, os.POSIX_FADV_WILLNEED)


# NIfTI-1 datatype code -> bytes per voxel (every type nibabel reads)
_NIFTI_ITEMSIZE = {
    2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4,
    1024: 8, 1280: 8, 1536: 16, 1792: 16, 2048: 32, 2304: 4,
}  # fmt: skip


def bounded_plain_nifti(
    path: str | os.PathLike[str], max_bytes: int | None = None, *, readahead: bool = False
) -> bool:
    """Whether ``path`` is an uncompressed NIfTI-1 ``.nii`` whose declared data lies inside
    the file (and, with ``max_bytes``, is at most that large): safe to read in-process.

    ``readahead``: a file of at least :data:`READAHEAD_BYTES` is also handed to the
    kernel's read-ahead (``posix_fadvise(WILLNEED)``), so that its reading from disk
    overlaps the scoring of the items before it, without using a core of this process."""
    name = os.fspath(path)
    if not name.lower().endswith(".nii"):
        return False
    try:
        with open(name, "rb") as fh:
            head = fh.read(348)
            size = os.fstat(fh.fileno()).st_size
            if readahead and size >= READAHEAD_BYTES:
                _readahead(fh.fileno())
    except OSError:
        return False
    if len(head) < 348 or head[344:348] != b"n+1\x00":
        return False
    end = "<" if head[:4] == b"\x5c\x01\x00\x00" else ">"  # sizeof_hdr 348
    if struct.unpack(end + "i", head[:4])[0] != 348:
        return False
    dim = struct.unpack(end + "8h", head[40:56])
    (datatype,) = struct.unpack(end + "h", head[70:72])
    (offset,) = struct.unpack(end + "f", head[108:112])
    shape = dim[1 : dim[0] + 1] if 1 <= dim[0] <= 7 else ()
    itemsize = _NIFTI_ITEMSIZE.get(datatype)
    if not shape or min(shape) <= 0 or itemsize is None or not offset >= 0:
        return False
    nbytes = math.prod(shape) * itemsize
    return int(offset) + nbytes <= size and (max_bytes is None or nbytes <= max_bytes)


class MedresDecoder:
    """Decoding with ingest's readers: an item -> its raw :class:`~medres.train.batched.RawImage`.

    Picklable (the preprocessing dict, the memory cap and the scoring device travel; the
    :class:`~medres.train.batched.BatchedPreprocess` is built lazily in each process).
    ``inline_max_bytes`` (the worker memory cap) bounds what :meth:`in_process` accepts.
    ``device`` is the scoring device: it decides where a worker-decoded item is
    preprocessed (:meth:`ship_raw`); :attr:`batched` is the one preprocessing, on that
    device, that the scoring loop runs on each batch.
    """

    def __init__(
        self,
        preprocessing: dict[str, Any],
        *,
        inline_max_bytes: int | None = None,
        device: str = "cpu",
    ):
        self.preprocessing = preprocessing
        self.inline_max_bytes = inline_max_bytes
        self.device = str(device)
        self.in_worker = False  # set by :func:`init_worker`
        self._batched: Any = None
        self._local: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_batched": None, "_local": None}

    @property
    def batched(self) -> Any:
        """The :class:`~medres.train.batched.BatchedPreprocess` on the scoring device."""
        if self._batched is None:
            from medres.train.batched import BatchedPreprocess

            self._batched = BatchedPreprocess(self.preprocessing, device=self.device)
        return self._batched

    def load(self, item: ScoreItem) -> Any:
        """The item's :class:`~medres.ingest.image.LoadedImage` via ingest's readers."""
        if item.kind == "dicom":
            from medres.ingest.dicom import load_stack

            return load_stack(item.payload)
        from medres.ingest.nifti import load_nifti

        return load_nifti(Path(item.payload[0]), item.payload[1] if len(item.payload) > 1 else "")

    def check_dims(self, item: ScoreItem, dims: int) -> None:
        """Refuse (``wrong_dims``) an image whose dimensionality is not the model's: no
        2D image is stretched into a volume, and a slice is taken from a volume only when
        the saved preprocessing says so (a 2D model trained on the slices of volumes:
        ``slice_mode`` center/random, scored on the centre slice)."""
        want = int(self.preprocessing.get("dims") or 0)
        slicing = str(self.preprocessing.get("slice_mode") or "none") != "none"
        if want == 2 and dims == 3 and slicing:
            return
        if want in (2, 3) and dims != want:
            raise IngestError(
                f"{item.source}: a {dims}D image, and the model takes {want}D images; score "
                f"it with a {dims}D model (or leave it out)",
                code=Code.WRONG_DIMS,
            )

    def in_process(self, item: ScoreItem) -> bool:
        """Whether ``item`` may be decoded in the scoring process (see the module docstring).

        DICOM (native pixel decoders), compressed files (a gzip bomb) and NIfTI files whose
        header does not match the file go to the isolated workers. A large accepted file is
        read ahead by the kernel from here on (items are routed chunks ahead of decoding).
        """
        if item.kind == "error":
            return True  # nothing to decode
        return item.kind == "nifti" and bounded_plain_nifti(
            item.payload[0], self.inline_max_bytes, readahead=True
        )

    def prepare(self) -> None:
        """Import the readers and the batched preprocessing, validate the saved
        preprocessing (once per process: a bad model.json fails here, not per item)."""
        import medres.ingest.nifti  # noqa: F401

        _ = self.batched.spec

    def ship_raw(self, raw: Any) -> bool:
        """Whether ``raw`` leaves the decoder as it is (preprocessed later, batched, on the
        scoring device) rather than preprocessed here. Always in the scoring process and
        when scoring on an accelerator; in a worker on CPU scoring only when it is small
        (at most :data:`SHIP_RAW_BYTES` or the size of its model input), so that a large
        volume is reduced where it was read and only its model input crosses processes."""
        if not self.in_worker or not self.device.startswith("cpu"):
            return True
        out = math.prod(self.batched.out_shape) * 4
        return int(getattr(raw.array, "nbytes", 0)) <= max(SHIP_RAW_BYTES, out)

    def __call__(self, item: ScoreItem) -> Any:
        """The raw image of ``item`` (a ``RawImage``), or, when :meth:`ship_raw` says no,
        its model input (float32 (C, *image_size)) made by the same batched preprocessing
        on this worker's CPU."""
        from medres.train.batched import RawImage
        from medres.train.transforms import check_volumes

        img = self.load(item)
        self.check_dims(item, img.dims)
        check_volumes(self.preprocessing, getattr(img, "n_volumes", 1), item.source)  # 4D rule
        raw = RawImage(img.array, np.asarray(img.affine, np.float64), int(img.channels or 1))
        if self.ship_raw(raw):
            return raw
        if self._local is None:
            from medres.train.batched import BatchedPreprocess

            self._local = BatchedPreprocess(self.preprocessing, device="cpu")
        return self._local([raw])[0].numpy()


# -- worker side (runs in IsolatedPool workers) ---------------------------------------------
_WORKER_DECODER: Callable[[ScoreItem], Any] | None = None


def init_worker(decoder: Callable[[ScoreItem], Any]) -> None:
    """Pool initializer: keep the decoder, one torch thread, set-up done once."""
    global _WORKER_DECODER
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(1)  # one thread per worker; the parallelism is across workers
    if hasattr(decoder, "in_worker"):
        decoder.in_worker = True  # see MedresDecoder.ship_raw
    prepare = getattr(decoder, "prepare", None)
    if callable(prepare):
        prepare()
    _WORKER_DECODER = decoder


def decode_in_worker(item: ScoreItem) -> Decoded:
    """The pool task: :func:`decode_one` with this worker's decoder."""
    if _WORKER_DECODER is None:  # pragma: no cover - the initializer always ran
        raise RuntimeError("scoring worker has no decoder")
    return decode_one(_WORKER_DECODER, item)


# -- the ordered feed ------------------------------------------------------------------------
def chunks(
    items: Iterable[ScoreItem], size: int, here: Callable[[ScoreItem], bool] | None = None
) -> Iterator[tuple[bool, list[ScoreItem]]]:
    """``(in_process, chunk)``: at most ``size`` consecutive items that share a route.

    ``here(item)`` tells whether ``item`` may be decoded in this process (else: in a
    worker process); without it every item goes to the workers.
    """
    chunk: list[ScoreItem] = []
    route = False
    for it in items:
        r = bool(here(it)) if here is not None else False
        if chunk and r != route:
            yield route, chunk
            chunk = []
        route = r
        chunk.append(it)
        if len(chunk) >= size:
            yield route, chunk
            chunk = []
    if chunk:
        yield route, chunk


def _failed(item: ScoreItem, failure: Failure) -> Decoded:
    return Decoded(item, code=failure.code, message=f"{item.source}: {failure.message}")


class _Decoders:
    """Ordered, bounded, prefetching decode of item chunks.

    Chunks marked ``in_process`` are decoded inline when they are consumed, the others by
    an :class:`~medres.workers.IsolatedPool` of ``workers`` processes (started by
    :meth:`start` or on first need, and fed ahead); with ``workers == 0`` every chunk is
    decoded inline. ``timeout_s`` and ``memory_mb`` are the pool's per-item limits.
    """

    def __init__(
        self,
        decoder: Callable[[ScoreItem], Any],
        workers: int,
        prefetch: int,
        per_batch: int = 1,
        *,
        timeout_s: float = 120.0,
        memory_mb: int | None = None,
    ):
        self.decoder = decoder
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        # while the model runs on one batch, the chunks of the next one must already be
        # in flight (one slot is taken by the chunk being consumed), else the decoders idle
        self.max_inflight = max(1, workers * prefetch, per_batch + workers)
        self.pool: IsolatedPool | None = None

    def _new_pool(self) -> IsolatedPool:
        pool = IsolatedPool(
            self.workers,
            timeout_s=self.timeout_s,
            memory_mb=self.memory_mb,
            initializer=init_worker,
            initargs=(self.decoder,),
            preload=PRELOAD,
        )
        pool.start()
        return pool

    def start(self) -> None:
        """Start the workers now (they warm up while discovery runs)."""
        if self.workers > 0 and self.pool is None:
            self.pool = self._new_pool()

    def close(self, kill: bool = False) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close(kill=kill)

    def run(self, chunks: Iterable[tuple[bool, list[ScoreItem]]]) -> Iterator[list[Decoded]]:
        if self.workers <= 0:
            for _, chunk in chunks:
                yield [decode_one(self.decoder, it) for it in chunk]
            return
        pending: deque[tuple[list[ScoreItem], int | None]] = deque()
        try:
            for here, chunk in chunks:
                pending.append((chunk, self._submit(here, chunk)))
                while len(pending) >= self.max_inflight:
                    yield self._result(*pending.popleft())
            while pending:
                yield self._result(*pending.popleft())
        except BaseException:
            self.close(kill=True)  # never wait for workers on the error path
            raise
        self.close()

    def _submit(self, here: bool, chunk: Sequence[ScoreItem]) -> int | None:
        """The ticket of a worker-decoded chunk; ``None`` for one decoded inline."""
        if here:
            return None
        if self.pool is None:  # no item was expected to need the workers
            self.pool = self._new_pool()
        return self.pool.submit(decode_in_worker, chunk)

    def _result(self, chunk: list[ScoreItem], ticket: int | None) -> list[Decoded]:
        if ticket is None or self.pool is None:
            return [decode_one(self.decoder, it) for it in chunk]
        answers = self.pool.result(ticket)
        return [
            val if ok else _failed(it, val) for it, (ok, val) in zip(chunk, answers, strict=True)
        ]
