"""Batched on-device augmentation: per-sample determinism, identity, axes, parameter ranges."""

from __future__ import annotations

import math

import pytest
import torch

from medres.train.augment_batched import BatchedAugment
from medres.train.spec import TransformSpec


def _spec(**kw: object) -> TransformSpec:
    base = dict(dims=2, in_channels=1, image_size=(12, 10), intensity="none")
    base.update(kw)
    return TransformSpec(**base)  # type: ignore[arg-type]


def test_same_seed_same_output_independent_of_batch_mates() -> None:
    aug = BatchedAugment(_spec(noise_prob=0.5), seed=3)
    x = torch.randn(6, 1, 12, 10, generator=torch.Generator().manual_seed(0))
    seeds = aug.seeds(epoch=1, start=0, n=6)
    full = aug.apply(x, aug.draw(seeds))
    assert torch.equal(full, aug.apply(x, aug.draw(seeds)))
    for i in range(6):  # alone, and with other batch-mates, sample i comes out the same
        alone = aug.apply(x[i : i + 1], aug.draw([seeds[i]]))
        torch.testing.assert_close(alone[0], full[i], rtol=0, atol=1e-6)
    mixed = aug.apply(torch.cat([torch.randn(2, 1, 12, 10), x[4:5]]), aug.draw([7, 8, seeds[4]]))
    torch.testing.assert_close(mixed[2], full[4], rtol=0, atol=1e-6)
    assert not torch.equal(full, aug(x, epoch=2, start=0))  # another epoch, other draws


def test_all_probabilities_zero_is_identity() -> None:
    spec = _spec(flip_prob=0, affine_prob=0, intensity_prob=0, noise_prob=0)
    aug = BatchedAugment(spec, seed=0)
    x = torch.randn(5, 1, 12, 10)
    out = aug.apply(x, aug.draw(aug.seeds(0, 0, 5)))
    assert torch.equal(out, x)
    assert torch.equal(BatchedAugment(_spec(augment=False)).apply(x, aug.draw(range(5))), x)


def test_flips_only_on_allowed_axes() -> None:
    spec = _spec(dims=3, image_size=(4, 5, 6), flip_prob=1.0, flip_axes=(1,),
                 affine_prob=0, intensity_prob=0, noise_prob=0)  # fmt: skip
    aug = BatchedAugment(spec)
    x = torch.randn(3, 2, 4, 5, 6)
    p = aug.draw(aug.seeds(0, 0, 3))
    assert p.flip[:, 1].all() and not p.flip[:, 0].any() and not p.flip[:, 2].any()
    assert torch.equal(aug.apply(x, p), x.flip(3))


def test_parameter_distributions_match_spec() -> None:
    spec = _spec(flip_prob=0.3, affine_prob=0.6, rotate_deg=20, scale=0.1,
                 intensity_prob=0.5, intensity_jitter=0.2, noise_prob=0.25, noise_std=0.05)  # fmt: skip
    aug = BatchedAugment(spec, seed=1)
    p = aug.draw(aug.seeds(0, 0, 4000))
    assert p.flip[:, 0].float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert not p.flip[:, 1].any()
    assert p.affine.float().mean().item() == pytest.approx(0.6, abs=0.03)
    rot, zoom = p.rotate[p.affine], p.zoom[p.affine]
    lim = math.radians(20)
    assert rot.abs().max() <= lim and rot.abs().max() > 0.95 * lim
    assert rot.mean().abs() < 0.05 * lim
    assert ((zoom - 1).abs() <= 0.1).all() and (zoom - 1).abs().max() > 0.095
    assert (p.rotate[~p.affine] == 0).all() and (p.zoom[~p.affine] == 1).all()
    on = p.gain != 1
    assert on.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert ((p.gain[on] - 1).abs() <= 0.2).all()
    assert (p.offset.abs() <= 0.2).all()
    assert (p.noise_std > 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert (p.noise_std <= 0.05).all()


def test_rotation_by_90_degrees_rotates_the_image() -> None:
    spec = _spec(image_size=(8, 8), flip_prob=0, affine_prob=1.0, rotate_deg=90, scale=0,
                 intensity_prob=0, noise_prob=0)  # fmt: skip
    aug = BatchedAugment(spec)
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    p = aug.draw([0])
    p.rotate[:] = math.pi / 2
    out = aug.apply(x, p)
    assert torch.allclose(out, torch.rot90(x, 1, (2, 3)), atol=1e-4) or torch.allclose(
        out, torch.rot90(x, -1, (2, 3)), atol=1e-4
    )
