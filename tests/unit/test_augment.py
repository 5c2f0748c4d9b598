"""Per-site augmentation (SiteTask spec.data.augment): each transform against a numpy oracle,
seeded, and applied to training batches only (a site's validation scores are untouched)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfed.learning.augment import augment, check_augment
from mfed.rounds.site_round import run_site_round
from mfed.spec import AugmentSpec, DataSource, DataSpec, SpecError
from mfed.storage import Storage
from tests.unit.factories import write_image_folder
from tests.unit.test_image_folder import _spec


def _batch(n: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).random((n, 1, 6, 5), dtype=np.float32))


def test_a_horizontal_flip_mirrors_about_half_the_images_exactly():
    x = _batch(64)
    out = augment(x, AugmentSpec(flip="horizontal"), torch.Generator().manual_seed(1))
    flipped = [bool(np.array_equal(o, i[..., ::-1])) for o, i in zip(out.numpy(), x.numpy(), strict=True)]
    kept = [bool(np.array_equal(o, i)) for o, i in zip(out.numpy(), x.numpy(), strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each one or the other
    assert 16 < sum(flipped) < 48


def test_a_shift_moves_pixels_and_brings_zeros_in():
    x = _batch(32)
    out = augment(x, AugmentSpec(shift=2), torch.Generator().manual_seed(2)).numpy()
    for o, i in zip(out, x.numpy(), strict=True):
        matches = [
            (dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if np.array_equal(o, _oracle_shift(i, dy, dx))
        ]
        assert matches, "not a shift of its input by at most 2 pixels"


def _oracle_shift(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    out = np.zeros_like(image)
    h, w = image.shape[-2:]
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[..., y, x] = image[..., y - dy, x - dx]
    return out


def test_brightness_and_noise_stay_in_range_and_the_draws_are_seeded():
    x = _batch()
    spec = AugmentSpec(brightness=0.3, noise=0.1, flip="both", shift=1)
    one = augment(x, spec, torch.Generator().manual_seed(3))
    again = augment(x, spec, torch.Generator().manual_seed(3))
    other = augment(x, spec, torch.Generator().manual_seed(4))
    assert torch.equal(one, again) and not torch.equal(one, other)
    assert float(one.min()) >= 0 and float(one.max()) <= 1
    assert torch.equal(x, _batch())  # the input is not modified
    assert augment(x, AugmentSpec(), torch.Generator()) is x  # nothing asked: nothing done


def test_settings_that_cannot_work_name_the_field():
    for kwargs, field in [
        ({"flip": "sideways"}, "flip"),
        ({"shift": -1}, "shift"),
        ({"brightness": 1.0}, "brightness"),
    ]:
        with pytest.raises(SpecError, match=f"data.augment.{field}"):
            AugmentSpec(**kwargs)
    with pytest.raises(SpecError, match="use noise only"):
        check_augment(AugmentSpec(flip="horizontal"), (16,))  # feature rows have no left and right
    check_augment(AugmentSpec(noise=0.1), (16,))


def test_a_site_round_augments_its_training_batches_only(tmp_path):
    write_image_folder(tmp_path / "images", per_class=20)
    plain = DataSpec(source=DataSource.IMAGE_FOLDER, uri=str(tmp_path / "images"), loader_workers=0)
    augmented = DataSpec(
        source=DataSource.IMAGE_FOLDER,
        uri=str(tmp_path / "images"),
        loader_workers=0,
        augment=AugmentSpec(flip="horizontal", noise=0.05),
    )
    a = run_site_round(_spec(tmp_path / "a", plain), Storage()).manifest
    b = run_site_round(_spec(tmp_path / "b", augmented), Storage()).manifest
    assert a.metrics["val_before"] == b.metrics["val_before"]  # validation is scored as it is
    assert a.delta.sha256 != b.delta.sha256  # training saw other batches
