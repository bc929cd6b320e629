"""Name -> class registries for methods, datasets, tasks and backbones.

One mechanism for every kind of plugin (see lm-evaluation-harness's registry):
- ``@REGISTRY.register("name")`` registers a class; the class must subclass the
  registry's base class and implement its abstract methods, checked at registration.
- an entry may be lazy: a ``"package.module:Class"`` string imported on first ``get``,
  so listing names never imports torch;
- third-party packages register through the entry-point group ``harness.<kind>s``
  (``harness.methods`` for methods) without editing this repository;
- an unknown name is an error that suggests close names and lists the known ones;
- a duplicate name is an error naming both sources.

This module must stay free of torch imports (the CLI's listing and dry runs use it).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Dict, Generic, Iterator, List, Optional, Type, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """A registry lookup or registration failed; the message says why and what is known."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


@dataclass
class _Entry:
    target: Any  # a class, or a "module:Object" string not imported yet
    origin: str  # file:line, "entry point <group>:<name> (<dist>)" or the lazy string

    @property
    def loaded(self) -> bool:
        return not isinstance(self.target, str)


def _origin_of(obj: Any) -> str:
    try:
        file = inspect.getsourcefile(obj) or "?"
        line = inspect.getsourcelines(obj)[1]
        return f"{file}:{line}"
    except (OSError, TypeError):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def _import_target(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise RegistryError(f"lazy registry entry {spec!r} must look like 'package.module:Object'")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """A named collection of classes of one kind, with base-class checks and lazy entries."""

    def __init__(self, kind: str, base_cls: Optional[type] = None, entry_point_group: Optional[str] = None):
        self.kind = kind
        self._base_cls_spec = base_cls
        self.entry_point_group = entry_point_group
        self._entries: Dict[str, _Entry] = {}
        self._discovered = False
        self._frozen = False

    # -- registration -------------------------------------------------------------------------
    def register(self, name: str, target: Any = None) -> Any:
        """Register ``target`` under ``name``; used bare as a decorator when target is None."""
        if target is None:
            def decorator(cls: Type[T]) -> Type[T]:
                self._add(name, cls, _origin_of(cls))
                return cls
            return decorator
        origin = target if isinstance(target, str) else _origin_of(target)
        self._add(name, target, origin)
        return target

    def _add(self, name: str, target: Any, origin: str) -> None:
        if self._frozen:
            raise RegistryError(f"the {self.kind} registry is frozen; register {name!r} before discovery ends")
        if not isinstance(name, str) or not name:
            raise RegistryError(f"a {self.kind} name must be a non-empty string, got {name!r}")
        if not isinstance(target, str):
            self._check(name, target, origin)
        existing = self._entries.get(name)
        if existing is not None:
            if existing.target is target:
                return  # re-registering the same object is a no-op
            if not existing.loaded and not isinstance(target, str) and existing.target == _spec_of(target):
                existing.target = target  # the lazy entry's module was imported: keep the class
                return
            if existing.loaded and not isinstance(target, str) and _same_class(existing.target, target):
                return  # the same class seen through a re-import of its module
            raise RegistryError(
                f"duplicate {self.kind} name {name!r}: already registered from {existing.origin}, "
                f"registered again from {origin}"
            )
        self._entries[name] = _Entry(target, origin)

    @property
    def base_cls(self) -> Optional[type]:
        spec = self._base_cls_spec
        if isinstance(spec, str):
            self._base_cls_spec = spec = _import_target(spec)
        return spec

    def _check(self, name: str, target: Any, origin: str) -> None:
        base = self.base_cls
        if base is None:
            return
        if not (inspect.isclass(target) and issubclass(target, base)):
            raise RegistryError(
                f"{self.kind} {name!r} ({origin}) must be a subclass of {base.__module__}.{base.__qualname__}"
            )
        missing = sorted(getattr(target, "__abstractmethods__", ()))
        if missing:
            raise RegistryError(
                f"{self.kind} {name!r} ({origin}) does not implement {', '.join(missing)} "
                f"required by {base.__qualname__}"
            )

    # -- discovery ----------------------------------------------------------------------------
    def discover(self) -> None:
        """Add the entry points of ``entry_point_group`` (installed plugins), once."""
        if self._discovered or self.entry_point_group is None:
            self._discovered = True
            return
        self._discovered = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            dist = getattr(getattr(ep, "dist", None), "name", "?")
            origin = f"entry point {self.entry_point_group}:{ep.name} ({dist}: {ep.value})"
            existing = self._entries.get(ep.name)
            if existing is not None and not existing.loaded and existing.target == ep.value:
                continue
            if existing is not None:
                raise RegistryError(
                    f"duplicate {self.kind} name {ep.name!r}: already registered from {existing.origin}, "
                    f"registered again from {origin}"
                )
            self._entries[ep.name] = _Entry(ep.value, origin)

    def freeze(self) -> None:
        self._frozen = True

    # -- lookup -------------------------------------------------------------------------------
    def names(self) -> List[str]:
        self.discover()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def origin(self, name: str) -> str:
        return self._entry(name).origin

    def _entry(self, name: str, where: str = "") -> _Entry:
        self.discover()
        entry = self._entries.get(name)
        if entry is None:
            raise RegistryError(self.unknown_message(name, where))
        return entry

    def unknown_message(self, name: Any, where: str = "") -> str:
        known = sorted(self._entries)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
        msg = f"Unknown {self.kind} {name!r}"
        if where:
            msg += f" ({where})"
        msg += "."
        if close:
            msg += f" Did you mean: {', '.join(close)}?"
        shown = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        msg += f" Known: {shown or 'none'}."
        if self.entry_point_group:
            msg += f" Plugins register through the entry-point group '{self.entry_point_group}'."
        return msg

    def get(self, name: str, where: str = "") -> Any:
        """The class registered as ``name`` (imported now if it was lazy)."""
        entry = self._entry(name, where)
        if not entry.loaded:
            try:
                target = _import_target(entry.target)
            except ImportError as exc:
                raise RegistryError(
                    f"{self.kind} {name!r} is registered from {entry.origin} but could not be imported: {exc}"
                ) from exc
            self._check(name, target, entry.origin)
            entry.target = target
        return entry.target

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)


def _spec_of(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}:{getattr(obj, '__qualname__', '')}"


def _same_class(a: Any, b: Any) -> bool:
    return (
        inspect.isclass(a)
        and inspect.isclass(b)
        and a.__module__ == b.__module__
        and a.__qualname__ == b.__qualname__
    )


# The registries of the harness. Base classes are named lazily so that this module stays
# torch-free; built-in plugins are listed lazily so that `harness methods` imports nothing heavy.
METHODS: Registry = Registry("method", base_cls="harness.api:Method", entry_point_group="harness.methods")
DATASETS: Registry = Registry("dataset", base_cls="harness.api:Dataset", entry_point_group="harness.datasets")
TASKS: Registry = Registry("task", base_cls="harness.api:Task", entry_point_group="harness.tasks")

# Built-in entries, in the report's row order for methods.
_BUILTIN: Dict[Registry, Dict[str, str]] = {
    METHODS: {
        "scratch": "baselines.scratch:Scratch",
        "pointcontrast": "baselines.pointcontrast:PointContrast",
        "csc": "baselines.csc:CSC",
        "depthcontrast": "baselines.depthcontrast:DepthContrast",
        "image_guided": "methods.image_guided.method:ImageGuided",
        "published": "baselines.published:Published",
    },
    DATASETS: {
        "scannet": "harness.data.scannet:ScanNet",
        "s3dis": "harness.data.s3dis:S3DIS",
        "semantickitti": "harness.data.semantickitti:SemanticKITTI",
        "sunrgbd": "harness.data.sunrgbd:SUNRGBD",
    },
    TASKS: {
        "semseg": "harness.tasks.semseg:SemanticSegmentation",
        "instseg": "harness.tasks.instseg:InstanceSegmentation",
        "detection": "harness.tasks.detection:Detection",
    },
}


def _register_builtins() -> None:
    """Register the built-in plugins lazily: their modules are imported on first use."""
    for registry, entries in _BUILTIN.items():
        for name, spec in entries.items():
            registry._entries.setdefault(name, _Entry(spec, spec))


_register_builtins()
