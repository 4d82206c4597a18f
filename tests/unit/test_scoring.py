"""The scoring loop: decode workers -> batched inference -> ledger, with a stand-in model."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from medres.errors import ConfigError, IngestError
from medres.models.modeldir import ModelMeta
from medres.score.cam import TopK
from medres.score.decode import decode_one
from medres.score.engine import LoopConfig, background, run_items
from medres.score.items import ScoreItem
from medres.score.ledger import Ledger, ModelInfo, predict_label
from medres.score.predict import Predictor, default_to_probs


def _meta(**fields) -> ModelMeta:
    """The model.json of a tiny 2D two-class model, with ``fields`` set."""
    return ModelMeta(arch="resnet18", dims=2, in_channels=1, num_classes=2, **fields)


H = "cd" * 32
CLASSES = ["0", "1"]


class TinyNet(torch.nn.Module):
    def __init__(self, dims: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        conv = torch.nn.Conv2d if dims == 2 else torch.nn.Conv3d
        pool = torch.nn.AdaptiveAvgPool2d(1) if dims == 2 else torch.nn.AdaptiveAvgPool3d(1)
        self.body = torch.nn.Sequential(conv(1, 4, 3, padding=1), torch.nn.ReLU(), pool)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


class SeedDecoder:
    """Deterministic image per item from its key; ``bad`` keys fail like corrupt files."""

    def __init__(self, size: int = 8, bad: tuple[str, ...] = (), coded: tuple[str, ...] = ()):
        self.size, self.bad, self.coded = size, bad, coded

    def __call__(self, item: ScoreItem) -> np.ndarray:
        if item.key in self.bad:
            raise RuntimeError("broken stream")
        if item.key in self.coded:
            raise IngestError("too few slices", code="too_few_slices")
        rng = np.random.default_rng(int(item.key.split("-")[1]))
        return rng.normal(size=(1, self.size, self.size)).astype(np.float32)


def _items(n: int) -> list[ScoreItem]:
    return [ScoreItem(f"img-{i}", f"id{i}", f"f{i}.nii", "nifti") for i in range(n)]


def _run(tmp_path, items, decoder, *, workers=0, batch_size=4, precision="fp32", name="l"):
    led = Ledger(tmp_path / f"{name}.sqlite")
    led.register_model(ModelInfo(H, tuple(CLASSES), "binary"))
    pred = Predictor(TinyNet(), precision=precision)
    config = LoopConfig(
        label_fn=lambda p: predict_label(p, CLASSES), batch_size=batch_size, workers=workers
    )
    stats = run_items(items, decoder, pred, led, H, config)
    recs = {r.item_key: r for r in led.records(H)}
    led.close()
    return stats, recs


def test_inline_and_worker_decoding_give_identical_scores(tmp_path) -> None:
    items = _items(23)
    s0, r0 = _run(tmp_path, items, SeedDecoder(), workers=0, name="a")
    s2, r2 = _run(tmp_path, items, SeedDecoder(), workers=2, name="b")
    assert s0.scored == s2.scored == 23
    assert s0.batches == 6  # ceil(23 / 4)
    assert {k: r.scores for k, r in r0.items()} == {k: r.scores for k, r in r2.items()}
    # probabilities are a distribution and pred is their argmax
    for r in r0.values():
        assert sum(r.scores) == pytest.approx(1.0)
        assert r.pred == CLASSES[int(np.argmax(r.scores))]


def test_batch_size_does_not_change_scores(tmp_path) -> None:
    items = _items(9)
    _, a = _run(tmp_path, items, SeedDecoder(), batch_size=1, name="a")
    _, b = _run(tmp_path, items, SeedDecoder(), batch_size=8, name="b")
    for k in a:
        np.testing.assert_allclose(a[k].scores, b[k].scores, atol=1e-6)


def test_failures_become_coded_error_rows(tmp_path) -> None:
    items = [*_items(6), ScoreItem("img-99", "x", "junk.bin", "error", code="not_dicom")]
    dec = SeedDecoder(bad=("img-2",), coded=("img-3",))
    stats, recs = _run(tmp_path, items, dec, workers=2)
    assert stats.scored == 4 and stats.errors == 3
    assert recs["img-2"].code == "decode_failed" and "RuntimeError" in recs["img-2"].message
    assert "broken stream" not in recs["img-2"].message  # exception text may hold paths
    assert recs["img-3"].code == "too_few_slices"
    assert recs["img-99"].code == "not_dicom"
    assert recs["img-2"].scores == ()


def test_mixed_shapes_are_batched_separately(tmp_path) -> None:
    class TwoSizes(SeedDecoder):
        def __call__(self, item):
            size = 8 if int(item.key.split("-")[1]) % 2 else 12
            return np.ones((1, size, size), np.float32) * int(item.key.split("-")[1])

    stats, _ = _run(tmp_path, _items(10), TwoSizes(), batch_size=3)
    assert stats.scored == 10
    assert stats.batches == 4  # 5 of each size -> 2 batches each


def test_decode_one_never_raises_on_non_exception_panics() -> None:
    class Panic(BaseException):
        pass

    def dec(item):
        raise Panic("rust panic")

    d = decode_one(dec, _items(1)[0])
    assert d.array is None and d.code == "decode_failed"


def test_predictor_bf16_close_to_fp32_and_rejects_unknown() -> None:
    x = np.random.default_rng(0).normal(size=(4, 1, 16, 16)).astype(np.float32)
    p32 = Predictor(TinyNet(), precision="fp32")(x)
    pbf = Predictor(TinyNet(), precision="bf16")(x)
    assert p32.shape == (4, 2)
    assert np.abs(p32 - pbf).max() < 2e-2
    assert Predictor(TinyNet(), precision="auto").precision == "fp32"  # CPU default is exact
    with pytest.raises(ConfigError, match="precision"):
        Predictor(TinyNet(), precision="int8")
    with pytest.raises(ConfigError, match="CUDA"):
        Predictor(TinyNet(), precision="fp16")


def test_predictor_3d_channels_last() -> None:
    x = np.random.default_rng(1).normal(size=(2, 1, 6, 6, 6)).astype(np.float32)
    p = Predictor(TinyNet(dims=3), precision="fp32")(x)
    with torch.inference_mode():
        ref = torch.softmax(TinyNet(dims=3)(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(p, ref, atol=1e-6)


def test_default_to_probs_single_logit_is_binary() -> None:
    p = default_to_probs(torch.tensor([[0.0], [2.0]]))
    assert p.shape == (2, 2)
    torch.testing.assert_close(p.sum(1), torch.ones(2))


def test_background_streams_and_propagates_errors() -> None:
    assert list(background(iter(range(1000)), maxsize=4)) == list(range(1000))

    def boom():
        yield 1
        raise ConfigError("bad source")

    it = background(boom())
    assert next(it) == 1
    with pytest.raises(ConfigError, match="bad source"):
        next(it)


@pytest.mark.parametrize("dims,shape", [(2, (1, 32, 32)), (3, (1, 16, 16, 16))])
def test_grad_cam_overlay_png(tmp_path, dims, shape) -> None:
    from medres.models.resnet import build_model
    from medres.score.cam import grad_cam, overlay_png, rank_class

    torch.manual_seed(0)
    model = build_model("resnet18", dims, 1, 2, stem="small")
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    cam = grad_cam(model, x, class_idx=1)
    assert cam.shape == shape[1:]
    assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1 + 1e-6
    png = overlay_png(x[0], cam, tmp_path / "a.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rank_class(_meta(task="binary", classes=("neg", "pos"), positive_class="pos")) == 1
    assert rank_class(_meta(task="multiclass", classes=("a", "b", "c"))) is None
    with pytest.raises(ConfigError, match="cam-class"):
        rank_class(_meta(classes=("a",)), "zzz")


def test_keep_top_keeps_only_the_highest_ranked(tmp_path) -> None:
    led = Ledger(tmp_path / "l.sqlite")
    led.register_model(ModelInfo(H, tuple(CLASSES), "binary"))
    config = LoopConfig(label_fn=lambda p: predict_label(p, CLASSES), batch_size=5, workers=0)
    keep = TopK(3, rank_fn=lambda p: float(p[1]))
    run_items(_items(12), SeedDecoder(), Predictor(TinyNet()), led, H, config, on_scored=keep)
    top = keep.top()
    all_p1 = sorted((r.scores[1] for r in led.records(H)), reverse=True)
    assert [float(p[1]) for _, _, p in top] == pytest.approx(all_p1[:3])
    led.close()


def test_score_resume_and_retry_errors(tmp_path) -> None:
    """Errors are committed (not retried on resume) until --retry-errors; one row per item."""
    from helpers.models import write_nifti_folder

    from medres.score import ScoreConfig, score

    write_nifti_folder(tmp_path / "imgs", 5, (8, 8))

    class Flaky:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        def __call__(self, item: ScoreItem) -> np.ndarray:
            if self.fail and item.source.endswith("00003.nii"):
                raise RuntimeError("transient read error")
            return np.ones((1, 8, 8), np.float32)

    meta = _meta(classes=("0", "1"), task="binary")
    cfg = ScoreConfig(tmp_path / "m", (tmp_path / "imgs",), tmp_path / "out", workers=0)
    s1 = score(cfg, decoder=Flaky(True), model=TinyNet(), meta=meta)
    assert (s1.scored, s1.errors) == (4, 1)
    s2 = score(cfg, decoder=Flaky(False), model=TinyNet(), meta=meta)
    assert (s2.scored, s2.errors, s2.skipped_done) == (0, 0, 5)
    retry = ScoreConfig(**{**cfg.__dict__, "retry_errors": True})
    s3 = score(retry, decoder=Flaky(False), model=TinyNet(), meta=meta)
    assert (s3.scored, s3.skipped_done, s3.total_ok, s3.total_errors) == (1, 4, 5, 0)
    rows = (tmp_path / "out" / "scores.csv").read_text().strip().splitlines()
    assert len(rows) == 6 and all(r.endswith(",ok") for r in rows[1:])


class Killer(SeedDecoder):
    """Kills its worker process on one item, like a segfaulting decoder."""

    def __call__(self, item: ScoreItem) -> np.ndarray:
        if item.key == "img-3":
            os._exit(1)
        return super().__call__(item)


@pytest.mark.slow  # restarts worker pools (forkserver): ~10 s unloaded
def test_a_worker_crash_is_isolated_to_its_item(tmp_path) -> None:
    stats, recs = _run(tmp_path, _items(8), Killer(), workers=1, batch_size=2)
    assert recs["img-3"].status == "error" and recs["img-3"].code == "decode_failed"
    assert stats.scored == 7 and all(recs[f"img-{i}"].status == "ok" for i in range(8) if i != 3)
