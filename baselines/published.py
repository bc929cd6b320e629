"""A published checkpoint as a row of the table: no pre-training here, the backbone comes from a
file (a released PointContrast/CSC ``.pth``, or another harness run's ``backbone.safetensors``).

It goes through the one loader (``harness.backbones.checkpoint.load_backbone``: prefixes
stripped, shapes and meta checked, pickled configs not read) and is exported in the canonical
format, so its fine-tuning runs the same code path as every method pre-trained here. A sweep
may hold several such rows under names of their own::

    methods:
      pointcontrast_release: {method: published, path: /ckpt/pointcontrast.pth, group: Multi-scan}
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from harness.api import Method, MethodConfig
from harness.pretrain import EXPORT_NAME, export_backbone
from harness.registry import METHODS


@dataclass
class PublishedConfig(MethodConfig):
    method: str = "published"
    path: str = "???"  # the checkpoint file (its bytes are part of the results' identity)
    group: Optional[str] = None  # Table-1 row group (Scratch | Multi-scan | Single-scan); null: Multi-scan
    # Recorded in the exported meta (what the file was pre-trained with; 0 = not known).
    input_features: str = "rgb"
    voxel_size: float = 0.0
    extra_prefixes: List[str] = field(default_factory=list)  # stripped besides module./model./backbone.
    allow_missing: bool = False  # load a file that lacks some of the backbone's tensors


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@METHODS.register("published")
class Published(Method):
    group = "Multi-scan"
    consumes = ()
    Config = PublishedConfig

    @classmethod
    def fingerprint(cls, cfg: Any) -> str:
        path = Path(str(cfg.path)).expanduser()
        return _sha256(path) if path.is_file() else ""

    def pretrain(self, ctx: Any) -> Path:
        from harness.backbones.checkpoint import load_backbone

        path = Path(self.cfg.path).expanduser()
        self.backbone = ctx.build_backbone(in_channels=3, out_channels=32)
        report = load_backbone(self.backbone, path, extra_prefixes=tuple(self.cfg.extra_prefixes),
                               allow_missing=bool(self.cfg.allow_missing))
        ctx.extra["checkpoint_import"] = {"path": str(path), "sha256": _sha256(path), "loaded": len(report.loaded),
                                          "skipped": len(report.skipped), "missing": len(report.missing),
                                          "not_read": sorted(report.ignored)}
        return self.export(ctx.workdir / EXPORT_NAME, ctx)

    def export(self, path: Path, ctx: Any) -> Path:
        return export_backbone(path, self.backbone, ctx, "published", self.cfg)
