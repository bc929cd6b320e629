"""The results store: one directory per job under ``runs/<sweep>/``, one ``result.json`` each.

The store is the truth: the launcher and the report trust ``result.json`` (written atomically,
temp file + rename), not the scheduler's state. A result records the metric, seed, config hash,
git commit, wall time, checkpoint path and the checkpoint loader's counts; a failed job records
its error and log path. A job whose result has ``status: done`` and the same config hash is not
run again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from harness.data.cache import atomic_write_json

log = logging.getLogger(__name__)

RESULT = "result.json"
DONE, FAILED = "done", "failed"


def read_jsonl(path: Path) -> Tuple[List[Dict[str, Any]], int]:
    """The records (JSON objects, one a line) of a JSON-lines file such as a job's metric log, and
    how many non-blank lines were not records (cut off when a process died while writing)."""
    records, bad = [], 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            bad += 1
    return records, bad


@dataclass
class Store:
    root: Path  # runs/<sweep>

    def job_dir(self, kind: str, job_id: str) -> Path:
        return self.root / ("pretrain" if kind == "pretrain" else "cells") / job_id

    def result_path(self, kind: str, job_id: str) -> Path:
        return self.job_dir(kind, job_id) / RESULT

    def read(self, kind: str, job_id: str) -> Optional[Dict[str, Any]]:
        path = self.result_path(kind, job_id)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            # Atomic writes never leave one half-written; a disk or a hand did. Say so wherever
            # the job is shown (status, report), and let the next run redo it.
            log.warning("store.unreadable file=%s", path)
            return {"status": FAILED, "unreadable": True,
                    "error": f"{path} is unreadable ({exc}); the next run of the sweep redoes the job"}

    def write(self, kind: str, job_id: str, result: Dict[str, Any]) -> Path:
        return atomic_write_json(self.result_path(kind, job_id), result)

    def archive(self, kind: str, job_id: str) -> Optional[Path]:
        """Move a job's result aside (into ``attempts/``) before the job runs again.

        A re-launched job must not be judged by its previous attempt's result (e.g. a failure
        that a waiting launcher would read as the new attempt's outcome).
        """
        path = self.result_path(kind, job_id)
        if not path.is_file():
            return None
        dest = path.parent / "attempts" / f"result-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9:09d}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        return dest

    def is_done(self, kind: str, job_id: str, config_hash: str) -> bool:
        r = self.read(kind, job_id)
        return bool(r and r.get("status") == DONE and r.get("config_hash") == config_hash)

    def results(self, kind: str = "finetune") -> Iterator[Dict[str, Any]]:
        base = self.root / ("pretrain" if kind == "pretrain" else "cells")
        if not base.is_dir():
            return
        for path in sorted(base.glob(f"*/{RESULT}")):
            try:
                yield json.loads(path.read_text())
            except json.JSONDecodeError:
                log.warning("store.unreadable file=%s", path)

    def write_plan(self, plan: Dict[str, Any]) -> Path:
        return atomic_write_json(self.root / "plan.json", plan)

    def read_plan(self) -> Optional[Dict[str, Any]]:
        path = self.root / "plan.json"
        return json.loads(path.read_text()) if path.is_file() else None
