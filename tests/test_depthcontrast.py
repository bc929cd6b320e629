"""DepthContrast: MoCo pieces against hand-computed values, the model's step semantics, the
augmentations, resumption and learning on the embedded scans."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from baselines.depthcontrast import (DepthContrast, DepthContrastModel, box_mask, crop_fractions, cuboid_drop_mask,
                                     enqueue_, info_nce, make_view, momentum_update_, spaced_frames,
                                     view_transform)
from harness.config import BackboneConfig, TrainerConfig, plugin_config
from harness.context import RunContext
from harness.registry import METHODS
from harness.train import Trainer

TINY = {"name": "Res16UNet14A", "planes": [8, 8, 16, 16, 16, 16, 8, 8], "backend": "torch"}


def tiny_ctx(tmp_path: Path, dataset=None, **trainer) -> RunContext:
    bb = OmegaConf.merge(OmegaConf.structured(BackboneConfig), TINY)
    tr = OmegaConf.merge(OmegaConf.structured(TrainerConfig), {"checkpoint_every": 0, "log_every": 1, **trainer})
    return RunContext(tmp_path, 0, torch.device("cpu"), bb, tr, dataset, progress=False)


def method(**overrides) -> DepthContrast:
    base = {"epochs": 0, "steps": 4, "batch_size": 4, "queue_size": 8, "frame_stride": 1, "crop_min_points": 1000,
            "resample_sizes": [1000, 2000], "momentum": 0.99}
    return DepthContrast(plugin_config("method", "depthcontrast", {**base, **overrides}))


# ---------------------------------------------------------------------------------------------
# registration and published config


def test_registered_with_published_recipe():
    cls = METHODS.get("depthcontrast")
    assert cls is DepthContrast and cls.group == "Single-scan" and cls.consumes == ("frames",)
    cfg = plugin_config("method", "depthcontrast")
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == \
        ("sgd", 0.12, 0.9, 1e-4)
    assert cfg.schedule.name == "cosine" and cfg.batch_size == 1024 and cfg.epochs == 1000
    assert (cfg.voxel_size, cfg.input_features, cfg.temperature, cfg.momentum) == (0.05, "rgb", 0.1, 0.999)
    assert (cfg.queue_size, cfg.embedding_dim, cfg.mlp_hidden) == (131072, 128, 256)


# ---------------------------------------------------------------------------------------------
# MoCo pieces on tiny tensors


def test_momentum_update_by_hand():
    k = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    q = [torch.tensor([3.0, -2.0]), torch.tensor([[10.0]])]
    momentum_update_(k, q, 0.9)
    # 0.9 * 1 + 0.1 * 3 = 1.2; 0.9 * 2 + 0.1 * -2 = 1.6; 0.9 * 0 + 0.1 * 10 = 1
    assert torch.allclose(k[0], torch.tensor([1.2, 1.6])) and torch.allclose(k[1], torch.tensor([[1.0]]))
    momentum_update_(k, q, 0.9)
    # 0.9 * 1.2 + 0.3 = 1.38; 0.9 * 1.6 - 0.2 = 1.24
    assert torch.allclose(k[0], torch.tensor([1.38, 1.24]))
    assert torch.equal(q[0], torch.tensor([3.0, -2.0]))  # the query is untouched


def test_queue_is_fifo_with_wraparound():
    queue, ptr = torch.full((5, 2), -1.0), torch.zeros((), dtype=torch.long)
    key = lambda i: [float(i), float(10 * i)]  # noqa: E731
    enqueue_(queue, ptr, torch.tensor([key(0), key(1)]))
    assert int(ptr) == 2
    enqueue_(queue, ptr, torch.tensor([key(2), key(3)]))
    assert int(ptr) == 4
    assert queue.tolist() == [key(0), key(1), key(2), key(3), [-1.0, -1.0]]
    enqueue_(queue, ptr, torch.tensor([key(4), key(5)]))
    # slot 4 takes key 4, then it wraps: key 5 replaces the oldest, key 0
    assert int(ptr) == 1
    assert queue.tolist() == [key(5), key(1), key(2), key(3), key(4)]
    with pytest.raises(ValueError, match="queue_size=5"):
        enqueue_(queue, ptr, torch.zeros(6, 2))


def _enqueue_on_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as tdist

    from baselines.depthcontrast import enqueue_from_all_ranks_

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        queue, ptr = torch.zeros(5, 2), torch.zeros((), dtype=torch.long)
        n = 2 if rank == 0 else 1  # uneven local batches
        enqueue_from_all_ranks_(queue, ptr, torch.full((n, 2), float(rank + 1)))
        enqueue_from_all_ranks_(queue, ptr, torch.full((n, 2), float(rank + 3)))
        torch.save({"queue": queue, "ptr": ptr}, f"{out}.{rank}")
    finally:
        tdist.destroy_process_group()


def test_queue_takes_the_keys_of_all_ranks_in_rank_order(tmp_path):
    import torch.multiprocessing as mp

    init, out = f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "queue")
    mp.start_processes(_enqueue_on_rank, args=(2, init, out), nprocs=2, join=True, start_method="fork")
    # step 1: rank 0's two keys (1), rank 1's key (2) -> slots 0..2; step 2: (3, 3, 4) -> 3, 4, 0
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["queue"][:, 0].tolist() == [4.0, 1.0, 2.0, 3.0, 3.0] and int(got["ptr"]) == 1


def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    loss, logits = info_nce(q, k, queue, 0.1)
    # row 0: pos 0.6, negs (0, -1) -> logits (6, 0, -10); row 1: pos 1, negs (1, 0) -> (10, 10, 0)
    row0 = -6 + math.log(math.exp(6) + 1 + math.exp(-10))
    row1 = -10 + math.log(2 * math.exp(10) + 1)
    assert torch.allclose(logits, torch.tensor([[6.0, 0.0, -10.0], [10.0, 10.0, 0.0]]), atol=1e-5)
    assert float(loss) == pytest.approx((row0 + row1) / 2, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# The model: one training forward


def synthetic_batch(seed: int, n_items: int = 3):
    rng = np.random.default_rng(seed)

    def view():
        rows = []
        for b in range(n_items):
            c = np.unique(rng.integers(0, 12, (300, 3)), axis=0)
            rows.append(np.concatenate([np.full((len(c), 1), b), c], 1))
        coords = torch.from_numpy(np.concatenate(rows).astype(np.int32))
        return coords, torch.from_numpy(rng.uniform(-0.5, 0.5, (len(coords), 3)).astype(np.float32))

    (c1, f1), (c2, f2) = view(), view()
    return {"coords": c1, "feats": f1, "key_coords": c2, "key_feats": f2, "batch_size": n_items}


def tiny_model(queue_size: int = 4, momentum: float = 0.9, backend: str = "torch") -> DepthContrastModel:
    from harness.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone(TINY["name"], 3, 32, backend, planes=TINY["planes"])
    key_backbone = build_backbone(TINY["name"], 3, 32, backend, planes=TINY["planes"])
    return DepthContrastModel(backbone, key_backbone, hidden=16, dim=8, queue_size=queue_size, momentum=momentum, temperature=0.1)


BACKENDS = ["torch", pytest.param("minkowski", marks=[pytest.mark.minkowski, pytest.mark.skipif(
    "minkowski" not in __import__("harness.backbones", fromlist=["x"]).available_backends(),
    reason="MinkowskiEngine does not import here")])]


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_updates_key_encoder_then_enqueues_and_keeps_keys_gradient_free(backend):
    _check_training_forward(backend)


def _check_training_forward(backend: str) -> None:
    model = tiny_model(queue_size=4, momentum=0.9, backend=backend).train()
    batch = synthetic_batch(0)
    # the key encoder starts as an exact copy
    assert all(torch.equal(k, q) for k, q in zip(model.key_params(), model.query_params()))
    # pretend an optimiser step moved the query encoder
    with torch.no_grad():
        for p in model.query_params():
            p.add_(0.5)
    k_before = [p.detach().clone() for p in model.key_params()]
    q_now = [p.detach().clone() for p in model.query_params()]
    queue_before, ptr_before = model.queue.clone(), int(model.queue_ptr)

    out = model(batch)
    out["loss"].backward()

    # momentum update from the moved query parameters: k = 0.9 k + 0.1 q = k + 0.05 here
    for kb, qn, k in zip(k_before, q_now, model.key_params()):
        assert torch.allclose(k, 0.9 * kb + 0.1 * qn, atol=1e-6)
        assert torch.allclose(k, kb + 0.05, atol=1e-6)
    # no gradient reaches the key encoder; the query encoder (but its unused final) gets one
    assert all(not p.requires_grad and p.grad is None for p in model.key_params())
    assert model.head.fc1.weight.grad is not None and model.backbone.conv0p1s1.kernel.grad is not None
    assert model.backbone.final.kernel.grad is None
    # the three keys went to slots 0, 1, 2 (FIFO); slot 3 keeps its random key
    assert int(model.queue_ptr) == (ptr_before + 3) % 4
    assert torch.equal(model.queue[3], queue_before[3])
    keys = model.queue[:3]
    assert torch.allclose(keys.norm(dim=1), torch.ones(3), atol=1e-5)
    # the loss used the queue as it was before this step, and the keys as positives
    with torch.no_grad():
        q = model.embed(model.backbone, model.head, batch["coords"], batch["feats"], 3)
        logits = torch.cat([(q * keys).sum(1, keepdim=True), q @ queue_before.t()], 1) / 0.1
        expected = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    assert float(out["loss"].detach()) == pytest.approx(float(expected), abs=1e-6)


def test_eval_forward_changes_no_state():
    model = tiny_model()
    with torch.no_grad():
        for p in model.query_params():
            p.add_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(synthetic_batch(1))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------
# Augmentations


def test_box_and_drop_masks():
    pts = np.array([[0, 0, 0], [1, 1, 1], [2, 0, 0], [0.5, 0.5, 1.0]], dtype=np.float32)
    assert box_mask(pts, np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 0.5])).tolist() == [True, True, False, True]
    rng = np.random.default_rng(0)
    line = np.stack([np.arange(100.0), np.zeros(100), np.zeros(100)], 1)
    for _ in range(20):
        keep = cuboid_drop_mask(rng, line, 0.2)  # a box 19.8 long in x: drops 10 to 20 consecutive points
        dropped = np.nonzero(~keep)[0]
        assert 10 <= len(dropped) <= 20 and np.all(np.diff(dropped) == 1)
    assert cuboid_drop_mask(rng, line[:1], 0.2).all()  # never drops everything


def test_crop_fractions_and_transform():
    rng = np.random.default_rng(1)
    for _ in range(50):
        f = crop_fractions(rng, 0.5, 1.0, 0.75)
        assert np.all((f >= 0.5) & (f <= 1.0))
        assert max(min(f[a], f[b]) / max(f[a], f[b]) for a, b in ((0, 1), (0, 2), (1, 2))) >= 0.75
    cfg = OmegaConf.create({"flip": False, "rotate_axes": "z", "rotate_max": math.pi, "scale_min": 0.8,
                            "scale_max": 1.2})
    for _ in range(10):
        M = view_transform(rng, cfg)
        s = M[2, 2]  # a rotation about z keeps z: only the scale acts on it
        assert 0.8 <= s <= 1.2 and M[2, :2].tolist() == [0, 0]
        assert np.allclose(M.T @ M, s * s * np.eye(3))


def test_make_view_is_a_valid_backbone_input():
    rng = np.random.default_rng(2)
    pts = rng.uniform(0, 3, (5000, 3)).astype(np.float32)
    cols = rng.integers(0, 256, (5000, 3)).astype(np.uint8)
    cfg = method(crop_min_points=500, resample_sizes=[800]).cfg
    coords, feats = make_view(rng, pts, cols, cfg)
    assert coords.dtype == np.int32 and len(np.unique(coords, axis=0)) == len(coords)
    assert np.all(coords.min(0) >= 0) and np.all(coords.min(0) < 100)  # shifted by [0, coord_shift)
    assert 0 < len(coords) <= 800 and feats.shape == (len(coords), 3)
    assert feats.min() >= -0.5 and feats.max() <= 0.5


# ---------------------------------------------------------------------------------------------
# On the embedded scans


def test_spaced_frames_keeps_raw_indices_at_least_stride_apart():
    from types import SimpleNamespace

    refs = [SimpleNamespace(index=i) for i in (30, 0, 2, 3, 4, 7, 9, 10)]
    assert [r.index for r in spaced_frames(refs, 3)] == [0, 3, 7, 10, 30]
    assert [r.index for r in spaced_frames(refs, 1)] == [0, 2, 3, 4, 7, 9, 10, 30]
    assert [r.index for r in spaced_frames(refs, 25)] == [0, 30]


def test_scans_and_steps_from_epochs(small_scannet, tmp_path):
    ids = {s: [r.index for r in small_scannet.frames(s)] for s in small_scannet.scenes("train")}
    m = method(frame_stride=1, epochs=3, batch_size=4)
    ctx = tiny_ctx(tmp_path, small_scannet)
    scans = m.scans(ctx)
    assert [(r.scene, r.index) for r in scans] == [(s, i) for s in ids for i in ids[s]]
    assert len(scans) == 8  # 2 train scenes x 4 valid frames
    assert m.total_steps(ctx) == math.ceil(3 * 8 / 4)
    batch = m.batch_stream(ctx).next()
    assert batch["batch_size"] == 4 and set(batch["coords"][:, 0].tolist()) == {0, 1, 2, 3}
    assert set(batch["key_coords"][:, 0].tolist()) == {0, 1, 2, 3}


class _Interrupt(Exception):
    pass


def test_resume_equals_uninterrupted_run(small_scannet, tmp_path):
    def run(workdir: Path, stop_after: int = 0):
        m = method(steps=4, batch_size=2, queue_size=6)
        ctx = tiny_ctx(workdir, small_scannet, checkpoint_every=2)
        model, stream = m.build_model(ctx), m.batch_stream(ctx)
        if stop_after:
            inner, calls = stream.next, []

            def next_or_stop():
                calls.append(1)
                if len(calls) > stop_after:
                    raise _Interrupt()
                return inner()

            stream.next = next_or_stop
        Trainer(model, stream, m.cfg.steps, m.cfg.optimizer, m.cfg.schedule, workdir, ctx.device, ctx.trainer,
                name="pretrain", progress=False).fit()
        return model

    straight = run(tmp_path / "a").state_dict()
    with pytest.raises(_Interrupt):
        run(tmp_path / "b", stop_after=2)  # dies in step 3, after the checkpoint of step 2
    resumed = run(tmp_path / "b").state_dict()
    assert int(resumed["queue_ptr"]) == int(straight["queue_ptr"]) == (4 * 2) % 6
    assert set(straight) == set(resumed)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight), \
        [k for k in straight if not torch.equal(straight[k], resumed[k])]


def test_loss_falls_on_embedded_scans(small_scannet, tmp_path):
    import json

    # A short run needs a key encoder that keeps up (m = 0.9) and a step size for a batch of 4
    # (the published lr 0.12 is for 1024 scans a step); queue + batch = the 8 scans, so no scan
    # meets an older key of itself as a negative within an epoch.
    m = method(steps=24, momentum=0.9, queue_size=4, optimizer={"lr": 0.03}, schedule={"name": "constant"})
    ctx = tiny_ctx(tmp_path, small_scannet)
    Trainer(m.build_model(ctx), m.batch_stream(ctx), m.cfg.steps, m.cfg.optimizer, m.cfg.schedule, tmp_path,
            ctx.device, ctx.trainer, name="pretrain", progress=False).fit()
    log = [json.loads(line) for line in (tmp_path / "metrics-pretrain.jsonl").read_text().splitlines()]
    losses, accs = [r["loss"] for r in log], [r["acc"] for r in log]
    assert len(losses) == 24
    # chance is log(1 + 4) = 1.61; the first step compares against the random initial queue
    early, late = np.mean(losses[2:10]), np.mean(losses[-8:])
    assert early - late > 0.2, (early, late, losses)
    assert np.mean(accs[-8:]) > np.mean(accs[2:10]) + 0.3, accs


def test_pretrain_export_and_semseg_loads_it(small_scannet, tmp_path):
    from harness.backbones.checkpoint import read_checkpoint
    from harness.registry import TASKS

    m = method(steps=2, batch_size=2, queue_size=4)
    ctx = tiny_ctx(tmp_path / "pre", small_scannet)
    path = m.pretrain(ctx)
    state, meta = read_checkpoint(path)
    assert meta["method"] == "depthcontrast" and meta["voxel_size"] == 0.05 and meta["input_features"] == "rgb"
    assert ctx.extra["pretrain"]["steps"] == 2
    # the query backbone only: no final, no MLP head, no key encoder, no queue
    expected = {k: v for k, v in m.model.backbone.state_dict().items() if not k.startswith("final.")}
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert not torch.equal(state["conv0p1s1.kernel"], m.model.key_backbone.conv0p1s1.kernel)

    task_cfg = plugin_config("task", "semseg", {"steps": 1, "batch_size": 1, "voxel_size": 0.05,
                                                "max_train_scenes": 1, "max_eval_scenes": 1})
    fctx = tiny_ctx(tmp_path / "fine", small_scannet)
    fctx.checkpoint = path
    result = TASKS.get("semseg")(task_cfg).run(fctx)
    assert fctx.extra["checkpoint_load"] == {"loaded": len(state), "skipped": 0, "missing": 2}  # final.kernel/bias
    assert 0.0 <= result["miou"] <= 1.0


def test_the_projection_head_is_affine_as_in_the_published_voxel_trunk():
    """SMLP(mlp_dim) of DepthContrast's res16unet: two linear layers, use_relu False."""
    import torch

    from baselines.depthcontrast import ProjectionHead

    torch.manual_seed(0)
    head = ProjectionHead(16, 16, 8)
    x, zero = torch.randn(5, 16), torch.zeros(1, 16)
    torch.testing.assert_close(head(-2 * x) - head(zero), -2 * (head(x) - head(zero)), rtol=1e-5, atol=1e-6)
