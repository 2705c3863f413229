"""Hostile and careless input to train.py and ./train_gpt: every bad file,
flag or number ends in one line naming it, a non-zero exit, and nothing left
behind (no temporary, no DONE marker over bad data). The standalone trainer
runs under ASan and UBSan (build/train_gpt_asan), so a read out of bounds
would fail the test rather than pass unseen."""

import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

import gpt
from tests.conftest import ROOT, run_train
from tests.test_sanitizers import ASAN
from tests.test_train import CFG, assert_fails, llmc_model_bytes, random_tensors, write_shard

FAST = ["--batch-size", "2", "--seq-len", "16", "--threads", "1", "--eval-every", "0", "--sample-tokens", "0",
        "--warmup", "1"]


def data_flags(data_dir: str) -> list[str]:
    return ["--data-dir", data_dir, *FAST]


def assert_nothing_left(ckpt: str) -> None:
    """No temporary and no published checkpoint in ckpt (if it exists at all)."""
    left = os.listdir(ckpt) if os.path.exists(ckpt) else []
    assert not [f for f in left if f.endswith(".tmp") or f.startswith("DONE")], left


def model_file(path, cfg: dict = CFG, fill: float | None = None) -> None:
    """An llm.c model file of shape cfg, random weights (all `fill` if given)."""
    model = gpt.Model(cfg, 0, cfg["num_layers"], 1, min(8, cfg["max_seq_len"]))
    tensors = [np.full(t.shape, fill, np.float32) if fill is not None else t for t in random_tensors(model)]
    raw = bytearray(llmc_model_bytes(tensors, 3))
    c = cfg
    raw[:32] = struct.pack("<8i", 20240326, 3, c["max_seq_len"], c["vocab_size"], c["num_layers"], c["num_heads"],
                           c["channels"], c["padded_vocab_size"])
    path.write_bytes(bytes(raw))


def tiny_shard(path, n: int = 4000, seed: int = 0) -> None:
    """Tokens below CFG's vocabulary, for runs of the CFG-shaped model."""
    write_shard(path, np.random.default_rng(seed).integers(0, CFG["vocab_size"], n))


def run_asan(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The ASan/UBSan standalone trainer; leaks are not checked, since an
    error exit hands its memory back with the process (test_sanitizers
    checks them on the run that succeeds)."""
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    return subprocess.run([ASAN, *flags], capture_output=True, text=True, timeout=timeout, env=env)


def asan_ok(r) -> None:
    assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr[-3000:]


# -----------------------------------------------------------------------------
# 1. token ids against the model's vocabulary


@pytest.mark.parametrize("token", [50257, 50300, 60000])  # V, in [V, Vp), past Vp
@pytest.mark.parametrize("split", ["train", "val"])
def test_token_outside_the_vocabulary(data_dir, tmp_path, token, split):
    tokens = np.arange(4000) % 1000
    tokens[1234] = token
    bad = tmp_path / "bad.bin"
    write_shard(bad, tokens)
    good = f"{data_dir}/shakespeare/shakespeare_train_*.bin"
    ckpt = str(tmp_path / "ckpt")
    flags = ["--data", str(bad)] if split == "train" else ["--data", good, "--val-data", str(bad)]
    r = run_train(*data_flags(data_dir), *flags, "--eval-every", "1", "--steps", "1", "--checkpoint-dir", ckpt)
    assert_fails(r, "bad.bin", "offset 1234", f"token {token}", "vocabulary of 50257")
    assert_nothing_left(ckpt)


def test_smaller_vocabulary_model_on_the_default_data(data_dir, tmp_path):
    """A valid llm.c file with V=67 meets GPT-2 tokens: named, not a segfault."""
    path = tmp_path / "model.bin"
    model_file(path)
    r = run_train(*data_flags(data_dir), "--init-from", str(path), "--seq-len", "8", "--steps", "1")
    assert_fails(r, "shakespeare_train_000000.bin", "outside the model's vocabulary of 67")


def test_token_past_the_padded_vocabulary_under_asan(tmp_path):
    tokens = np.zeros(4000, np.int64)
    tokens[77] = 60000
    write_shard(tmp_path / "bad.bin", tokens)
    r = run_asan("-i", str(tmp_path / "bad.bin"), "-v", "0", "-g", "0", "-n", "1", "-b", "1", "-t", "8", "-p", "1")
    asan_ok(r)
    assert r.returncode == 1 and r.stderr.strip() == \
        f"error: {tmp_path}/bad.bin: token 60000 at offset 77 is outside the model's vocabulary of 50257"


def test_stage_run_checks_its_tokens():
    model = gpt.Model(CFG, 0, 2, 1, 8)
    model.init(1)
    ops = np.array([[gpt.FWD, 0], [gpt.BWD_INPUT, 0], [gpt.BWD_WEIGHT, 0]])
    x = np.zeros((1, 1, 8), np.intc)
    y = x.copy()
    y[0, 0, 5] = CFG["vocab_size"]
    with pytest.raises(gpt.GPTError, match="target token 67 at index 5 is outside the vocabulary of 67"):
        model.run(ops, x, y)
    with pytest.raises(gpt.GPTError, match="input token -1 at index 5"):
        model.run(ops, x - (y > 0), x)

# -----------------------------------------------------------------------------
# 2. header fields


@pytest.mark.parametrize("field,value", [
    (4, 1 << 30),               # L: once a hang in pipeline.partition
    (6, 1 << 20),               # C
    (2, 0), (2, (1 << 31) - 1),  # maxT
    (3, 100), (7, 66),          # V > Vp (V=100 with Vp=80; Vp=66 under V=67)
    (5, 0), (5, 3),             # NH = 0, C not a multiple of NH
])
def test_model_header_fields_are_range_checked(tmp_path, data_dir, field, value):
    path = tmp_path / "model.bin"
    model_file(path)
    raw = bytearray(path.read_bytes())
    raw[4 * field:4 * field + 4] = struct.pack("<i", value)
    path.write_bytes(bytes(raw))
    started = time.monotonic()
    r = run_train(*data_flags(data_dir), "--init-from", str(path), "--seq-len", "8", "--steps", "1", timeout=60)
    assert_fails(r, "--init-from", "model.bin", "implausible model shape")
    assert time.monotonic() - started < 30


def test_header_that_would_wrap_the_parameter_count(tmp_path):
    """Products of huge fields wrap a 64-bit count to 0; the bounds refuse them first."""
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<256i", 20240326, 3, 1 << 16, 1 << 28, 1 << 20, 1, 1 << 16, 1 << 28, *[0] * 248))
    with pytest.raises(gpt.GPTError, match="implausible model shape"):
        gpt.read_config(str(path))
    with pytest.raises(gpt.GPTError, match="implausible model shape"):
        gpt.Model(dict(CFG, num_layers=1 << 30), 0, 1, 1, 8)


@pytest.fixture(scope="module")
def two_checkpoints(data_dir, tmp_path_factory) -> str:
    """A run's checkpoints of steps 2 and 4."""
    ckpt = str(tmp_path_factory.mktemp("two"))
    r = run_train(*data_flags(data_dir), "--steps", "4", "--checkpoint-dir", ckpt, "--checkpoint-every", "2")
    assert r.returncode == 0, r.stderr
    return ckpt


def copy_of(ckpt: str, tmp_path) -> str:
    d = str(tmp_path / "ckpt")
    shutil.copytree(ckpt, d)
    return d


def patch_state(ckpt: str, checkpoint: int, **fields) -> None:
    path = f"{ckpt}/state_{checkpoint:08d}.bin"
    raw = bytearray(open(path, "rb").read())
    for name, value in fields.items():
        at = {"step": 32, "shard": 40, "pos": 48}[name]
        raw[at:at + 8] = struct.pack("<q", value)
    open(path, "wb").write(raw)


@pytest.mark.parametrize("fields,words", [
    (dict(step=-5), "optimizer state is of step -5, its DONE marker says 4"),
    (dict(step=3), "optimizer state is of step 3, its DONE marker says 4"),
    (dict(shard=-3), "data position shard -3"),
    (dict(pos=-1), "token -1 is negative"),
])
def test_state_header_fields_fall_back_to_an_older_checkpoint(data_dir, tmp_path, two_checkpoints, fields, words):
    ckpt = copy_of(two_checkpoints, tmp_path)
    patch_state(ckpt, 4, **fields)
    r = run_train(*data_flags(data_dir), "--steps", "5", "--checkpoint-dir", ckpt, "--resume")
    assert r.returncode == 0, r.stderr
    assert f"warning: checkpoint of step 4 is unusable" in r.stderr and words in r.stderr, r.stderr
    assert "resumed from" in r.stdout and "at step 2" in r.stdout and "step 5/5" in r.stdout
    # and with no good checkpoint left, resume refuses in one line after the warnings
    patch_state(ckpt, 2, step=-5)
    os.remove(f"{ckpt}/DONE_00000005")
    r = run_train(*data_flags(data_dir), "--steps", "5", "--checkpoint-dir", ckpt, "--resume")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --resume: no finished"), r.stderr

# -----------------------------------------------------------------------------
# 5. the checkpoint directory


def test_resume_falls_back_when_the_newest_files_are_missing(data_dir, tmp_path, two_checkpoints):
    ckpt = copy_of(two_checkpoints, tmp_path)
    os.remove(f"{ckpt}/model_00000004.bin")
    r = run_train(*data_flags(data_dir), "--steps", "4", "--checkpoint-dir", ckpt, "--resume")
    assert r.returncode == 0, r.stderr
    assert "model_00000004.bin: cannot open model file" in r.stderr and "at step 2" in r.stdout


def test_a_run_holds_its_checkpoint_dir(data_dir, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    first = subprocess.Popen([sys.executable, "train.py", *data_flags(data_dir), "--steps", "100000",
                              "--checkpoint-dir", ckpt, "--checkpoint-every", "1"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in first.stdout:
            if line.startswith("step 2/"):
                break
        second = run_train(*data_flags(data_dir), "--steps", "2", "--checkpoint-dir", ckpt, "--resume")
        assert_fails(second, "--checkpoint-dir", "in use by another run")
    finally:
        first.kill()
        first.wait()
    # the lock died with its holder: the directory resumes at once
    again = run_train(*data_flags(data_dir), "--steps", "4", "--checkpoint-dir", ckpt, "--resume")
    assert again.returncode == 0, again.stderr
    assert not [f for f in os.listdir(ckpt) if f.endswith(".tmp")]


def test_fresh_run_refuses_a_dir_with_checkpoints(data_dir, tmp_path, two_checkpoints):
    ckpt = copy_of(two_checkpoints, tmp_path)
    before = sorted(os.listdir(ckpt))
    r = run_train(*data_flags(data_dir), "--steps", "2", "--seed", "7", "--checkpoint-dir", ckpt)
    assert_fails(r, "--checkpoint-dir", "checkpoint file(s) of an earlier run", "--resume", "--overwrite")
    assert sorted(os.listdir(ckpt)) == before
    r = run_train(*data_flags(data_dir), "--steps", "1", "--seed", "7", "--checkpoint-dir", ckpt, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(ckpt)) == ["DONE_00000001", "model_00000001.bin", "state_00000001.bin"]


def test_failed_write_leaves_no_temporaries(data_dir, tmp_path):
    """A file-size limit of 1 MiB stands in for a full disk (the tiny model's checkpoint is 88 MB)."""
    ckpt = str(tmp_path / "ckpt")

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG rather than a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    r = subprocess.run([sys.executable, "train.py", *data_flags(data_dir), "--steps", "1", "--checkpoint-dir", ckpt],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=small_disk)
    assert_fails(r, "ckpt", "File too large")
    assert os.listdir(ckpt) == []


def test_stale_temporaries_are_removed_and_keep_last_k(data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model_00000003.bin.tmp").write_bytes(b"a dead run's")
    (ckpt / "notes.txt").write_text("not ours")
    r = run_train(*data_flags(data_dir), "--steps", "5", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "1",
                  "--keep-checkpoints", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(ckpt)) == ["DONE_00000004", "DONE_00000005", "model_00000004.bin",
                                        "model_00000005.bin", "notes.txt", "state_00000004.bin", "state_00000005.bin"]

# -----------------------------------------------------------------------------
# 6. non-finite numbers


@pytest.mark.parametrize("flag", ["--lr", "--temperature", "--peer-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1e-3"])
def test_non_finite_and_negative_flags(data_dir, flag, value):
    assert_fails(run_train(*data_flags(data_dir), f"{flag}={value}", "--steps", "1"), flag)


@pytest.mark.parametrize("where", ["model", "state"])
def test_nan_in_a_file_is_refused(data_dir, tmp_path, two_checkpoints, where):
    ckpt = copy_of(two_checkpoints, tmp_path)
    for step in (2, 4):
        path = f"{ckpt}/{where}_{step:08d}.bin"
        raw = bytearray(open(path, "rb").read())
        raw[1024 + 40:1024 + 44] = struct.pack("<f", float("nan"))
        open(path, "wb").write(raw)
    flags = ["--init-from", f"{ckpt}/model_00000004.bin"] if where == "model" else \
            ["--checkpoint-dir", ckpt, "--resume"]
    r = run_train(*data_flags(data_dir), *flags, "--steps", "6")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert ("wte element 10 is nan" if where == "model" else "AdamW m element 10 is nan") in r.stderr
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("DONE")) == ["DONE_00000002", "DONE_00000004"]


def test_non_finite_loss_stops_the_run_unpublished(tmp_path):
    """Weights of 1e30 are finite, but the layernorm's variance overflows:
    the first step's loss is NaN. Both trainers stop there, naming it."""
    model, shard, ckpt = tmp_path / "model.bin", tmp_path / "train.bin", str(tmp_path / "ckpt")
    model_file(model, fill=1e30)
    tiny_shard(shard)
    r = run_train("--init-from", str(model), "--data", str(shard), *FAST[:2], "--seq-len", "8", "--steps", "3",
                  "--eval-every", "0", "--sample-tokens", "0", "--threads", "1", "--checkpoint-dir", ckpt,
                  "--checkpoint-every", "1")
    assert_fails(r, "step 1:", "not finite", "stopped before its update and checkpoint")
    assert r.returncode == 1 and os.listdir(ckpt) == []
    r = run_asan("-e", str(model), "-i", str(shard), "-v", "0", "-g", "0", "-n", "3", "-b", "1", "-t", "8",
                 "-p", "1", "-o", ckpt, "-k", "1")
    asan_ok(r)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: step 1: loss nan"), r.stderr
    assert os.listdir(ckpt) == []

# -----------------------------------------------------------------------------
# 7. resource flags and out of memory


@pytest.mark.parametrize("flags,words", [
    (["--threads", "100000"], ["--threads 100000", "between 0 and"]),
    (["--steps", "3000000000"], ["--steps 3000000000"]),
    (["--seed", "-1"], ["--seed -1"]),
    (["--sample-tokens", "2000000000"], ["--sample-tokens 2000000000"]),
    (["--warmup", "3000000000"], ["--warmup"]),
    (["--micro-batches", "100000000", "--batch-size", "100000000"], ["--micro-batches 100000000"]),
    (["--top-k", str(1 << 40)], ["--top-k"]),
    (["--keep-checkpoints", "2"], ["--keep-checkpoints needs --checkpoint-dir"]),
])
def test_resource_flags_are_bounded(data_dir, flags, words):
    assert_fails(run_train(*data_flags(data_dir), *flags), *words)


def test_help_states_each_default_once(capsys):
    """-h appends argparse's "(default: X)" only where the help does not say
    its default itself and X is what the run starts from (None means "per
    device" or "off", which the help words say)."""
    import train
    with pytest.raises(SystemExit):
        train.parse_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    flags = re.split(r" (?=--[a-z])", text[text.index("--device"):])
    assert len(flags) > 30
    for flag in flags:
        assert flag.count("default") <= 1 and "(default: None)" not in flag and "(default: False)" not in flag, flag
    assert any(f.startswith("--steps") and "(default: 300)" in f for f in flags)
    assert any(f.startswith("--model") and "(default: tiny on the CPU, d12 on the GPU)" in f for f in flags)


@pytest.mark.parametrize("env,words", [
    (dict(MASTER_PORT="99999"), ["MASTER_PORT 99999"]),
    (dict(WORLD_SIZE="0"), ["WORLD_SIZE 0"]),
    (dict(GPT_JOB_TOKEN=""), ["GPT_JOB_TOKEN is not set", "export GPT_JOB_TOKEN="]),
])
def test_bad_job_environment(data_dir, env, words):
    full = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511",
            "GPT_JOB_TOKEN": "0123456789abcdef", **env}
    r = subprocess.run([sys.executable, "train.py", *data_flags(data_dir), "--steps", "1"], cwd=ROOT, env=full,
                       capture_output=True, text=True, timeout=60)
    assert_fails(r, *words)


def test_out_of_memory_names_the_allocation(data_dir):
    def small_memory():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    r = subprocess.run([sys.executable, "train.py", *data_flags(data_dir), "--batch-size", "64", "--seq-len", "1024",
                        "--steps", "1"], cwd=ROOT, capture_output=True, text=True, timeout=60, preexec_fn=small_memory)
    assert_fails(r, "out of memory allocating the activations of one micro-batch", "x 4 bytes", "MiB")


@pytest.mark.parametrize("flags,words", [
    (["-p", "100000"], "-p 100000: expected a whole number in [0,"),
    (["-b", "abc"], "-b abc: expected a whole number"),
    (["-n", "3000000000"], "-n 3000000000"),
    (["-l", "nan"], "-l nan: expected a learning rate"),
    (["-x", "-1"], "-x -1: expected a seed"),
])
def test_standalone_flags_are_bounded(flags, words):
    r = run_asan(*flags, "-v", "0", "-g", "0")
    asan_ok(r)
    assert r.returncode == 1 and r.stderr.strip().startswith("error: ") and words in r.stderr, r.stderr

# -----------------------------------------------------------------------------
# 8. and 9. everything a run needs, checked before step 1


def short_tokenizer(data_dir: str, tmp_path, n: int = 100) -> str:
    """A copy of the GPT-2 tokenizer file cut to its first n tokens."""
    raw = open(f"{data_dir}/gpt2_tokenizer.bin", "rb").read()
    body, at = raw[1024:], 0
    for _ in range(n):
        at += 1 + body[at]
    header = bytearray(raw[:1024])
    header[8:12] = struct.pack("<i", n)
    path = tmp_path / "gpt2_tokenizer.bin"
    path.write_bytes(bytes(header) + body[:at])
    return str(path)


@pytest.mark.parametrize("case", ["val glob", "trace dir", "trace one stage", "tokenizer"])
def test_inputs_are_checked_before_step_1(data_dir, tmp_path, case):
    train = f"{data_dir}/shakespeare/shakespeare_train_*.bin"
    flags, words = {
        "val glob": (["--data", train, "--val-data", str(tmp_path / "none_*.bin"), "--eval-every", "3"],
                     ["no token shards match", "none_*.bin"]),
        "trace dir": (["--stages", "2", "--trace", str(tmp_path / "nodir" / "t.json")], ["--trace", "nodir"]),
        "trace one stage": (["--trace", str(tmp_path / "t.json")], ["--trace", "--stages 2"]),
        "tokenizer": (["--data-dir", str(tmp_path), "--data", train, "--sample-tokens", "8"],
                      ["gpt2_tokenizer.bin", "100 tokens", "vocabulary of 50257"]),
    }[case]
    if case == "tokenizer":
        short_tokenizer(data_dir, tmp_path)
    r = run_train(*data_flags(data_dir), "--steps", "3", *flags)
    assert_fails(r, *words)
    assert "step 1/" not in r.stdout


def test_prompt_with_end_of_text_samples(data_dir):
    r = run_train(*data_flags(data_dir), "--steps", "1", "--sample-tokens", "4", "--prompt", "ROMEO:<|endoftext|>")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("sample:\n", 1)[1].startswith("ROMEO:<|endoftext|>")


def test_offline_tinyshakespeare_names_the_train_flag(data_dir, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    proxy = "http://127.0.0.1:9"  # nothing listens there: the download fails at once
    env = dict(os.environ, http_proxy=proxy, https_proxy=proxy, HTTPS_PROXY=proxy, HTTP_PROXY=proxy)
    r = subprocess.run([sys.executable, "train.py", "--data-dir", str(d), "--data", "tinyshakespeare"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=60)
    assert_fails(r, "--data tinyshakespeare: cannot download", "use --data shakespeare")
    assert "--source" not in r.stderr


def test_standalone_checks_tokenizer_and_checkpoint_dir_first(data_dir, tmp_path):
    train = ["-i", f"{data_dir}/shakespeare/shakespeare_train_*.bin", "-v", "0", "-b", "1", "-t", "8", "-n", "3",
             "-p", "1"]
    r = run_asan(*train, "-g", "16", "-z", short_tokenizer(data_dir, tmp_path))
    asan_ok(r)
    assert r.returncode == 1 and "tokenizer of 100 tokens" in r.stderr and "step 1/" not in r.stdout, r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_asan(*train, "-g", "0", "-o", str(blocker / "ckpt"), "-k", "3")
    asan_ok(r)
    assert r.returncode == 1 and "not writable" in r.stderr and "step 1/" not in r.stdout, r.stderr
