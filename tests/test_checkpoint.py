"""The canonical backbone checkpoint: export, the one loader, and its refusals."""

from __future__ import annotations

import collections

import pytest
import torch

from harness.backbones import build_backbone
from harness.backbones.checkpoint import load_backbone, read_checkpoint, save_backbone, strip_prefixes

PLANES = [8, 8, 16, 16, 16, 16, 8, 8]


def small(out=5, in_channels=3):
    torch.manual_seed(0)
    return build_backbone("Res16UNet14A", in_channels=in_channels, out_channels=out, backend="torch", planes=PLANES)


META = {"backbone": "Res16UNet14A", "in_channels": 3, "voxel_size": 0.05, "method": "test"}


def test_round_trip_drops_final_and_keeps_meta(tmp_path):
    m = small()
    p = save_backbone(tmp_path / "b.safetensors", m, META)
    state, meta = read_checkpoint(p)
    assert meta == META
    assert "final.kernel" not in state and "conv0p1s1.kernel" in state
    assert set(state) == {k for k in m.state_dict() if not k.startswith("final.")}
    other = small(out=7)
    torch.nn.init.zeros_(other.conv0p1s1.kernel)
    report = load_backbone(other, p, expect={"in_channels": 3, "voxel_size": 0.05}, quiet=True)
    assert torch.equal(other.conv0p1s1.kernel, m.conv0p1s1.kernel)
    assert report.missing == ["final.bias", "final.kernel"]
    assert len(report.loaded) == len(state)


def test_strip_prefixes_on_every_key():
    assert strip_prefixes("module.model.backbone.block1.0.conv1.kernel") == "block1.0.conv1.kernel"
    assert strip_prefixes("conv0p1s1.kernel") == "conv0p1s1.kernel"


def test_me_era_pth_with_prefixes_and_head(tmp_path):
    m = small()
    sd = collections.OrderedDict(("module." + k, v) for k, v in m.state_dict().items())
    sd["module.head.weight"] = torch.zeros(3)
    torch.save({"state_dict": sd, "epoch": 12}, tmp_path / "pc.pth")
    other = small()
    torch.nn.init.zeros_(other.block1[0].conv1.kernel)
    report = load_backbone(other, tmp_path / "pc.pth", quiet=True)
    assert torch.equal(other.block1[0].conv1.kernel, m.block1[0].conv1.kernel)
    assert report.skipped["head.weight"].startswith("unexpected")
    assert report.skipped["final.kernel"].startswith("head")
    assert report.meta["epoch"] == 12


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": small().state_dict(), "extra": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(tmp_path / "evil.pth")


def test_meta_mismatch_names_key_and_values(tmp_path):
    p = save_backbone(tmp_path / "b.safetensors", small(), META)
    with pytest.raises(ValueError, match=r"meta 'voxel_size' is 0.05, expected 0.02"):
        load_backbone(small(), p, expect={"voxel_size": 0.02}, quiet=True)


def test_other_architecture_is_refused(tmp_path):
    p = save_backbone(tmp_path / "b.safetensors", small(in_channels=1), {**META, "in_channels": 1})
    with pytest.raises(ValueError, match=r"'conv0p1s1.kernel' has shape \(27, 1, 32\), the backbone expects \(27, 3, 32\)"):
        load_backbone(small(), p, quiet=True)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="no tensor matches this backbone"):
        load_backbone(small(), tmp_path / "resnet.pth", quiet=True)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(small(), tmp_path / "nope.safetensors", quiet=True)
