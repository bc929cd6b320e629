"""ScanNet's ``.sens`` RGB-D streams: read, write, and export to the SensReader frame layout.

The harness decodes ``scans/<scene>/<scene>.sens`` itself (no external SensReader). The format
(little-endian throughout):

- header: uint32 version (4); uint64 length + sensor name bytes; four float32 4x4 row-major
  matrices (colour intrinsics, colour extrinsics, depth intrinsics, depth extrinsics); int32
  colour compression (-1 unknown, 0 raw, 1 png, 2 jpeg) and int32 depth compression (-1 unknown,
  0 raw uint16, 1 zlib of uint16, 2 occi); uint32 colour width, height, depth width, height;
  float32 depth shift (raw units per metre, 1000 = millimetres); uint64 frame count;
- per frame: float32 4x4 camera-to-world pose; uint64 colour and depth timestamps; uint64 colour
  and depth byte counts; the colour blob, then the depth blob.

IMU data may follow the frames; it is not read. Frames whose pose holds -inf or NaN (the tracker
lost the camera; real scenes have them) are skipped by :func:`export_sens` and counted in a
warning. Decoded depth is uint16 in the stream's units (divide by ``depth_shift`` for metres).
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

log = logging.getLogger(__name__)

SENS_VERSION = 4
COLOR_COMPRESSION = {-1: "unknown", 0: "raw", 1: "png", 2: "jpeg"}
DEPTH_COMPRESSION = {-1: "unknown", 0: "raw_ushort", 1: "zlib_ushort", 2: "occi_ushort"}
_FRAME_HEAD = struct.Struct("<16f4Q")  # pose, colour/depth timestamps, colour/depth sizes


@dataclass
class SensHeader:
    sensor_name: str = "StructureSensor"
    intrinsic_color: np.ndarray = field(default_factory=lambda: np.eye(4))
    extrinsic_color: np.ndarray = field(default_factory=lambda: np.eye(4))
    intrinsic_depth: np.ndarray = field(default_factory=lambda: np.eye(4))
    extrinsic_depth: np.ndarray = field(default_factory=lambda: np.eye(4))
    color_compression: int = 2
    depth_compression: int = 1
    color_width: int = 0
    color_height: int = 0
    depth_width: int = 0
    depth_height: int = 0
    depth_shift: float = 1000.0
    num_frames: int = 0
    version: int = SENS_VERSION


@dataclass
class SensFrame:
    """One frame as stored: the pose and the compressed blobs (decode with the methods)."""

    index: int
    pose: np.ndarray  # (4, 4) float32 camera-to-world
    timestamp_color: int
    timestamp_depth: int
    color_data: bytes
    depth_data: bytes

    @property
    def valid(self) -> bool:
        return bool(np.all(np.isfinite(self.pose)))

    def color(self, header: SensHeader) -> np.ndarray:
        """(H, W, 3) uint8."""
        if header.color_compression in (1, 2):
            from PIL import Image

            return np.asarray(Image.open(io.BytesIO(self.color_data)).convert("RGB"))
        if header.color_compression == 0:
            return np.frombuffer(self.color_data, np.uint8).reshape(header.color_height, header.color_width, 3)
        raise ValueError(f"sens: colour compression {header.color_compression} "
                         f"({COLOR_COMPRESSION.get(header.color_compression, '?')}) is not supported")

    def depth(self, header: SensHeader) -> np.ndarray:
        """(H, W) uint16 in the stream's units (``header.depth_shift`` per metre)."""
        if header.depth_compression == 1:
            raw = zlib.decompress(self.depth_data)
        elif header.depth_compression == 0:
            raw = self.depth_data
        else:
            raise ValueError(f"sens: depth compression {header.depth_compression} "
                             f"({DEPTH_COMPRESSION.get(header.depth_compression, '?')}) is not supported")
        want = header.depth_width * header.depth_height * 2
        if len(raw) != want:
            raise ValueError(f"sens: frame {self.index}: depth holds {len(raw)} bytes, expected {want} "
                             f"({header.depth_width}x{header.depth_height} uint16)")
        return np.frombuffer(raw, "<u2").reshape(header.depth_height, header.depth_width)


class SensFile:
    """A ``.sens`` file opened for reading: ``header``, then ``frames()`` streamed from disk."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: .sens file not found")
        self.size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            self.header = self._read_header(fh)
            self._frames_offset = fh.tell()

    def _need(self, fh: BinaryIO, n: int, what: str) -> bytes:
        at = fh.tell()
        data = fh.read(n)
        if len(data) != n:
            raise ValueError(f"{self.path}: truncated .sens: {what} needs {n} bytes at byte {at}, "
                             f"the file has {self.size} bytes")
        return data

    def _read_header(self, fh: BinaryIO) -> SensHeader:
        (version,) = struct.unpack("<I", self._need(fh, 4, "the version"))
        if version != SENS_VERSION:
            raise ValueError(f"{self.path}: not a ScanNet .sens file of version {SENS_VERSION} "
                             f"(version field reads {version})")
        (n,) = struct.unpack("<Q", self._need(fh, 8, "the sensor name length"))
        if n > 4096:
            raise ValueError(f"{self.path}: corrupt .sens header: sensor name length {n}")
        name = self._need(fh, n, "the sensor name").decode("utf-8", errors="replace")
        mats = [np.frombuffer(self._need(fh, 64, "a calibration matrix"), "<f4").reshape(4, 4).astype(np.float64)
                for _ in range(4)]
        ccomp, dcomp = struct.unpack("<ii", self._need(fh, 8, "the compression types"))
        cw, ch, dw, dh = struct.unpack("<4I", self._need(fh, 16, "the image sizes"))
        (shift,) = struct.unpack("<f", self._need(fh, 4, "the depth shift"))
        (count,) = struct.unpack("<Q", self._need(fh, 8, "the frame count"))
        return SensHeader(name, mats[0], mats[1], mats[2], mats[3], ccomp, dcomp, cw, ch, dw, dh, float(shift),
                          int(count), version)

    def frames(self) -> Iterator[SensFrame]:
        """Every frame in file order; a truncated frame raises ValueError naming the file and frame."""
        with open(self.path, "rb") as fh:
            fh.seek(self._frames_offset)
            for i in range(self.header.num_frames):
                head = self._need(fh, _FRAME_HEAD.size, f"the header of frame {i}")
                vals = _FRAME_HEAD.unpack(head)
                pose = np.asarray(vals[:16], dtype=np.float32).reshape(4, 4)
                ts_c, ts_d, n_c, n_d = vals[16:]
                if n_c + n_d > self.size:
                    raise ValueError(f"{self.path}: corrupt .sens: frame {i} announces {n_c} + {n_d} bytes, "
                                     f"the file has {self.size} bytes")
                color = self._need(fh, n_c, f"the colour data of frame {i}")
                depth = self._need(fh, n_d, f"the depth data of frame {i}")
                yield SensFrame(i, pose, ts_c, ts_d, color, depth)


def read_sens(path: Union[str, Path]) -> Tuple[SensHeader, List[SensFrame]]:
    """The header and every frame (still compressed) of a ``.sens`` file."""
    f = SensFile(path)
    return f.header, list(f.frames())


def encode_color(color: np.ndarray, compression: int = 2, quality: int = 92) -> bytes:
    if compression == 0:
        return np.ascontiguousarray(color, dtype=np.uint8).tobytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(color, dtype=np.uint8)).save(buf, format="JPEG" if compression == 2 else "PNG",
                                                           quality=quality)
    return buf.getvalue()


def encode_depth(depth: np.ndarray, compression: int = 1) -> bytes:
    raw = np.ascontiguousarray(depth, dtype="<u2").tobytes()
    if compression == 1:
        return zlib.compress(raw, 6)
    if compression == 0:
        return raw
    raise ValueError(f"sens: depth compression {compression} cannot be written (0 raw, 1 zlib)")


def write_sens(path: Union[str, Path], header: SensHeader,
               frames: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]],
               timestamps: Optional[Sequence[Tuple[int, int]]] = None) -> Path:
    """Write a ``.sens`` file from (colour uint8 HxWx3, depth uint16 HxW, pose 4x4) triples.

    ``header``'s compression types, intrinsics and depth shift are used as given; sizes and the
    frame count are taken from the frames. Written to a temporary file, then renamed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    c_h, c_w = (frames[0][0].shape[:2] if frames else (header.color_height, header.color_width))
    d_h, d_w = (frames[0][1].shape[:2] if frames else (header.depth_height, header.depth_width))
    name = header.sensor_name.encode("utf-8")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<I", SENS_VERSION))
        fh.write(struct.pack("<Q", len(name)) + name)
        for m in (header.intrinsic_color, header.extrinsic_color, header.intrinsic_depth, header.extrinsic_depth):
            fh.write(np.asarray(m, dtype="<f4").reshape(4, 4).tobytes())
        fh.write(struct.pack("<ii", header.color_compression, header.depth_compression))
        fh.write(struct.pack("<4I", c_w, c_h, d_w, d_h))
        fh.write(struct.pack("<f", header.depth_shift))
        fh.write(struct.pack("<Q", len(frames)))
        for i, (color, depth, pose) in enumerate(frames):
            if color.shape[:2] != (c_h, c_w) or depth.shape[:2] != (d_h, d_w):
                raise ValueError(f"write_sens: frame {i} has colour {color.shape[:2]} / depth {depth.shape[:2]}, "
                                 f"frame 0 has {(c_h, c_w)} / {(d_h, d_w)}")
            cdata = encode_color(color, header.color_compression)
            ddata = encode_depth(depth, header.depth_compression)
            ts = timestamps[i] if timestamps is not None else (i * 33333, i * 33333)
            fh.write(np.asarray(pose, dtype="<f4").reshape(4, 4).tobytes())
            fh.write(struct.pack("<4Q", ts[0], ts[1], len(cdata), len(ddata)))
            fh.write(cdata)
            fh.write(ddata)
    tmp.replace(path)
    return path


def export_sens(sens_path: Union[str, Path], out_dir: Union[str, Path], frame_skip: int = 1) -> dict:
    """Export frames ``0, N, 2N, ...`` (N = ``frame_skip``) with a finite pose to the SensReader layout.

    ``out_dir`` receives ``color/<i>.jpg`` (the stored JPEG bytes, not re-encoded),
    ``depth/<i>.png`` (uint16, the stream's units), ``pose/<i>.txt``, ``intrinsic/`` (the four
    calibration matrices) and ``export.json`` (depth shift, counts); ``i`` is the frame's index in
    the stream. Returns the summary written to ``export.json``.
    """
    from PIL import Image

    from harness.data.cache import atomic_write_json

    if frame_skip < 1:
        raise ValueError(f"export_sens: frame_skip must be >= 1, got {frame_skip}")
    sens = SensFile(sens_path)
    h = sens.header
    out = Path(out_dir)
    for sub in ("color", "depth", "pose", "intrinsic"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for name, m in (("intrinsic_color", h.intrinsic_color), ("extrinsic_color", h.extrinsic_color),
                    ("intrinsic_depth", h.intrinsic_depth), ("extrinsic_depth", h.extrinsic_depth)):
        np.savetxt(out / "intrinsic" / f"{name}.txt", m, fmt="%f")
    exported, invalid = [], []
    for frame in sens.frames():
        if frame.index % frame_skip:
            continue
        if not frame.valid:
            invalid.append(frame.index)
            continue
        i = frame.index
        if h.color_compression == 2:
            (out / "color" / f"{i}.jpg").write_bytes(frame.color_data)
        else:
            Image.fromarray(frame.color(h)).save(out / "color" / f"{i}.jpg", quality=95)
        Image.fromarray(np.ascontiguousarray(frame.depth(h))).save(out / "depth" / f"{i}.png")
        np.savetxt(out / "pose" / f"{i}.txt", frame.pose.astype(np.float64), fmt="%f")
        exported.append(i)
    if invalid:
        log.warning("sens.invalid_poses file=%s skipped=%d frames=%s", sens.path, len(invalid),
                    ",".join(map(str, invalid[:20])) + (",..." if len(invalid) > 20 else ""))
    summary = {"source": str(sens.path), "frame_skip": frame_skip, "num_frames": h.num_frames,
               "exported": len(exported), "skipped_invalid_pose": invalid, "depth_shift": h.depth_shift,
               "color_size": [h.color_width, h.color_height], "depth_size": [h.depth_width, h.depth_height]}
    atomic_write_json(out / "export.json", summary)
    return summary
