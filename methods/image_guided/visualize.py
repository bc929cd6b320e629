"""Figure 2 of the paper: 2D and 3D features of one view, in one shared colour basis.

``visualize_features(weights_dir, scene, out_png)`` reads an image-guided pre-training directory
(``resunet2d.safetensors`` and ``stage2_model.safetensors``, written beside the exported
backbone) and one scene of the pre-training dataset, and writes a PNG with four panels:

1. the RGB frame;
2. its 2D features (the stage-1 ResUNet, 16-d per pixel);
3. the 3D features (backbone + stage-2 MLP, 16-d per point) of the scene's points that are
   visible in that frame (depth test against the frame's depth map), drawn at their pixels;
4. the scene's point cloud coloured by its 3D features, rendered from an oblique view.

All features are reduced to RGB by *one* PCA basis fitted on the 2D and 3D features together,
so equal colours mean similar features across panels. If the 3D model has learnt to mimic the
2D one, panels 2 and 3 agree, and surfaces of one object share a colour.

The CLI is ``harness visualize features --weights DIR --scene NAME``; ``register_cli`` adds it
to the harness parser. The default output is the run's report directory
(``runs/<sweep>/report/features_<method>_<scene>_<frame>.png`` for a pre-training directory
``runs/<sweep>/pretrain/<id>``). Importing this module imports no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Pure helpers (numpy)


def pca_basis(features: np.ndarray, k: int = 3, max_rows: int = 50000, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(mean (D,), components (k, D)) of ``features`` (N, D) by SVD on at most ``max_rows`` rows."""
    f = np.asarray(features, dtype=np.float64)
    if len(f) > max_rows:
        f = f[np.random.default_rng(seed).choice(len(f), max_rows, replace=False)]
    mean = f.mean(0)
    _, _, vt = np.linalg.svd(f - mean, full_matrices=False)
    comps = vt[:k]
    # a deterministic sign: the largest-magnitude loading of each component is positive
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(1)])
    return mean, comps * signs[:, None]


def to_rgb(features: np.ndarray, mean: np.ndarray, comps: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Features (N, D) -> colours (N, 3) in [0, 1] through the basis and the per-channel range lo..hi."""
    proj = (np.asarray(features, dtype=np.float64) - mean) @ comps.T
    return np.clip((proj - lo) / np.maximum(hi - lo, 1e-9), 0.0, 1.0)


def splat(pixels: np.ndarray, depth: np.ndarray, colors: np.ndarray, width: int, height: int,
          radius: "int | np.ndarray" = 1) -> np.ndarray:
    """An RGBA image of points drawn at ``pixels`` (u, v) as (2 r + 1)^2 squares (``radius``: one for
    all points or one per point); at every pixel the nearest point (smallest ``depth``) wins; alpha 0
    where no point falls."""
    img = np.zeros((height, width, 4), dtype=np.float64)
    n = len(depth)
    radii = np.broadcast_to(np.asarray(radius, dtype=np.int64), (n,))
    u0 = np.rint(pixels[:, 0]).astype(np.int64)
    v0 = np.rint(pixels[:, 1]).astype(np.int64)
    us, vs, srcs = [], [], []
    for r in np.unique(radii):
        idx = np.nonzero(radii == r)[0]
        for dv in range(-r, r + 1):
            for du in range(-r, r + 1):
                us.append(u0[idx] + du), vs.append(v0[idx] + dv), srcs.append(idx)
    if not srcs:
        return img
    u, v, src = np.concatenate(us), np.concatenate(vs), np.concatenate(srcs)
    ok = (u >= 0) & (u < width) & (v >= 0) & (v < height)
    lin, src = v[ok] * width + u[ok], src[ok]
    order = np.lexsort((depth[src], lin))  # by pixel, then nearest first
    lin, src = lin[order], src[order]
    first = np.unique(lin, return_index=True)[1]
    flat = img.reshape(-1, 4)
    flat[lin[first], :3] = colors[src[first]]
    flat[lin[first], 3] = 1.0
    return img


def point_spacing(points: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    """Median distance from a point to its nearest neighbour (on a sample of the points)."""
    from scipy.spatial import cKDTree

    pts = np.asarray(points, dtype=np.float64)
    pick = np.random.default_rng(seed).choice(len(pts), min(sample, len(pts)), replace=False)
    d, _ = cKDTree(pts).query(pts[pick], k=2)
    return float(np.median(d[:, 1]))


# ----------------------------------------------------------------------------------------------
# Feature computation


def _dataset(dataset_cfg: Any) -> Any:
    from harness.config import plugin_config
    from harness.registry import DATASETS

    cfg = plugin_config("dataset", "scannet", dataset_cfg)
    return DATASETS.get("scannet")(cfg)


def _dataset_cfg_from_run(weights_dir: Path) -> Optional[Dict[str, Any]]:
    """The pre-training dataset config recorded in the sweep's plan.json, when there is one."""
    plan = weights_dir.parent.parent / "plan.json"
    if not plan.is_file():
        return None
    try:
        jobs = json.loads(plan.read_text()).get("jobs", [])
    except json.JSONDecodeError:
        return None
    for job in jobs:
        if job.get("kind") == "pretrain" and job.get("id") == weights_dir.name:
            return job.get("dataset_cfg")
    return None


def default_output(weights_dir: Path, scene: str, frame: int) -> Path:
    """``runs/<sweep>/report/`` for a sweep's pre-training directory, else ``<weights_dir>/report/``."""
    weights_dir = Path(weights_dir)
    if weights_dir.parent.name == "pretrain":
        report = weights_dir.parent.parent / "report"
    else:
        report = weights_dir / "report"
    return report / f"features_{weights_dir.name}_{scene}_{frame}.png"


def compute_features(weights_dir: Path, scene: str, frame: Optional[int] = None, dataset_cfg: Any = None,
                     image_size: Optional[Sequence[int]] = None, backend: str = "torch") -> Dict[str, Any]:
    """Everything the picture shows, as arrays (see ``visualize_features``)."""
    import torch

    from harness.backbones.voxelize import voxelize
    from harness.data import augment as aug
    from harness.data.frames import transform_points

    from .method import NET2D_NAME, STAGE2_NAME
    from .resunet import load_resunet
    from .stage2 import point_pixels, prepare_image, sample_pixel_features

    weights_dir = Path(weights_dir)
    if weights_dir.is_file():
        weights_dir = weights_dir.parent
    if dataset_cfg is None:
        dataset_cfg = _dataset_cfg_from_run(weights_dir)
    ds = _dataset(dataset_cfg)
    known = list(ds.scenes("train")) + list(ds.scenes("val"))
    if scene not in known:
        raise ValueError(f"scene {scene!r} is not in the dataset at {ds.root} (known: {', '.join(known[:8])}...)")
    refs = ds.frames(scene)
    if frame is None:
        ref = refs[len(refs) // 2]
    else:
        by_index = {r.index: r for r in refs}
        if frame not in by_index:
            raise ValueError(f"{scene} has no frame {frame} (frames: {sorted(by_index)[:10]}...)")
        ref = by_index[frame]
    fr = ref.load()

    net2d, _ = load_resunet(weights_dir / NET2D_NAME)
    from .stage2 import load_stage2

    backbone, head, meta = load_stage2(weights_dir / STAGE2_NAME, backend=backend)
    net2d.eval(), backbone.eval(), head.eval()

    # 2D features of the frame at its colour resolution (the 2D net sees it at stage 2's image size)
    if image_size is None and meta.get("image_size"):
        image_size = meta["image_size"]
    h, w = fr.color.shape[:2]
    image, (sx, sy) = prepare_image(fr.color, list(image_size) if image_size else None)
    with torch.no_grad():
        fmap = net2d(image[None])[0]
        vh, vw = int(round(h * sy)), int(round(w * sx))
        uu, vv = np.meshgrid(np.arange(w), np.arange(h))
        uv_all = np.stack([uu.ravel(), vv.ravel()], -1).astype(np.float64)
        uv_scaled = (uv_all + 0.5) * np.array([sx, sy]) - 0.5
        f2d = sample_pixel_features(fmap, torch.from_numpy(uv_scaled).float(), (vh, vw)).numpy()
    f2d = f2d.reshape(h, w, -1)

    # 3D features of the scene's points (in the scan frame, as the frames' poses are)
    s = ds.load(scene)
    align = np.asarray(s.get("axis_alignment", np.eye(4)))
    pts_scan = transform_points(np.linalg.inv(align), np.asarray(s["points"], dtype=np.float64))
    voxel = float(meta["voxel_size"])
    vox = voxelize(pts_scan.astype(np.float32), voxel)
    coords = vox.coords - vox.coords.min(0)
    feats_in = aug.input_features(meta.get("input_features", "rgb"), np.asarray(s["colors"])[vox.index])
    batch_coords = np.concatenate([np.zeros((len(coords), 1), np.int32), coords.astype(np.int32)], 1)
    with torch.no_grad():
        out = backbone(torch.from_numpy(batch_coords), torch.from_numpy(feats_in))
        f3d_vox = head(out).numpy()
    f3d = f3d_vox[vox.inverse]

    # which scene points this frame sees, and where
    pose = np.asarray(fr.pose, dtype=np.float64)
    ok, uv = point_pixels(pts_scan, fr.k_color, w, h, np.linalg.inv(pose), fr.depth, fr.k_depth, tolerance=0.05)
    cam = transform_points(np.linalg.inv(pose), pts_scan)
    return {"scene": scene, "frame": ref.index, "color": fr.color, "k_color": fr.k_color, "f2d": f2d, "f3d": f3d,
            "points": np.asarray(s["points"]), "visible": ok, "uv": uv, "z": cam[:, 2],
            "semantic": s.get("semantic"), "meta": meta}


def visualize_features(weights_dir: Path, scene: str, out_png: Optional[Path] = None, frame: Optional[int] = None,
                       dataset_cfg: Any = None, image_size: Optional[Sequence[int]] = None,
                       max_cloud_points: int = 30000) -> Path:
    """Write the four-panel feature picture (module doc) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights_dir = Path(weights_dir)
    if weights_dir.is_file():  # the exported backbone file: its directory
        weights_dir = weights_dir.parent
    d = compute_features(weights_dir, scene, frame, dataset_cfg, image_size)
    h, w = d["color"].shape[:2]
    f2d = d["f2d"].reshape(-1, d["f2d"].shape[-1])
    f3d = d["f3d"]
    vis = d["visible"]
    # one basis for both modalities: fitted on the 2D pixels and the 3D points together
    mean, comps = pca_basis(np.concatenate([f2d, f3d]))
    proj = (np.concatenate([f2d, f3d]) - mean) @ comps.T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb2d = to_rgb(f2d, mean, comps, lo, hi).reshape(h, w, 3)
    rgb3d = to_rgb(f3d, mean, comps, lo, hi)
    # each point as a square about as wide as the gap to its neighbours at its depth (f * spacing / z)
    focal = float(d["k_color"][0, 0])
    radius = np.clip(np.ceil(0.5 * focal * point_spacing(d["points"]) / np.maximum(d["z"][vis], 1e-3)), 0, 8)
    proj_img = splat(d["uv"][vis], d["z"][vis], rgb3d[vis], w, h, radius=radius.astype(np.int64))

    fig = plt.figure(figsize=(13, 10))
    ax = fig.add_subplot(2, 2, 1)
    ax.imshow(d["color"]), ax.set_title(f"RGB: {scene} frame {d['frame']}"), ax.axis("off")
    ax = fig.add_subplot(2, 2, 2)
    ax.imshow(rgb2d), ax.set_title("2D features (stage-1 ResUNet)"), ax.axis("off")
    ax = fig.add_subplot(2, 2, 3)
    ax.imshow(np.zeros((h, w, 3))), ax.imshow(proj_img), ax.set_title(f"3D features of the {int(vis.sum())} visible points")
    ax.axis("off")
    ax = fig.add_subplot(2, 2, 4, projection="3d")
    pts = d["points"]
    pick = np.arange(len(pts))
    if len(pts) > max_cloud_points:
        pick = np.sort(np.random.default_rng(0).choice(len(pts), max_cloud_points, replace=False))
    p = pts[pick]
    ax.scatter(p[:, 0], p[:, 1], p[:, 2], c=rgb3d[pick], s=1.5, linewidths=0, depthshade=False)
    ax.view_init(elev=40, azim=-60)
    lo3, hi3 = p.min(0), p.max(0)
    ax.set_xlim(lo3[0], hi3[0]), ax.set_ylim(lo3[1], hi3[1]), ax.set_zlim(lo3[2], hi3[2])
    ax.set_box_aspect(tuple(np.maximum(hi3 - lo3, 1e-3)), zoom=1.3)  # metric proportions
    ax.set_title("3D features of the scene (oblique view)"), ax.set_axis_off()
    fig.suptitle("Image-guided pre-training: features reduced to RGB by one shared PCA basis")
    fig.tight_layout()
    out = Path(out_png) if out_png else default_output(weights_dir, scene, d["frame"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    log.info("visualize.features scene=%s frame=%s visible=%d out=%s", scene, d["frame"], int(vis.sum()), out)
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def _cmd_features(args: argparse.Namespace) -> int:
    from harness.config import parse_overrides, to_plain

    ds_cfg = to_plain(parse_overrides(args.dataset)) if args.dataset else None
    out = visualize_features(Path(args.weights), args.scene, Path(args.out) if args.out else None, args.frame,
                             ds_cfg, args.image_size)
    from rich.console import Console

    Console().print(f"feature picture: {out}", highlight=False)
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``visualize features`` to the harness CLI's subparsers; returns the ``visualize`` parser."""
    vis = subparsers.add_parser("visualize", help="pictures of pre-trained features")
    vsub = vis.add_subparsers(dest="what", required=True)
    s = vsub.add_parser("features", help="2D and 3D features of one view (paper Figure 2)")
    s.add_argument("--weights", required=True,
                   help="image-guided pre-training directory (runs/<sweep>/pretrain/image_guided__s0) or its backbone file")
    s.add_argument("--scene", required=True, help="scene name, e.g. scene0012_00")
    s.add_argument("--frame", type=int, default=None, help="frame index (default: the scene's middle frame)")
    s.add_argument("--out", default=None, help="PNG path (default: the run's report directory)")
    s.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="size the colour image is resized to for the 2D net (default: stage 2's)")
    s.add_argument("--dataset", nargs="*", default=None, metavar="KEY=VALUE",
                   help="ScanNet dataset config overrides, e.g. root=/data/scannet (default: the run's, else embedded)")
    s.set_defaults(func=_cmd_features)
    return vis
