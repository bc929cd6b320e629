"""Published numbers as data: the paper's Table 1 ships as ``harness/data/published/table1.csv``.

The file is long-form, one line per (method, dataset, task): ``method,dataset,task,metric,value``
with values in percent and ``#`` comment lines naming the source. A sweep column matches a
published value by its (dataset, task) pair, so ``scannet-semseg`` or any other column id of
ScanNet semantic segmentation compares with the paper's ScanNet Semantic number. Another file of
the same form can be given instead (``harness report RUN --compare path/to/table.csv``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Tuple

import pandas as pd

PUBLISHED = "published"
COLUMNS = ("method", "dataset", "task", "metric", "value")


def published_path(name: str) -> Path:
    """``published`` = the packaged Table 1 of the paper; anything else is a CSV path."""
    if name == PUBLISHED:
        return Path(str(resources.files("harness.data") / "published" / "table1.csv"))
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"--compare {name}: neither 'published' nor an existing CSV file")
    return path


def load_published(name: str = PUBLISHED) -> Tuple[pd.DataFrame, str]:
    """The published table (columns ``COLUMNS``) and a one-line description of its source."""
    path = published_path(name)
    frame = pd.read_csv(path, comment="#", skipinitialspace=True)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    bad = frame[pd.to_numeric(frame["value"], errors="coerce").isna()]
    if len(bad):
        raise ValueError(f"{path}: line for {bad.iloc[0]['method']}/{bad.iloc[0]['dataset']}/{bad.iloc[0]['task']}: "
                         f"value {bad.iloc[0]['value']!r} is not a number")
    dup = frame[frame.duplicated(["method", "dataset", "task"], keep=False)]
    if len(dup):
        r = dup.iloc[0]
        raise ValueError(f"{path}: {r['method']}/{r['dataset']}/{r['task']} is listed more than once")
    frame["value"] = frame["value"].astype(float)
    first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
    source = first or str(path)
    return frame, source
