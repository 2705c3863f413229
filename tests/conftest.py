"""Shared fixtures: the prepared Shakespeare data, made once per test session."""

import os
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
