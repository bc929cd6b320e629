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


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_not_unpickled_and_the_weights_still_load(tmp_path, capsys):
    """A pickled object whose class weights_only refuses is read as an inert stand-in: its
    reduce function (print here) never runs, and the report names the entry."""
    src = small()
    torch.save({"state_dict": src.state_dict(), "cfg": _Evil()}, tmp_path / "evil.pth")
    rep = load_backbone(small(), tmp_path / "evil.pth")
    assert "unpickled!" not in capsys.readouterr().out
    assert rep.ignored == {"cfg": "builtins.print"} and len(rep.loaded) == len(src.state_dict())


class _DictOfWeights(dict):
    pass


def test_an_object_that_cannot_be_stood_in_for_is_refused_with_the_reason(tmp_path):
    torch.save({"state_dict": _DictOfWeights(small().state_dict())}, tmp_path / "sub.pth")
    with pytest.raises(ValueError, match=r"sub\.pth: cannot read as a weights-only torch checkpoint "
                                         r"\(UnpicklingError: Can only SETITEMS") as err:
        load_backbone(small(), tmp_path / "sub.pth")
    assert "\x1b" not in str(err.value) and "weights_only` set to `False" not in str(err.value)


@pytest.mark.parametrize("zipped", [True, False])
def test_published_style_checkpoint_with_config_namespace_and_numpy_scalar(tmp_path, zipped):
    """PointContrast/CSC trainers save their OmegaConf config, downstream ones an
    argparse.Namespace and numpy best scores next to the weights (both torch.save formats)."""
    import argparse

    import numpy as np
    from omegaconf import OmegaConf

    torch.manual_seed(2)
    src = small(out_channels=32)
    obj = {"curr_iter": 3000, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()},
           "config": OmegaConf.create({"net": {"model": "Res16UNet14A", "planes": [8, 8]}, "opt": {"lr": 0.1}}),
           "args": argparse.Namespace(voxel_size=0.025), "best_val": np.float64(61.2)}
    torch.save(obj, tmp_path / "pc.pth", _use_new_zipfile_serialization=zipped)
    dst = small(out_channels=20)
    rep = load_backbone(dst, tmp_path / "pc.pth")
    assert set(rep.ignored) == {"config", "args", "best_val"}
    assert rep.ignored["config"] == "omegaconf.dictconfig.DictConfig" and rep.ignored["args"] == "argparse.Namespace"
    assert rep.meta == {"curr_iter": 3000} and set(rep.skipped) == {"final.kernel", "final.bias"}
    assert torch.equal(dst.block8[0].conv2.kernel, src.block8[0].conv2.kernel)


def test_files_are_told_apart_by_their_bytes_not_their_suffix(tmp_path):
    path = save_backbone(tmp_path / "b.safetensors", small(), META)
    (tmp_path / "b.st").write_bytes(path.read_bytes())
    assert read_checkpoint(tmp_path / "b.st")[1]["method"] == "csc"
    torch.save({"state_dict": small().state_dict()}, tmp_path / "x.pth")
    (tmp_path / "x.safetensors").write_bytes((tmp_path / "x.pth").read_bytes())
    assert len(read_checkpoint(tmp_path / "x.safetensors")[0]) == len(small().state_dict())


def test_a_page_or_a_truncated_file_is_named_for_what_it_is(tmp_path):
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(ValueError, match=r"page\.pth: not a checkpoint.*HTML or XML page"):
        load_backbone(small(), tmp_path / "page.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="it is empty"):
        load_backbone(small(), tmp_path / "empty.pth")
    torch.save({"state_dict": small().state_dict()}, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth: cannot read") as err:
        load_backbone(small(), tmp_path / "cut.pth")
    assert "re-save" not in str(err.value)
    path = save_backbone(tmp_path / "b.safetensors", small(), META)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"b\.safetensors: cannot read as safetensors"):
        load_backbone(small(), path)


def test_a_deeper_network_is_refused_unless_allowed(tmp_path):
    deep = build_backbone("Res16UNet14A", in_channels=3, out_channels=4, backend="torch",
                          layers=(2, 1, 1, 1, 1, 1, 1, 1), planes=SMALL["planes"])
    torch.save({"state_dict": deep.state_dict()}, tmp_path / "deep.pth")
    with pytest.raises(ValueError, match=r"belong to modules this .* lacks, e\.g\. \['block1\.1\."):
        load_backbone(small(), tmp_path / "deep.pth")
    rep = load_backbone(small(), tmp_path / "deep.pth", allow_unexpected=True)
    assert all(k.startswith("block1.1.") for k in rep.skipped) and rep.skipped
    # tensors of modules the network has no part of (a pre-training head) are only skipped
    sd = {**small().state_dict(), "projector.0.weight": torch.zeros(4, 4)}
    torch.save(sd, tmp_path / "head.pth")
    assert load_backbone(small(), tmp_path / "head.pth").skipped == {"projector.0.weight": "unexpected"}


def test_every_expected_meta_key_is_checked_or_reported_unchecked(tmp_path, caplog):
    path = save_backbone(tmp_path / "b.safetensors", small(), META)
    with pytest.raises(ValueError, match=r"'method': expected 'pointcontrast', found 'csc'"):
        load_backbone(small(), path, expect={"method": "pointcontrast"})
    with pytest.raises(ValueError, match=r"'input_features': expected 'xyz', found 'rgb'"):
        load_backbone(small(), path, expect={"input_features": "xyz"})
    with pytest.raises(ValueError, match="unknown meta key.*voxelsize"):
        load_backbone(small(), path, expect={"voxelsize": 0.02})
    torch.save({"state_dict": small().state_dict()}, tmp_path / "old.pth")
    with caplog.at_level(logging.WARNING, logger="harness.backbones.checkpoint"):
        rep = load_backbone(small(), tmp_path / "old.pth", expect={"voxel_size": 0.02})
    assert rep.unchecked == ["voxel_size"] and "records no voxel_size" in caplog.text


def test_extra_prefixes_are_stripped(tmp_path):
    src = small()
    torch.save({f"encoder_q.{k}": v for k, v in src.state_dict().items()}, tmp_path / "moco.pth")
    with pytest.raises(ValueError, match="extra_prefixes"):
        load_backbone(small(), tmp_path / "moco.pth")
    dst = small()
    load_backbone(dst, tmp_path / "moco.pth", extra_prefixes=("encoder_q.",))
    assert torch.equal(dst.conv0p1s1.kernel, src.conv0p1s1.kernel)


def test_save_takes_an_omegaconf_config(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"optimizer": {"betas": [0.9, 0.99], "lr": "${base}"}, "base": 0.1})
    path = save_backbone(tmp_path / "b.safetensors", small(), {**META, "config": cfg})
    assert read_checkpoint(path)[1]["config"] == {"optimizer": {"betas": [0.9, 0.99], "lr": 0.1}, "base": 0.1}


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
