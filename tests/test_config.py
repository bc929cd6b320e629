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
    assert str(p) in msg and "columns.scannet-semseg.optimizer.lrr" in msg


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


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_sweep("configs/sweeps/nope.yaml")


def test_task_not_supported_by_dataset(tmp_path, monkeypatch):
    from harness.data.scannet import ScanNet

    monkeypatch.setattr(ScanNet, "tasks", ("detection",))
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError, match="no labels for task 'semseg'"):
        load_sweep(p)
