"""Shared fixtures: the prepared Shakespeare data, made once per test session."""

import os
import shutil
import subprocess
import sys

import pytest

from dev.data.prepare import prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("data"))
    prepare(d, "shakespeare", progress=False)
    return d


def run_train(*flags: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """python train.py with flags, from the repo root."""
    return subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def copy_checkout(dst: str) -> None:
    """The files a fresh clone of this checkout would have, with the changes
    not yet committed (git's tracked and untracked, not its ignored: no
    build outputs, no data), copied to dst."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, f)):  # a deleted file git still tracks is skipped
            os.makedirs(os.path.join(dst, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def run_make(*args: str, cwd: str = ROOT, timeout: float = 600) -> subprocess.CompletedProcess:
    """make with args in cwd, free of the make that may be running the tests
    (its MAKEFLAGS would pass on its variables and jobserver)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
