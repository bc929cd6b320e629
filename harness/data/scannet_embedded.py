"""The embedded miniature ScanNet: random rooms written in ScanNet's own on-disk layout.

Deterministic from a seed, generated on first use into the cache directory. Each scene is a
room of box furniture (harness.data.rooms) placed in a random "scan" frame (its
``axisAlignment`` undoes that), with the two PLYs (same headers and property types as the
release), instance annotations (aggregation + over-segmentation), the scene .txt, the label map
``scannetv2-labels.combined.tsv``, and RGB-D frames ray-cast from a camera path (colour and depth
at different resolutions, each with its intrinsics) stored as the release stores them: in
``scans/<scene>/<scene>.sens`` (JPEG colour, zlib depth in millimetres). The first scene's stream
holds one frame with an all -inf pose, as real streams do, so the reader's skip path runs. The
reader reads it exactly as it reads real ScanNet (and exports the frames from the .sens).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from harness.config import to_plain
from harness.data import synth
from harness.data.cache import ensure_generated
from harness.data.ply import write_ply
from harness.data.sens import SensHeader, write_sens
from harness.data.rooms import Room, make_room
from harness.data.scannet import LABEL_TSV, NYU40_NAMES

log = logging.getLogger(__name__)
GENERATOR_VERSION = 2

# generic room category -> (ScanNet raw category, NYU40 id)
RAW_CATEGORY = {
    "wall": ("wall", 1), "floor": ("floor", 2), "cabinet": ("cabinet", 3), "bed": ("bed", 4),
    "chair": ("chair", 5), "sofa": ("couch", 6), "table": ("table", 7), "door": ("door", 8),
    "window": ("window", 9), "bookshelf": ("bookshelf", 10), "picture": ("picture", 11),
    "counter": ("kitchen counter", 12), "desk": ("desk", 14), "curtain": ("curtain", 16),
    "refrigerator": ("refrigerator", 24), "toilet": ("toilet", 33), "sink": ("sink", 34),
    "bathtub": ("bathtub", 36), "box": ("box", 29), "ceiling": ("ceiling", 22),
}
# ScanNet's NYU40 palette, as in the release's labels PLY (index = NYU40 id).
NYU40_PALETTE = np.array([
    (0, 0, 0), (174, 199, 232), (152, 223, 138), (31, 119, 180), (255, 187, 120), (188, 189, 34),
    (140, 86, 75), (255, 152, 150), (214, 39, 40), (197, 176, 213), (148, 103, 189), (196, 156, 148),
    (23, 190, 207), (178, 76, 76), (247, 182, 210), (66, 188, 102), (219, 219, 141), (140, 57, 197),
    (202, 185, 52), (51, 176, 203), (200, 54, 131), (92, 193, 61), (78, 71, 183), (172, 114, 82),
    (255, 127, 14), (91, 163, 138), (153, 98, 156), (140, 153, 101), (158, 218, 229), (100, 125, 154),
    (178, 127, 135), (120, 185, 128), (146, 111, 194), (44, 160, 44), (112, 128, 144), (96, 207, 209),
    (227, 119, 194), (213, 92, 176), (94, 106, 211), (82, 84, 163), (100, 85, 144)], dtype=np.uint8)


def ensure_embedded_scannet(cache_dir: Path, cfg: Any) -> Path:
    params = {"generator": "scannet", "version": GENERATOR_VERSION, **to_plain(cfg)}
    target = Path(cache_dir) / f"embedded-scannet-s{params['seed']}"
    return ensure_generated(target, params, lambda tmp: generate(tmp, params))


def scene_names(params: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    n_train, n_val = params["train_scenes"], params["val_scenes"]
    names = [f"scene{i:04d}_00" for i in range(n_train + n_val)]
    return names[:n_train], names[n_train:]


def generate(root: Path, params: Dict[str, Any]) -> None:
    from rich.progress import track

    train, val = scene_names(params)
    (root / "scannetv2_train.txt").write_text("\n".join(train) + "\n")
    (root / "scannetv2_val.txt").write_text("\n".join(val) + "\n")
    write_label_tsv(root / LABEL_TSV)
    for i, scene in enumerate(track(train + val, description="generating embedded ScanNet", transient=True)):
        rng = np.random.default_rng([params["seed"], i])
        room = make_room(rng)
        write_scene(root, scene, room, rng, params, invalid_frame=i == 0)


def write_label_tsv(path: Path) -> None:
    """A label map with the release's columns for every raw category the generator uses."""
    cols = ["id", "raw_category", "category", "count", "nyu40id", "eigen13id", "nyuClass", "nyu40class",
            "mpcat40index", "mpcat40"]
    rows = ["\t".join(cols)]
    for k, (raw, nyu) in enumerate(sorted(RAW_CATEGORY.values()), start=1):
        name = NYU40_NAMES[nyu - 1]
        rows.append("\t".join([str(k), raw, raw, "1", str(nyu), "", name, name, "", ""]))
    path.write_text("\n".join(rows) + "\n")


def write_scene(root: Path, scene: str, room: Room, rng: np.random.Generator, params: Dict[str, Any],
                invalid_frame: bool = False) -> None:
    d = root / "scans" / scene
    d.mkdir(parents=True, exist_ok=True)
    W, D, H = room.size
    # The scan frame: the aligned room turned and shifted; axisAlignment maps scan -> aligned.
    scan_from_aligned = synth.rigid(float(rng.uniform(-np.pi, np.pi)), rng.uniform(-1.0, 1.0, 3) * [2, 2, 0.1])
    aligned_from_scan = np.linalg.inv(scan_from_aligned)

    mesh = synth.box_mesh(room.scene, params["mesh_spacing"])
    verts = synth.transform(scan_from_aligned, mesh["vertices"].astype(np.float64)).astype(np.float32)
    n = len(verts)
    inst_of_part = room.scene.part_instance[mesh["part"]]
    nyu = np.array([RAW_CATEGORY[room.scene.instances[i].category][1] for i in inst_of_part], dtype=np.uint16)
    xyz = {"x": verts[:, 0], "y": verts[:, 1], "z": verts[:, 2]}
    rgb = {"red": mesh["colors"][:, 0], "green": mesh["colors"][:, 1], "blue": mesh["colors"][:, 2]}
    write_ply(d / f"{scene}_vh_clean_2.ply", {**xyz, **rgb, "alpha": np.full(n, 255, np.uint8)}, mesh["faces"],
              comment="VCGLIB generated")
    pal = NYU40_PALETTE[nyu]
    write_ply(d / f"{scene}_vh_clean_2.labels.ply",
              {**xyz, "red": pal[:, 0], "green": pal[:, 1], "blue": pal[:, 2],
               "alpha": np.where(nyu > 0, 255, 0).astype(np.uint8), "label": nyu}, mesh["faces"],
              comment="MLIB generated")

    # Over-segmentation: tiles of about 0.8 m on each face of each part; instances group them.
    tile = np.floor(mesh["vertices"] / 0.8).astype(np.int64)
    key = np.stack([mesh["part"], mesh["face"], tile[:, 0], tile[:, 1], tile[:, 2]], -1)
    _, seg = np.unique(key, axis=0, return_inverse=True)
    seg = seg.ravel()
    (d / f"{scene}_vh_clean_2.0.010000.segs.json").write_text(json.dumps(
        {"params": {"kThresh": "0.01", "segMinVerts": "20", "minPoints": "750", "maxPoints": "5000",
                    "thinThresh": "0.05", "flatThresh": "0.001", "minLength": "0.02", "maxLength": "1"},
         "sceneId": f"scannet.{scene}", "segIndices": seg.tolist()}))
    groups = []
    for k, inst in enumerate(room.scene.instances):
        segs = np.unique(seg[inst_of_part == k]).tolist()
        if segs:
            groups.append({"id": len(groups), "objectId": len(groups), "segments": segs,
                           "label": RAW_CATEGORY[inst.category][0]})
    (d / f"{scene}.aggregation.json").write_text(json.dumps(
        {"sceneId": f"scannet.{scene}", "appId": "Annotator.v1.0.1", "segGroups": groups,
         "segmentsFile": f"scannet.{scene}_vh_clean_2.0.010000.segs.json"}))

    frames = render_frames(room, rng, params)
    wd, hd = params["depth_size"]
    wc, hc = params["color_size"]
    k_depth, k_color = frame_intrinsics(params)
    lines = {
        "axisAlignment": " ".join(f"{v:.9g}" for v in aligned_from_scan.ravel()),
        "colorHeight": hc, "colorWidth": wc, "depthHeight": hd, "depthWidth": wd,
        "fx_color": k_color[0, 0], "fx_depth": k_depth[0, 0], "fy_color": k_color[1, 1], "fy_depth": k_depth[1, 1],
        "mx_color": k_color[0, 2], "mx_depth": k_depth[0, 2], "my_color": k_color[1, 2], "my_depth": k_depth[1, 2],
        "numColorFrames": len(frames) + int(invalid_frame), "numDepthFrames": len(frames) + int(invalid_frame),
        "numIMUmeasurements": 0,
        "sceneType": room.kind.capitalize(),
    }
    (d / f"{scene}.txt").write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))

    # The RGB-D stream: poses in the scan frame (as the release's), one lost-tracking frame if asked.
    stream = [(color, np.clip(np.rint(depth * 1000.0), 0, 65535).astype(np.uint16), scan_from_aligned @ pose)
              for color, depth, pose in frames]
    if invalid_frame and stream:
        at = len(stream) // 3
        color, depth, _ = stream[at]
        stream.insert(at, (color, depth, np.full((4, 4), -np.inf)))
    header = SensHeader(sensor_name="StructureSensor", intrinsic_color=k_color, intrinsic_depth=k_depth,
                        color_compression=2, depth_compression=1, depth_shift=1000.0)
    write_sens(d / f"{scene}.sens", header, stream)


def frame_intrinsics(params: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    wd, hd = params["depth_size"]
    wc, hc = params["color_size"]
    # about 67 degrees horizontal field of view for both cameras
    return synth.intrinsics(wd, hd, 0.75 * wd), synth.intrinsics(wc, hc, 0.75 * wc)


def camera_path(room: Room, rng: np.random.Generator, count: int) -> List[np.ndarray]:
    """Poses (camera-to-world, aligned frame) on a loop around the room, looking outwards and down."""
    W, D, _ = room.size
    centre = np.array([W / 2, D / 2])
    radius = 0.22 * min(W, D)
    phase = rng.uniform(0, 2 * np.pi)
    poses = []
    for k in range(count):
        a = phase + 2 * np.pi * k / count
        direction = np.array([np.cos(a), np.sin(a)])
        eye = np.concatenate([centre + radius * direction, [rng.uniform(1.35, 1.6)]])
        target = np.concatenate([eye[:2] + 2.0 * direction, [rng.uniform(0.3, 0.7)]])
        poses.append(synth.look_at(eye, target))
    return poses


def render_frames(room: Room, rng: np.random.Generator, params: Dict[str, Any]
                  ) -> List[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    wd, hd = params["depth_size"]
    wc, hc = params["color_size"]
    k_depth, k_color = frame_intrinsics(params)
    frames = []
    for pose in camera_path(room, rng, params["frames_per_scene"]):
        depth, _, _ = synth.render_rgbd(room.scene, k_depth, pose, wd, hd)
        _, color, _ = synth.render_rgbd(room.scene, k_color, pose, wc, hc)
        frames.append((color, depth.astype(np.float32), pose))
    return frames
