"""Configs: schemas refuse misspelt keys and wrong types, naming the file and the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import ConfigError, load_sweep

REPO = Path(__file__).resolve().parent.parent
TABLE1 = REPO / "configs" / "sweeps" / "table1.yaml"


def write(tmp_path: Path, text: str) -> Path:
    sweeps = tmp_path / "configs" / "sweeps"
    sweeps.mkdir(parents=True)
    for kind in ("methods", "datasets", "tasks"):
        (tmp_path / "configs" / kind).mkdir()
    for f in (REPO / "configs" / "tasks").glob("*.yaml"):
        (tmp_path / "configs" / "tasks" / f.name).write_text(f.read_text())
    p = sweeps / "s.yaml"
    p.write_text(text)
    return p


BASE = """
name: s
methods: {scratch: {}}
columns:
  scannet-semseg: {dataset: scannet, task: semseg}
"""


def test_table1_loads_and_overrides_apply():
    s = load_sweep(TABLE1, ["tasks.semseg.steps=7", "seeds=[0,1]"])
    assert s.columns["scannet-semseg"].steps == 7
    assert list(s.cfg.seeds) == [0, 1]
    assert s.methods["scratch"].method == "scratch"


def test_misspelt_top_level_key_names_file_and_key(tmp_path):
    p = write(tmp_path, BASE + "seedz: [0]\n")
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    assert str(p) in str(e.value) and "'seedz'" in str(e.value)


def test_misspelt_task_key_names_dotted_path(tmp_path):
    p = write(tmp_path, BASE + "tasks:\n  semseg: {optimizer: {lrr: 0.1}}\n")
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    msg = str(e.value)
    assert str(p) in msg and "'tasks.semseg.optimizer.lrr'" in msg
    # the same key misspelt in one column's recipe names that column
    p = write(tmp_path / "recipe", BASE.replace("task: semseg}", "task: semseg, recipe: {optimizer: {lrr: 0.1}}}"))
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    assert "(columns.scannet-semseg.recipe)" in str(e.value) and "optimizer.lrr" in str(e.value)


def test_wrong_type_is_refused(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="steps"):
        load_sweep(p, ["tasks.semseg.steps=many"])


def test_unknown_method_lists_known_names(tmp_path):
    p = write(tmp_path, BASE.replace("scratch: {}", "scrtch: {}"))
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    msg = str(e.value)
    assert "Unknown method 'scrtch'" in msg and "Did you mean: scratch?" in msg and str(p) in msg


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_sweep(TABLE1, ["seeds"])
    # an unclosed bracket: one error naming the override, not a YAML parser traceback
    with pytest.raises(ConfigError, match=r"bad override 'methods\.csc=\{steps: 100': did not find expected"):
        load_sweep(TABLE1, ["seeds=[0]", "methods.csc={steps: 100"])


def test_cli_errors_keep_their_quotes():
    from tests._sweeps import cli

    rc, _, err = cli("sweep", TABLE1, "report.correction=bonferroni", "--dry-run")
    assert rc == 2 and err.strip().endswith("got 'bonferroni'"), err


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_sweep("configs/sweeps/nope.yaml")


def test_task_not_supported_by_dataset(tmp_path, monkeypatch):
    from harness.data.scannet import ScanNet

    monkeypatch.setattr(ScanNet, "tasks", ("detection",))
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="no labels for task 'semseg'"):
        load_sweep(p)


def test_paper_sweep_resolves_and_names_a_missing_data_root(monkeypatch):
    """table1-paper.yaml: every method, task and column recipe passes the schemas (roots pointed
    at the embedded data here, the image-guided encoder said to start at random), and an unset
    root or ImageNet-weights variable is one error naming file, key and variable."""
    from harness.sweep import make_plan

    paper = REPO / "configs" / "sweeps" / "table1-paper.yaml"
    embedded = [f"datasets.{d}.root=null" for d in ("scannet", "s3dis", "semantickitti", "sunrgbd")]
    monkeypatch.delenv("IMAGENET_RESNET18", raising=False)
    with pytest.raises(ConfigError, match=r"table1-paper.yaml: methods.image_guided.stage1.encoder_weights: "
                                          r".*IMAGENET_RESNET18"):
        load_sweep(paper, embedded)
    sweep = load_sweep(paper, embedded + ["methods.image_guided.stage1.encoder_weights=null"])
    plan = make_plan(sweep)
    assert len(plan.pretrain) == 4 * 3 and len(plan.finetune) == 5 * 7 * 3  # Scratch needs no pre-training
    assert sweep.columns["semantickitti-semseg"].optimizer.head_lr_scale == 40.0
    assert sweep.columns["s3dis-semseg"].voxel_size == 0.05 and sweep.columns["scannet-semseg"].voxel_size == 0.02
    assert sweep.columns["sunrgbd-detection"].use_heading and not sweep.columns["scannet-detection"].use_heading
    # augmentations: CSC's ScanNet set by default, its S3DIS variant, none of it for KITTI, x-only flips on SUN RGB-D
    cols = sweep.columns
    assert cols["scannet-semseg"].augment.elastic == [[0.2, 0.4], [0.8, 1.6]] and cols["scannet-instseg"].augment.coord_shift == 100
    assert [cols[c].augment.clip_bound for c in ("s3dis-semseg", "s3dis-instseg")] == [4.0, 4.0]
    assert cols["s3dis-instseg"].augment.elastic == [] and cols["s3dis-instseg"].augment.color_noise == 1.275
    assert cols["semantickitti-semseg"].augment.elastic == [] and cols["semantickitti-semseg"].augment.point_dropout == 0
    assert cols["sunrgbd-detection"].augment.flip_axes == "x" and cols["scannet-detection"].augment.flip_axes == "xy"
    monkeypatch.delenv("SCANNET_ROOT", raising=False)
    with pytest.raises(ConfigError, match=r"table1-paper.yaml: datasets.scannet.root: .*SCANNET_ROOT"):
        load_sweep(paper, ["methods.image_guided.stage1.encoder_weights=null"])


def test_a_subset_of_rows_and_columns_plans_the_same_cells():
    """--methods/--columns keep only those rows and columns; the kept cells are the full sweep's
    own (same ids and config hashes), so a partial run and the full run share their results."""
    from harness.sweep import make_plan

    full = {j.id: j.config_hash for j in make_plan(load_sweep(TABLE1)).jobs}
    part = load_sweep(TABLE1, methods=["scratch", "csc"], columns=["scannet-semseg", "sunrgbd-detection"])
    assert list(part.methods) == ["scratch", "csc"] and list(part.columns) == ["scannet-semseg", "sunrgbd-detection"]
    assert sorted(part.datasets) == ["scannet", "sunrgbd"] and sorted(part.cfg.tasks) == ["detection", "semseg"]
    jobs = {j.id: j.config_hash for j in make_plan(part).jobs}
    assert sorted(jobs) == sorted(["csc__s0", "scratch__scannet-semseg__s0", "scratch__sunrgbd-detection__s0",
                                   "csc__scannet-semseg__s0", "csc__sunrgbd-detection__s0"])
    assert all(full[k] == h for k, h in jobs.items())
    with pytest.raises(ConfigError, match=r"--methods scratch,cs: cs not in the sweep's methods"):
        load_sweep(TABLE1, methods=["scratch", "cs"])


def test_a_nested_unknown_key_lists_its_own_mappings_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'tasks\.semseg\.augment\.max_pointz'.*"
                                          r"Known keys of tasks\.semseg\.augment: rotate_z, ") as err:
        load_sweep(TABLE1, ["tasks.semseg.augment.max_pointz=1"])
    assert "max_points" in str(err.value) and "output_dir" not in str(err.value)
    with pytest.raises(ConfigError, match=r"command-line override: unknown key 'launcher\.slurm\.gpus'.* "
                                          r"Did you mean 'gpus_per_node'\? Known keys of launcher\.slurm: "):
        load_sweep(TABLE1, ["launcher.slurm.gpus=1"])


def test_an_override_of_a_plugin_is_named_as_one():
    with pytest.raises(ConfigError, match=r"table1\.yaml \+ command-line override: unknown key 'methods\.csc\.stepz'"):
        load_sweep(TABLE1, ["methods.csc.stepz=10"])
    with pytest.raises(ConfigError, match=r"datasets\.scanet is configured but .* \(did you mean 'scannet'\?\)"):
        load_sweep(TABLE1, ["datasets.scanet={}"])


@pytest.mark.parametrize("override, message", [
    ("backbone.name=Res16UNet99", r"backbone\.name: Unknown backbone 'Res16UNet99'"),
    ("backbone.backend=mink", r"backbone\.backend must be one of auto, torch, minkowski, got 'mink'"),
    ("backbone.planes=[8,8]", r"backbone\.planes must be 8 positive integers .* got \[8, 8\]"),
    ("backbone.layers=[1,1,1,1,0,1,1,1]", r"backbone\.layers must be 8 positive integers"),
    ("device=tpu", r"device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
])
def test_settings_every_job_would_fail_on_stop_the_sweep_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(TABLE1, [override])
    load_sweep(TABLE1, ["backbone.name=res16unet34c", "device=cuda:0"])  # case-insensitive name; cuda:N


def test_a_pretraining_dataset_without_the_frames_a_method_consumes_is_refused():
    with pytest.raises(ConfigError, match=r"pretrain_dataset: s3dis has no RGB-D frames, which "
                                          r"methods\.pointcontrast consumes \(frame_pairs\)"):
        load_sweep(TABLE1, ["pretrain_dataset=s3dis"])
    load_sweep(TABLE1, ["pretrain_dataset=s3dis"], methods=["scratch"])  # Scratch reads no data


def test_moving_the_caches_keeps_every_jobs_identity():
    from harness.sweep import make_plan

    def hashes(*over):
        return {j.id: j.config_hash for j in make_plan(load_sweep(TABLE1, list(over))).jobs}

    here = hashes()
    assert hashes("datasets.scannet.cache_dir=/shared/cache", "datasets.s3dis.cache_dir=/shared/cache") == here
    moved = hashes("datasets.s3dis.root=/data/s3dis")  # other data: the S3DIS cells are other jobs
    assert {k for k in here if moved[k] != here[k]} == {k for k in here if "__s3dis-" in k}
