"""What the benchmarks stamp their results with, and how they write them."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def commit_id(paths: tuple[str, ...] = ()) -> str:
    """The checkout's short commit, `-dirty` when tracked files (under `paths`, repository-relative,
    if given) have uncommitted changes. Without a git checkout (the GPU machine gets the working
    tree without .git; bench/gpu.sh passes the commit) `$FLEXKV_COMMIT`, else "unknown"."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True).stdout.strip()
        if not sha:
            return os.environ.get("FLEXKV_COMMIT") or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except OSError:
        return os.environ.get("FLEXKV_COMMIT") or "unknown"


def write_results(out: Path, res: dict, md: str) -> None:
    """`<out>.json` (res) and `<out>.md` (md), and md to stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(md)
    print(md)
