"""Several processes (gloo on CPU, 2 ranks started here with torch.multiprocessing): synchronised
BatchNorm, gradients of 2 ranks x batch B against 1 process x batch 2B (semantic segmentation,
PointContrast), kill-and-resume of a 2-rank training, the rank-0-only files.

The one-process numbers are computed in this test process with the plain modules (no
``harness.distributed`` code in the way); the ranks write theirs to files.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from harness import distributed as dist

IGNORE = -100


# ----------------------------------------------------------------------------------------------
# Starting ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    faulthandler.enable(all_threads=True)  # a native abort (gloo) shows where each thread was
    assert dist.init_from_env(timeout_s=60)
    try:
        fn(*args)
        dist.finish()
    finally:
        dist.shutdown()


def run_ranks(fn, *args, world: int = 2) -> None:
    """``fn(*args)`` on ``world`` fresh processes joined in one gloo group; raises if any fails."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, _free_port(), fn, args), nprocs=world, join=True, start_method="spawn")


def _max_diffs(got: dict, want: dict) -> tuple:
    """(max abs difference, max abs difference / max abs value over all tensors, max per-tensor
    relative difference over the tensors whose largest value is above 1e-3 of the overall one:
    a deep layer that sees a couple of voxels has gradients near 0, only float noise)."""
    top = max(float(w.abs().max()) for w in want.values())
    ab, per = 0.0, 0.0
    for k, w in want.items():
        d = float((got[k] - w).abs().max())
        ab = max(ab, d)
        if float(w.abs().max()) > 1e-3 * top:
            per = max(per, d / float(w.abs().max()))
    return ab, ab / top, per


# ----------------------------------------------------------------------------------------------
# Synchronised BatchNorm


def _bn_inputs():
    g = torch.Generator().manual_seed(7)
    # different sizes and statistics per rank: the global statistics differ from either rank's
    xs = [torch.randn(5, 3, generator=g) * 2 + 1, torch.randn(8, 3, generator=g) * 0.5 - 3]
    ws = [torch.randn(5, 3, generator=g), torch.randn(8, 3, generator=g)]
    xs2 = [torch.randn(2, 3, 2, 3, generator=g) + 2, torch.randn(3, 3, 2, 3, generator=g) * 3]
    ws2 = [torch.randn(2, 3, 2, 3, generator=g), torch.randn(3, 3, 2, 3, generator=g)]
    return xs, ws, xs2, ws2


def _bn(cls):
    bn = cls(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    return bn


def _bn_worker(out: Path) -> None:
    r = dist.rank()
    xs, ws, xs2, ws2 = _bn_inputs()
    res = {}
    for tag, cls, x0, w in (("1d", nn.BatchNorm1d, xs[r], ws[r]), ("2d", nn.BatchNorm2d, xs2[r], ws2[r])):
        bn = dist.convert_sync_batchnorm(_bn(cls))
        assert type(bn).__name__.startswith("SyncBatchNorm")
        x = x0.clone().requires_grad_(True)
        y = bn(x)
        (y * w).sum().backward()
        res[tag] = {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                    "rm": bn.running_mean.clone(), "rv": bn.running_var.clone()}
    torch.save(res, out / f"bn{r}.pt")


def test_sync_batchnorm_on_two_ranks_equals_batchnorm_of_the_concatenated_batch(tmp_path):
    run_ranks(_bn_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in range(2)]
    xs, ws, xs2, ws2 = _bn_inputs()
    for tag, cls, x_parts, w_parts in (("1d", nn.BatchNorm1d, xs, ws), ("2d", nn.BatchNorm2d, xs2, ws2)):
        bn = _bn(cls)
        x = torch.cat(x_parts).requires_grad_(True)
        y = bn(x)
        (y * torch.cat(w_parts)).sum().backward()
        n0 = len(x_parts[0])
        got_y = torch.cat([ranks[0][tag]["y"], ranks[1][tag]["y"]])
        got_dx = torch.cat([ranks[0][tag]["dx"], ranks[1][tag]["dx"]])
        torch.testing.assert_close(got_y, y.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_dx, x.grad, rtol=1e-5, atol=1e-5)
        # the affine parameters get each rank's local sum (DDP then averages): they add up to the total
        torch.testing.assert_close(ranks[0][tag]["dw"] + ranks[1][tag]["dw"], bn.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ranks[0][tag]["db"] + ranks[1][tag]["db"], bn.bias.grad, rtol=1e-5, atol=1e-5)
        # running statistics: those of the global batch (unbiased variance), the same on both ranks
        for r in range(2):
            torch.testing.assert_close(ranks[r][tag]["rm"], bn.running_mean, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ranks[r][tag]["rv"], bn.running_var, rtol=1e-5, atol=1e-6)
        assert n0 < len(x)  # the two ranks held different numbers of rows


def test_sync_batchnorm_with_one_process_is_plain_batchnorm():
    x = torch.randn(6, 3)
    plain, sync = _bn(nn.BatchNorm1d), dist.convert_sync_batchnorm(_bn(nn.BatchNorm1d))
    assert isinstance(sync, nn.BatchNorm1d) and type(sync) is not nn.BatchNorm1d
    assert torch.equal(plain(x), sync(x))
    assert list(plain.state_dict()) == list(sync.state_dict())


@pytest.mark.parametrize("backend", ["torch", pytest.param("minkowski", marks=pytest.mark.minkowski)])
def test_both_backbone_backends_get_every_batchnorm_synchronised(backend):
    from harness.backbones import build_backbone, resolve_backend

    if backend == "minkowski":
        pytest.importorskip("MinkowskiEngine")
    assert resolve_backend(backend) == backend
    model = build_backbone("Res16UNet14A", 3, 5, backend=backend, planes=[8] * 8)
    keys = list(model.state_dict())
    plain = [n for n, m in model.named_modules() if type(m) is nn.BatchNorm1d]
    assert len(plain) == 30  # bn0, bn1..4, bntr4..7 and two per block (8 blocks), inside the sparse BN wrappers
    dist.convert_sync_batchnorm(model)
    mods = dict(model.named_modules())
    assert all(type(mods[n]) is dist.SyncBatchNorm1d for n in plain)
    assert list(model.state_dict()) == keys  # checkpoints of either kind load into the other


# ----------------------------------------------------------------------------------------------
# Gradients: 2 ranks x batch B == 1 process x batch 2B


def _points(seed: int, n: int):
    g = np.random.default_rng(seed)
    flat = g.choice(24 ** 3, size=n, replace=False)  # several voxels remain at the coarsest stride (16)
    xyz = np.stack([flat // 24 ** 2, (flat // 24) % 24, flat % 24], 1).astype(np.int32)
    return xyz, g.normal(size=(n, 3)).astype(np.float32)


def _backbone(backend: str = "torch"):
    from harness.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("Res16UNet14A", 3, 6, backend=backend, planes=[8, 8, 8, 8, 8, 8, 8, 8])


def _seg_scene(i: int):
    xyz, feats = _points(100 + i, 120 + 40 * i)
    g = np.random.default_rng(200 + i)
    sem = g.integers(0, 6, len(xyz))
    sem[g.random(len(xyz)) < 0.2 + 0.3 * i] = IGNORE  # different numbers of labelled points per scene
    return xyz, feats, sem


def _seg_batch(scenes):
    coords, feats, sem = [], [], []
    for b, (x, f, s) in enumerate(scenes):
        coords.append(np.concatenate([np.full((len(x), 1), b, np.int32), x], 1))
        feats.append(f)
        sem.append(s)
    return {"coords": torch.from_numpy(np.concatenate(coords)), "feats": torch.from_numpy(np.concatenate(feats)),
            "semantic": torch.from_numpy(np.concatenate(sem).astype(np.int64))}


def _seg_model():
    from harness.tasks.semseg import SegModel

    return SegModel(_backbone(), IGNORE)


def _seg_model_me():
    from harness.tasks.semseg import SegModel

    return SegModel(_backbone("minkowski"), IGNORE)


def _pc_model():
    from baselines.pointcontrast import PointContrastModel

    # every match is used (no sampling), so both runs see the same matches
    return PointContrastModel(_backbone(), types.SimpleNamespace(tau=0.4, num_matches=10 ** 6))


def _pair(i: int):
    xa, fa = _points(300 + i, 90 + 30 * i)
    xb, fb = _points(400 + i, 80 + 20 * i)
    g = np.random.default_rng(500 + i)
    m = 15 + 10 * i  # different numbers of matches per pair
    anchor = (g.random((m, 3)) * 30).astype(np.float32)  # CSC's shape-context frame (voxel units)
    return xa, fa, xb, fb, g.choice(len(xa), m, replace=False), g.choice(len(xb), m, replace=False), anchor


def _pair_batch(pairs):
    coords, feats, ma, mb, item, anchors = [], [], [], [], [], []
    offset = 0
    for b, (xa, fa, xb, fb, ia, ib, anchor) in enumerate(pairs):
        item.append(np.full(len(ia), b, np.int64))
        anchors.append(anchor)
        coords += [np.concatenate([np.full((len(xa), 1), 2 * b, np.int32), xa], 1),
                   np.concatenate([np.full((len(xb), 1), 2 * b + 1, np.int32), xb], 1)]
        feats += [fa, fb]
        ma.append(ia + offset)
        mb.append(ib + offset + len(xa))
        offset += len(xa) + len(xb)
    return {"coords": torch.from_numpy(np.concatenate(coords)), "feats": torch.from_numpy(np.concatenate(feats)),
            "match_a": torch.from_numpy(np.concatenate(ma).astype(np.int64)),
            "match_b": torch.from_numpy(np.concatenate(mb).astype(np.int64)),
            "match_item": torch.from_numpy(np.concatenate(item)), "anchor": torch.from_numpy(np.concatenate(anchors))}


def _csc_model():
    from baselines.csc import CSCModel

    return CSCModel(_backbone(), types.SimpleNamespace(tau=0.4, num_matches=10 ** 6, r1=2.0, r2=20.0,
                                                       partition_reduction="sum"))


CASES = {"semseg": (_seg_model, _seg_scene, _seg_batch), "pointcontrast": (_pc_model, _pair, _pair_batch),
         "csc": (_csc_model, _pair, _pair_batch), "semseg-minkowski": (_seg_model_me, _seg_scene, _seg_batch)}


def _grads(model: nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _grad_worker(case: str, out: Path) -> None:
    make_model, item, collate = CASES[case]
    model = dist.convert_sync_batchnorm(make_model())  # as the trainer does
    module = dist.wrap(model, torch.device("cpu"))
    assert module is not model  # DistributedDataParallel
    res = module(collate([item(dist.rank())]))
    res["loss"].backward()
    torch.save({"grads": _grads(model), "loss": dist.mean_scalars({"loss": float(res["loss"].detach())})["loss"]},
               out / f"{case}{dist.rank()}.pt")


@pytest.mark.parametrize("case", [c if "minkowski" not in c else pytest.param(c, marks=pytest.mark.minkowski)
                                  for c in CASES])
def test_two_ranks_batch_b_give_the_gradients_of_one_process_batch_2b(case, tmp_path):
    if "minkowski" in case:
        pytest.importorskip("MinkowskiEngine")
    run_ranks(_grad_worker, case, tmp_path)
    make_model, item, collate = CASES[case]
    model = make_model()  # plain BatchNorm, no process group
    res = model(collate([item(0), item(1)]))
    res["loss"].backward()
    want = _grads(model)
    ranks = [torch.load(tmp_path / f"{case}{r}.pt", weights_only=True) for r in range(2)]
    assert set(ranks[0]["grads"]) == set(want) and len(want) > 10
    for r in range(2):
        ab, rel, per = _max_diffs(ranks[r]["grads"], want)
        assert rel < 1e-5 and per < 1e-4, (case, r, ab, rel, per)
        print(f"{case} rank={r} grad max_abs_diff={ab:.3g} rel_to_max={rel:.3g} max_per_tensor_rel={per:.3g}")
    assert ranks[0]["loss"] == pytest.approx(float(res["loss"].detach()), rel=1e-5)
    # not trivially equal: the average of the two ranks' gradients without synchronisation
    # (BatchNorm per rank, each rank's own mean) is another one
    apart = {}
    for i in range(2):
        alone = make_model()
        alone(collate([item(i)]))["loss"].backward()
        for k, v in _grads(alone).items():
            apart[k] = apart.get(k, 0) + v / 2
    assert _max_diffs(apart, want)[1] > 1e-2


def _contrastive_inputs():
    g = torch.Generator().manual_seed(11)
    anchors = [torch.randn(4, 5, generator=g), torch.randn(7, 5, generator=g)]  # pixels matched per rank
    positives = [torch.randn(4, 5, generator=g), torch.randn(7, 5, generator=g)]
    keys = [torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)]  # DepthContrast keys per rank
    return anchors, positives, keys


def _contrastive_worker(out: Path) -> None:
    from baselines.depthcontrast import enqueue_from_all_ranks_
    from methods.image_guided.losses import pixel_info_nce

    r = dist.rank()
    anchors, positives, keys = _contrastive_inputs()
    a, p = anchors[r].clone().requires_grad_(True), positives[r].clone().requires_grad_(True)
    loss = pixel_info_nce(a, p, 0.3, chunk=3)  # chunked: logits recomputed in the backward pass
    loss.backward()
    queue, ptr = torch.zeros(8, 5), torch.tensor(5)
    enqueue_from_all_ranks_(queue, ptr, keys[r])
    torch.save({"loss": loss.detach(), "da": a.grad, "dp": p.grad, "queue": queue, "ptr": ptr}, out / f"c{r}.pt")


def test_contrastive_gathers_image_pixels_and_depthcontrast_keys_of_all_ranks(tmp_path):
    from methods.image_guided.losses import pixel_info_nce

    run_ranks(_contrastive_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"c{r}.pt", weights_only=True) for r in range(2)]
    anchors, positives, keys = _contrastive_inputs()
    a, p = torch.cat(anchors).requires_grad_(True), torch.cat(positives).requires_grad_(True)
    loss = pixel_info_nce(a, p, 0.3)  # one process holding the pixels of both images
    loss.backward()
    # DDP averages: the ranks' losses and gradients, averaged, are those of the global batch
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    # each rank's rows get the sum of every rank's loss gradients (divided by 2 for DDP's average)
    torch.testing.assert_close(torch.cat([ranks[0]["da"], ranks[1]["da"]]) / 2, a.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([ranks[0]["dp"], ranks[1]["dp"]]) / 2, p.grad, rtol=1e-5, atol=1e-6)
    # the queue (8 rows, pointer at 5) gets the 6 keys of both ranks in rank order, wrapping round
    want = torch.zeros(8, 5)
    both = torch.cat(keys)
    want[5:8], want[0:3] = both[:3], both[3:]
    for r in range(2):
        assert torch.equal(ranks[r]["queue"], want) and int(ranks[r]["ptr"]) == 3


# ----------------------------------------------------------------------------------------------
# Leaving the group


def _leave_worker(out: Path) -> None:
    """Records when this rank's ``destroy_process_group`` starts and ends; rank 1's is slow."""
    import time

    r = dist.rank()
    destroy = dist.tdist.destroy_process_group

    def timed(*a, **k):
        t0 = time.time()
        if r == 1:
            time.sleep(1.0)
        destroy(*a, **k)
        (out / f"left{r}.json").write_text(json.dumps({"start": t0, "end": time.time()}))

    dist.tdist.destroy_process_group = timed


def test_rank_zero_leaves_the_group_after_the_others(tmp_path):
    # rank 0 hosts the store: it must not tear down while another rank is still leaving
    run_ranks(_leave_worker, tmp_path)
    t = [json.loads((tmp_path / f"left{r}.json").read_text()) for r in range(2)]
    assert t[0]["start"] >= t[1]["end"], t


# ----------------------------------------------------------------------------------------------
# Kill and resume with 2 ranks


class _Regression(nn.Module):
    """Least squares with BatchNorm and dropout (torch's RNG, per rank, in the checkpoint)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))

    def forward(self, batch):
        return {"loss": ((self.backbone(batch["x"]).squeeze(1) - batch["y"]) ** 2).mean()}


def _train_worker(workdir: Path, stop_at: int, out: Path, how: str = "signal") -> None:
    from harness.config import OptimizerConfig, ScheduleConfig, TrainerConfig
    from harness.train import BatchStream, Preempted, Trainer

    w = np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)
    calls = [0]

    def make_batch(items, rngs):
        calls[0] += 1
        if dist.rank() == 1 and calls[0] == stop_at:
            if how == "kill":
                os._exit(9)  # this process dies at once (no checkpoint, no clean-up)
            os.kill(os.getpid(), signal.SIGUSR1)  # only this rank is told to stop (as a SLURM signal to one task)
        x = np.stack([r.normal(size=4).astype(np.float32) for r in rngs])
        return {"x": torch.from_numpy(x), "y": torch.from_numpy(x @ w)}

    torch.manual_seed(dist.rank())  # different initial weights: DDP must start every rank from rank 0's
    cfg = OmegaConf.structured(TrainerConfig(checkpoint_every=3, log_every=1))
    opt = OmegaConf.structured(OptimizerConfig(lr=0.05, momentum=0.9))
    trainer = Trainer(_Regression(), BatchStream(16, 4, 0, make_batch), 8, opt,
                      OmegaConf.structured(ScheduleConfig(name="cosine")), workdir, torch.device("cpu"), cfg,
                      progress=False)
    try:
        trainer.fit()
        status = "done"
    except Preempted:
        status = f"preempted at {trainer.step}"
    torch.save({"status": status, "model": trainer.model.state_dict()}, out / f"rank{dist.rank()}.pt")


@pytest.mark.parametrize("how", ["signal", "kill"])
def test_two_rank_run_stopped_on_one_rank_and_resumed_equals_an_uninterrupted_one(how, tmp_path):
    import torch.multiprocessing as mp

    full, cut = tmp_path / "full", tmp_path / "cut"
    for d in (full, cut, tmp_path / "o1", tmp_path / "o2", tmp_path / "o3"):
        d.mkdir()
    run_ranks(_train_worker, full, 0, tmp_path / "o1")
    if how == "signal":
        run_ranks(_train_worker, cut, 5, tmp_path / "o2", how)
        stopped = [torch.load(tmp_path / "o2" / f"rank{r}.pt", weights_only=True) for r in range(2)]
        # rank 1 got the signal during step 5; the ranks agree on it and both stop after that step
        assert [s["status"] for s in stopped] == ["preempted at 5", "preempted at 5"]
    else:
        # rank 1 dies during step 5: the job ends with an error (rank 1's exit or rank 0's lost-peer
        # error, whichever the parent sees first); the last checkpoint is step 3's
        with pytest.raises((mp.ProcessExitedException, mp.ProcessRaisedException)):
            run_ranks(_train_worker, cut, 5, tmp_path / "o2", how)
        assert torch.load(cut / "ckpt" / "train-last.pt", weights_only=True)["step"] == 3
    run_ranks(_train_worker, cut, 0, tmp_path / "o3")
    ends = [torch.load(tmp_path / "o3" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    refs = [torch.load(tmp_path / "o1" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in range(2):
        assert ends[r]["status"] == refs[r]["status"] == "done"
        for k, v in refs[r]["model"].items():
            assert torch.equal(ends[r]["model"][k], v), (r, k)
        for k, v in refs[0]["model"].items():  # the ranks hold the same model
            assert torch.equal(refs[r]["model"][k], v), (r, k)

    def metrics(d):
        return [{k: v for k, v in json.loads(line).items() if k != "time"}
                for line in (d / "metrics-train.jsonl").read_text().splitlines()]

    # one metric log and one checkpoint series, written by rank 0 only
    assert [m["step"] for m in metrics(cut)][:8] == list(range(1, 9))
    assert metrics(cut) == metrics(full)
    assert sorted(p.name for p in (cut / "ckpt").iterdir()) == ["train-last.pt"]
    assert sorted(p.name for p in cut.iterdir()) == ["ckpt", "metrics-train.jsonl"]


def _failing_worker(out: Path) -> None:
    import time

    if dist.rank() == 1:
        dist.shutdown()  # this rank goes away (its sockets close) while rank 0 waits in a collective
        time.sleep(5)
        raise ValueError("rank 1 broke")
    start = time.time()
    try:
        dist.barrier()
    except Exception as exc:  # gloo: the peer closed the connection
        (out / "rank0.json").write_text(json.dumps({"error": type(exc).__name__, "seconds": time.time() - start}))
        raise


def test_a_rank_that_leaves_fails_the_others_instead_of_hanging(tmp_path):
    import torch.multiprocessing as mp

    with pytest.raises(mp.ProcessRaisedException):
        run_ranks(_failing_worker, tmp_path)
    # rank 0 failed in its barrier within seconds, well before the collective timeout (60 s here)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert rank0["seconds"] < 5, rank0


def _runner_failing_on_rank_1(spec) -> dict:
    if dist.rank() == 1:
        raise ValueError("rank 1: scene0042_00 has no points")
    dist.barrier()  # rank 0 waits for rank 1, which never comes
    return {}


def _job_worker(run_dir: Path) -> None:
    import time

    import harness.launch as launch
    from harness.sweep import JobSpec

    launch.RUNNERS["pretrain"] = _runner_failing_on_rank_1
    spec = JobSpec(kind="pretrain", id="m__s0", method="m", seed=0, run_dir=str(run_dir), method_cfg={}, backbone={},
                   trainer={}, device="cpu", dataset="scannet", dataset_cfg={})
    try:
        launch.Job()(spec)
    except ValueError:
        assert dist.rank() == 1
        dist.shutdown()  # the process leaves (its sockets close), as a crashed rank does
        deadline = time.time() + 30  # stay alive until rank 0 has recorded the failure
        while time.time() < deadline and not (run_dir / "pretrain" / "m__s0" / "result.json").is_file():
            time.sleep(0.2)
    except Exception:
        assert dist.rank() == 0  # a peer went away: the backend's error
        dist.shutdown()


def test_a_job_whose_rank_fails_records_that_ranks_error_not_the_peers_connection_error(tmp_path):
    import time

    start = time.time()
    run_ranks(_job_worker, tmp_path)
    res = json.loads((tmp_path / "pretrain" / "m__s0" / "result.json").read_text())
    assert res["status"] == "failed" and res["failed_rank"] == 1, res
    assert res["error"] == "ValueError: rank 1: scene0042_00 has no points"
    assert [e["rank"] for e in res["rank_errors"]] == [1, 0]  # rank 0's own error (the lost peer) comes second
    assert time.time() - start < 40  # well before the collective timeout would have ended a hang


# ----------------------------------------------------------------------------------------------
# Whole jobs of 2 processes: the local launcher (submitit's local executor) and SLURM (srun)

DDP_SWEEP = """\
name: ddp
backbone: {name: Res16UNet14A, planes: [8, 8, 16, 16, 16, 16, 8, 8], backend: torch}
device: cpu
methods: {scratch: {}}
datasets: {scannet: {}}
columns: {scannet-semseg: {dataset: scannet, task: semseg}}
trainer: {checkpoint_every: 3, log_every: 1}
launcher: {local: {tasks_per_node: 2, cpus: 2}, slurm: {tasks_per_node: 2, nodes: 1}}
"""
CELL = "scratch__scannet-semseg__s0"


def _ddp_sweep(tmp: Path, cache, launcher: str):
    from tests._sweeps import cli, slurm_args, tiny

    sweep = tmp / "ddp.yaml"
    sweep.write_text(DDP_SWEEP)
    # tiny() sets batch 1: the global batch of 2 processes is 2 (one scene each)
    args = ["sweep", sweep, *tiny(tmp / "runs", cache), "tasks.semseg.batch_size=2"]
    if launcher == "slurm":
        args += [*slurm_args(), "launcher.slurm.max_wait_min=4", "--launcher", "slurm"]
    rc, text, err = cli(*args)
    assert rc == 0, text + err
    return tmp / "runs" / "ddp"


def _check_one_job_of_two_processes(run: Path) -> dict:
    from tests._sweeps import result

    cell = result(run, "finetune", CELL)
    assert cell["status"] == "done" and 0.0 <= cell["value"] <= 1.0, cell
    job = run / "cells" / CELL
    # one result, one metric log, one checkpoint series: rank 0's
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("result.json")) == [
        f"cells/{CELL}/result.json", "pretrain/scratch__s0/result.json"]
    assert sorted(p.name for p in (job / "ckpt").iterdir()) == ["finetune-last.pt"]
    steps = [json.loads(line)["step"] for line in (job / "metrics-finetune.jsonl").read_text().splitlines()
             if "step" in line]
    assert steps[:6] == [1, 2, 3, 4, 5, 6]
    logs = "".join(p.read_text() for p in (run / "logs").rglob("*") if p.is_file() and p.suffix in (".err", ".out"))
    for r in range(2):  # both processes of the job took part
        assert f"job.start id={CELL} kind=finetune rank={r} world=2" in logs, logs[-2000:]
    return cell


@pytest.fixture(scope="module")
def local_two_process_job(tmp_path_factory, cache_dir, small_scannet):
    tmp = tmp_path_factory.mktemp("ddp-local")
    env = pytest.MonkeyPatch()
    env.setenv("HARNESS_CONFIGS", str(Path(__file__).resolve().parent.parent / "configs"))
    try:
        return _ddp_sweep(tmp, cache_dir, "local")
    finally:
        env.undo()


def test_local_launcher_runs_a_job_as_two_processes(local_two_process_job):
    _check_one_job_of_two_processes(local_two_process_job)


def test_slurm_runs_a_two_task_job_on_one_node(local_two_process_job, tmp_path, cache_dir, monkeypatch):
    from tests._sweeps import result, slurm_problem

    problem = slurm_problem()
    if problem:
        pytest.skip(f"no SLURM cluster: {problem}")
    monkeypatch.setenv("HARNESS_CONFIGS", str(Path(__file__).resolve().parent.parent / "configs"))
    run = _ddp_sweep(tmp_path, cache_dir, "slurm")
    cell = _check_one_job_of_two_processes(run)
    assert cell["slurm_job_id"]
    # srun's 2 tasks and the local executor's 2 processes train identically (gloo, one thread each)
    assert cell["value"] == result(local_two_process_job, "finetune", CELL)["value"]


def test_a_global_batch_that_does_not_split_over_the_processes_stops_the_sweep_before_it_runs(tmp_path, monkeypatch):
    from tests._sweeps import cli

    monkeypatch.setenv("HARNESS_CONFIGS", str(Path(__file__).resolve().parent.parent / "configs"))
    sweep = tmp_path / "ddp.yaml"
    sweep.write_text(DDP_SWEEP)
    rc, text, err = cli("sweep", sweep, f"output_dir={tmp_path / 'runs'}", "tasks.semseg.batch_size=3")
    assert rc == 2, text + err
    assert (f"{sweep}: tasks.semseg.batch_size=3 (or columns.scannet-semseg.recipe.batch_size): the global batch "
            f"of job {CELL} does not divide evenly over its 2 processes (launcher.local.tasks_per_node=2)") \
        in " ".join((text + err).split())
    assert not list((tmp_path / "runs").rglob("result.json"))


def test_each_rank_takes_its_contiguous_share_of_every_global_batch(monkeypatch):
    from harness.train import BatchStream, item_rng

    def stream():
        return BatchStream(5, 4, 3, lambda items, rngs: (items, [r.integers(1 << 30) for r in rngs]))

    one = stream()
    batches = [one.next() for _ in range(4)]  # 16 items: 5 per epoch, reshuffled every epoch
    items = [i for b, _ in batches for i in b]
    assert [sorted(i for i, e in items if e == ep) for ep in range(3)] == [list(range(5))] * 3
    assert [i for i, e in items if e == 0] != [i for i, e in items if e == 1]  # the epochs differ in order
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    for r in range(2):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        mine = stream()
        for its, draws in batches:
            got, got_draws = mine.next()
            assert got == its[2 * r:2 * r + 2]  # rank r: items 2r and 2r+1 of the global batch
            # augmentations drawn from the same per-item RNG as in the one-process run
            assert got_draws == draws[2 * r:2 * r + 2] == [item_rng(3, e, i).integers(1 << 30) for i, e in got]
