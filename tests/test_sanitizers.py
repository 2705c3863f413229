"""The standalone C trainer under AddressSanitizer and UBSan (built by make
test as build/train_gpt_asan): train, validate, checkpoint, resume, sample."""

import os
import subprocess

from tests.conftest import ROOT

ASAN = os.path.join(ROOT, "build", "train_gpt_asan")


def run(*flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    return subprocess.run([ASAN, *flags], capture_output=True, text=True, timeout=300, env=env)


def test_small_run_is_clean_under_asan_and_ubsan(data_dir, tmp_path):
    assert os.path.exists(ASAN), "build/train_gpt_asan is missing: run `make test`"
    data = ["-i", f"{data_dir}/shakespeare/shakespeare_train_*.bin",
            "-j", f"{data_dir}/shakespeare/shakespeare_val_*.bin", "-z", f"{data_dir}/gpt2_tokenizer.bin"]
    ckpt = str(tmp_path)
    first = run(*data, "-b", "2", "-t", "16", "-a", "2", "-n", "3", "-v", "2", "-g", "4", "-o", ckpt, "-k", "2", "-p", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "val loss" in first.stdout and "sample:" in first.stdout
    resumed = run(*data, "-b", "2", "-t", "16", "-a", "2", "-n", "4", "-v", "0", "-g", "0", "-o", ckpt, "-r")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 4/4" in resumed.stdout
    for r in (first, resumed):
        assert "runtime error" not in r.stderr and "AddressSanitizer" not in r.stderr, r.stderr[-3000:]
