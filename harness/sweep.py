"""Expand a sweep into jobs: one pre-training job per (method, seed), then one fine-tuning job per
(method, column, seed) that starts from that method's exported checkpoint.

A job is a small picklable ``JobSpec`` (names, plain configs, paths): the job function rebuilds
everything in the worker from registry names, so the same spec runs in this process, in a local
subprocess or on a SLURM node. Each job's config hash covers everything that can move its
numbers (a fine-tuning hash includes its pre-training hash), so re-running a sweep skips exactly
the jobs whose inputs did not change.

Torch-free (``--dry-run`` plans without loading a model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from harness.config import ResolvedSweep, config_hash, to_plain
from harness.registry import METHODS, TASKS

PRETRAIN, FINETUNE = "pretrain", "finetune"


@dataclass
class JobSpec:
    kind: str  # pretrain | finetune
    id: str
    method: str
    seed: int
    run_dir: str  # runs/<sweep>
    method_cfg: Dict[str, Any]
    backbone: Dict[str, Any]
    trainer: Dict[str, Any]
    device: str
    dataset: str  # registered name (pre-training: the ScanNet entry)
    dataset_cfg: Dict[str, Any]
    column: Optional[str] = None
    task: Optional[str] = None
    task_cfg: Optional[Dict[str, Any]] = None
    pretrain_id: Optional[str] = None
    pretrain_hash: Optional[str] = None
    config_hash: str = ""
    threads: int = 0
    # SLURM / multi-process layout (the launcher fills it; 1 task = plain single process)
    tasks_per_node: int = 1
    nodes: int = 1
    # Pre-training runs inside the fine-tuning job for methods that consume no data (Scratch).
    inline_pretrain: bool = False

    @property
    def workdir(self) -> Path:
        return Path(self.run_dir) / ("pretrain" if self.kind == PRETRAIN else "cells") / self.id

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class Plan:
    sweep: str
    run_dir: Path
    pretrain: List[JobSpec] = field(default_factory=list)
    finetune: List[JobSpec] = field(default_factory=list)
    columns: List[str] = field(default_factory=list)
    methods: List[str] = field(default_factory=list)
    seeds: List[int] = field(default_factory=list)
    groups: Dict[str, str] = field(default_factory=dict)  # method -> Table-1 row group
    report: Dict[str, Any] = field(default_factory=dict)  # the sweep's report settings (ReportConfig)

    @property
    def jobs(self) -> List[JobSpec]:
        return self.pretrain + self.finetune

    def to_dict(self) -> Dict[str, Any]:
        return {"sweep": self.sweep, "run_dir": str(self.run_dir), "columns": self.columns, "methods": self.methods,
                "groups": self.groups, "seeds": self.seeds, "report": self.report, "jobs": [j.to_dict() for j in self.jobs]}


def pretrain_id(method: str, seed: int) -> str:
    return f"{method}__s{seed}"


def cell_id(method: str, column: str, seed: int) -> str:
    return f"{method}__{column}__s{seed}"


def data_identity(dataset_cfg: Any) -> Dict[str, Any]:
    """A dataset's settings as far as they decide results: where its caches go does not (a cache
    moved to a shared file system must not make every finished or running job stale)."""
    plain = dict(to_plain(dataset_cfg) or {})
    plain.pop("cache_dir", None)
    return plain


def make_plan(sweep: ResolvedSweep) -> Plan:
    cfg = sweep.cfg
    run_dir = sweep.run_dir
    backbone = to_plain(cfg.backbone)
    trainer = to_plain(cfg.trainer)
    plan = Plan(sweep.name, run_dir, columns=list(sweep.columns), methods=list(sweep.methods), seeds=list(cfg.seeds),
                report=to_plain(cfg.report))
    pre_ds = cfg.pretrain_dataset
    for method, mcfg in sweep.methods.items():
        cls = METHODS.get(mcfg.method)
        plan.groups[method] = mcfg.get("group") or cls.group
        inline = len(cls.consumes) == 0
        for seed in cfg.seeds:
            method_cfg = to_plain(mcfg)
            inputs = cls.fingerprint(mcfg)
            p_hash = config_hash("pretrain", method, getattr(cls, "version", "1"), method_cfg, backbone,
                                 data_identity(sweep.datasets[pre_ds]) if not inline else None, seed,
                                 *([inputs] if inputs else []))
            p_id = pretrain_id(method, seed)
            p_spec = JobSpec(PRETRAIN, p_id, method, seed, str(run_dir), method_cfg, backbone, trainer, cfg.device,
                             pre_ds, to_plain(sweep.datasets[pre_ds]), config_hash=p_hash)
            if not inline:
                plan.pretrain.append(p_spec)
            for column, task_cfg in sweep.columns.items():
                col = cfg.columns[column]
                task_plain = to_plain(task_cfg)
                ds_plain = to_plain(sweep.datasets[col.dataset])
                task_cls = TASKS.get(col.task)
                f_hash = config_hash("finetune", method, col.task, getattr(task_cls, "version", "1"), task_plain,
                                     data_identity(ds_plain), backbone, p_hash, seed)
                plan.finetune.append(JobSpec(
                    FINETUNE, cell_id(method, column, seed), method, seed, str(run_dir), method_cfg, backbone, trainer,
                    cfg.device, col.dataset, ds_plain, column=column, task=col.task, task_cfg=task_plain,
                    pretrain_id=p_id, pretrain_hash=p_hash, config_hash=f_hash, inline_pretrain=inline))
    return plan
