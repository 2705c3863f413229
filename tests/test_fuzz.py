"""Seeded fuzzing of the three files a run reads: random truncations, byte
flips and header-field changes of a valid model file, optimizer state and
token shard, each run through the ASan/UBSan standalone trainer. Every case
ends in error lines and a non-zero exit, or trains: no crash, no sanitizer
report, no hang, no temporary left and no checkpoint published from it."""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import gpt
from tests.test_hostile import run_asan, tiny_shard
from tests.test_sanitizers import ASAN
from tests.test_train import CFG

CASES_PER_FILE = 100
SEED = 9
# the header ints each format uses: model (magic, version, maxT, V, L, NH, C, Vp),
# state (magic, version, L, C, Vp, maxT, then int64 step, shard, pos), shard (magic, version, ntok)
FIELDS = {"model": range(8), "state": [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13], "shard": range(3)}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict:
    """A committed checkpoint of step 1 of the CFG model, and a shard for it."""
    d = tmp_path_factory.mktemp("fuzz")
    ckpt = str(d / "ckpt")
    os.mkdir(ckpt)
    model = gpt.Model(CFG, 0, CFG["num_layers"], 1, 8)
    model.init(3)
    model.write_checkpoint(ckpt, 1, 0, 8)
    gpt.commit_checkpoint(ckpt, 1)
    tiny_shard(d / "train.bin", n=400)
    return {"dir": str(d), "ckpt": ckpt, "model": f"{ckpt}/model_00000001.bin",
            "state": f"{ckpt}/state_00000001.bin", "shard": str(d / "train.bin")}


def mutate(raw: bytes, target: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """One random change of raw, and what it was (for the failure message)."""
    raw = bytearray(raw)
    how = rng.choice(["truncate", "flip", "field"])
    near = rng.random() < 0.5  # half of the changes land in the header, where the shapes are
    if how == "truncate":
        n = int(rng.integers(0, 1024 if near else len(raw)))
        return bytes(raw[:n]), f"truncated to {n}"
    if how == "flip":
        at = int(rng.integers(0, 64 if near else len(raw)))
        raw[at] ^= int(rng.integers(1, 256))
        return bytes(raw), f"byte {at} flipped"
    field = int(rng.choice(FIELDS[target]))
    old = int(np.frombuffer(raw, "<i4", 1, 4 * field)[0])
    value = int(rng.choice([0, 1, -1, 2**31 - 1, -2**31, 1 << int(rng.integers(0, 31)), old + 1, old - 1,
                            old * 2, -old]))
    value = (value + 2**31) % 2**32 - 2**31
    raw[4 * field:4 * field + 4] = np.int32(value).tobytes()
    return bytes(raw), f"int {field}: {old} -> {value}"


def run_case(originals: dict, i: int, target: str, raw: bytes, what: str) -> str | None:
    """Runs one mutated file; returns what went wrong, or None."""
    case = os.path.join(originals["dir"], f"case{i}")
    ckpt = os.path.join(case, "ckpt")
    shutil.copytree(originals["ckpt"], ckpt)
    files = {"model": originals["model"], "shard": originals["shard"]}
    path = os.path.join(case, "mutated.bin") if target != "state" else f"{ckpt}/state_00000001.bin"
    with open(path, "wb") as f:
        f.write(raw)
    files[target] = path
    # resume from step 1, train step 2 and checkpoint it
    flags = ["-e", files["model"], "-i", files["shard"], "-o", ckpt, "-r", "-n", "2", "-k", "1", "-b", "1",
             "-t", "8", "-v", "0", "-g", "0", "-p", "1"]
    try:
        r = run_asan(*flags, timeout=60)
    except subprocess.TimeoutExpired:
        return f"case {i} ({target}, {what}): hung"
    left = sorted(os.listdir(ckpt))
    shutil.rmtree(case)
    problem = None
    lines = r.stderr.strip().splitlines()
    if r.returncode < 0 or "AddressSanitizer" in r.stderr or "runtime error" in r.stderr:
        problem = f"crashed (status {r.returncode}): {r.stderr[-2000:]}"
    elif any(f.endswith(".tmp") for f in left):
        problem = f"left temporaries: {left}"
    elif r.returncode == 0:
        if not re.search(r"^step 2/2 \| loss \d+\.\d+ ", r.stdout, re.M) or "DONE_00000002" not in left:
            problem = f"exit 0 without training: {r.stdout[-500:]}"
    elif not lines or not lines[-1].startswith("error: ") or \
            not all(l.startswith("warning: ") for l in lines[:-1]):
        problem = f"exit {r.returncode} without one error line: {r.stderr[-1000:]}"
    elif "DONE_00000002" in left:
        problem = "failed, but published a checkpoint"
    return f"case {i} ({target}, {what}): {problem}" if problem else None


def test_fuzzed_files_fail_cleanly_or_train(originals):
    assert os.path.exists(ASAN), "build/train_gpt_asan is missing: run `make test`"
    rng = np.random.default_rng(SEED)
    cases = []
    for target in ("model", "state", "shard"):
        with open(originals[target], "rb") as f:
            raw = f.read()
        cases += [(target, *mutate(raw, target, rng)) for _ in range(CASES_PER_FILE)]
    with ThreadPoolExecutor(2) as pool:
        problems = list(pool.map(lambda ic: run_case(originals, ic[0], *ic[1]), enumerate(cases)))
    problems = [p for p in problems if p]
    assert not problems, "\n".join(problems[:10])
