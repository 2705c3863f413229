"""train.py end to end: training, checkpoints and resume, and bad input."""

import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

import gpt
from tests.conftest import ROOT, run_train

SMALL = ["--batch-size", "4", "--seq-len", "32", "--warmup", "5", "--threads", "2"]


def step_lines(out: str) -> list[str]:
    """The step lines without their timings, which differ run to run."""
    return [re.sub(r" \| \d+ ms \| \d+ tok/s", "", l) for l in out.splitlines() if l.startswith("step ")]


def losses(out: str) -> list[float]:
    return [float(m) for m in re.findall(r"^step \d+/\d+ \| loss ([\d.]+)", out, re.M)]


def test_training_lowers_the_loss_and_prints_a_sample(data_dir):
    r = run_train("--data-dir", data_dir, *SMALL, "--steps", "40", "--eval-every", "20",
                  "--sample-tokens", "16", "--prompt", "ROMEO:")
    assert r.returncode == 0, r.stderr
    loss = losses(r.stdout)
    assert len(loss) == 40
    assert np.mean(loss[-5:]) < np.mean(loss[:5]) - 1.0
    assert re.search(r"^step 40/40 \| loss [\d.]+ \| lr [\d.e+-]+ \| norm [\d.]+ \| \d+ ms \| \d+ tok/s$",
                     r.stdout, re.M)
    assert len(re.findall(r"^val loss [\d.]+$", r.stdout, re.M)) == 2
    sample = r.stdout.split("sample:\n", 1)[1]
    assert sample.startswith("ROMEO:") and len(sample.strip()) > 10


def test_resume_continues_bitwise(data_dir, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    flags = ["--data-dir", data_dir, *SMALL, "--micro-batches", "2", "--steps", "6", "--eval-every", "0",
             "--sample-tokens", "0"]
    a = run_train(*flags, "--checkpoint-dir", full)
    b1 = run_train(*flags, "--checkpoint-dir", part, "--checkpoint-every", "3")
    os.remove(os.path.join(part, "DONE_00000006"))  # as if the first run had stopped after step 3
    b2 = run_train(*flags, "--checkpoint-dir", part, "--resume", "--threads", "1")
    for r in (a, b1, b2):
        assert r.returncode == 0, r.stderr
    assert "resumed from" in b2.stdout
    assert step_lines(b2.stdout) == step_lines(a.stdout)[3:]
    for name in ("model_00000006.bin", "state_00000006.bin"):
        with open(os.path.join(full, name), "rb") as f, open(os.path.join(part, name), "rb") as g:
            assert f.read() == g.read(), name


CFG = dict(max_seq_len=16, vocab_size=67, padded_vocab_size=80, num_layers=2, num_heads=4, channels=32)


def llmc_model_bytes(tensors: list[np.ndarray], version: int) -> bytes:
    """An llm.c model file, laid out byte by byte as llm.c's train_gpt2.c documents it."""
    c = CFG
    header = [20240326, version, c["max_seq_len"], c["vocab_size"], c["num_layers"], c["num_heads"],
              c["channels"], c["padded_vocab_size"]] + [0] * 248
    if version == 3:
        payload = b"".join(t.astype("<f4").tobytes() for t in tensors)
    else:  # bf16: the top 16 bits of each fp32
        payload = b"".join((t.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes() for t in tensors)
    return struct.pack("<256i", *header) + payload


def random_tensors(model) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(p.shape).astype(np.float32) for p in model.params().values()]


@pytest.mark.parametrize("version", [3, 5])
def test_llmc_model_file_loads(tmp_path, version):
    model = gpt.Model(CFG, 0, 2, 1, 8)
    tensors = random_tensors(model)
    path = tmp_path / "model.bin"
    path.write_bytes(llmc_model_bytes(tensors, version))
    assert gpt.read_config(str(path)) == CFG
    model.load(str(path))
    for t, (name, p) in zip(tensors, model.params().items()):
        want = t if version == 3 else (t.view(np.uint32) & 0xFFFF0000).view(np.float32)
        assert np.array_equal(p, want), name


def test_checkpoint_round_trip(tmp_path):
    a = gpt.Model(CFG, 0, 2, 1, 8)
    a.init(5)
    a.write_checkpoint(str(tmp_path), 7, 0, 123)
    assert gpt.checkpoint_latest_step(str(tmp_path)) == -1  # not committed yet
    gpt.commit_checkpoint(str(tmp_path), 7)
    assert gpt.checkpoint_latest_step(str(tmp_path)) == 7
    assert sorted(os.listdir(tmp_path)) == ["DONE_00000007", "model_00000007.bin", "state_00000007.bin"]
    b = gpt.Model(CFG, 0, 2, 1, 8)
    assert b.read_checkpoint(str(tmp_path), 7) == (7, 0, 123)
    for name, p in a.params().items():
        assert np.array_equal(p, b.params()[name]), name
    # the model file is a plain llm.c file: header, then all 16 tensors in order
    raw = (tmp_path / "model_00000007.bin").read_bytes()
    assert struct.unpack("<8i", raw[:32]) == (20240326, 3, 16, 67, 2, 4, 32, 80)
    flat = np.concatenate([p.ravel() for p in a.params().values()])
    assert raw[1024:] == flat.astype("<f4").tobytes()


# -----------------------------------------------------------------------------
# bad input: one line on stderr, a non-zero exit, nothing half-written


def assert_fails(r, *words: str) -> None:
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0], lines[0]


def write_shard(path, tokens, magic=20240520, version=1, ntok=None):
    header = [magic, version, len(tokens) if ntok is None else ntok] + [0] * 253
    path.write_bytes(struct.pack("<256i", *header) + np.asarray(tokens, "<u2").tobytes())


@pytest.fixture
def ckpt(tmp_path):
    return str(tmp_path / "ckpt")


def test_missing_data(tmp_path, ckpt):
    r = run_train("--data", str(tmp_path / "nothing_*.bin"), "--checkpoint-dir", ckpt)
    assert_fails(r, "no token shards match", "nothing_*.bin")
    assert os.listdir(ckpt) == []


@pytest.mark.parametrize("case,words", [
    ("magic", ["bad.bin", "not a token shard"]),
    ("version", ["bad.bin", "version 7"]),
    ("truncated", ["bad.bin", "truncated"]),
])
def test_bad_shard(tmp_path, ckpt, case, words):
    path = tmp_path / "bad.bin"
    tokens = np.arange(1000) % 50257
    if case == "magic":
        write_shard(path, tokens, magic=1234)
    elif case == "version":
        write_shard(path, tokens, version=7)
    else:
        write_shard(path, tokens, ntok=2000)
    r = run_train("--data", str(path), "--checkpoint-dir", ckpt, "--steps", "1")
    assert_fails(r, *words)
    assert os.listdir(ckpt) == []


@pytest.mark.parametrize("case,words", [
    ("magic", ["not an llm.c model file"]),
    ("version", ["model version 4"]),
    ("truncated", ["truncated"]),
])
def test_bad_checkpoint(tmp_path, data_dir, case, words):
    model = gpt.Model(CFG, 0, 2, 1, 8)
    raw = bytearray(llmc_model_bytes(random_tensors(model), 3))
    if case == "magic":
        raw[0:4] = struct.pack("<i", 42)
    elif case == "version":
        raw[4:8] = struct.pack("<i", 4)
    else:
        raw = raw[:-100]
    path = tmp_path / "model.bin"
    path.write_bytes(bytes(raw))
    r = run_train("--data-dir", data_dir, "--init-from", str(path), "--seq-len", "8", "--steps", "1")
    assert_fails(r, "model.bin", *words)


@pytest.mark.parametrize("flags,words", [
    (["--seq-len", "2048"], ["--seq-len 2048", "1024"]),
    (["--batch-size", "6", "--micro-batches", "4"], ["--batch-size 6", "--micro-batches 4"]),
    (["--model", "gpt5"], ["--model", "unknown model 'gpt5'"]),
    (["--resume"], ["--resume needs --checkpoint-dir"]),
    (["--stages", "5"], ["--stages 5", "4 layers"]),
])
def test_bad_flags(data_dir, flags, words):
    assert_fails(run_train("--data-dir", data_dir, *flags), *words)


def test_unwritable_checkpoint_dir(tmp_path, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    r = run_train("--data-dir", data_dir, "--checkpoint-dir", str(blocker / "ckpt"), "--steps", "1")
    assert_fails(r, "--checkpoint-dir", "not writable")
    assert blocker.read_text() == "not a directory"


def test_cuda_without_a_gpu(data_dir):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "train.py", "--data-dir", data_dir, "--device", "cuda"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=env)
    assert_fails(r, "--device cuda")
    assert "no GPU is visible" in r.stderr or "not built" in r.stderr


def test_resume_without_checkpoint(data_dir, ckpt):
    assert_fails(run_train("--data-dir", data_dir, "--checkpoint-dir", ckpt, "--resume"), "no finished checkpoint")
