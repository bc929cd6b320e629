"""PLY meshes as ScanNet ships them: binary little-endian vertices (+ faces), read with numpy.

ScanNet's ``_vh_clean_2.ply`` has ``float x, y, z, uchar red, green, blue, alpha`` per vertex and
``property list uchar int vertex_indices`` per face; ``_vh_clean_2.labels.ply`` adds ``ushort label``.
The reader takes any scalar vertex properties and triangle (or general) faces, checks that the
file holds exactly the bytes its header announces, and names the file in every error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_NAMES = {v: k for k, v in reversed(list(_TYPES.items())) if k in ("char", "uchar", "short", "ushort", "int", "uint", "float", "double")}


class PlyError(ValueError):
    """A PLY file is malformed or truncated; the message names the file."""


def _parse_header(path: Path, data: bytes) -> Tuple[str, List[dict], int]:
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise PlyError(f"{path}: not a PLY file (no 'ply' magic or no 'end_header')")
    nl = data.find(b"\n", end)
    body_start = nl + 1 if nl >= 0 else len(data)
    lines = data[:end].decode("ascii", errors="replace").splitlines()
    fmt = None
    elements: List[dict] = []
    for raw in lines[1:]:
        parts = raw.split()
        if not parts or parts[0] in ("comment", "obj_info"):
            continue
        if parts[0] == "format":
            fmt = parts[1]
        elif parts[0] == "element":
            elements.append({"name": parts[1], "count": int(parts[2]), "props": []})
        elif parts[0] == "property":
            if not elements:
                raise PlyError(f"{path}: property before any element in the header")
            if parts[1] == "list":
                elements[-1]["props"].append(("list", parts[4], _np(path, parts[2]), _np(path, parts[3])))
            else:
                elements[-1]["props"].append(("scalar", parts[2], _np(path, parts[1])))
    if fmt is None:
        raise PlyError(f"{path}: header has no 'format' line")
    return fmt, elements, body_start


def _np(path: Path, name: str) -> str:
    try:
        return _TYPES[name]
    except KeyError:
        raise PlyError(f"{path}: unknown PLY property type {name!r}") from None


def read_ply(path: Union[str, Path]) -> Dict[str, np.ndarray]:
    """Vertex properties by name (e.g. ``x``, ``red``, ``label``) plus ``faces`` (F, k) if any."""
    path = Path(path)
    if not path.is_file():
        raise PlyError(f"{path}: file not found")
    data = path.read_bytes()
    fmt, elements, offset = _parse_header(path, data)
    if fmt == "ascii":
        return _read_ascii(path, data[offset:], elements)
    if fmt != "binary_little_endian":
        raise PlyError(f"{path}: format {fmt!r} is not supported (binary_little_endian or ascii)")
    out: Dict[str, np.ndarray] = {}
    for el in elements:
        scalar = [p for p in el["props"] if p[0] == "scalar"]
        lists = [p for p in el["props"] if p[0] == "list"]
        if lists and scalar:
            raise PlyError(f"{path}: element {el['name']!r} mixes list and scalar properties")
        if not lists:
            dtype = np.dtype([(p[1], "<" + p[2]) for p in scalar])
            need = dtype.itemsize * el["count"]
            if offset + need > len(data):
                raise PlyError(
                    f"{path}: truncated: element {el['name']!r} needs {need} bytes "
                    f"({el['count']} x {dtype.itemsize}) from byte {offset}, the file has {len(data)} bytes"
                )
            arr = np.frombuffer(data, dtype=dtype, count=el["count"], offset=offset)
            offset += need
            if el["name"] == "vertex":
                out.update({name: arr[name].copy() for name in arr.dtype.names})
            else:
                out.update({f"{el['name']}_{name}": arr[name].copy() for name in arr.dtype.names})
            continue
        if len(lists) != 1:
            raise PlyError(f"{path}: element {el['name']!r} has {len(lists)} list properties (one supported)")
        _, name, count_t, item_t = lists[0]
        faces, offset = _read_list(path, data, offset, el["count"], count_t, item_t)
        out["faces" if el["name"] == "face" else f"{el['name']}_{name}"] = faces
    if offset != len(data):
        raise PlyError(f"{path}: {len(data) - offset} bytes after the last element (header announces fewer)")
    return out


def _read_list(path: Path, data: bytes, offset: int, count: int, count_t: str, item_t: str
               ) -> Tuple[np.ndarray, int]:
    csize, isize = np.dtype(count_t).itemsize, np.dtype(item_t).itemsize
    if count == 0:
        return np.zeros((0, 3), dtype="<" + item_t), offset
    if offset + csize > len(data):
        raise PlyError(f"{path}: truncated: face list expected at byte {offset}, file has {len(data)} bytes")
    k = int(np.frombuffer(data, dtype="<" + count_t, count=1, offset=offset)[0])
    # Fast path: every face has the same vertex count k (ScanNet meshes are all triangles).
    row = np.dtype([("n", "<" + count_t), ("v", "<" + item_t, (k,))])
    need = row.itemsize * count
    if offset + need <= len(data):
        arr = np.frombuffer(data, dtype=row, count=count, offset=offset)
        if np.all(arr["n"] == k):
            return arr["v"].astype(np.int64), offset + need
    faces = []
    for _ in range(count):
        if offset + csize > len(data):
            raise PlyError(f"{path}: truncated inside the face list at byte {offset}")
        n = int(np.frombuffer(data, dtype="<" + count_t, count=1, offset=offset)[0])
        offset += csize
        if offset + n * isize > len(data):
            raise PlyError(f"{path}: truncated inside the face list at byte {offset}")
        faces.append(np.frombuffer(data, dtype="<" + item_t, count=n, offset=offset).astype(np.int64))
        offset += n * isize
    width = max(len(f) for f in faces)
    out = np.full((count, width), -1, dtype=np.int64)
    for i, f in enumerate(faces):
        out[i, : len(f)] = f
    return out, offset


def _read_ascii(path: Path, body: bytes, elements: List[dict]) -> Dict[str, np.ndarray]:
    lines = body.decode("ascii", errors="replace").splitlines()
    out: Dict[str, np.ndarray] = {}
    pos = 0
    for el in elements:
        rows = lines[pos: pos + el["count"]]
        if len(rows) < el["count"]:
            raise PlyError(f"{path}: truncated: element {el['name']!r} announces {el['count']} rows, "
                           f"found {len(rows)}")
        pos += el["count"]
        if el["props"] and el["props"][0][0] == "list":
            faces = [list(map(int, r.split()[1:])) for r in rows]
            out["faces"] = np.asarray(faces, dtype=np.int64)
            continue
        table = np.asarray([r.split() for r in rows], dtype=np.float64).reshape(len(rows), -1)
        for i, p in enumerate(el["props"]):
            key = p[1] if el["name"] == "vertex" else f"{el['name']}_{p[1]}"
            out[key] = table[:, i].astype(p[2])
    return out


def write_ply(path: Union[str, Path], vertex: Dict[str, np.ndarray], faces: Optional[np.ndarray] = None,
              comment: str = "harness generated") -> Path:
    """Write a binary little-endian PLY; ``vertex`` maps property names to equal-length arrays.

    Property order and types follow the dict (use ScanNet's: x, y, z float32; red, green, blue,
    alpha uint8; label uint16). Faces are written as ``property list uchar int vertex_indices``.
    """
    path = Path(path)
    names = list(vertex)
    n = len(vertex[names[0]])
    dtype = np.dtype([(k, "<" + np.asarray(vertex[k]).dtype.str[1:]) for k in names])
    arr = np.empty(n, dtype=dtype)
    for k in names:
        if len(vertex[k]) != n:
            raise ValueError(f"write_ply: property {k!r} has {len(vertex[k])} values, expected {n}")
        arr[k] = vertex[k]
    header = ["ply", "format binary_little_endian 1.0", f"comment {comment}", f"element vertex {n}"]
    header += [f"property {_NAMES[np.dtype(dtype[k]).str[1:]]} {k}" for k in names]
    body = [arr.tobytes()]
    if faces is not None:
        faces = np.asarray(faces)
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
        frow = np.dtype([("n", "u1"), ("v", "<i4", (faces.shape[1],))])
        farr = np.empty(len(faces), dtype=frow)
        farr["n"] = faces.shape[1]
        farr["v"] = faces
        body.append(farr.tobytes())
    header.append("end_header")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(("\n".join(header) + "\n").encode("ascii") + b"".join(body))
    tmp.replace(path)
    return path
