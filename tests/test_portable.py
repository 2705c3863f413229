"""The build off x86: the C targets cross-compiled for arm64 Linux by the
Makefile (`make CC=aarch64-linux-gnu-gcc train_gpt build/test_sgemm
build/train_gpt_asan`, in a copy of the checkout), and the standalone
trainer run under qemu-user.

The arm64 build must take the portable path: no asm/*.S in its commands, and
no x86 flag (the aarch64 gcc rejects -march=native and
-mprefer-vector-width=512, so the build would fail on them). Trained on a
small model (sizes that are no multiple of any vector width) and a small
shard, it must print the losses and gradient norms of this machine's portable
path (`GPT_NO_ASM=1 ./train_gpt`) within fp32 tolerance, and bitwise the
same output with 1 and 2 threads. (-std=c11 keeps gcc from contracting
multiply-adds into FMAs on either ISA, but the libm differs: glibc runs FMA
variants of expf and logf on x86-64 CPUs that have FMA. So the last bits may
differ, though at the printed precision they agree today.)

The cross gcc and qemu are Debian packages (`make cross-tools`). In CI
(CI=true) the test installs them when they are missing; elsewhere, or where
they cannot be installed (no apt-get, not root), it skips and says why."""

import os
import platform
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import gpt
from dev.data.prepare import write_shard
from tests.conftest import ROOT, copy_checkout, run_make

CROSS_CC = "aarch64-linux-gnu-gcc"
SYSROOT = "/usr/aarch64-linux-gnu"  # where Debian's libc6-arm64-cross puts the arm64 libc and libgomp
# awkward on purpose: C and the head size (9) no multiple of a NEON or AVX vector
CFG = dict(max_seq_len=32, vocab_size=256, padded_vocab_size=264, num_layers=2, num_heads=4, channels=36)
RUN = ["-b", "3", "-t", "24", "-n", "8", "-l", "3e-3", "-u", "2", "-v", "4", "-g", "0"]
# printed losses (6 decimals, about 5) and norms (4 decimals, about 1): after
# 8 steps fp32's differences stay far below this; a wrong kernel does not
LOSS_RTOL = 1e-4
NORM_ATOL = 2e-4


def qemu() -> str | None:
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def cross_tools_missing() -> str | None:
    """None when the cross gcc, its libc and qemu are all here, else what is missing."""
    missing = [name for name, ok in ((CROSS_CC, shutil.which(CROSS_CC)), ("qemu-aarch64", qemu()),
                                     (SYSROOT, os.path.isdir(os.path.join(SYSROOT, "lib")))) if not ok]
    return ", ".join(missing) or None


@pytest.fixture(scope="module")
def cross_tools():
    if platform.machine() != "x86_64":
        pytest.skip(f"the host is {platform.machine()}, not x86-64: there `make test` builds the portable path natively")
    missing = cross_tools_missing()
    if missing and os.environ.get("CI") == "true":
        r = run_make("cross-tools", timeout=480)
        if r.returncode != 0:
            reason = (r.stdout + r.stderr).strip().splitlines()[-1:]
            if shutil.which("apt-get") and os.geteuid() == 0:  # it could have worked: a real failure
                pytest.fail(f"make cross-tools failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
            pytest.skip(f"no arm64 cross tools and they cannot be installed here: {' '.join(reason)}")
        missing = cross_tools_missing()
        assert not missing, f"make cross-tools succeeded but {missing} is still missing"
    if missing:
        pytest.skip(f"no arm64 cross tools ({missing}): `make cross-tools` installs them (Debian/Ubuntu, root)")


@pytest.fixture(scope="module")
def arm_trainer(cross_tools, tmp_path_factory) -> str:
    src = str(tmp_path_factory.mktemp("arm64"))
    copy_checkout(src)
    # every C target of make and make test (the Python module would want arm64's Python.h)
    r = run_make(f"CC={CROSS_CC}", f"PYTHON={sys.executable}", "train_gpt", "build/test_sgemm", "build/train_gpt_asan",
                 cwd=src, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert not re.search(r"\.S\b", r.stdout), f"the arm64 build assembled x86 code:\n{r.stdout}"
    exe = os.path.join(src, "train_gpt")
    with open(exe, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183, "not an AArch64 ELF"
    return exe


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """An llm.c model file with the trainer's seeded init, and a shard of
    byte tokens (this repo's README) for it."""
    d = tmp_path_factory.mktemp("inputs")
    model = gpt.Model(CFG, 0, CFG["num_layers"], 1, CFG["max_seq_len"])
    model.init(11)
    model.write_checkpoint(str(d), 1, 0, 0)  # steps count from 1
    gpt.commit_checkpoint(str(d), 1)  # renames the files into place
    with open(os.path.join(ROOT, "README.md"), "rb") as f:
        write_shard(str(d / "bytes_000.bin"), np.frombuffer(f.read(), np.uint8))
    shard = str(d / "bytes_*.bin")
    return ["-e", str(d / "model_00000001.bin"), "-i", shard, "-j", shard]


def train(cmd: list[str], inputs: list[str], threads: int, **env: str) -> str:
    """The run's step and validation lines, without their timings (which differ run to run)."""
    r = subprocess.run([*cmd, *inputs, *RUN, "-p", str(threads)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [l for l in r.stdout.splitlines() if l.startswith(("step ", "val loss "))]
    return "\n".join(re.sub(r" \| \d+ ms \| \d+ tok/s", "", l) for l in lines)


def figures(out: str, name: str) -> np.ndarray:
    return np.array([float(v) for v in re.findall(rf"{name} ([\d.]+)", out)])


def test_arm64_build_trains_like_the_portable_path(arm_trainer, inputs):
    x86 = os.path.join(ROOT, "train_gpt")
    assert os.path.exists(x86), "./train_gpt is missing: run `make`"
    want = train([x86], inputs, 2, GPT_NO_ASM="1")
    arm = [qemu(), "-L", SYSROOT, arm_trainer]
    got = train(arm, inputs, 2)
    assert train(arm, inputs, 1) == got, "the arm64 build depends on the thread count"
    loss_x86, loss_arm = figures(want, "loss"), figures(got, "loss")
    assert len(loss_x86) == 8 + 2 and len(loss_arm) == len(loss_x86), got  # 8 steps, 2 validations
    np.testing.assert_allclose(loss_arm, loss_x86, rtol=LOSS_RTOL)
    np.testing.assert_allclose(figures(got, "norm"), figures(want, "norm"), rtol=0, atol=NORM_ATOL)
    steps = figures(got, r"\| loss")
    assert steps[-1] < steps[0] - 0.5, f"the arm64 run did not learn: {steps}"
