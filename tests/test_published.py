"""A published checkpoint as a row of the table (`method: published`), end to end on tiny sizes:
two rows of the one method under names of their own, each fine-tuned from its file's weights."""

from __future__ import annotations

import json

import torch

from harness.backbones import build_backbone
from harness.backbones.checkpoint import read_checkpoint, save_backbone
from tests._sweeps import SWEEP, cli, local_args, result, tiny

PLANES = (8, 8, 16, 16, 16, 16, 8, 8)  # tests/sweeps/tiny.yaml's backbone


def _release(path, seed):
    """A file shaped like PointContrast's release: wrapped keys, a 32-wide head, the trainer's
    OmegaConf config next to the weights."""
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    net = build_backbone("Res16UNet14A", 3, 32, backend="torch", planes=PLANES)
    torch.save({"curr_iter": 100, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()},
                "config": OmegaConf.create({"net": {"model": "Res16UNet14A"}})}, path)
    return net


def test_published_checkpoints_become_rows(tmp_path, cache_dir, small_scannet):
    out = tmp_path / "runs"
    run = out / "table1"
    release = _release(tmp_path / "pointcontrast.pth", seed=5)
    mine = build_backbone("Res16UNet14A", 3, 20, backend="torch", planes=PLANES)
    save_backbone(tmp_path / "mine.safetensors", mine, {"method": "csc", "voxel_size": 0.05, "input_features": "rgb"})
    rows = [f"methods.pc_release={{method: published, path: {tmp_path / 'pointcontrast.pth'}, voxel_size: 0.025}}",
            f"methods.mine={{method: published, path: {tmp_path / 'mine.safetensors'}, group: Single-scan}}"]
    rc, text, err = cli("sweep", SWEEP, *tiny(out, cache_dir, steps=2), *local_args(), *rows)
    assert rc == 0, text + err
    plan = json.loads((run / "plan.json").read_text())
    assert plan["methods"] == ["scratch", "pc_release", "mine"]
    assert plan["groups"] == {"scratch": "Scratch", "pc_release": "Multi-scan", "mine": "Single-scan"}
    pre = result(run, "pretrain", "pc_release__s0")
    imported = pre["checkpoint_import"]
    assert imported["not_read"] == ["config"] and (imported["loaded"], imported["skipped"]) == (188, 0)
    exported, meta = read_checkpoint(pre["checkpoint"])
    assert meta["method"] == "published" and meta["voxel_size"] == 0.025
    for key, value in exported.items():  # the file's weights, not a fresh initialisation
        assert torch.equal(value, release.state_dict()[key]), key
    for row in ("pc_release", "mine"):
        cell = result(run, "finetune", f"{row}__scannet-semseg__s0")
        assert cell["status"] == "done" and 0.0 <= cell["value"] <= 1.0, cell
    assert "pc_release" in (run / "report" / "table1.md").read_text()
    # a new file under the same path is a new row identity: its cell runs again, the others are reused
    torch.manual_seed(9)
    other = build_backbone("Res16UNet14A", 3, 20, backend="torch", planes=PLANES)
    save_backbone(tmp_path / "mine.safetensors", other, {"method": "csc", "voxel_size": 0.05, "input_features": "rgb"})
    rc, text, err = cli("sweep", SWEEP, *tiny(out, cache_dir, steps=2), *local_args(), *rows)
    assert rc == 0 and "(1 ran, 2 reused, 0 failed)" in text, text + err


def test_a_published_row_is_checked_before_anything_runs(tmp_path, cache_dir):
    out = tmp_path / "runs"
    base = ["sweep", SWEEP, *tiny(out, cache_dir), *local_args()]
    rc, _, err = cli(*base, f"methods.gone={{method: published, path: {tmp_path / 'gone.pth'}}}")
    assert rc == 2 and f"methods.gone.path: weights file {tmp_path / 'gone.pth'} does not exist" in err, err
    _release(tmp_path / "pc.pth", seed=0)
    rc, _, err = cli(*base, f"methods.pc={{method: published, path: {tmp_path / 'pc.pth'}, group: Multiscan}}")
    assert rc == 2 and "methods.pc.group: 'Multiscan' is not a row group" in err, err
    rc, _, err = cli(*base, "methods.pc={method: publishd}")
    assert rc == 2 and "Unknown method 'publishd'" in err, err
    assert not out.exists()


def test_an_encoder_weights_file_that_is_not_there_stops_the_sweep(tmp_path, cache_dir):
    out = tmp_path / "runs"
    rc, _, err = cli("sweep", SWEEP, *tiny(out, cache_dir), *local_args(),
                     f"methods.image_guided={{stage1: {{encoder_weights: {tmp_path / 'r18.pth'}}}}}")
    assert rc == 2 and f"methods.image_guided.stage1.encoder_weights: weights file {tmp_path / 'r18.pth'} " \
                       "does not exist" in err, err
    assert not out.exists()
