"""The canonical backbone checkpoint: one export format for every method, one loader for every task.

Format: a safetensors file with the backbone's weights only (MinkowskiEngine's names and
shapes; ``final.*`` and method heads dropped) and a JSON meta in the safetensors header under
the key ``harness``: backbone name, LAYERS/PLANES, in_channels, input features, voxel size,
method, config, harness version, git commit.

The loader (``load_backbone``) also reads ME-era ``.pth``/``.pt`` checkpoints (PointContrast,
CSC) with ``torch.load(weights_only=True)``, never unpickling arbitrary objects. It strips
``module.`` / ``model.`` / ``backbone.`` prefixes from every key, refuses a meta mismatch or a
shape mismatch of a backbone tensor with an error naming the key and both values, and reports
what it loaded, skipped (with the reason) and left missing (at initialisation), as a rich table
and one ``key=value`` log line. A missing file or zero loaded tensors is an error: it never falls
back to training from scratch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

log = logging.getLogger(__name__)

META_KEY = "harness"
STRIP_PREFIXES = ("module.", "model.", "backbone.")
# Keys of a training module that are not the backbone's (method heads): never loaded.
HEAD_PREFIXES = ("final.",)


def _state_of(obj: Union[torch.nn.Module, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return dict(obj.state_dict() if isinstance(obj, torch.nn.Module) else obj)


def save_backbone(path: Union[str, Path], module_or_state_dict: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
                  meta: Dict[str, Any], drop_prefixes: Sequence[str] = HEAD_PREFIXES) -> Path:
    """Write the backbone weights (without ``drop_prefixes``) and ``meta`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in _state_of(module_or_state_dict).items()
             if not any(k.startswith(p) for p in drop_prefixes)}
    if not state:
        raise ValueError(f"save_backbone: nothing to save to {path} (every key was dropped)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True, default=str)})
    os.replace(tmp, path)
    log.info("ckpt.export tensors=%d file=%s method=%s", len(state), path, meta.get("method"))
    return path


def read_checkpoint(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict, meta) of our safetensors export or of an ME-era ``.pth``/``.pt`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get(META_KEY)
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # a torn or foreign file
            raise ValueError(f"checkpoint {path} is not a readable safetensors file: {exc}") from exc
        meta = json.loads(raw) if raw else {}
        return state, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"checkpoint {path} cannot be read with torch.load(weights_only=True) "
                         f"(only tensors and plain containers are accepted): {exc}") from exc
    return _find_state_dict(path, obj), _foreign_meta(obj)


def _find_state_dict(path: Path, obj: Any) -> Dict[str, torch.Tensor]:
    """The tensor dict inside a training checkpoint (``state_dict``, ``model``, ``model_state``...)."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state", "model_state_dict", "net", "backbone"):
            if key in obj:
                return _find_state_dict(path, obj[key])
    raise ValueError(f"checkpoint {path}: no state_dict found (looked for a tensor dict, or one under "
                     f"state_dict / model / model_state / model_state_dict / net / backbone)")


def _foreign_meta(obj: Any) -> Dict[str, Any]:
    meta: Dict[str, Any] = {"format": "torch"}
    if isinstance(obj, Mapping):
        for key in ("epoch", "iteration", "curr_iter", "best_val"):
            if key in obj and isinstance(obj[key], (int, float)):
                meta[key] = obj[key]
    return meta


def strip_prefixes(key: str, prefixes: Iterable[str] = STRIP_PREFIXES) -> str:
    """Remove wrapper prefixes (``module.model.conv0p1s1.kernel`` -> ``conv0p1s1.kernel``)."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


@dataclass
class LoadReport:
    file: str
    loaded: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # key -> reason
    missing: List[str] = field(default_factory=list)  # left at initialisation
    meta: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"ckpt.load loaded={len(self.loaded)} skipped={len(self.skipped)} missing={len(self.missing)} "
                f"file={self.file}")

    def print(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.table import Table

        console = console or Console(stderr=True)
        t = Table(title=f"backbone checkpoint {self.file}", show_lines=False)
        t.add_column("status")
        t.add_column("n", justify="right")
        t.add_column("keys")
        shorten = lambda ks: ", ".join(ks[:8]) + (f", ... ({len(ks)} in all)" if len(ks) > 8 else "")  # noqa: E731
        t.add_row("[green]loaded", str(len(self.loaded)), shorten(self.loaded))
        t.add_row("[yellow]skipped", str(len(self.skipped)), shorten([f"{k} ({v})" for k, v in self.skipped.items()]))
        t.add_row("[red]missing (left at init)", str(len(self.missing)), shorten(self.missing))
        console.print(t)


def check_meta(meta: Mapping[str, Any], expect: Mapping[str, Any], path: Union[str, Path]) -> None:
    """Refuse a checkpoint whose meta disagrees with what the caller expects."""
    for key, want in expect.items():
        if key not in meta:
            continue  # foreign checkpoints carry no meta; shapes are still checked
        found = meta[key]
        same = abs(float(found) - float(want)) < 1e-9 if isinstance(want, float) else found == want
        if not same:
            raise ValueError(f"checkpoint {path}: meta '{key}' is {found!r}, expected {want!r}")


def load_backbone(module: torch.nn.Module, path: Union[str, Path], expect: Optional[Mapping[str, Any]] = None,
                  strict_meta_keys: Sequence[str] = ("voxel_size", "in_channels", "backbone"),
                  console: Any = None, quiet: bool = False) -> LoadReport:
    """Load a backbone checkpoint into ``module`` and report what happened (see module docstring).

    ``expect`` holds meta values the checkpoint must match; only keys in ``strict_meta_keys``
    (and present in ``expect``) are checked. ``final.*`` (the head) is never loaded: a task
    builds its own.
    """
    state, meta = read_checkpoint(path)
    if expect:
        check_meta(meta, {k: v for k, v in expect.items() if k in strict_meta_keys}, path)
    own = module.state_dict()
    report = LoadReport(str(path), meta=meta)
    to_load: Dict[str, torch.Tensor] = {}
    for raw_key, tensor in state.items():
        key = strip_prefixes(raw_key)
        if any(key.startswith(p) for p in HEAD_PREFIXES):
            report.skipped[key] = "head (not part of the exported backbone)"
            continue
        if key not in own:
            report.skipped[key] = "unexpected (no such parameter in this backbone)"
            continue
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(f"checkpoint {path}: '{key}' has shape {tuple(tensor.shape)}, the backbone expects "
                             f"{tuple(own[key].shape)} (another architecture, width or in_channels?)")
        to_load[key] = tensor
    if not to_load:
        raise ValueError(f"checkpoint {path}: no tensor matches this backbone ({len(state)} tensors in the file, "
                         f"e.g. {next(iter(state), '-')}); is it a backbone checkpoint of this architecture?")
    report.loaded = sorted(to_load)
    report.missing = sorted(k for k in own if k not in to_load)
    non_head_missing = [k for k in report.missing if not any(k.startswith(p) for p in HEAD_PREFIXES)]
    if non_head_missing:
        log.warning("ckpt.load missing_backbone_keys=%d first=%s file=%s", len(non_head_missing),
                    non_head_missing[0], path)
    module.load_state_dict({**own, **to_load})
    log.info(report.summary())
    if not quiet:
        report.print(console)
    return report
