"""scripts/setup-env.sh redoes only what changed: the pip install when requirements-test.txt
changed, the extension build when its sources, build files or requirements changed or the built
library is gone. Python is stubbed: the stub logs what it was asked to do."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Logs each request; `pip install -e` "builds" the library and "installs" the package.
STUB = r'''#!/usr/bin/env bash
case "$*" in
  "-m pip install --upgrade pip") ;;
  "-m pip install -r "*) echo requirements >> "$STUB_LOG" ;;
  "-m pip install --no-build-isolation --no-deps -v -e "*)
    echo build >> "$STUB_LOG"; date +%s%N > "$STUB_ROOT/dms/_C.cpython-311-x86_64-linux-gnu.so"
    touch "$STUB_VENV/installed" ;;
  "-c "*) [ -f "$STUB_VENV/installed" ] && echo "$STUB_ROOT/dms" || echo ;;
  *check_build.py*) ;;
  *) echo "unexpected: $*" >&2; exit 1 ;;
esac
'''


@pytest.fixture
def tree(tmp_path):
    root, venv = tmp_path / "repo", tmp_path / "venv"
    (root / "scripts").mkdir(parents=True)
    for name in ("setup-env.sh", "build-env.sh"):
        shutil.copy(ROOT / "scripts" / name, root / "scripts")
    for name in ("requirements-test.txt", "setup.py", "pyproject.toml", "CMakeLists.txt"):
        (root / name).write_text(name)
    (root / "csrc").mkdir()
    (root / "csrc" / "op.cpp").write_text("int x;\n")
    (root / "dms").mkdir()
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(STUB)
    (venv / "bin" / "python").chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv}/bin:$PATH"\n')
    return root, venv


def setup_env(root: Path, venv: Path) -> list[str]:
    log = root.parent / "log.txt"
    log.write_text("")
    env = {**os.environ, "DMS_VENV": str(venv), "STUB_LOG": str(log), "STUB_ROOT": str(root),
           "STUB_VENV": str(venv)}
    subprocess.run(["bash", "-c", ". scripts/setup-env.sh"], cwd=root, env=env, check=True, capture_output=True)
    return log.read_text().split()


def test_first_run_does_everything_and_a_repeat_nothing(tree):
    assert setup_env(*tree) == ["requirements", "build"]
    assert setup_env(*tree) == []


def test_changed_source_rebuilds_only(tree):
    root, venv = tree
    setup_env(root, venv)
    (root / "csrc" / "op.cpp").write_text("int y;\n")
    assert setup_env(root, venv) == ["build"]
    assert setup_env(root, venv) == []


def test_changed_requirements_reinstall_and_rebuild(tree):
    root, venv = tree
    setup_env(root, venv)
    (root / "requirements-test.txt").write_text("torch==9\n")
    assert setup_env(root, venv) == ["requirements", "build"]


def test_changed_build_variable_rebuilds(tree, monkeypatch):
    root, venv = tree
    setup_env(root, venv)
    monkeypatch.setenv("DMS_BUILD_CUDA", "0")
    assert setup_env(root, venv) == ["build"]


def test_missing_or_replaced_library_rebuilds(tree):
    root, venv = tree
    setup_env(root, venv)
    library = next((root / "dms").glob("_C*.so"))
    library.unlink()
    assert setup_env(root, venv) == ["build"]
    library.write_text("built by hand, bigger than before\n")
    assert setup_env(root, venv) == ["build"]


def test_package_not_installed_from_this_tree_rebuilds(tree):
    root, venv = tree
    setup_env(root, venv)
    (venv / "installed").unlink()
    assert setup_env(root, venv) == ["build"]
