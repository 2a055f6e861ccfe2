"""bench/stamp.py: the commit every benchmark stamps (git, else $FLEXKV_COMMIT) and the writer."""
from __future__ import annotations

import json
import subprocess

from helpers import load_bench


def test_commit_id_from_git_else_the_environment(monkeypatch):
    st = load_bench("stamp")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=st.ROOT, text=True,
                         capture_output=True).stdout.strip()
    if sha:
        assert st.commit_id().split("-")[0] == sha
    monkeypatch.setenv("FLEXKV_COMMIT", "abc1234")

    def no_git(*a, **k):
        raise OSError("no git")

    monkeypatch.setattr(st.subprocess, "run", no_git)
    assert st.commit_id() == "abc1234"
    monkeypatch.setattr(st.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "not a repo"))
    assert st.commit_id() == "abc1234"
    monkeypatch.delenv("FLEXKV_COMMIT")
    assert st.commit_id() == "unknown"


def test_write_results(tmp_path, capsys):
    st = load_bench("stamp")
    st.write_results(tmp_path / "sub" / "r", dict(a=1), "# table\n")
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == dict(a=1)
    assert (tmp_path / "sub" / "r.md").read_text() == "# table\n"
    assert "# table" in capsys.readouterr().out
