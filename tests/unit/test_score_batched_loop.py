"""The scoring loop's batched preprocessing (issue 18): where a worker preprocesses, mixed
raw/preprocessed batches, a failing item, and what ``on_scored`` (CAM) sees."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import medres.score.decode as decode
from medres.score.decode import MedresDecoder
from medres.score.engine import LoopConfig, run_items
from medres.score.items import ScoreItem
from medres.score.ledger import Ledger, ModelInfo
from medres.score.predict import Predictor
from medres.train.batched import RawImage
from medres.train.spec import TransformSpec
from medres.train.transforms import preprocessing_dict

H = "h" * 64


def _pre(in_channels: int = 3) -> dict:
    spec = TransformSpec(
        dims=2, in_channels=in_channels, intensity="range", image_size=(8, 8), augment=False
    )
    return preprocessing_dict(spec)


def _raw(seed: int, shape=(20, 18), channels: int = 1) -> RawImage:
    rng = np.random.default_rng(seed)
    full = (*shape, channels) if channels > 1 else shape
    return RawImage(rng.integers(0, 900, size=full).astype(np.int16), np.eye(4), channels)


def test_workers_ship_small_raw_images_and_preprocess_large_ones_on_cpu(monkeypatch) -> None:
    dec = MedresDecoder(_pre(), device="cpu")
    raw = _raw(0)
    assert dec.ship_raw(raw)  # the scoring process: always raw
    dec.in_worker = True
    assert dec.ship_raw(raw)  # small: raw (batched later)
    monkeypatch.setattr(decode, "SHIP_RAW_BYTES", 0)
    big = _raw(1, shape=(40, 40))  # 3200 bytes > its 8x8x3 float32 model input (768)
    assert not dec.ship_raw(big)
    monkeypatch.setattr(dec, "load", lambda item: _Loaded(big))
    got = dec(ScoreItem("k", "k", "s", "nifti", ("x.nii",)))
    assert isinstance(got, np.ndarray) and got.shape == (3, 8, 8)
    want = MedresDecoder(_pre()).batched([big])[0].numpy()
    np.testing.assert_array_equal(got, want)  # the same code on one item
    assert MedresDecoder(_pre(), device="cuda").ship_raw(big)  # accelerator: always raw


class _Loaded:
    def __init__(self, raw: RawImage) -> None:
        self.array, self.affine, self.channels = raw.array, raw.affine, raw.channels
        self.dims, self.n_volumes = 2, 1


class _Mixed:
    """Raw images, one preprocessed array, one image the model cannot take (2 channels)."""

    def __init__(self) -> None:
        self.real = MedresDecoder(_pre())
        self.batched = self.real.batched

    def __call__(self, item: ScoreItem):
        i = int(item.key.split("-")[1])
        if i == 3:
            return self.batched([_raw(i)])[0].numpy()  # as a worker would ship it
        if i == 5:
            return _raw(i, channels=2)  # 2 channels, the model takes 3: ConfigError
        return _raw(i, shape=(20, 18) if i % 2 else (11, 13))


def test_mixed_batch_failing_item_and_cam_inputs(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    led = Ledger(tmp_path / "l.sqlite")
    led.register_model(ModelInfo(H, ("a", "b"), "binary"))
    seen: dict[str, np.ndarray] = {}

    def on_scored(decoded, probs) -> None:
        for d in decoded:
            seen[d.item.key] = d.array

    items = [ScoreItem(f"img-{i}", str(i), f"s{i}.nii", "nifti") for i in range(8)]
    config = LoopConfig(label_fn=lambda p: "ab"[int(np.argmax(p))], batch_size=4, workers=0)
    dec = _Mixed()
    stats = run_items(items, dec, Predictor(net), led, H, config, on_scored=on_scored)
    recs = {r.item_key: r for r in led.records(H)}
    assert stats.scored == 7 and stats.errors == 1
    assert recs["img-5"].code == "decode_failed" and "2 channels" in recs["img-5"].message
    # every scored item's probabilities are its own: equal to scoring it alone
    for i in (0, 1, 3, 6):
        x = dec.batched([_raw(i, shape=(20, 18) if i % 2 else (11, 13))])
        if i == 3:
            x = dec.batched([_raw(3)])
        alone = Predictor(net)(x)[0]
        np.testing.assert_allclose(recs[f"img-{i}"].scores, alone, atol=1e-6)
        np.testing.assert_allclose(seen[f"img-{i}"], x[0].numpy(), atol=1e-6)  # CAM input
    assert set(seen) == {f"img-{i}" for i in range(8)} - {"img-5"}
    led.close()
