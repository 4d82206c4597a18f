"""The scoring speed-ups give exactly what the plain paths give (values, dtype, affine)."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medres.errors import IngestError
from medres.ingest import nifti
from medres.phi import KEY_FILE
from medres.score.decode import MedresDecoder, _Decoders
from medres.score.decode import chunks as _chunks
from medres.score.items import ScoreItem
from medres.score.predict import Predictor
from medres.train.transforms import build_transforms, image_to_metatensor

SHEARED = np.array([[0, 0, 2.0, 1], [0, -1, 0.2, 2], [1.3, 0, 0, 3], [0, 0, 0, 1]])


def _via_nibabel(monkeypatch: pytest.MonkeyPatch, path) -> nifti.LoadedImage:
    with monkeypatch.context() as m:
        m.setattr(nifti, "_read_simple_nii", lambda p: None)
        return nifti.load_nifti(path)


@pytest.mark.parametrize("dtype", ["u1", "i2", "i4", "f4", "f8", "u2"])
@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (4, 5, 1), (4, 5, 6, 1)])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_fast_nii_read_equals_nibabel(tmp_path, monkeypatch, dtype, shape, endian):
    rng = np.random.default_rng(len(shape))
    arr = (rng.random(shape) * 100).astype(dtype)
    img = nib.Nifti1Image(arr, np.diag([-1.5, 2.0, 0.7, 1.0]) if len(shape) > 2 else SHEARED)
    if endian == ">":
        img = nib.Nifti1Image(arr, img.affine, header=img.header.as_byteswapped(">"))
    p = tmp_path / "x.nii"
    nib.save(img, p)
    assert nifti._read_simple_nii(p) is not None  # the fast path is taken
    fast, slow = nifti.load_nifti(p), _via_nibabel(monkeypatch, p)
    assert fast.array.dtype == slow.array.dtype
    assert fast.array.shape == slow.array.shape
    np.testing.assert_array_equal(fast.array, slow.array)
    np.testing.assert_array_equal(fast.affine, slow.affine)
    assert (fast.dims, fast.channels, fast.n_slices, fast.meta) == (
        slow.dims,
        slow.channels,
        slow.n_slices,
        slow.meta,
    )


def test_fast_nii_read_declines_what_it_does_not_handle(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(4, 6)
    gz = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), gz)
    scaled = nib.Nifti1Image(arr, np.eye(4))
    scaled.header.set_slope_inter(2.0, 1.0)
    nib.save(scaled, tmp_path / "s.nii")
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "q.nii")
    raw = bytearray((tmp_path / "q.nii").read_bytes())
    raw[254:256] = np.int16(0).tobytes()  # sform_code 0: nibabel would use the qform
    (tmp_path / "q.nii").write_bytes(bytes(raw))
    for name in ("a.nii.gz", "s.nii", "q.nii"):
        assert nifti._read_simple_nii(tmp_path / name) is None, name
    # the nibabel path still applies the scaling
    np.testing.assert_allclose(nifti.load_nifti(tmp_path / "s.nii").array, arr * 2.0 + 1.0)


def test_truncated_nii_keeps_its_error_code(tmp_path):
    p = tmp_path / "t.nii"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 4), np.int16), np.eye(4)), p)
    p.write_bytes(p.read_bytes()[:-100])
    assert nifti._read_simple_nii(p) is None
    with pytest.raises(IngestError) as exc:
        nifti.load_nifti(p)
    assert str(exc.value.code) == "truncated"


def _pre(dims: int, **kw) -> dict:
    from medres.train.spec import TransformSpec
    from medres.train.transforms import preprocessing_dict

    size = (12,) * dims
    spec = TransformSpec(
        dims=dims, in_channels=1, intensity="range", image_size=size, augment=False, **kw
    )
    return preprocessing_dict(spec)


@pytest.mark.parametrize(
    ("dims", "shape", "kw"),
    [
        (2, (20, 17), {}),
        (3, (10, 14, 9), {"orientation": "RAS"}),
        (3, (10, 14, 9), {"orientation": "RAS", "spacing": (2.0, 2.0, 2.0)}),
    ],
)
def test_decoder_equals_tracked_transforms(tmp_path, dims, shape, kw):
    """The decoder's raw image, batched-preprocessed, equals the MetaTensor path (1e-5)."""
    rng = np.random.default_rng(3)
    arr = rng.integers(-100, 900, size=shape).astype(np.int16)
    p = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(arr, np.diag([-1.2, 0.8, 1.5, 1.0])), p)
    pre = _pre(dims, **kw)
    dec = MedresDecoder(pre)
    raw = dec(ScoreItem("img-1", "id1", "v.nii", "nifti", payload=(str(p), "v.nii")))
    assert raw.array.dtype == np.int16  # the array as read: preprocessing runs on the batch
    got = dec.batched([raw])[0].numpy()
    ref = build_transforms(pre, train=False, load=False)(
        {"image": image_to_metatensor(nifti.load_nifti(p))}
    )["image"]
    np.testing.assert_allclose(got, np.asarray(torch.as_tensor(ref)), atol=1e-5, rtol=0)
    from monai.data import get_track_meta

    assert get_track_meta()  # the global switch is restored


def test_predictor_formats_model_up_front_and_prefetch_covers_a_batch():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    net(torch.zeros(1, 1, 5, 5, 5))
    p = Predictor(net, precision="fp32", dims=3)
    w = p.model[0].weight
    assert w.is_contiguous(memory_format=torch.channels_last_3d)
    assert p(np.zeros((2, 1, 5, 5, 5), np.float32)).shape == (2, 2)
    # 64 items in chunks of 16 with 2 workers: the next batch's 4 chunks stay in flight
    assert _Decoders(lambda it: np.zeros(1), 2, 2, per_batch=4).max_inflight >= 4 + 2


class PidDecoder:
    """Returns an image holding the pid of the process that decoded it."""

    def __init__(self, here_keys: tuple[str, ...] = ()) -> None:
        self.here_keys = here_keys

    def in_process(self, item: ScoreItem) -> bool:
        return item.key in self.here_keys

    def __call__(self, item: ScoreItem) -> np.ndarray:
        return np.full((1, 4, 4), float(os.getpid()), np.float32)


def test_items_routed_in_process_are_decoded_here_and_keep_their_order():
    items = [ScoreItem(f"img-{i}", f"id{i}", f"f{i}.nii", "nifti") for i in range(10)]
    here = ("img-0", "img-1", "img-2", "img-6", "img-9")
    chunks = list(_chunks(items, 2, PidDecoder(here).in_process))
    assert [r for r, _ in chunks] == [True, True, False, False, True, False, True]
    assert [it.key for _, c in chunks for it in c] == [it.key for it in items]
    decs = _Decoders(PidDecoder(here), workers=1, prefetch=2, per_batch=1)
    decs.start()
    out = [d for batch in decs.run(chunks) for d in batch]
    assert [d.item.key for d in out] == [it.key for it in items]
    pids = {d.item.key: int(d.array.flat[0]) for d in out}
    assert all((pids[k] == os.getpid()) == (k in here) for k in pids)


def test_medres_decoder_keeps_dicom_and_compressed_inputs_isolated(tmp_path):
    dec = MedresDecoder(_pre(2))
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), tmp_path / "a.NII")
    nii = ScoreItem("a", "a", "a.nii", "nifti", payload=(str(tmp_path / "a.NII"), "a.nii"))
    gz = ScoreItem("b", "b", "b.nii.gz", "nifti", payload=("/x/b.nii.gz", "b.nii.gz"))
    dcm = ScoreItem("c", "c", "c", "dicom", payload=None)
    bad = ScoreItem("d", "d", "d", "error", code="not_dicom")
    assert [dec.in_process(it) for it in (nii, gz, dcm, bad)] == [True, False, False, True]


def test_only_nii_files_whose_header_matches_the_file_are_decoded_in_process(tmp_path):
    """The inline fast path is bounded: the declared data lies in the file, under the cap."""
    from medres.score.decode import bounded_plain_nifti

    p = tmp_path / "ok.nii"
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 4), np.int16), np.eye(4)), p)
    assert bounded_plain_nifti(p)
    assert bounded_plain_nifti(p, max_bytes=32 * 32 * 4 * 2)
    assert not bounded_plain_nifti(p, max_bytes=1000)  # larger than the memory cap
    raw = bytearray(p.read_bytes())
    raw[42:44] = np.int16(30000).tobytes()  # dim[1]: far more data than the file holds
    (tmp_path / "big.nii").write_bytes(bytes(raw))
    assert not bounded_plain_nifti(tmp_path / "big.nii")
    (tmp_path / "junk.nii").write_bytes(b"\x00" * 100)
    assert not bounded_plain_nifti(tmp_path / "junk.nii")
    assert not bounded_plain_nifti(tmp_path / "missing.nii")


def test_plain_nifti_runs_start_no_worker_pool_and_give_the_model_every_core(tmp_path, monkeypatch):
    """Plain .nii inputs: no decode process, the model gets all cores; scores unchanged."""
    from helpers.models import write_model_dir, write_nifti_folder

    from medres.score import ScoreConfig, score
    from medres.score import pipeline as pl

    model = write_model_dir(tmp_path / "m", image_size=(12, 12))
    write_nifti_folder(tmp_path / "imgs", 6, (12, 12))
    seen: list[int] = []
    real = pl._cpu_threads

    def spy(device, workers):
        seen.append(workers)
        return real(device, workers)

    monkeypatch.setattr(pl, "_cpu_threads", spy)
    ref = score(ScoreConfig(model, (tmp_path / "imgs",), tmp_path / "ref", workers=0))

    def no_pool(self, *, safe=False):
        raise AssertionError("a worker pool was started for plain NIfTI inputs")

    monkeypatch.setattr(_Decoders, "_new_pool", no_pool)
    (tmp_path / "out").mkdir()
    shutil.copy(tmp_path / "ref" / KEY_FILE, tmp_path / "out" / KEY_FILE)  # same image_ids
    got = score(ScoreConfig(model, (tmp_path / "imgs",), tmp_path / "out", workers=2))
    assert (ref.scored, got.scored, seen) == (6, 6, [0, 0])
    assert (tmp_path / "ref" / "scores.csv").read_text() == (
        tmp_path / "out" / "scores.csv"
    ).read_text()


@pytest.mark.parametrize(
    ("names", "plain"),
    [(("a.nii", "b.nii"), True), (("a.nii", "b.nii.gz"), False), (("a.nii", "c.dcm"), False)],
)
def test_item_stream_knows_before_decoding_whether_workers_are_needed(tmp_path, names, plain):
    from helpers.models import write_dicom_2d

    from medres.score.sources import discover_items

    src = tmp_path / "src"
    src.mkdir()
    for name in names:
        if name.endswith(".dcm"):
            write_dicom_2d(src / name, study_uid="1.2.3", series_uid="1.2.3.4", size=4)
        else:
            nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), src / name)
    stream = discover_items([src], key=b"k" * 32, scratch=tmp_path / "s")
    assert stream.plain_nifti is plain
    assert len(list(stream)) == len(names)
