"""Killing the launcher of a 2-stage run any way (SIGTERM, SIGHUP, SIGKILL)
leaves no rank behind within seconds, and the last complete checkpoint
still resumes; Ctrl-C of a 1-stage run ends in one line."""

import os
import signal
import time

import pytest

import gpt
from tests.conftest import run_train
from tests.test_pipeline import FLAGS, alive, rank_pids, start_long_run


def wait_gone(pids, seconds: float) -> list[int]:
    """The pids still alive after waiting up to `seconds` for them to end."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_killing_the_launcher_leaves_no_rank(data_dir, tmp_path, sig):
    ckpt = str(tmp_path)
    p, _ = start_long_run(data_dir, ckpt, 2)
    pids = rank_pids(p.pid)
    assert sorted(pids) == [0, 1]
    os.kill(p.pid, sig)
    p.wait(timeout=20)
    assert wait_gone(pids.values(), 5.0) == [], "a rank outlived its launcher"
    err = p.stderr.read().strip().splitlines()
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:  # handled like Ctrl-C
        assert p.returncode == 130 and err[-1] == "error: interrupted; stopped all 2 ranks", err
    step = gpt.checkpoint_latest_step(ckpt)
    assert step >= 2
    r = run_train("--data-dir", data_dir, *FLAGS, "--steps", str(step + 1), "--checkpoint-dir", ckpt, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"at step {step}" in r.stdout and f"step {step + 1}/{step + 1}" in r.stdout
    assert not [f for f in os.listdir(ckpt) if f.endswith(".tmp")]


def test_ctrl_c_of_one_stage_is_one_line(data_dir, tmp_path):
    p, _ = start_long_run(data_dir, str(tmp_path), 1)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=20)
    assert p.returncode == 130 and p.stderr.read().strip() == "error: interrupted"
