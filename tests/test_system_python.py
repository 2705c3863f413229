"""The README's two commands on a stock system Python that refuses pip
installs (PEP 668's EXTERNALLY-MANAGED marker, as Debian 12+ ships it): in a
copy of the checkout, `make PYTHON=/usr/bin/python3` makes the project's
.venv, installs the requirements there and builds, and `python3 train.py`
under that same system Python re-executes itself under .venv's and trains
(here that system Python has none of the requirements, so the run needs the
re-execution). A system Python without the venv module or Python.h gets
make's one-line error naming the Debian package.

`CUDA=0` leaves out the CUDA targets, minutes of nvcc that the CPU run does
not need; pip may use its cache. Skips where there is no externally-managed
/usr/bin/python3."""

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import copy_checkout, run_make

SYSTEM_PYTHON = "/usr/bin/python3"
# what pip itself checks (PEP 668): the marker in the stdlib directory, outside a venv
ASK = ("import importlib.util, os, sys, sysconfig; "
       "managed = sys.prefix == sys.base_prefix and "
       "os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')); "
       "print(int(managed), int(bool(importlib.util.find_spec('ensurepip'))), "
       "int(os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))))")


def system_python() -> tuple[bool, bool]:
    """(has the venv module's pip, has Python.h) of the externally-managed system Python; skips without one."""
    if not os.path.exists(SYSTEM_PYTHON):
        pytest.skip(f"no {SYSTEM_PYTHON} here")
    managed, ensurepip, headers = subprocess.run([SYSTEM_PYTHON, "-c", ASK], capture_output=True, text=True,
                                                 check=True, timeout=60).stdout.split()
    if managed != "1":
        pytest.skip(f"{SYSTEM_PYTHON} is not externally managed (no PEP 668 marker): pip installs into it work")
    return ensurepip == "1", headers == "1"


def test_make_and_train_on_an_externally_managed_python(tmp_path):
    can_venv, headers = system_python()
    src = str(tmp_path / "clone")
    copy_checkout(src)
    make = [f"PYTHON={SYSTEM_PYTHON}", "CUDA=0", "-j2"]
    r = run_make(*make, cwd=src, timeout=600)
    if not (can_venv and headers):
        assert r.returncode != 0
        errors = [l for l in r.stdout.splitlines() if l.startswith("Makefile: ") and ("failed" in l or "Python.h" in l)]
        assert len(errors) == 1 and ("python3-venv" if not can_venv else "python3-dev") in errors[0], r.stdout
        assert not os.path.exists(os.path.join(src, ".venv", "bin", "python")), "a half-made .venv was left"
        return
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^\.venv/bin/python -m pip install", r.stdout, re.M), r.stdout
    again = run_make(*make, cwd=src, timeout=120)
    assert again.returncode == 0 and "pip install" not in again.stdout, again.stdout  # .venv is reused

    run = subprocess.run([SYSTEM_PYTHON, "train.py", "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                          "--eval-every", "0", "--sample-tokens", "8", "--threads", "2"],
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"^step 2/2 \| loss [\d.]+", run.stdout, re.M) and "sample:" in run.stdout, run.stdout
    shutil.rmtree(src)  # about 200 MB of .venv and data; kept for a look when the test fails
