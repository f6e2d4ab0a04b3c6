"""benchmarks/common.py: ``write_result`` records the commit and the exact command (script relative to the
repository root, its arguments), and refuses a dirty tree. Run end to end in a throwaway git repository,
so ``git describe --always --dirty`` itself (not a patched value) decides what is clean."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = '''import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result
print(write_result("demo", {"value": 3}))
'''


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "common.py", tmp_path / "benchmarks" / "common.py")
    (tmp_path / "benchmarks" / "demo.py").write_text(DEMO)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-q", "-m", "demo")
    return tmp_path


def run_demo(repo: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LLMSPACE_ALLOW_DIRTY", "LLMSPACE_GIT_DESCRIBE")}
    return subprocess.run([sys.executable, "benchmarks/demo.py", *argv], cwd=repo, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_write_result_records_commit_script_and_argv(repo):
    done = run_demo(repo, "--examples", "5", "--engine", "x y")
    assert done.returncode == 0, done.stderr
    result = json.loads((repo / "benchmarks" / "results" / "demo.json").read_text())
    assert result["machine"]["commit"] == git(repo, "rev-parse", "--short", "HEAD")
    assert result["run"] == {"script": "benchmarks/demo.py", "argv": ["--examples", "5", "--engine", "x y"]}
    assert result["value"] == 3
    # the hook's provenance rule: the recorded commit holds the script that the run names
    git(repo, "cat-file", "-e", f"{result['machine']['commit']}:{result['run']['script']}")


def test_write_result_refuses_a_dirty_tree(repo):
    with open(repo / "benchmarks" / "common.py", "a") as f:
        f.write("\n# an uncommitted edit\n")
    done = run_demo(repo)
    assert done.returncode != 0
    assert "refusing to write results/demo.json from a dirty tree" in done.stderr
    assert not (repo / "benchmarks" / "results" / "demo.json").exists()
    done = run_demo(repo, LLMSPACE_ALLOW_DIRTY="1")    # allowed on request, and then marked
    assert done.returncode == 0, done.stderr
    result = json.loads((repo / "benchmarks" / "results" / "demo.json").read_text())
    assert result["machine"]["commit"].endswith("-dirty")


def test_write_result_keeps_provenance_keys_reserved(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import common
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(common, "DESCRIBE_AT_START", "abc1234")
    with pytest.raises(ValueError, match="reserved"):
        common.write_result("demo", {"run": {"script": "elsewhere.py"}})
    assert not (tmp_path / "demo.json").exists()
