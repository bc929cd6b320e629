import numpy as np
import pytest
import torch

from harness.backbones.voxelize import batch_coords, voxelize


def test_floor_coords_first_point_and_inverse():
    pts = np.array([[0.01, 0.01, 0.01], [-0.01, 0.0, 0.0], [0.015, 0.019, 0.001], [-0.05, 0.3, -0.001]])
    v = voxelize(pts, 0.02)
    assert v.coords.dtype == np.int32 and v.index.dtype == np.int64 and v.inverse.dtype == np.int64
    # floor, not truncation, for negative coordinates
    assert np.array_equal(v.coords[v.inverse], np.floor(pts / 0.02).astype(np.int32))
    assert len(v) == 3
    # representative = first point of each voxel in input order
    for m in range(len(v)):
        members = np.flatnonzero(v.inverse == m)
        assert v.index[m] == members.min()
    # voxel predictions map back onto points
    pred = np.arange(len(v)) * 10
    assert np.array_equal(pred[v.inverse], pred[v.inverse])
    assert np.array_equal(v.coords[v.inverse[2]], v.coords[v.inverse[0]])


def test_random_representative_with_rng():
    pts = np.zeros((50, 3)) + 0.001
    seen = {int(voxelize(pts, 0.1, rng=np.random.default_rng(s)).index[0]) for s in range(20)}
    assert len(seen) > 5
    v = voxelize(pts, 0.1, rng=np.random.default_rng(0))
    assert np.all(v.inverse == 0)


def test_labels_first_and_vote():
    pts = np.array([[0.0, 0, 0]] * 5 + [[1.0, 0, 0]] * 4 + [[2.0, 0, 0]] * 2 + [[3.0, 0, 0]] * 2)
    labels = np.array([3, 1, 1, 3, 2] + [5, 4, 4, 5] + [-100, -100] + [-100, 7])
    first = voxelize(pts, 0.5, labels=labels, mode="first")
    assert first.labels.tolist() == [3, 5, -100, -100]
    vote = voxelize(pts, 0.5, labels=labels, mode="vote")
    # tie 3 vs 1 -> smallest; tie 4 vs 5 -> smallest; all ignored -> ignore; ignore does not vote
    assert vote.labels.tolist() == [1, 4, -100, 7]


def test_bad_input():
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        voxelize(np.zeros((4, 2)), 0.1)
    with pytest.raises(ValueError, match="empty"):
        voxelize(np.zeros((0, 3)), 0.1)
    with pytest.raises(ValueError, match="mode"):
        voxelize(np.zeros((2, 3)), 0.1, labels=np.zeros(2), mode="avg")
    with pytest.raises(ValueError, match="voxel_size"):
        voxelize(np.zeros((2, 3)), 0.0)


def test_batch_coords():
    c = batch_coords([np.array([[1, 2, 3], [4, 5, 6]]), torch.tensor([[-1, 0, 0]])])
    assert c.dtype == torch.int32
    assert c.tolist() == [[0, 1, 2, 3], [0, 4, 5, 6], [1, -1, 0, 0]]
    with pytest.raises(ValueError, match="float"):
        batch_coords([np.zeros((2, 3))])
    with pytest.raises(ValueError, match="empty"):
        batch_coords([])
