"""The project's virtual environment, .venv, which `make` creates when the
Python it is given refuses pip installs (PEP 668: Debian 12+, Ubuntu 23.04+)
and then installs the requirements into and builds the gpt module for. Once
.venv exists the Makefile always uses it, so the entry points follow it:
`python3 train.py` under any other interpreter re-executes itself under
.venv's, with the same command line."""

import os
import sys

VENV = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv")


def reexec_in_project_venv() -> None:
    """Replace this process with the same command under .venv/bin/python,
    when .venv exists and this interpreter is not already its."""
    python = os.path.join(VENV, "bin", "python")
    if os.path.exists(python) and os.path.realpath(sys.prefix) != os.path.realpath(VENV):
        os.execv(python, [python, *sys.orig_argv[1:]])
