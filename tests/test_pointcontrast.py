"""PointContrast: PointInfoNCE by hand, the frame-pair views, and training on embedded pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from baselines.pointcontrast import PointContrast, point_info_nce
from harness.data import augment as aug
from harness.registry import METHODS

from .multiscan_fixtures import method_config, pair_scannet, tiny_context  # noqa: F401

TAU = 0.4


def test_point_info_nce_two_matches_by_hand():
    # after L2 normalisation: za = e1, e2; zb = (0.6, 0.8), (0.8, 0.6)
    fa = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    fb = torch.tensor([[3.0, 4.0], [8.0, 6.0]])
    out = point_info_nce(fa, fb, TAU)
    # row 0: logits (0.6, 0.8) / 0.4 = (1.5, 2.0), target 0; row 1: (2.0, 1.5), target 1
    row = -1.5 + math.log(math.exp(1.5) + math.exp(2.0))
    assert out["loss"].item() == pytest.approx(row, rel=1e-6)
    assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(0.5)), rel=1e-6)
    assert out["acc"].item() == 0.0  # both rows prefer the wrong partner
    assert out["pos_sim"].item() == pytest.approx(0.6, rel=1e-6)


def test_point_info_nce_three_matches_by_hand():
    fa = torch.eye(3)
    fb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.6, 0.8]])
    out = point_info_nce(fa, fb, TAU)
    # rows 0 and 1: positive 1/tau, negatives 0 and 0 (row 1 also sees zb2.e2 = 0.6)
    r0 = -2.5 + math.log(math.exp(2.5) + 2.0)
    r1 = -2.5 + math.log(math.exp(2.5) + 1.0 + math.exp(1.5))
    r2 = -2.0 + math.log(1.0 + 1.0 + math.exp(2.0))  # positive 0.8/tau; zb0.e3 = zb1.e3 = 0
    assert out["loss"].item() == pytest.approx((r0 + r1 + r2) / 3, rel=1e-6)
    assert out["acc"].item() == 1.0


def test_point_info_nce_gradient_pulls_positives_together():
    fa = torch.tensor([[1.0, 0.2], [0.1, 1.0]], requires_grad=True)
    fb = torch.tensor([[0.9, 0.5], [0.4, 1.0]])
    loss = point_info_nce(fa, fb, TAU)["loss"]
    loss.backward()
    with torch.no_grad():
        moved = fa - 0.1 * fa.grad
        assert point_info_nce(moved, fb, TAU)["loss"] < loss


def test_registered_in_the_multi_scan_group():
    cls = METHODS.get("pointcontrast")
    assert cls is PointContrast
    assert cls.group == "Multi-scan" and cls.consumes == ("frame_pairs",)
    cfg = method_config("pointcontrast")
    # the published recipe, from configs/methods/pointcontrast.yaml
    assert cfg.tau == 0.4 and cfg.input_features == "ones" and cfg.out_channels == 32
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == \
        ("sgd", 0.1, 0.8, 0.0001)
    assert (cfg.schedule.name, cfg.schedule.gamma, cfg.schedule.step_size) == ("step", 0.99, 250)
    full = method_config("pointcontrast", batch_size=32, voxel_size=0.025, num_matches=4096, steps=60000)
    assert (full.pairs.min_overlap, full.pairs.radius_factor, full.match_radius_factor) == (0.3, 1.5, 1.5)


def test_views_are_registered_matched_and_independently_transformed(pair_scannet, tmp_path):
    method = PointContrast(method_config("pointcontrast"))
    ctx = tiny_context(tmp_path, pair_scannet)
    data = method.pair_data(ctx)
    assert len(data) >= 8 and ctx.extra["frame_pairs"]["pairs"] == len(data)
    rng = np.random.default_rng(0)
    s = data.sample(0, rng)
    va, vb = s["a"], s["b"]
    assert len(s["match_a"]) > 50
    # positives: nearest neighbours within 1.5 voxels in world coordinates
    gap = np.linalg.norm(va["world"][s["match_a"]] - vb["world"][s["match_b"]], axis=1)
    assert gap.max() <= 1.5 * 0.1 + 1e-6
    # each view's voxels are its own transform of the registered points ...
    for v in (va, vb):
        g = np.floor(aug.apply(v["transform"], v["world"]).astype(np.float64) / 0.1).astype(np.int64)
        assert np.array_equal(g - g.min(0), v["coords"])
    # ... and the two transforms differ (here by more than 10 degrees of rotation)
    Ra = va["transform"][:3, :3] / np.cbrt(np.linalg.det(va["transform"][:3, :3]))
    Rb = vb["transform"][:3, :3] / np.cbrt(np.linalg.det(vb["transform"][:3, :3]))
    angle = np.degrees(np.arccos(np.clip((np.trace(Ra.T @ Rb) - 1) / 2, -1, 1)))
    assert angle > 10.0
    # geometry-only input
    assert np.all(va["feats"] == 1.0) and va["feats"].shape[1] == 3


def test_batches_are_deterministic_and_rows_point_into_their_views(pair_scannet, tmp_path):
    method = PointContrast(method_config("pointcontrast"))
    ctx = tiny_context(tmp_path, pair_scannet)
    b1 = method.batch_stream(ctx).next()
    b2 = method.batch_stream(ctx).next()
    for k in b1:
        assert torch.equal(b1[k], b2[k]), k
    batch_of = b1["coords"][:, 0].long()
    assert torch.equal(batch_of[b1["match_a"]], 2 * b1["match_item"])
    assert torch.equal(batch_of[b1["match_b"]], 2 * b1["match_item"] + 1)


def _fit(method, ctx, steps: int):
    from harness.train import build_optimizer

    torch.manual_seed(0)
    model = method.build_model(ctx)
    batch = method.batch_stream(ctx).next()
    opt = build_optimizer(model, method.cfg.optimizer)
    losses = []
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    return losses


def test_pointcontrast_lowers_its_loss_on_embedded_pairs(pair_scannet, tmp_path):
    method = PointContrast(method_config("pointcontrast", num_matches=128, batch_size=1))
    losses = _fit(method, tiny_context(tmp_path, pair_scannet), 20)
    assert all(math.isfinite(v) for v in losses)
    # 128 matches: chance level is about log(128) = 4.85
    assert losses[0] == pytest.approx(math.log(128), abs=0.6)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses


@pytest.mark.parametrize("name", ["pointcontrast", "csc"])
def test_pretrain_export_and_semseg_loads_the_checkpoint(name, pair_scannet, tmp_path):
    """End to end, tiny: the shared trainer pre-trains a few steps, the canonical export drops
    ``final``, and the semantic-segmentation task fine-tunes from it through the one loader."""
    import json

    from harness.backbones.checkpoint import read_checkpoint
    from harness.config import plugin_config

    method = METHODS.get(name)(method_config(name, steps=3, num_matches=64, batch_size=1))
    ctx = tiny_context(tmp_path / "pre", pair_scannet, trainer={"log_every": 1, "checkpoint_every": 0})
    path = method.pretrain(ctx)
    state, meta = read_checkpoint(path)
    assert meta["method"] == name and meta["voxel_size"] == 0.1
    assert meta["input_features"] == ("ones" if name == "pointcontrast" else "rgb")
    assert state and not any(k.startswith("final.") for k in state)
    log = [json.loads(line) for line in (tmp_path / "pre" / "metrics-pretrain.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert ctx.extra["pretrain"]["steps"] == 3 and ctx.extra["frame_pairs"]["pairs"] > 0

    task_cfg = plugin_config("task", "semseg", {"steps": 2, "batch_size": 1, "voxel_size": 0.1})
    from harness.registry import TASKS

    fctx = tiny_context(tmp_path / "fine", pair_scannet, trainer={"checkpoint_every": 0})
    fctx.checkpoint = path
    result = TASKS.get("semseg")(task_cfg).run(fctx)
    assert 0.0 <= result["miou"] <= 1.0
    load = fctx.extra["checkpoint_load"]
    assert load["loaded"] == len(state) and load["skipped"] == 0
    assert load["missing"] == 2  # final.kernel and final.bias: the task's own head


def test_the_a_views_and_the_b_views_are_two_backbone_calls_with_rows_in_batch_order():
    """As the public trainers (model(sinput0), then model(sinput1)): each view set's BatchNorm
    statistics are its own; the output rows come back where the batch had them."""
    from omegaconf import OmegaConf

    from baselines.contrastive import PairModel

    calls = []

    class Recorder(torch.nn.Module):
        def forward(self, coords, feats):
            calls.append(coords[:, 0].tolist())
            return feats * 10 + coords[:, :1].float()  # row's own value, and its batch id in the call

    model = PairModel(Recorder(), OmegaConf.create({"tau": 0.4, "num_matches": 8}))
    coords = torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0], [2, 1, 1, 1], [3, 2, 2, 2], [1, 5, 5, 5]], dtype=torch.int32)
    feats = torch.arange(5, dtype=torch.float32)[:, None]
    out = model.views_forward(coords, feats)
    assert calls == [[0, 1], [0, 1, 0]]  # A views of pairs 0, 1; then B views of pairs 0, 1, 0
    assert out[:, 0].tolist() == [0.0, 10.0, 21.0, 31.0, 40.0]
