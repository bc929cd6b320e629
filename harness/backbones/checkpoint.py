"""The one backbone checkpoint format of the harness, and the one loader.

Export: backbone weights only, in safetensors, with a JSON meta in the safetensors header
(key ``"harness"``): backbone, layers, planes, in_channels, input_features, voxel_size,
method, config, harness_version, git_commit.

Load: our safetensors files and ME-era ``torch.save`` files (``.pth``/``.pt``), told apart by
their first bytes, not their suffix. A ``torch.save`` file goes through
``torch.load(weights_only=True)``, which never unpickles arbitrary objects; the training
configs, argument namespaces and numpy scalars that published checkpoints keep next to their
weights are read as inert stand-ins (:class:`_Ignored`: no class of theirs is imported, no code
of theirs runs) and reported as ignored. The weights may sit under ``state_dict``, ``model``
or ``model_state``. Prefixes ``module.``, ``model.`` and ``backbone.`` are stripped from every
key; tensors whose shape differs are refused (``final.*`` is only skipped, since downstream
tasks rebuild it), and so are tensors of the network's own modules that it does not have (a
deeper network); the meta is compared with what the caller expects. The loader reports what it
loaded, skipped (with the reason), left missing and ignored, as a log line and a table.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

__all__ = ["save_backbone", "read_checkpoint", "load_backbone", "LoadReport", "strip_prefixes",
           "META_KEYS", "STRIP_PREFIXES"]

META_KEY = "harness"
META_KEYS = ("backbone", "layers", "planes", "in_channels", "input_features", "voxel_size", "method", "config",
             "harness_version", "git_commit")
STRIP_PREFIXES = ("module.", "model.", "backbone.")
_NESTED = ("state_dict", "model_state", "model_state_dict", "model", "net", "network")

PathLike = Union[str, os.PathLike]


def _jsonable(v: Any) -> Any:
    """Plain JSON values of configs (OmegaConf's containers are Mappings and Sequences)."""
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, Sequence) and not isinstance(v, (str, bytes)):
        return [_jsonable(x) for x in v]
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


def save_backbone(path: PathLike, module_or_state_dict: Union[torch.nn.Module, Mapping[str, torch.Tensor]],
                  meta: Mapping[str, Any], drop_prefixes: Sequence[str] = ("final.",)) -> Path:
    """Write backbone weights and meta to ``path`` (safetensors, written atomically).

    Keys starting with ``drop_prefixes`` (the backbone's own ``final`` by default) are left
    out; wrapper prefixes (``module.`` ...) are stripped. ``backbone``, ``layers``, ``planes``
    and ``in_channels`` default to the module's own; ``harness_version`` and ``git_commit``
    are filled in; ``input_features``, ``voxel_size`` and ``method`` must be given.
    """
    from safetensors.torch import save_file

    import harness
    from harness.provenance import git_commit

    full: Dict[str, Any] = {}
    if isinstance(module_or_state_dict, torch.nn.Module):
        mod = module_or_state_dict
        sd = mod.state_dict()
        for key in ("name", "layers", "planes", "in_channels"):
            if hasattr(mod, key):
                full["backbone" if key == "name" else key] = getattr(mod, key)
    elif isinstance(module_or_state_dict, Mapping):
        sd = dict(module_or_state_dict)
    else:
        raise ValueError(f"save_backbone: expected a module or a state_dict, got {type(module_or_state_dict).__name__}")
    full.update(dict(meta))
    full.setdefault("config", {})
    full.setdefault("harness_version", harness.__version__)
    full.setdefault("git_commit", git_commit())
    missing = [k for k in META_KEYS if k not in full]
    if missing:
        raise ValueError(f"save_backbone: meta lacks {', '.join(missing)} (needed: {', '.join(META_KEYS)})")
    tensors: Dict[str, torch.Tensor] = {}
    for key, t in strip_prefixes(sd).items():
        if any(key.startswith(p) for p in drop_prefixes):
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"save_backbone: {key} is a {type(t).__name__}, not a tensor")
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    if not tensors:
        raise ValueError("save_backbone: nothing to save after dropping " + ", ".join(drop_prefixes))
    try:
        meta_json = json.dumps(_jsonable(full), sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"save_backbone: meta is not JSON-serialisable: {exc}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={META_KEY: meta_json})
    os.replace(tmp, path)
    logger.info("ckpt.save tensors=%d backbone=%s method=%s file=%s", len(tensors), full.get("backbone"),
                full.get("method"), path)
    return path


def strip_prefixes(sd: Mapping[str, Any], prefixes: Sequence[str] = STRIP_PREFIXES) -> Dict[str, Any]:
    """Strip wrapper prefixes from every key, repeatedly (``module.model.x`` -> ``x``)."""
    out: Dict[str, Any] = {}
    for key, v in sd.items():
        k = key
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        if k in out:
            raise ValueError(f"checkpoint keys {key!r} and another both become {k!r} after stripping prefixes")
        out[k] = v
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(obj: Any, path: Path, depth: int = 0) -> Dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping) and depth < 3:
        for key in _NESTED:
            if key in obj and isinstance(obj[key], Mapping):
                try:
                    return _find_state_dict(obj[key], path, depth + 1)
                except ValueError:
                    continue
        # a dict of tensors mixed with scalars (e.g. a step counter next to weights)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) > 1 and len(tensors) >= len(obj) // 2:
            return tensors
    found = sorted(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(f"{path}: no state_dict found (looked for a dict of tensors, also under "
                     f"{', '.join(_NESTED)}); top level has {found}")


_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Ignored:
    """Stands in for a pickled object of a class the weights-only reader does not allow (a
    training config, an ``argparse.Namespace``, a numpy scalar). Made from nothing and keeping
    nothing, so no class of the file's is imported and no code of the file's runs."""

    origin = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Ignored":
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<not read: {self.origin}>"


def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (_Ignored,), {"origin": name, "__module__": __name__})


def _file_format(path: Path) -> str:
    """``safetensors``, ``zip`` (``torch.save`` since torch 1.6) or ``pickle`` (older
    ``torch.save``), from the first bytes; anything else is refused, naming what it starts with."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    what = "it is empty" if not head else f"it begins with {head!r}"
    if head.lstrip()[:1] == b"<":
        what += " (an HTML or XML page: a failed download?)"
    raise ValueError(f"{path}: not a checkpoint: neither a safetensors file nor a torch.save file; {what}")


def _torch_error(path: Path, exc: BaseException) -> ValueError:
    """torch.load's failure in one line, without its advice to load unsafely."""
    text = _ANSI.sub("", str(exc))
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation of torch.load")[0]
        text = text.split("Please use `torch.serialization")[0]
    reason = " ".join(text.split())
    return ValueError(f"{path}: cannot read as a weights-only torch checkpoint ({type(exc).__name__}: {reason})")


def _allowing(names: set):
    """A context in which ``torch.load(weights_only=True)`` reads each of ``names`` as a stand-in."""
    if not names:
        return contextlib.nullcontext()
    return torch.serialization.safe_globals([(_stand_in(n), n) for n in sorted(names)])


def _torch_load(path: Path, fmt: str) -> Tuple[Any, List[str]]:
    """``torch.load(weights_only=True)`` with every global it refuses read as an
    :class:`_Ignored` stand-in: (object, the stand-ins' names). The zip format names them up
    front; the older one, and anything found only while reading, one refusal at a time."""
    names: set = set()
    if fmt == "zip":
        try:
            with open(path, "rb") as f:
                names.update(torch.serialization.get_unsafe_globals_in_checkpoint(f))
        except Exception:  # torch < 2.5 or an unreadable archive: torch.load says what is wrong
            pass
    for _ in range(256):
        try:
            with _allowing(names), open(path, "rb") as f:  # a file object: torch.load's own suffix rules stay out
                return torch.load(f, map_location="cpu", weights_only=True), sorted(names)
        except pickle.UnpicklingError as exc:
            found = _UNSAFE_GLOBAL.search(_ANSI.sub("", str(exc)))
            name = found.group(1) if found else ""
            name = name if "." in name else f"builtins.{name}"  # torch's message drops "builtins."
            if found is None or name in names or not hasattr(torch.serialization, "safe_globals"):
                raise _torch_error(path, exc) from exc
            names.add(name)
        except Exception as exc:  # a corrupt archive, a truncated file
            raise _torch_error(path, exc) from exc
    raise ValueError(f"{path}: more than 256 kinds of pickled objects besides the tensors")


def _ignored_entries(obj: Any, prefix: str = "", depth: int = 0) -> Dict[str, str]:
    """Where the stand-ins sit in a loaded checkpoint (two levels deep): key -> class name."""
    if isinstance(obj, _Ignored):
        return {prefix.rstrip(".") or "(top level)": obj.origin}
    out: Dict[str, str] = {}
    if isinstance(obj, Mapping) and depth < 2:
        for k, v in obj.items():
            out.update(_ignored_entries(v, f"{prefix}{k}.", depth + 1))
    return out


def _read(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, str]]:
    """(state_dict, meta, ignored entries: key -> class name) of a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    fmt = _file_format(path)
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            sd = load_file(str(path))
        except Exception as exc:  # SafetensorError: a damaged header or a truncated file
            raise ValueError(f"{path}: cannot read as safetensors ({type(exc).__name__}: {exc})") from exc
        meta: Dict[str, Any] = {}
        if META_KEY in header:
            try:
                meta = json.loads(header[META_KEY])
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: the '{META_KEY}' metadata is not valid JSON: {exc}") from exc
        return sd, meta, {}
    obj, stand_ins = _torch_load(path, fmt)
    ignored = _ignored_entries(obj) if stand_ins else {}
    if ignored:
        logger.info("ckpt.read %s: not read (pickled %s): %s", path, ", ".join(stand_ins),
                    ", ".join(f"{k} ({v})" for k, v in ignored.items()))
    try:
        sd = _find_state_dict(obj, path)
    except ValueError as exc:
        if ignored:
            raise ValueError(f"{exc}; not read (pickled objects): {', '.join(ignored)}") from None
        raise
    meta = {}
    if isinstance(obj, Mapping):
        meta = {k: v for k, v in obj.items() if isinstance(v, (int, float, str, bool))}
    return sd, meta, ignored


def read_checkpoint(path: PathLike) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state_dict, meta) of a safetensors checkpoint (meta from its header) or an ME-era
    ``torch.save`` file (meta: the plain scalars next to the weights, if any)."""
    sd, meta, _ = _read(path)
    return sd, meta


@dataclass
class LoadReport:
    """What :func:`load_backbone` did."""

    path: str
    loaded: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)  # checkpoint key -> reason
    missing: List[str] = field(default_factory=list)  # module keys left at their initial values
    meta: Dict[str, Any] = field(default_factory=dict)
    ignored: Dict[str, str] = field(default_factory=dict)  # file entry -> class of the pickled object not read
    unchecked: List[str] = field(default_factory=list)  # expected meta keys the file does not record

    def summary(self) -> str:
        return (f"ckpt.load loaded={len(self.loaded)} skipped={len(self.skipped)} missing={len(self.missing)} "
                f"file={self.path}")

    def table(self):
        from rich.table import Table

        t = Table(title=f"checkpoint {self.path}", show_lines=False)
        t.add_column("status")
        t.add_column("count", justify="right")
        t.add_column("keys")

        def short(keys: Iterable[str], limit: int = 12) -> str:
            keys = list(keys)
            more = f" ... (+{len(keys) - limit})" if len(keys) > limit else ""
            return ", ".join(keys[:limit]) + more

        t.add_row("loaded", str(len(self.loaded)), short(self.loaded, 6))
        t.add_row("skipped", str(len(self.skipped)), short(f"{k} ({v})" for k, v in self.skipped.items()))
        t.add_row("missing", str(len(self.missing)), short(self.missing))
        if self.ignored:
            t.add_row("not read", str(len(self.ignored)), short(f"{k} ({v})" for k, v in self.ignored.items()))
        if self.unchecked:
            t.add_row("unchecked meta", str(len(self.unchecked)), short(self.unchecked))
        return t


def _same(key: str, expected: Any, found: Any) -> bool:
    if key == "voxel_size":
        try:
            return math.isclose(float(expected), float(found), rel_tol=1e-6, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    if key == "backbone":
        return str(expected).lower() == str(found).lower()
    if isinstance(expected, (list, tuple)) or isinstance(found, (list, tuple)):
        try:
            return list(_jsonable(expected)) == list(_jsonable(found))
        except TypeError:
            return False
    return _jsonable(expected) == _jsonable(found)


def _is_optional(key: str) -> bool:
    # Counters that older checkpoints may lack, and the head that tasks rebuild.
    return key.startswith("final.") or key.endswith("num_batches_tracked")


def load_backbone(module: torch.nn.Module, path: PathLike, expect: Optional[Mapping[str, Any]] = None,
                  strict_meta_keys: Sequence[str] = ("voxel_size", "in_channels", "backbone"),
                  allow_missing: bool = False, allow_unexpected: bool = False,
                  extra_prefixes: Sequence[str] = (), console=None) -> LoadReport:
    """Load backbone weights from ``path`` into ``module`` and report what happened.

    ``expect``: meta values the caller requires (keys of ``META_KEYS``, e.g.
    ``{"voxel_size": 0.02}``); the module's own name, in_channels, layers and planes are
    expected too. Each key of ``expect``, ``strict_meta_keys``, layers and planes that the
    file records must agree, else ValueError naming the key, the expected and the found value;
    a key of ``expect`` the file does not record (an ME-era ``.pth`` has no meta) is reported
    as unchecked. A shape mismatch of a key other than ``final.*`` is a ValueError; a
    ``final.*`` mismatch is skipped. Zero loaded backbone tensors are an error, and so are,
    unless allowed, module tensors other than ``final.*`` left missing (``allow_missing``) and
    file tensors of the module's own top-level modules that it lacks (``allow_unexpected``: a
    deeper network). ``extra_prefixes`` are stripped besides ``STRIP_PREFIXES`` (e.g.
    ``encoder_q.``).
    """
    path = Path(path)
    unknown = sorted(set(expect or {}) - set(META_KEYS))
    if unknown:
        raise ValueError(f"load_backbone: unknown meta key(s) in expect: {', '.join(unknown)} "
                         f"(known: {', '.join(META_KEYS)})")
    sd, meta, ignored = _read(path)
    sd = strip_prefixes(sd, tuple(STRIP_PREFIXES) + tuple(extra_prefixes))
    exp: Dict[str, Any] = {}
    for attr, key in (("name", "backbone"), ("in_channels", "in_channels"), ("layers", "layers"),
                      ("planes", "planes")):
        if hasattr(module, attr):
            exp[key] = getattr(module, attr)
    exp.update(dict(expect or {}))
    for key in dict.fromkeys([*strict_meta_keys, *(expect or {})]):
        if key in exp and key in meta and not _same(key, exp[key], meta[key]):
            raise ValueError(f"{path}: meta mismatch for {key!r}: expected {exp[key]!r}, found {meta[key]!r}")
    for key in ("layers", "planes"):  # architecture is always checked when the meta has it
        if key in exp and key in meta and not _same(key, exp[key], meta[key]):
            raise ValueError(f"{path}: meta mismatch for {key!r}: expected {list(exp[key])!r}, found {meta[key]!r} "
                             "(a checkpoint of another architecture)")
    target = module.state_dict()
    report = LoadReport(path=str(path), meta=dict(meta), ignored=ignored,
                        unchecked=[k for k in (expect or {}) if k not in meta])
    to_load: Dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key not in target:
            report.skipped[key] = "unexpected"
            continue
        want = tuple(target[key].shape)
        if tuple(t.shape) != want:
            if key.startswith("final."):
                report.skipped[key] = f"shape {tuple(t.shape)} vs {want}"
                continue
            raise ValueError(f"{path}: shape mismatch for {key!r}: expected {want}, found {tuple(t.shape)} "
                             "(a checkpoint of another architecture or channel count?)")
        to_load[key] = t
    report.loaded = list(to_load)
    report.missing = [k for k in target if k not in to_load]
    n_backbone = sum(1 for k in to_load if not k.startswith("final."))
    if n_backbone == 0:
        raise ValueError(f"{path}: no backbone tensor matches this {type(module).__name__} "
                         f"({len(sd)} tensors in the file, e.g. {list(sd)[:3]}; the module's are e.g. "
                         f"{list(target)[:3]}); a checkpoint of another architecture, a prefix to strip "
                         "(extra_prefixes), or a wrapper passed instead of its backbone?")
    hard_missing = [k for k in report.missing if not _is_optional(k)]
    if hard_missing and not allow_missing:
        raise ValueError(f"{path}: {len(hard_missing)} backbone tensors are not in the checkpoint, e.g. "
                         f"{hard_missing[:5]}; a checkpoint of another architecture? (allow_missing=True to accept)")
    own = {k.split(".", 1)[0] for k in target}
    extra = [k for k, why in report.skipped.items()
             if why == "unexpected" and k.split(".", 1)[0] in own and not _is_optional(k)]
    if extra and not allow_unexpected:
        raise ValueError(f"{path}: {len(extra)} tensors of the checkpoint belong to modules this "
                         f"{type(module).__name__} lacks, e.g. {extra[:5]}; a deeper network (other layers)? "
                         "(allow_unexpected=True to load the rest)")
    with torch.no_grad():
        for key, t in to_load.items():
            target[key].copy_(t.to(dtype=target[key].dtype))
    logger.info(report.summary())
    for key in report.unchecked:
        logger.warning("ckpt.load %s records no %s: expected %r, not checked", path, key, exp[key])
    try:
        from rich.console import Console

        (console or Console(stderr=True)).print(report.table())
    except ImportError:  # rich is a dependency; stay usable without it
        pass
    return report
