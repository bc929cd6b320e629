import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch

import harness
from harness.backbones import build_backbone
from harness.backbones.checkpoint import load_backbone, read_checkpoint, save_backbone, strip_prefixes

SMALL = dict(layers=(1, 1, 1, 1, 1, 1, 1, 1), planes=(8, 8, 16, 16, 16, 16, 8, 8))
META = dict(input_features="rgb", voxel_size=0.02, method="csc", config={"tau": 0.4})


def small(out_channels=4, **kw):
    return build_backbone("Res16UNet14A", in_channels=3, out_channels=out_channels, backend="torch",
                          **{**SMALL, **kw})


def test_save_and_load_roundtrip_drops_final_and_records_meta(tmp_path, caplog):
    torch.manual_seed(0)
    src = small()
    path = save_backbone(tmp_path / "ckpt" / "backbone.safetensors", src, META)
    sd, meta = read_checkpoint(path)
    assert not any(k.startswith("final.") for k in sd)
    assert meta["backbone"] == "Res16UNet14A" and meta["layers"] == list(SMALL["layers"])
    assert meta["planes"] == list(SMALL["planes"]) and meta["in_channels"] == 3
    assert meta["voxel_size"] == 0.02 and meta["method"] == "csc" and meta["config"] == {"tau": 0.4}
    assert meta["harness_version"] == harness.__version__ and meta["git_commit"]
    dst = small(out_channels=20)
    with caplog.at_level(logging.INFO, logger="harness.backbones.checkpoint"):
        rep = load_backbone(dst, path, expect={"voxel_size": 0.02})
    assert "ckpt.load loaded=" in caplog.text
    assert len(rep.loaded) == len(sd) and rep.missing == ["final.kernel", "final.bias"] and not rep.skipped
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v)
    assert "missing=2" in rep.summary()


def test_meta_records_the_checkouts_commit(tmp_path):
    """The commit in a checkpoint's meta is this checkout's HEAD, as git itself reports it."""
    root = Path(harness.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    _, meta = read_checkpoint(save_backbone(tmp_path / "b.safetensors", small(), META))
    assert meta["git_commit"] in (head.stdout.strip(), head.stdout.strip() + "+dirty")


def test_save_requires_the_meta_fields(tmp_path):
    with pytest.raises(ValueError, match="voxel_size"):
        save_backbone(tmp_path / "x.safetensors", small(), {"method": "csc", "input_features": "rgb"})


def test_meta_mismatch_names_key_expected_and_found(tmp_path):
    path = save_backbone(tmp_path / "b.safetensors", small(), META)
    with pytest.raises(ValueError, match=r"voxel_size.*expected 0\.05.*found 0\.02"):
        load_backbone(small(), path, expect={"voxel_size": 0.05})
    with pytest.raises(ValueError, match=r"in_channels.*expected 6.*found 3"):
        load_backbone(build_backbone("Res16UNet14A", in_channels=6, backend="torch", **SMALL), path)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = save_backbone(tmp_path / "b.safetensors", small(), META)
    other = build_backbone("Res16UNet14A", backend="torch", layers=SMALL["layers"], planes=(8, 8, 16, 16, 16, 16, 8, 12))
    with pytest.raises(ValueError, match="planes"):
        load_backbone(other, path)
    # without meta (an ME-era .pth) the shapes catch it, naming the key and both shapes
    torch.save({"state_dict": small().state_dict()}, tmp_path / "old.pth")
    with pytest.raises(ValueError, match=r"shape mismatch for 'convtr7p2s2.kernel': expected \(8, 8, 12\), found \(8, 8, 8\)"):
        load_backbone(other, tmp_path / "old.pth")
    torch.save({"model": {"encoder.layer1.weight": torch.zeros(3)}}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="no backbone tensor"):
        load_backbone(small(), tmp_path / "foreign.pth")
    torch.save({"state_dict": {k: v for k, v in small().state_dict().items() if not k.startswith("block8")}},
               tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="not in the checkpoint"):
        load_backbone(small(), tmp_path / "partial.pth")


def test_me_era_pth_with_wrapper_prefixes_and_final_of_other_width(tmp_path):
    torch.manual_seed(1)
    src = small(out_channels=32)
    sd = {f"module.model.{k}": v for k, v in src.state_dict().items()}
    torch.save({"epoch": 7, "state_dict": sd, "optimizer": {"lr": 0.1}}, tmp_path / "pc.pth")
    dst = small(out_channels=20)
    rep = load_backbone(dst, tmp_path / "pc.pth")
    assert set(rep.skipped) == {"final.kernel", "final.bias"}
    assert "vs" in rep.skipped["final.kernel"] and rep.meta["epoch"] == 7
    assert torch.equal(dst.block8[0].conv1.kernel, src.block8[0].conv1.kernel)


def test_pth_with_pickled_objects_is_refused_not_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"state_dict": small().state_dict(), "cfg": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights-only"):
        load_backbone(small(), tmp_path / "evil.pth")


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_backbone(small(), tmp_path / "nope.safetensors")


def test_strip_prefixes_every_key_repeatedly():
    out = strip_prefixes({"module.backbone.a": 1, "model.b": 2, "c": 3, "backbone.module.d": 4})
    assert out == {"a": 1, "b": 2, "c": 3, "d": 4}
    with pytest.raises(ValueError, match="both become"):
        strip_prefixes({"module.a": 1, "a": 2})


def test_safetensors_header_holds_json_meta(tmp_path):
    from safetensors import safe_open

    path = save_backbone(tmp_path / "b.safetensors", small().state_dict(),
                         {**META, "backbone": "Res16UNet14A", "layers": SMALL["layers"], "planes": SMALL["planes"],
                          "in_channels": 3})
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["harness"])
    assert meta["method"] == "csc"
