"""Generated-on-first-use directories (the embedded datasets) and atomic file writes.

A generated directory is built in a temporary sibling and renamed into place when complete, under
a file lock, so two jobs starting together generate it once and an interrupted generation is
never read as valid. Its ``.complete`` marker records the generator's parameters.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Union

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_generated(target: Path, params: Dict[str, Any], generate: Callable[[Path], None]) -> Path:
    """Return ``target``, generating it with ``generate(tmp_dir)`` unless it is already complete."""
    target = Path(target)
    marker = target / ".complete"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if marker.is_file() and json.loads(marker.read_text()) == params:
            return target
        if target.exists():
            log.info("cache.regenerate path=%s reason=params-changed-or-incomplete", target)
            shutil.rmtree(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        start = time.time()
        try:
            generate(tmp)
            (tmp / ".complete").write_text(json.dumps(params, sort_keys=True))
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("cache.generated path=%s seconds=%.1f", target, time.time() - start)
    return target


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: Union[str, Path], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
