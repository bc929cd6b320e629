"""Stage-1 views: source coordinates of crops and flips, worked out by hand; pixel matching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.image_guided.augment2d import (CropBox, ViewAugmentConfig, augment_view, crop_resize, match_pixels,
                                            random_crop_box, source_coords)


def ramp(width: int, height: int) -> torch.Tensor:
    """Channel 0 = x (column), channel 1 = y (row), channel 2 = 0: a view's values are its coordinates."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                          indexing="ij")
    return torch.stack([x, y, torch.zeros_like(x)])


def test_source_coords_of_a_crop_by_hand():
    # box x0=2, y0=1, 4 wide, 2 high -> 2x2 output: one output pixel covers 2 x 1 source pixels.
    # x = 2 + (j + 0.5) * 4/2 - 0.5 -> 2.5, 4.5;  y = 1 + (i + 0.5) * 2/2 - 0.5 -> 1.0, 2.0
    c = source_coords(CropBox(2, 1, 4, 2), out_w=2, out_h=2, flip=False)
    assert c.shape == (2, 2, 2)
    np.testing.assert_allclose(c[..., 0], [[2.5, 4.5], [2.5, 4.5]])
    np.testing.assert_allclose(c[..., 1], [[1.0, 1.0], [2.0, 2.0]])


def test_source_coords_of_a_flipped_crop_by_hand():
    # the same box mirrored: column 0 shows what column 1 showed
    c = source_coords(CropBox(2, 1, 4, 2), out_w=2, out_h=2, flip=True)
    np.testing.assert_allclose(c[..., 0], [[4.5, 2.5], [4.5, 2.5]])
    np.testing.assert_allclose(c[..., 1], [[1.0, 1.0], [2.0, 2.0]])


def test_identity_scale_crop_copies_pixels_and_flip_mirrors_them():
    img = ramp(10, 8)
    box = CropBox(3, 2, 4, 4)  # 4x4 box to a 4x4 view: a plain copy of columns 3..6, rows 2..5
    view = crop_resize(img, box, 4, 4, flip=False)
    np.testing.assert_allclose(view[0, 0].numpy(), [3, 4, 5, 6])
    np.testing.assert_allclose(view[1, :, 0].numpy(), [2, 3, 4, 5])
    flipped = crop_resize(img, box, 4, 4, flip=True)
    np.testing.assert_allclose(flipped[0, 0].numpy(), [6, 5, 4, 3])
    coords = source_coords(box, 4, 4, flip=True)
    np.testing.assert_allclose(coords[0, :, 0], [6, 5, 4, 3])


def test_downscaled_crop_samples_at_the_tracked_coordinates():
    # an 8x8 box to 4x4: output column j sits at source x = (j + 0.5) * 2 - 0.5 = 2j + 0.5, i.e. between
    # source columns 2j and 2j+1; on a linear ramp the (symmetric) resampling filter returns exactly that
    # value away from the image border (columns 1, 2 here; the border ones renormalise their weights)
    img = ramp(8, 8)
    view = crop_resize(img, CropBox(0, 0, 8, 8), 4, 4, flip=False)
    np.testing.assert_allclose(view[0, 1, 1:3].numpy(), [2.5, 4.5], atol=1e-5)
    np.testing.assert_allclose(view[1, 1:3, 1].numpy(), [2.5, 4.5], atol=1e-5)
    coords = source_coords(CropBox(0, 0, 8, 8), 4, 4, flip=False)
    np.testing.assert_allclose(coords[1, 1:3, 0], [2.5, 4.5])


def test_random_views_show_their_tracked_coordinates():
    # no colour change: every interior pixel of a random view of the ramp shows its source coordinates
    # (the ramp is scaled by 1/100 to stay within the [0, 1] colour range), to within 0.1 px: the
    # antialiasing filter's discrete weights put a pixel's centroid up to ~0.08 px off its centre
    cfg = ViewAugmentConfig(crop_size=[32, 32], jitter_prob=0.0, grayscale_prob=0.0, flip_prob=0.5)
    img = ramp(96, 64) / 100
    rng = np.random.default_rng(3)
    flips = 0
    for _ in range(8):
        view, coords = augment_view(rng, img, cfg)
        flips += int(coords[0, 0, 0] > coords[0, -1, 0])
        inner = (slice(2, -2), slice(2, -2))
        np.testing.assert_allclose(100 * view[0].numpy()[inner], coords[..., 0][inner], atol=0.1)
        np.testing.assert_allclose(100 * view[1].numpy()[inner], coords[..., 1][inner], atol=0.1)
    assert 0 < flips < 8  # both mirrored and plain views were drawn


def test_random_crop_box_respects_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(50):
        b = random_crop_box(rng, 320, 240, (0.2, 1.0), (0.75, 4 / 3))
        assert 0 <= b.x0 and b.x0 + b.w <= 320 and 0 <= b.y0 and b.y0 + b.h <= 240
        assert 0.2 * 320 * 240 * 0.95 <= b.w * b.h <= 320 * 240
        assert 0.7 <= b.w / b.h <= 1.4


def test_match_pixels_by_hand():
    # view A: 1x3 pixels at source x = 0, 2, 4; view B: 1x2 pixels at x = 2.5, 10 (all y = 0).
    # A0 is 2.5 from B0 (no match), A1 is 0.5 from B0, A2 is 1.5 from B0 (within 1.5, but B0
    # is A1's: one pair per B pixel, the nearest)
    a = np.array([[[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]]])
    b = np.array([[[2.5, 0.0], [10.0, 0.0]]])
    ia, ib = match_pixels(a, b, 1.5)
    assert ia.tolist() == [1] and ib.tolist() == [0]
    ia, ib = match_pixels(a, b, 1.0)
    assert ia.tolist() == [1] and ib.tolist() == [0]
    # B1 moved to x = 4.5: A2 (0.5 from it) now has a B pixel of its own
    ia, ib = match_pixels(a, np.array([[[2.5, 0.0], [4.5, 0.0]]]), 1.5)
    assert ia.tolist() == [1, 2] and ib.tolist() == [0, 1]


def test_a_zoomed_in_view_pairs_each_b_pixel_once_with_its_nearest_a_pixel():
    # A: 4 pixels at x = 0, 0.5, 1, 1.5 (twice B's resolution); B: 2 pixels at x = 0.6, 1.6.
    # Nearest B of each A: A0 -> B0 (0.6), A1 -> B0 (0.1), A2 -> B0 (0.4), A3 -> B1 (0.1).
    # B0 goes to A1 (nearest), B1 to A3.
    a = np.array([[[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [1.5, 0.0]]])
    b = np.array([[[0.6, 0.0], [1.6, 0.0]]])
    ia, ib = match_pixels(a, b, 1.5)
    assert ia.tolist() == [1, 3] and ib.tolist() == [0, 1]


def test_matched_pixels_of_two_views_show_the_same_source_point():
    cfg = ViewAugmentConfig(crop_size=[32, 32], jitter_prob=0.0, grayscale_prob=0.0)
    img = ramp(64, 48)
    rng = np.random.default_rng(1)
    va, ca = augment_view(rng, img, cfg)
    vb, cb = augment_view(rng, img, cfg)
    ia, ib = match_pixels(ca, cb, 1.5)
    assert len(ia) > 0
    pa, pb = ca.reshape(-1, 2)[ia], cb.reshape(-1, 2)[ib]
    assert np.all(np.linalg.norm(pa - pb, axis=1) <= 1.5 + 1e-9)
    # flat index -> (row, col) in row-major order, as the loss reads the feature maps
    ra, cola = np.divmod(ia, 32)
    np.testing.assert_allclose(ca[ra, cola], pa)


@pytest.mark.parametrize("seed", [0, 1])
def test_colour_jitter_keeps_range_and_geometry(seed):
    cfg = ViewAugmentConfig(crop_size=[32, 32], jitter_prob=1.0, grayscale_prob=0.5)
    img = torch.rand(3, 40, 40)
    view, coords = augment_view(np.random.default_rng(seed), img, cfg)
    assert view.shape == (3, 32, 32) and float(view.min()) >= 0 and float(view.max()) <= 1
    assert coords.shape == (32, 32, 2)


def test_frame_stride_counts_recording_frames():
    from types import SimpleNamespace

    from methods.image_guided.frames import every_nth

    def refs(indices):
        return [SimpleNamespace(index=i) for i in indices]

    # exported every 25th frame: a stride of 50 keeps every other export
    assert [r.index for r in every_nth(refs(range(0, 300, 25)), 50)] == [0, 50, 100, 150, 200, 250]
    # exported every 30th: the first frames at least 50 apart
    assert [r.index for r in every_nth(refs(range(0, 300, 30)), 50)] == [0, 60, 120, 180, 240]
    # all frames exported, out of order on disk: every 50th
    assert [r.index for r in every_nth(refs(reversed(range(0, 160))), 50)] == [0, 50, 100, 150]
    assert [r.index for r in every_nth(refs(range(16)), 1)] == list(range(16))
