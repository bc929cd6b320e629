"""Configs: omegaconf YAML files checked against dataclass schemas.

Every YAML under ``configs/`` has a schema (a dataclass): method YAMLs the method's ``Config``,
dataset and task YAMLs theirs, sweep YAMLs ``SweepConfig`` below. A misspelt key or a wrong
type fails at load with a ``ConfigError`` naming the file and the full dotted key; command-line
``key=value`` overrides go through the same check.

Torch-free: the CLI validates a sweep (``--dry-run``) without loading a model.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.api import GROUPS
from harness.registry import DATASETS, METHODS, TASKS, RegistryError


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file, the key and the value."""


class ClusterError(RuntimeError):
    """The cluster cannot be asked what a launch needs to know (e.g. squeue does not answer);
    nothing was submitted. Like ConfigError, one line for the user, not a traceback."""


# ----------------------------------------------------------------------------------------------
# Shared schemas


@dataclass
class BackboneConfig:
    # Registered backbone variant (Res16UNet34C = the paper's network, Res16UNet14A = small).
    name: str = "Res16UNet34C"
    # Override the variant's LAYERS / PLANES (8 entries each); null keeps the published values.
    layers: Optional[List[int]] = None
    planes: Optional[List[int]] = None
    # auto = minkowski when MinkowskiEngine imports, else the pure-PyTorch backend.
    backend: str = "auto"


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.0
    weight_decay: float = 1e-4
    # Multiplier of lr for parameters outside the backbone (e.g. KITTI's head x40).
    head_lr_scale: float = 1.0


@dataclass
class ScheduleConfig:
    # poly: lr * (1 - step/steps)^power | step: lr * gamma^(step // step_size)
    # cosine: half cosine to 0 | multistep: lr * gamma^(milestones passed) | constant
    name: str = "poly"
    power: float = 0.9
    gamma: float = 0.1
    step_size: int = 1000
    # multistep milestones as fractions of the run's steps (0.444 = epoch 80 of 180)
    milestones: List[float] = field(default_factory=list)


@dataclass
class TrainerConfig:
    # Write a resumable checkpoint every N steps (and on SIGUSR1/SIGTERM); 0 = only at the end.
    checkpoint_every: int = 100
    log_every: int = 10
    # Evaluate on the validation split every N steps for the training curves; 0 = only at the end.
    eval_every: int = 0
    # bf16 autocast on CPU / fp16 on CUDA.
    amp: bool = False
    # On CUDA, float32 matrix products and convolutions may use TF32 tensor cores (PyTorch's own
    # default for cuDNN convolutions; the sparse convolutions are matrix products). Measured:
    # Res16UNet34C fwd+bwd at 100k voxels on an H100, 39-44 ms per step against 55-60 ms in IEEE
    # float32 (commit 8762cb2; python -m bench.gpu_sweep, bench/backbone.py). false = IEEE float32 throughout.
    tf32: bool = True
    # Stop with an error after this many non-finite losses in a row.
    max_bad_steps: int = 5
    # Several processes per job: seconds a collective operation (gradient all-reduce, barrier) waits
    # for the other ranks before the job fails (a dead or stuck rank must not hang the job).
    collective_timeout_s: float = 600.0
    # Several processes: DDP looks for parameters without a gradient after each forward (robust for
    # models that leave some unused; false is a little faster when every parameter gets a gradient).
    find_unused_parameters: bool = True


# ----------------------------------------------------------------------------------------------
# Sweep schema


@dataclass
class ColumnConfig:
    """One Table-1 column: a (dataset, task) pair with its fine-tuning recipe overrides."""

    dataset: str = "???"
    task: str = "???"
    # Overrides of configs/tasks/<task>.yaml for this column (checked against the task schema).
    recipe: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LocalLauncherConfig:
    # Jobs that run at once on this machine; torch threads per job = cpus // parallel.
    parallel: int = 1
    cpus: int = 0  # 0 = all CPUs of this machine
    # "local" runs each job in a subprocess (submitit LocalExecutor); "debug" in this process.
    executor: str = "local"
    timeout_min: int = 600
    # Processes per job (DistributedDataParallel, gloo on CPU / NCCL on GPUs; needs executor: local);
    # each gets cpus // (parallel x tasks_per_node) threads and, with GPUs, one GPU.
    tasks_per_node: int = 1
    # GPUs each job sees (0 = none: submitit hides every GPU from a job given none); null = one
    # per process of a job where this machine has CUDA and the sweep's device is not cpu, else 0.
    # Each job gets the GPUs that the fewest running jobs are using.
    gpus_per_node: Optional[int] = None


@dataclass
class SlurmStageConfig:
    """Per-stage overrides (launcher.slurm.pretrain / .finetune): null = the launcher.slurm value."""

    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    timeout_min: Optional[int] = None
    nodes: Optional[int] = None
    tasks_per_node: Optional[int] = None
    additional_parameters: Dict[str, Any] = field(default_factory=dict)


@dataclass
class SlurmLauncherConfig:
    # sbatch --partition (null = the cluster's default partition)
    partition: Optional[str] = None
    # sbatch --account / --qos / --constraint (null = not passed)
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    # GPUs per node (0 = none requested); CPUs per task (= torch threads); memory per node (0 = site default)
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 32
    # Time limit of one job (minutes); a job reaching it is checkpointed and requeued.
    timeout_min: int = 24 * 60
    nodes: int = 1
    # Processes per node (one per GPU for multi-GPU training; launched by srun).
    tasks_per_node: int = 1
    # Cap on fine-tuning array tasks running at once (sbatch --array=...%N).
    array_parallelism: int = 32
    # Extra sbatch parameters, e.g. {mail-type: END, exclude: "node[01-02]"}.
    additional_parameters: Dict[str, Any] = field(default_factory=dict)
    # Shell lines run in the job before the harness starts (module load ..., source venv/bin/activate).
    setup: List[str] = field(default_factory=list)
    # Seconds before the time limit at which SLURM sends submitit's checkpoint signal (USR2).
    signal_delay_s: int = 90
    # Requeues after reaching the time limit before a job counts as failed (preemptions: unlimited).
    max_num_timeout: int = 3
    # Follow the jobs until they end (false or --no-wait: submit, print the job ids, return).
    wait: bool = True
    # Seconds between two looks at squeue and the store while waiting.
    poll_s: float = 10.0
    # Stop waiting (jobs keep running) when squeue has not answered for this long.
    unreachable_min: float = 10.0
    # Stop waiting after this long in all (jobs keep running; --status, or re-run to collect); 0 = no limit.
    max_wait_min: float = 0.0
    # Per-stage overrides of the resource fields above.
    pretrain: SlurmStageConfig = field(default_factory=SlurmStageConfig)
    finetune: SlurmStageConfig = field(default_factory=SlurmStageConfig)


@dataclass
class LauncherConfig:
    name: str = "local"  # local | slurm
    local: LocalLauncherConfig = field(default_factory=LocalLauncherConfig)
    slurm: SlurmLauncherConfig = field(default_factory=SlurmLauncherConfig)


@dataclass
class ReportConfig:
    """How ``harness report`` decides significance and what it writes (see harness/reporting/stats.py)."""

    # Significance level of the paired t-test over seeds (delta against Scratch, bold best of group).
    alpha: float = 0.05
    # Multiple-comparison correction over the deltas of one table: none | holm (Holm-Bonferroni).
    correction: str = "none"
    # Files written under runs/<sweep>/report/: any of md, csv, tex, html, png.
    formats: List[str] = field(default_factory=lambda: ["md", "csv", "tex", "html", "png"])
    # Put reproduced and published values side by side: null | published | path/to/table.csv.
    compare: Optional[str] = None
    # Decimals of the printed values (percent).
    digits: int = 1


@dataclass
class SweepConfig:
    name: str = "???"
    # Where runs/<name>/ goes (results, checkpoints, logs, reports).
    output_dir: str = "runs"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # Methods (rows of Table 1), each with overrides of configs/methods/<name>.yaml.
    methods: Dict[str, Any] = field(default_factory=dict)
    # Pre-training always uses ScanNet; this names its dataset entry below.
    pretrain_dataset: str = "scannet"
    # Datasets by registered name, each with overrides of configs/datasets/<name>.yaml.
    datasets: Dict[str, Any] = field(default_factory=dict)
    # Overrides of configs/tasks/<task>.yaml applied to every column of that task.
    tasks: Dict[str, Any] = field(default_factory=dict)
    # Table-1 columns by id (e.g. scannet-semseg).
    columns: Dict[str, ColumnConfig] = field(default_factory=dict)
    seeds: List[int] = field(default_factory=lambda: [0])
    device: str = "auto"  # auto | cpu | cuda
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


# ----------------------------------------------------------------------------------------------
# Loading


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).split("\n")[0]
    return f"key '{key}': {msg}" if key else msg


def load_yaml(path: Union[str, Path]) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: expected a mapping at the top level, got a {type(cfg).__name__}")
    return cfg


def _known_keys(cfg: DictConfig, schema: type, key: str, full: str, guess: bool = True) -> str:
    """" Known keys of <parent>: ..." of the mapping that lacks ``key`` (a nested one's own keys),
    after a guess at the one meant (where ``guess``)."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    known = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else [f.name for f in fields(schema)]
    close = difflib.get_close_matches(leaf, known, n=1) or [k for k in known if leaf and k.startswith(leaf)][:1]
    label = full.rpartition(".")[0]
    return (f" Did you mean '{close[0]}'?" if guess and close else "") \
        + f" Known keys{f' of {label}' if label else ''}: " + ", ".join(known)


def structured(schema: type, *layers: Any, where: Sequence[str] = (), prefix: str = "") -> DictConfig:
    """Merge ``layers`` (dicts or DictConfigs) onto ``schema``; errors name ``where[i]`` and the key.

    ``where[i]`` describes layer i (a file path or "override"); ``prefix`` is the dotted path of
    this config inside a larger one, so a nested error reads ``methods.csc.lr``.
    """
    if not is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass schema")
    cfg = OmegaConf.structured(schema)
    for i, layer in enumerate(layers):
        if layer is None:
            continue
        source = where[i] if i < len(where) else "override"
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or ""
            full = f"{prefix}.{key}" if prefix and key else (prefix or key)
            detail = str(exc).split("\n")[0]
            if "not in" in detail or "Key '" in detail and "not in" in detail:
                raise ConfigError(f"{source}: unknown key '{full}' ({detail})."
                                  f"{_known_keys(cfg, schema, key, full, guess='Did you mean' not in detail)}") from exc
            raise ConfigError(f"{source}: bad value for '{full}': {detail}") from exc
    OmegaConf.set_readonly(cfg, False)
    return cfg


def parse_overrides(items: Iterable[str]) -> DictConfig:
    """``a.b=1`` style command-line overrides as one DictConfig."""
    items = list(items)
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. seeds=[0,1])")
    try:
        return OmegaConf.from_dotlist(items)
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        for item in items:  # name the override at fault
            try:
                OmegaConf.from_dotlist([item])
            except (OmegaConfBaseException, yaml.YAMLError) as one:
                why = _describe(one) if isinstance(one, OmegaConfBaseException) else " ".join(
                    str(x) for x in (getattr(one, "problem", None), getattr(one, "context", None)) if x) or str(one)
                raise ConfigError(f"bad override {item!r}: {why}") from exc
        raise ConfigError(f"bad override: {_describe(exc) if isinstance(exc, OmegaConfBaseException) else exc}") from exc


def to_plain(cfg: Any) -> Any:
    """Plain Python data (dicts, lists, scalars) of an omegaconf config or a dataclass instance."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    if is_dataclass(cfg) and not isinstance(cfg, type):
        from dataclasses import asdict

        return asdict(cfg)
    return cfg


def config_hash(*parts: Any) -> str:
    """Stable short hash of plain or omegaconf data (the identity of a job's result)."""
    blob = json.dumps([to_plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Plugin configs (method / dataset / task YAMLs)


def default_config_root() -> Path:
    env = os.environ.get("HARNESS_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "configs"


def plugin_config(kind: str, name: str, overrides: Any = None, root: Optional[Path] = None,
                  prefix: str = "", layers: Sequence[Any] = (), where: Sequence[str] = (),
                  source: str = "override") -> DictConfig:
    """The config of plugin ``name`` of ``kind`` (method | dataset | task).

    Schema: the registered class's ``Config``; file: ``configs/<kind>s/<name>.yaml`` when it
    exists; then ``overrides`` (from the sweep or the command line), then further ``layers``
    described by ``where``. ``source`` names where ``overrides`` come from, for errors.
    """
    registry = {"method": METHODS, "dataset": DATASETS, "task": TASKS}[kind]
    try:
        cls = registry.get(name, where=", ".join(x for x in (source if source != "override" else "", prefix) if x))
    except RegistryError as exc:
        raise ConfigError(str(exc)) from exc
    root = Path(root) if root is not None else default_config_root()
    path = root / f"{kind}s" / f"{name}.yaml"
    file_cfg = load_yaml(path) if path.is_file() else None
    if file_cfg is not None and kind in file_cfg and file_cfg[kind] != name:
        raise ConfigError(f"{path}: '{kind}: {file_cfg[kind]}' does not match the file name '{name}'")
    base = {kind: name}
    cfg = structured(cls.Config, base, file_cfg, overrides, *layers,
                     where=("", str(path), source, *where), prefix=prefix)
    try:  # interpolations (e.g. ${oc.env:SCANNET_ROOT}) fail here, not deep inside a job
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = ".".join(x for x in (prefix, str(getattr(exc, "full_key", "") or "")) if x)
        raise ConfigError(f"{source}: {key}: {str(exc).splitlines()[0]}") from exc
    return cfg


# ----------------------------------------------------------------------------------------------
# Sweeps


@dataclass
class ResolvedSweep:
    """A sweep with every plugin config merged and checked; what the planner expands."""

    path: Path
    cfg: DictConfig  # the SweepConfig
    methods: Dict[str, DictConfig]
    datasets: Dict[str, DictConfig]
    columns: Dict[str, DictConfig]  # column id -> task config (recipe merged)

    @property
    def name(self) -> str:
        return str(self.cfg.name)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir) / self.name


def load_sweep(path: Union[str, Path], overrides: Iterable[str] = (), config_root: Optional[Path] = None,
               methods: Optional[Sequence[str]] = None, columns: Optional[Sequence[str]] = None) -> ResolvedSweep:
    """Load a sweep YAML, apply overrides and resolve every method, dataset and task config.
    ``methods`` / ``columns`` keep only those rows / columns of the sweep (a quick partial run)."""
    path = Path(path)
    file_cfg = load_yaml(path)
    over = parse_overrides(overrides)
    cfg = structured(SweepConfig, file_cfg, over, where=(str(path), "command-line override"))
    _select(cfg, "methods", methods, path)
    if columns is not None:
        _select(cfg, "columns", columns, path)
        used_datasets = {cfg.pretrain_dataset, *(c.dataset for c in cfg.columns.values())}
        used_tasks = {c.task for c in cfg.columns.values()}
        for name in [n for n in cfg.datasets if n not in used_datasets]:
            del cfg.datasets[name]
        for name in [n for n in cfg.tasks if n not in used_tasks]:
            del cfg.tasks[name]
    root = Path(config_root) if config_root is not None else _config_root_for(path)
    for key in ("name",):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{path}: missing required key '{key}'")
    if not cfg.methods:
        raise ConfigError(f"{path}: 'methods' is empty: name at least one method")
    check_report_config(cfg.report, str(path))
    check_backbone_and_device(cfg, str(path))

    def source(section: str, name: str) -> str:
        """Where a plugin's settings come from, for its errors."""
        touched = isinstance(over.get(section), Mapping) and name in over.get(section)
        return f"{path} + command-line override" if touched else str(path)

    methods: Dict[str, DictConfig] = {}
    for name, extra in cfg.methods.items():
        methods[name] = plugin_config("method", method_of(name, extra), extra, root, prefix=f"methods.{name}",
                                      source=source("methods", name))
        group = methods[name].get("group") or METHODS.get(methods[name].method).group
        if group not in GROUPS:
            raise ConfigError(f"{path}: methods.{name}.group: {group!r} is not a row group of Table 1 "
                              f"({', '.join(GROUPS)})")

    pre_cls = DATASETS.get(cfg.pretrain_dataset, where=f"{path}: pretrain_dataset")
    for name, mcfg in methods.items():
        wants = [c for c in METHODS.get(mcfg.method).consumes if c != "scenes"]
        if wants and not pre_cls.has_frames:
            raise ConfigError(f"{path}: pretrain_dataset: {cfg.pretrain_dataset} has no RGB-D frames, which "
                              f"methods.{name} consumes ({', '.join(wants)}); pre-training uses scannet")

    # Datasets used: the pre-training one plus every column's.
    used = [cfg.pretrain_dataset] + [c.dataset for c in cfg.columns.values()]
    datasets: Dict[str, DictConfig] = {}
    for name in dict.fromkeys(used):
        datasets[name] = plugin_config("dataset", name, cfg.datasets.get(name), root, prefix=f"datasets.{name}",
                                       source=source("datasets", name))
    for name in cfg.datasets:
        if name not in datasets:
            close = difflib.get_close_matches(str(name), list(datasets), n=1)
            raise ConfigError(f"{path}: datasets.{name} is configured but no column or pre-training uses it"
                              + (f" (did you mean '{close[0]}'?)" if close else f" (used: {', '.join(datasets)})"))

    for task, task_over in cfg.tasks.items():  # checked alone first, so that an error names tasks.<task>.<key>
        plugin_config("task", task, task_over, root, prefix=f"tasks.{task}", source=source("tasks", task))
    columns: Dict[str, DictConfig] = {}
    for cid, col in cfg.columns.items():
        for key in ("dataset", "task"):
            if OmegaConf.is_missing(col, key):
                raise ConfigError(f"{path}: columns.{cid}.{key} is required")
        task_cfg = plugin_config("task", col.task, cfg.tasks.get(col.task), root, prefix=f"columns.{cid}",
                                 layers=[col.recipe], where=[f"{path} (columns.{cid}.recipe)"],
                                 source=f"{path} (tasks.{col.task})")
        ds_cls = DATASETS.get(col.dataset)
        if ds_cls.tasks and col.task not in ds_cls.tasks:
            raise ConfigError(f"{path}: columns.{cid}: dataset '{col.dataset}' has no labels for task "
                              f"'{col.task}' (it supports {', '.join(ds_cls.tasks)})")
        columns[cid] = task_cfg
    return ResolvedSweep(path=path, cfg=cfg, methods=methods, datasets=datasets, columns=columns)


def method_of(row: str, cfg: Any) -> str:
    """The registered method of a sweep's row: its config's ``method`` where it names one (rows
    of one method under several names, e.g. two published checkpoints), else the row's name."""
    if isinstance(cfg, Mapping) and cfg.get("method"):
        return str(cfg.get("method"))
    return row


def _select(cfg: DictConfig, key: str, names: Optional[Sequence[str]], path: Path) -> None:
    """Keep only ``names`` of the sweep's ``key`` (methods or columns), in the sweep's order."""
    if names is None:
        return
    known = list(cfg[key])
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"{path}: --{key} {','.join(names)}: " + (f"{', '.join(unknown)} not in" if unknown else
                          "name at least one of") + f" the sweep's {key} ({', '.join(known)})")
    for name in known:
        if name not in names:
            del cfg[key][name]


REPORT_FORMATS = ("md", "csv", "tex", "html", "png")
CORRECTIONS = ("none", "holm")


def check_backbone_and_device(cfg: Any, source: str) -> None:
    """What every job of the sweep would otherwise fail on, found before anything runs."""
    from harness.backbones import BACKENDS, canonical_name

    try:
        canonical_name(cfg.backbone.name)
    except ValueError as exc:
        raise ConfigError(f"{source}: backbone.name: {exc}") from None
    if cfg.backbone.backend not in BACKENDS:
        raise ConfigError(f"{source}: backbone.backend must be one of {', '.join(BACKENDS)}, "
                          f"got {cfg.backbone.backend!r}")
    for key in ("layers", "planes"):
        value = cfg.backbone[key]
        if value is not None and (len(value) != 8 or any(int(v) < 1 for v in value)):
            raise ConfigError(f"{source}: backbone.{key} must be 8 positive integers (one per stage of the "
                              f"U-Net), got {list(value)}")
    device = str(cfg.device)
    if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:") and device[5:].isdigit()):
        raise ConfigError(f"{source}: device must be auto, cpu, cuda or cuda:N, got {device!r}")


def check_report_config(report: Any, source: str) -> None:
    """Values of ``report:`` that the schema's types cannot check."""
    if not 0.0 < float(report.alpha) < 1.0:
        raise ConfigError(f"{source}: report.alpha must be in (0, 1), got {report.alpha}")
    if report.correction not in CORRECTIONS:
        raise ConfigError(f"{source}: report.correction must be one of {', '.join(CORRECTIONS)}, "
                          f"got {report.correction!r}")
    bad = [f for f in report.formats if f not in REPORT_FORMATS]
    if bad:
        raise ConfigError(f"{source}: report.formats: unknown format(s) {', '.join(map(repr, bad))}; "
                          f"known: {', '.join(REPORT_FORMATS)}")
    if report.compare not in (None, "published") and not Path(report.compare).is_file():
        raise ConfigError(f"{source}: report.compare must be null, 'published' or an existing CSV file, "
                          f"got {report.compare!r}")
    if not 0 <= int(report.digits) <= 4:
        raise ConfigError(f"{source}: report.digits must be between 0 and 4, got {report.digits}")


def _config_root_for(sweep_path: Path) -> Path:
    """configs/ is the parent of the sweep's folder when it is configs/sweeps/, else the default."""
    parent = sweep_path.resolve().parent
    if parent.name == "sweeps" and (parent.parent / "methods").is_dir():
        return parent.parent
    return default_config_root()
