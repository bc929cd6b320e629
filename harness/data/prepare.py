"""``harness data prepare``: validate a release once, convert it to a memory-mapped cache.

Training reads only the cache. ``prepared(ds)`` returns an object with the dataset's
``scenes(split)``, ``load(scene)`` and class attributes whose ``load`` memory-maps per-scene
``.npy`` files from ``<cache_dir>/prepared/<dataset>-<key>/`` (``key`` hashes the resolved
root, the reader's version and its config); scenes not converted yet are converted on first use.
Each scene is written to a temporary folder and renamed into place, and ``manifest.json`` is
rewritten after each one, so an interrupted preparation resumes where it stopped and ends with
the same files as an uninterrupted one. A lock serialises concurrent preparations.

Layout::

    prepared/<dataset>-<key>/
      manifest.json                 # dataset, root, reader version, splits, per-scene arrays
      scenes/<scene with / as __>/  # <name>.npy per array of load(scene), meta.json for the rest

``prepare_command`` is what the CLI's ``harness data prepare DATASET --root PATH`` calls:
validation that names the first missing or corrupt file, conversion with a progress bar, and
a summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from harness.config import to_plain
from harness.data.cache import atomic_write_json, file_lock

log = logging.getLogger(__name__)

PREPARE_VERSION = 1
SPLITS = ("train", "val")
CLASS_ATTRS = ("class_names", "num_classes", "ignore_index", "instance_classes", "tasks", "has_frames", "voxel_size",
               "absent_class_iou")


def dataset_name(ds: Any) -> str:
    name = getattr(ds.cfg, "dataset", None)
    return str(name) if name and name != "???" else type(ds).__name__.lower()


def cache_key(ds: Any) -> str:
    """Identity of a conversion: resolved root, reader class and version, the reader's config."""
    cfg = {k: v for k, v in dict(to_plain(ds.cfg)).items() if k not in ("cache_dir", "root")}
    root = Path(ds.root).resolve()
    markers = [p / ".complete" for p in (root, root.parent)]
    generated = next((m.read_text() for m in markers if m.is_file()), None)  # embedded: its generator params
    blob = json.dumps({"root": str(root), "reader": f"{type(ds).__module__}.{type(ds).__qualname__}",
                       "version": str(getattr(ds, "version", "1")), "config": cfg, "generated": generated,
                       "prepare": PREPARE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def safe_name(scene: str) -> str:
    return scene.replace("/", "__")


def prepared_dir(ds: Any) -> Path:
    return Path(ds.cfg.cache_dir) / "prepared" / f"{dataset_name(ds)}-{cache_key(ds)}"


# ----------------------------------------------------------------------------------------------
# validation


def validate(ds: Any, splits: Sequence[str] = SPLITS) -> Dict[str, List[str]]:
    """Scenes per split, after checking that every file the reader needs exists and is not empty.

    Raises FileNotFoundError / ValueError naming the first missing or empty file (the split files
    are checked by ``scenes``). Content is checked when converting: readers name the file at fault.
    """
    out: Dict[str, List[str]] = {}
    for split in splits:
        scenes = ds.scenes(split)
        if not scenes:
            raise FileNotFoundError(f"{dataset_name(ds)}: the {split} split of {ds.root} lists no scene")
        for scene in scenes:
            files = ds.required_files(scene) if hasattr(ds, "required_files") else []
            for path in files:
                path = Path(path)
                if not path.is_file():
                    raise FileNotFoundError(f"{dataset_name(ds)} {split} scene {scene}: {path} is missing")
                if path.stat().st_size == 0:
                    raise ValueError(f"{dataset_name(ds)} {split} scene {scene}: {path} is empty")
        out[split] = list(scenes)
    return out


# ----------------------------------------------------------------------------------------------
# conversion


def _write_scene(scenes_dir: Path, scene: str, arrays: Dict[str, Any]) -> Dict[str, Any]:
    """Write one scene atomically; returns its manifest entry."""
    final = scenes_dir / safe_name(scene)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=scenes_dir))
    try:
        entry: Dict[str, Any] = {"arrays": {}, "meta": {}}
        for key in sorted(arrays):
            value = arrays[key]
            if isinstance(value, np.ndarray):
                if value.dtype.hasobject:
                    raise ValueError(f"prepare: {scene}: array {key!r} has dtype object")
                np.save(tmp / f"{key}.npy", np.ascontiguousarray(value), allow_pickle=False)
                entry["arrays"][key] = [value.dtype.str, list(value.shape)]
            else:
                entry["meta"][key] = value.item() if isinstance(value, np.generic) else value
        (tmp / "meta.json").write_text(json.dumps(entry["meta"], sort_keys=True, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def _scene_entry(scene_dir: Path) -> Dict[str, Any]:
    arrays = {}
    for f in sorted(scene_dir.glob("*.npy")):
        arr = np.load(f, mmap_mode="r")
        arrays[f.stem] = [arr.dtype.str, list(arr.shape)]
    return {"arrays": arrays, "meta": json.loads((scene_dir / "meta.json").read_text())}


def _manifest(ds: Any, splits: Dict[str, List[str]], entries: Dict[str, Any], complete: bool) -> Dict[str, Any]:
    return {"dataset": dataset_name(ds), "reader": f"{type(ds).__module__}.{type(ds).__qualname__}",
            "reader_version": str(getattr(ds, "version", "1")), "root": str(Path(ds.root).resolve()),
            "prepare_version": PREPARE_VERSION, "splits": splits, "complete": complete,
            "scenes": {s: entries[s] for s in sorted(entries)}}


def prepare(ds: Any, splits: Sequence[str] = SPLITS, progress: Optional[Callable[[str, int, int], None]] = None,
            force: bool = False) -> Path:
    """Convert the scenes of ``splits`` not converted yet; returns the prepared directory."""
    directory = prepared_dir(ds)
    directory.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "manifest.json"
    with file_lock(directory.parent / f".{directory.name}.lock"):
        if force and directory.exists():
            shutil.rmtree(directory)
        if manifest_path.is_file():
            man = json.loads(manifest_path.read_text())
            if man.get("complete") and all(s in man["splits"] for s in splits):
                return directory
        scene_lists = validate(ds, splits)
        scenes_dir = directory / "scenes"
        scenes_dir.mkdir(parents=True, exist_ok=True)
        for stale in scenes_dir.glob(".*"):  # temporary folders of an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        order = list(dict.fromkeys(s for split in splits for s in scene_lists[split]))
        entries: Dict[str, Any] = {}
        for s in order:
            d = scenes_dir / safe_name(s)
            if (d / "meta.json").is_file():
                entries[s] = _scene_entry(d)
        todo = [s for s in order if s not in entries]
        if entries:
            log.info("prepare.resume dataset=%s done=%d todo=%d dir=%s", dataset_name(ds), len(entries), len(todo),
                     directory)
        for k, scene in enumerate(todo):
            if progress is not None:
                progress(scene, len(entries), len(order))
            entries[scene] = _write_scene(scenes_dir, scene, ds.load(scene))
            atomic_write_json(manifest_path, _manifest(ds, scene_lists, entries, complete=False))
        if progress is not None:
            progress("", len(entries), len(order))
        atomic_write_json(manifest_path, _manifest(ds, scene_lists, entries, complete=True))
    return directory


class PreparedDataset:
    """A dataset read from its prepared cache: same scenes(), load() (memory-mapped) and class attributes.

    Other attributes (e.g. ScanNet's ``frames``) are those of the underlying reader.
    """

    def __init__(self, dataset: Any, directory: Path):
        self.dataset = dataset
        self.directory = Path(directory)
        self.manifest = json.loads((self.directory / "manifest.json").read_text())
        for attr in CLASS_ATTRS:
            if hasattr(dataset, attr):
                setattr(self, attr, getattr(dataset, attr))
        self.cfg = dataset.cfg

    def scenes(self, split: str) -> List[str]:
        if split not in self.manifest["splits"]:
            raise KeyError(f"prepared {self.manifest['dataset']} ({self.directory}) has splits "
                           f"{sorted(self.manifest['splits'])}, not {split!r}")
        return list(self.manifest["splits"][split])

    def load(self, scene: str) -> Dict[str, Any]:
        entry = self.manifest["scenes"].get(scene)
        if entry is None:
            raise KeyError(f"scene {scene!r} is not in the prepared cache {self.directory}")
        d = self.directory / "scenes" / safe_name(scene)
        out: Dict[str, Any] = dict(entry["meta"])
        for key, (dtype, shape) in entry["arrays"].items():
            path = d / f"{key}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing from the prepared cache (delete {self.directory} "
                                        f"and prepare again)")
            out[key] = np.load(path, mmap_mode="r") if int(np.prod(shape)) > 0 else np.load(path)
        return out

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def prepared(ds: Any, splits: Sequence[str] = SPLITS) -> PreparedDataset:
    """The prepared (memory-mapped) view of ``ds``, converting what is missing first."""
    start = time.time()

    def report(scene: str, done: int, total: int) -> None:
        if scene and (done % 25 == 0):
            log.info("prepare.progress dataset=%s done=%d total=%d", dataset_name(ds), done, total)

    directory = prepare(ds, splits, progress=report)
    elapsed = time.time() - start
    if elapsed > 1.0:
        log.info("prepare.done dataset=%s dir=%s seconds=%.1f", dataset_name(ds), directory, elapsed)
    return PreparedDataset(ds, directory)


# ----------------------------------------------------------------------------------------------
# CLI entry point


def prepare_command(dataset_name_: str, root: Optional[str], cache_dir: Optional[str] = None,
                    overrides: Optional[Dict[str, Any]] = None, splits: Sequence[str] = SPLITS,
                    force: bool = False, console: Any = None, config_root: Optional[Path] = None,
                    frames: bool = True) -> Dict[str, Any]:
    """``harness data prepare DATASET --root PATH``: validate, convert (progress bar), summarise.

    ``root`` None prepares the embedded miniature. ``overrides`` are further dataset-config
    values (e.g. ``{"frame_skip": 25}``). For a dataset with RGB-D frames (ScanNet), ``frames``
    also exports the frames of the train split (from the .sens) into the cache, once. Raises
    FileNotFoundError / ValueError naming the first missing or corrupt file. Returns the summary
    (also printed on ``console``).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from harness.config import plugin_config
    from harness.registry import DATASETS

    console = console or Console(stderr=True)
    layer: Dict[str, Any] = {"root": root}
    if cache_dir is not None:
        layer["cache_dir"] = cache_dir
    cfg = plugin_config("dataset", dataset_name_, layer, root=config_root, layers=[overrides or {}],
                        where=["override"])
    start = time.time()
    ds = DATASETS.get(dataset_name_)(cfg)
    console.print(f"[bold]{dataset_name_}[/]: validating {ds.root}")
    scene_lists = validate(ds, splits)
    export_frames = frames and getattr(ds, "has_frames", False) and "train" in scene_lists
    if export_frames:  # before any conversion: a missing .sens is found now, not after the scenes
        for scene in scene_lists["train"]:
            getattr(ds, "frame_source", lambda _: None)(scene)
    n_scenes = len(dict.fromkeys(s for sp in splits for s in scene_lists[sp]))
    console.print(f"  {', '.join(f'{sp}: {len(scene_lists[sp])}' for sp in splits)} scenes; every file present")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[scene]}"), console=console, transient=True,
                  disable=not console.is_terminal) as bar:
        task = bar.add_task(f"converting {dataset_name_}", total=n_scenes, scene="")

        def report(scene: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, scene=scene)

        directory = prepare(ds, splits, progress=report, force=force)
        n_frames = 0
        if export_frames:
            ftask = bar.add_task(f"exporting {dataset_name_} frames", total=len(scene_lists["train"]), scene="")
            for k, scene in enumerate(scene_lists["train"]):
                bar.update(ftask, completed=k, scene=scene)
                n_frames += len(ds.frames(scene))
            bar.update(ftask, completed=len(scene_lists["train"]), scene="")
    man = json.loads((directory / "manifest.json").read_text())
    points = sum(int(e["arrays"].get("points", ["", [0]])[1][0]) for e in man["scenes"].values())
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    summary = {"dataset": dataset_name_, "root": str(ds.root), "directory": str(directory),
               "scenes": {sp: len(man["splits"][sp]) for sp in splits}, "points": points, "bytes": size,
               "frames": n_frames, "seconds": round(time.time() - start, 1)}
    table = Table(title=f"prepared {dataset_name_}", show_header=False)
    for k in ("root", "directory"):
        table.add_row(k, summary[k])
    table.add_row("scenes", ", ".join(f"{sp} {n}" for sp, n in summary["scenes"].items()))
    table.add_row("points", f"{points:,}")
    if n_frames:
        table.add_row("frames (train)", f"{n_frames:,}")
    table.add_row("size", f"{size / 2**20:.1f} MiB")
    table.add_row("seconds", str(summary["seconds"]))
    unlabelled = {sp: [sc for sc in man["splits"][sp] if "semantic" not in man["scenes"][sc]["arrays"]]
                  for sp in splits} if "semseg" in getattr(ds, "tasks", ()) else {}
    summary["unlabelled"] = {sp: len(v) for sp, v in unlabelled.items() if v}
    if summary["unlabelled"]:
        table.add_row("[yellow]no labels[/]", ", ".join(f"{sp} {n}" for sp, n in summary["unlabelled"].items()))
    console.print(table)
    for sp, names in unlabelled.items():
        if names:
            console.print(f"[yellow]warning:[/] {len(names)} of {len(man['splits'][sp])} {sp} scenes have no "
                          f"semantic labels (e.g. {names[0]}): the release lacks their label files, or they were "
                          "added after this cache was made (--force rebuilds it)", highlight=False)
            log.warning("prepare.unlabelled dataset=%s split=%s scenes=%d", dataset_name_, sp, len(names))
    log.info("prepare.summary dataset=%s scenes=%d points=%d bytes=%d dir=%s", dataset_name_, n_scenes, points, size,
             directory)
    return summary
