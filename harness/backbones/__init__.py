"""Sparse 3D backbones: Res16UNet on a pure-PyTorch backend or on MinkowskiEngine.

``build_backbone("Res16UNet34C", in_channels=3, out_channels=20, backend="auto")`` returns a
module whose ``forward(coords, feats)`` maps int32 coordinates (N, 4) (batch index, x, y, z)
and features (N, in_channels) to (N, out_channels) in the same row order, with
MinkowskiEngine's parameter names and shapes on both backends. Importing this package never
imports MinkowskiEngine; ``backend="auto"`` uses it when it imports, else the torch backend.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = ["BACKBONES", "BACKENDS", "build_backbone", "available_backends", "resolve_backend", "canonical_name"]

# name -> (LAYERS, PLANES), as in MinkowskiEngine's public Res16UNet family (BasicBlock).
BACKBONES: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {
    "Res16UNet34C": ((2, 3, 4, 6, 2, 2, 2, 2), (32, 64, 128, 256, 256, 128, 96, 96)),
    "Res16UNet14A": ((1, 1, 1, 1, 1, 1, 1, 1), (32, 64, 128, 256, 128, 128, 96, 96)),
}
BACKENDS = ("auto", "torch", "minkowski")

_ME_STATUS: Optional[Tuple[bool, str]] = None


def _minkowski_status() -> Tuple[bool, str]:
    """(importable, reason) for MinkowskiEngine, imported at most once per process."""
    global _ME_STATUS
    if _ME_STATUS is None:
        try:
            from . import minkowski  # noqa: F401

            _ME_STATUS = (True, "")
        except Exception as exc:  # ImportError, or a broken build raising anything at import
            _ME_STATUS = (False, f"{type(exc).__name__}: {exc}")
    return _ME_STATUS


def available_backends() -> List[str]:
    """Backends that work in this environment: always ``torch``, plus ``minkowski`` when ME imports."""
    return ["torch"] + (["minkowski"] if _minkowski_status()[0] else [])


# What ``auto`` resolves to when set (``torch`` or ``minkowski``): one switch for a machine
# where ME is installed but every config should train on the torch backend (the test suite
# sets it, so that only the tests written for ME run on ME).
AUTO_BACKEND_ENV = "HARNESS_AUTO_BACKEND"


def resolve_backend(name: str = "auto") -> str:
    """``auto`` -> ``$HARNESS_AUTO_BACKEND`` if set, else ``minkowski`` when MinkowskiEngine
    imports, else ``torch``; a named backend is checked (``minkowski`` without ME is an error
    that says how to install it)."""
    key = str(name).lower()
    if key not in BACKENDS:
        raise ValueError(f"Unknown backbone backend {name!r}. Known: {', '.join(BACKENDS)}")
    if key == "auto":
        forced = os.environ.get(AUTO_BACKEND_ENV, "").strip().lower()
        if forced:
            if forced == "auto" or forced not in BACKENDS:
                raise ValueError(f"{AUTO_BACKEND_ENV}={forced!r}: use torch or minkowski")
            return resolve_backend(forced)
        return "minkowski" if _minkowski_status()[0] else "torch"
    if key == "minkowski":
        ok, why = _minkowski_status()
        if not ok:
            raise ValueError(f"backbone.backend=minkowski but MinkowskiEngine does not import ({why}). "
                             "Install it with `make minkowski` (see README) or use backend=torch.")
    return key


def canonical_name(name: str) -> str:
    """The registered spelling of a backbone name (matching is case-insensitive)."""
    by_lower = {k.lower(): k for k in BACKBONES}
    key = str(name).lower()
    if key in by_lower:
        return by_lower[key]
    close = difflib.get_close_matches(key, list(by_lower), n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(by_lower[c] for c in close)}?" if close else ""
    raise ValueError(f"Unknown backbone {name!r}.{hint} Known: {', '.join(BACKBONES)}")


def _ops_for(backend: str):
    if backend == "torch":
        from .torch_backend import TorchOps

        return TorchOps
    from .minkowski import MinkowskiOps

    return MinkowskiOps


def build_backbone(name: str = "Res16UNet34C", in_channels: int = 3, out_channels: int = 20,
                   backend: str = "auto", layers: Optional[Sequence[int]] = None,
                   planes: Optional[Sequence[int]] = None, bn_momentum: Optional[float] = None):
    """Build a Res16UNet variant on a backend.

    ``layers``/``planes`` override the named variant's LAYERS/PLANES (8 entries each);
    ``bn_momentum`` (PyTorch convention) goes to bn0..bn4 and bntr4..bntr7 as in the public
    code, the blocks' BatchNorms keep 0.1.
    """
    from .res16unet import Res16UNet

    cname = canonical_name(name)
    resolved = resolve_backend(backend)
    d_layers, d_planes = BACKBONES[cname]
    model = Res16UNet(_ops_for(resolved), cname, layers if layers is not None else d_layers,
                      planes if planes is not None else d_planes, in_channels, out_channels,
                      bn_momentum=bn_momentum)
    logger.debug("backbone.build name=%s backend=%s layers=%s planes=%s in=%d out=%d", cname, resolved,
                 model.layers, model.planes, in_channels, out_channels)
    return model
