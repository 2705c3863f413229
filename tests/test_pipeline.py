"""Pipeline ranks: any stage count and schedule computes bitwise what one
stage does; checkpoints move between stage counts; the rendezvous admits only
the job's ranks; a dying rank ends the job quickly and cleanly."""

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gpt
import pipeline
from tests.conftest import ROOT, run_train

# tiny model, 4 micro-batches of one sequence; lr high enough that clipping
# is active in every step (the norm starts above 1)
FLAGS = ["--batch-size", "4", "--seq-len", "16", "--micro-batches", "4", "--lr", "1e-2", "--warmup", "1",
         "--eval-every", "3", "--sample-tokens", "0", "--threads", "1"]


def results(r, ckpt: str, step: int) -> tuple[list[str], bytes, bytes]:
    """The step and val lines without timings, and the final checkpoint's bytes."""
    assert r.returncode == 0, r.stderr
    lines = [re.sub(r" \| \d+ ms \| \d+ tok/s", "", l) for l in r.stdout.splitlines()
             if l.startswith(("step ", "val loss"))]
    with open(f"{ckpt}/model_{step:08d}.bin", "rb") as f, open(f"{ckpt}/state_{step:08d}.bin", "rb") as g:
        return lines, f.read(), g.read()


@pytest.fixture(scope="module")
def one_stage(data_dir, tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("one"))
    r = run_train("--data-dir", data_dir, *FLAGS, "--steps", "3", "--checkpoint-dir", ckpt)
    return results(r, ckpt, 3)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_stages_match_one_stage_bitwise(data_dir, tmp_path, one_stage, schedule, stages):
    ckpt = str(tmp_path)
    r = run_train("--data-dir", data_dir, *FLAGS, "--steps", "3", "--checkpoint-dir", ckpt,
                  "--stages", str(stages), "--schedule", schedule)
    lines, model, state = results(r, ckpt, 3)
    assert lines == one_stage[0]
    assert float(re.search(r"norm ([\d.]+)", lines[0]).group(1)) > 1.0, "clipping should be active"
    assert model == one_stage[1], "parameters differ from the 1-stage run"
    assert state == one_stage[2], "optimizer state differs from the 1-stage run"
    assert "partition: rank 0: layers [0," in r.stdout and "bubble: measured" in r.stdout


def test_resume_with_another_stage_count(data_dir, tmp_path, one_stage):
    ckpt = str(tmp_path)
    first = run_train("--data-dir", data_dir, *FLAGS, "--steps", "3", "--checkpoint-dir", ckpt,
                      "--checkpoint-every", "1", "--stages", "3")
    assert first.returncode == 0, first.stderr
    for step in (2, 3):  # as if the 3-stage run had stopped after step 1
        os.remove(f"{ckpt}/DONE_{step:08d}")
    resumed = run_train("--data-dir", data_dir, *FLAGS, "--steps", "3", "--checkpoint-dir", ckpt, "--resume",
                        "--stages", "2", "--schedule", "zb-h1")
    lines, model, state = results(resumed, ckpt, 3)
    assert "resumed from" in resumed.stdout
    assert lines == one_stage[0][1:]
    assert model == one_stage[1] and state == one_stage[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launchers_on_localhost_match(data_dir, tmp_path, one_stage):
    """The multi-host path: each process is one rank, as srun or torchrun start them."""
    ckpt = str(tmp_path)
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               GPT_JOB_TOKEN=secrets.token_hex(16))  # the outside launcher's shared secret
    cmd = [sys.executable, "train.py", "--data-dir", data_dir, *FLAGS, "--steps", "3", "--checkpoint-dir", ckpt]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=dict(env, RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (1, 0)]  # rank 1 first: it waits
    outs = [p.communicate(timeout=120) for p in procs]
    rank0 = subprocess.CompletedProcess(cmd, procs[1].returncode, outs[1][0], outs[1][1])
    assert procs[0].returncode == 0, outs[0][1]
    lines, model, state = results(rank0, ckpt, 3)
    assert lines == one_stage[0] and model == one_stage[1] and state == one_stage[2]
    assert outs[0][0] == "", "only rank 0 prints"


def test_trace_is_a_chrome_trace_of_every_rank(data_dir, tmp_path):
    trace = str(tmp_path / "trace.json")
    r = run_train("--data-dir", data_dir, *FLAGS, "--steps", "2", "--stages", "2", "--schedule", "zb-h1",
                  "--trace", trace)
    assert r.returncode == 0, r.stderr
    events = [e for e in json.load(open(trace))["traceEvents"] if e["ph"] == "X"]
    ops = pipeline.schedule("zb-h1", 2, 4)
    for rank in (0, 1):
        mine = [e for e in events if e["tid"] == rank]
        assert len(mine) == 2 * len(ops[rank])
        assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in mine)
    m = re.search(r"bubble: measured ([\d.]+)%, simulator ([\d.]+)% .*\(([\d.]+) ms, the median\), "
                  r"([\d.]+)% with free transfers", r.stdout)
    assert m, r.stdout
    measured, with_transfers, transfer_ms, free = map(float, m.groups())
    assert 0 < measured < 100 and 0 < free <= with_transfers < 100 and transfer_ms >= 0


@pytest.mark.parametrize("zero", [0, 3])
def test_trace_of_a_2x2_grid_has_every_rank(data_dir, tmp_path, zero):
    """A 2 x 2 grid's trace: process d is replica d, thread s its stage, and
    each of the four ranks has one event per op of its list per step (the
    collectives and, under --zero 3, the per-layer ops and frees too); the
    bubble is the grid's, with each replica's."""
    trace = str(tmp_path / "trace.json")
    r = run_train("--data-dir", data_dir, *FLAGS, "--batch-size", "8", "--steps", "2", "--stages", "2", "--dp", "2",
                  "--zero", str(zero), "--trace", trace)
    assert r.returncode == 0, r.stderr
    events = json.load(open(trace))["traceEvents"]
    bounds = pipeline.partition(gpt.config_from_name("tiny"), 2, 16)
    ops = pipeline.grid_schedule("1f1b", 2, 2, 4, [hi - lo + 1 for lo, hi in bounds], zero)[0]
    for rank in range(4):
        replica, stage = divmod(rank, 2)
        mine = [e for e in events if e["ph"] == "X" and e["pid"] == replica and e["tid"] in (stage, 2 + stage)]
        assert [e["name"] for e in mine] == [pipeline.label(op) for op in ops[rank]] * 2
        assert all(e["args"]["rank"] == rank and e["dur"] >= 0 and e["ts"] >= 0 for e in mine)
        # --zero 3's collectives are on the track of the stage's comm thread, which runs them
        threaded = [e["tid"] == 2 + stage for e in mine]
        assert threaded == [zero == 3 and op.kind in pipeline.COLLECTIVES for op in ops[rank]] * 2
    names = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names[1, 0] == "stage 0 (rank 2)" and names[1, None].startswith("replica 1")
    assert (names.get((1, 3)) == "stage 1 comm thread (rank 3)") == (zero == 3)
    m = re.search(r"bubble: measured ([\d.]+)% \(replicas: ([\d.]+)%, ([\d.]+)%\), simulator ([\d.]+)%", r.stdout)
    assert m, r.stdout
    grid, first, second, simulated = map(float, m.groups())
    assert grid == pytest.approx((first + second) / 2, abs=0.1) and 0 < simulated < 100


@pytest.mark.parametrize("zero", [0, 3])
def test_trace_of_data_parallel_runs_times_the_collectives(data_dir, tmp_path, zero):
    """One stage on two replicas (DP, FSDP) has a trace and a bubble too: the
    time its compute waits on the collectives. A collective's times are when
    its ring ran (under --zero 3 on the comm thread, not when the compute
    queued it), so no rank finishes a collective before its partner has
    started it: a ring step needs both."""
    trace = str(tmp_path / "trace.json")
    r = run_train("--data-dir", data_dir, *FLAGS, "--micro-batches", "1", "--steps", "2", "--dp", "2",
                  "--zero", str(zero), "--trace", trace)
    assert r.returncode == 0, r.stderr
    events = [e for e in json.load(open(trace))["traceEvents"] if e["ph"] == "X"]
    ops = pipeline.grid_schedule("1f1b", 1, 2, 1, [gpt.config_from_name("tiny")["num_layers"] + 1], zero)[0]
    spans = {}
    for rank in (0, 1):
        mine = [e for e in events if e["pid"] == rank]
        assert [e["name"] for e in mine] == [pipeline.label(op) for op in ops[rank]] * 2
        for position, (e, op) in enumerate(zip(mine, ops[rank] * 2)):
            assert e["tid"] == (1 if zero == 3 and op.kind in pipeline.COLLECTIVES else 0)
            if op.kind in pipeline.COLLECTIVES:  # both ranks list the same collectives in the same order
                spans.setdefault(position, []).append((e["ts"], e["ts"] + e["dur"]))
    assert spans and all(len(both) == 2 for both in spans.values())
    for (a0, a1), (b0, b1) in spans.values():
        assert a1 >= b0 and b1 >= a0
    m = re.search(r"bubble \(the compute waiting on the collectives\): measured ([\d.]+)% \(replicas: [\d.]+%, "
                  r"[\d.]+%\), simulator ([\d.]+)% .*collective times \(mean ([\d.]+) ms", r.stdout)
    assert m, r.stdout
    measured, simulated, collective_ms = map(float, m.groups())
    assert 0 < measured < 100 and 0 < simulated < 100 and collective_ms > 0


# -----------------------------------------------------------------------------
# stages in one process, one thread each (stage_run releases the GIL)

CFG = dict(max_seq_len=16, vocab_size=67, padded_vocab_size=80, num_layers=4, num_heads=2, channels=16)


def threaded_stages(bounds, schedule, m, B=2, T=8, seed=3):
    S = len(bounds)
    pairs = [socket.socketpair() for _ in range(S - 1)]
    tied = socket.socketpair() if S > 1 else (None, None)
    ops = pipeline.schedule(schedule, S, m)
    peak = pipeline.validate(ops, m).peak_held
    models = []
    for r, (lo, hi) in enumerate(bounds):
        model = gpt.Model(CFG, lo, hi, B, T, peak[r])
        model.init(seed)
        prev = pairs[r - 1][1].fileno() if r > 0 else -1
        nxt = pairs[r][0].fileno() if r < S - 1 else -1
        t = tied[0].fileno() if (r == 0 and S > 1) else tied[1].fileno() if (r == S - 1 and S > 1) else -1
        model.set_peers(prev, nxt, t, 10.0)
        models.append(model)
    keep = [pairs, tied]
    return models, [np.array([(o.kind, o.mb) for o in rank_ops]) for rank_ops in ops], keep


def run_threads(fns):
    errors, threads = [None] * len(fns), []
    def wrap(i, fn):
        try:
            fn()
        except Exception as e:
            errors[i] = e
    for i, fn in enumerate(fns):
        threads.append(threading.Thread(target=wrap, args=(i, fn)))
        threads[-1].start()
    for t in threads:
        t.join(timeout=60)
    return errors


def test_tied_embedding_copies_stay_identical():
    rng = np.random.default_rng(0)
    m = 3
    x = rng.integers(0, CFG["vocab_size"], (m, 2, 8)); y = rng.integers(0, CFG["vocab_size"], (m, 2, 8))
    models, ops, keep = threaded_stages([(0, 2), (2, 3), (3, 4)], "1f1b", m)
    for step in range(2):
        def stage(r):
            model = models[r]
            model.run(ops[r], x if r == 0 else None, y if r == 2 else None)
            model.sum_wte_grads()
        assert run_threads([lambda r=r: stage(r) for r in range(3)]) == [None] * 3
        g0, g2 = models[0].grads()["wte"], models[2].grads()["wte"]
        assert np.array_equal(g0, g2) and np.any(g0 != 0)
        for model in models:
            model.adamw(1e-2, 0.1, 1.0, step + 1)
        assert np.array_equal(models[0].params()["wte"], models[2].params()["wte"])
    # and both equal the one-stage model's after the same two steps
    whole = gpt.Model(CFG, 0, 4, 2, 8, 1)
    whole.init(3)
    one = np.array([(k, mb) for mb in range(m) for k in (gpt.FWD, gpt.BWD_INPUT, gpt.BWD_WEIGHT)])
    for step in range(2):
        whole.run(one, x, y)
        whole.sum_wte_grads()
        whole.adamw(1e-2, 0.1, 1.0, step + 1)
    assert np.array_equal(whole.params()["wte"], models[0].params()["wte"])


def test_mismatched_op_lists_are_reported_not_mixed_up():
    rng = np.random.default_rng(0)
    x = rng.integers(0, CFG["vocab_size"], (2, 2, 8)); y = rng.integers(0, CFG["vocab_size"], (2, 2, 8))
    models, ops, keep = threaded_stages([(0, 2), (2, 4)], "gpipe", 2)
    F, B, W, SA, RA, SG, RG = range(7)
    swapped = np.array([(RA, 1), (F, 0), (RA, 0), (F, 1), (B, 0), (W, 0), (SG, 0), (B, 1), (W, 1), (SG, 1)])
    errors = run_threads([lambda: models[0].run(ops[0], x, None), lambda: models[1].run(swapped, None, y)])
    assert isinstance(errors[1], gpt.GPTError)
    assert "expected activation mb 1 from the previous stage, got activation mb 0" in str(errors[1])


# -----------------------------------------------------------------------------
# rendezvous


def assert_connected(rank0: pipeline.Rank, rank1: pipeline.Rank) -> None:
    """The two ranks' control link carries an allreduce."""
    sums = [None, None]
    run_threads([lambda: sums.__setitem__(0, rank0.allreduce(np.array([1.0]))),
                 lambda: sums.__setitem__(1, rank1.allreduce(np.array([2.0])))])
    assert sums[0][0] == sums[1][0] == 3.0


def test_rendezvous_rejects_wrong_token_and_malformed_messages(capsys):
    port = free_port()
    env0 = pipeline.Env(0, 2, "127.0.0.1", port, "secret" * 4)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rank0", pipeline.connect_ranks(env0, timeout=20)))
    t.start()
    deadline = time.monotonic() + 10

    def intruder(payload: bytes, kind=pipeline.HELLO) -> bytes:
        s = pipeline._connect(("127.0.0.1", port), deadline)
        pipeline.recv_json(s, pipeline.CHALLENGE, pipeline.NONCE)
        pipeline.send_msg(s, kind, payload)
        s.settimeout(5)
        try:
            return s.recv(1)  # rank 0 closes on us: b"" (or a reset, if it left bytes unread)
        except ConnectionResetError:
            return b""
        finally:
            s.close()

    s = pipeline._connect(("127.0.0.1", port), deadline)  # the whole handshake, with another secret
    with pytest.raises((ConnectionError, pipeline.ProtocolError)):
        pipeline._join(s, b"wrong", pipeline.HELLO, {"rank": 1, "world": 2, "host": "127.0.0.1", "port": 1},
                       pipeline.TABLE, {"table": list})
    s.close()
    assert intruder(b"{not json") == b""
    assert intruder(json.dumps({"token": "secret" * 4}).encode()) == b""
    assert intruder(b"\x00" * 8, kind=99) == b""
    rank1 = pipeline.connect_ranks(pipeline.Env(1, 2, "127.0.0.1", port, "secret" * 4), timeout=20)
    t.join(timeout=30)
    rank0 = result["rank0"]
    try:
        assert rank0.next is not None and rank0.tied is not None and rank1.prev is not None
        assert_connected(rank0, rank1)
    finally:
        rank0.close()
        rank1.close()
    err = capsys.readouterr().err
    assert "wrong job token" in err and "malformed HELLO" in err and "expected a HELLO message" in err


# -----------------------------------------------------------------------------
# failures: a dead rank ends the job within 10 s, named, with nothing left behind


def rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's children, read from /proc."""
    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != launcher:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            ranks[int(env[b"RANK"])] = int(pid)
        except (OSError, KeyError, ValueError, IndexError):
            continue
    return ranks


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_long_run(data_dir: str, ckpt: str, stages: int = 3, *flags: str) -> tuple[subprocess.Popen, list[str]]:
    """A run of endless steps (unless flags, which come last, say otherwise),
    returned at step 3 (so checkpoints 1 and 2 are published)."""
    p = subprocess.Popen([sys.executable, "train.py", "--data-dir", data_dir, *FLAGS, "--steps", "100000",
                          "--stages", str(stages), "--checkpoint-dir", ckpt, "--checkpoint-every", "1", *flags],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any(l.startswith("step 3/") for l in lines):
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read() if p.poll() else "too slow"
        time.sleep(0.05)
    return p, lines


def assert_clean_end(p: subprocess.Popen, pids: dict[int, int], started: float) -> str:
    p.wait(timeout=20)
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"the job took {elapsed:.1f} s to stop"
    assert p.returncode != 0
    for r, pid in pids.items():
        assert not alive(pid), f"rank {r} (pid {pid}) is still running"
    return p.stderr.read()


def assert_checkpoint_intact(ckpt: str) -> None:
    step = gpt.checkpoint_latest_step(ckpt)
    assert step >= 2
    model = gpt.Model(gpt.config_from_name("tiny"), 0, 4, 1, 16)
    assert model.read_checkpoint(ckpt, step)[0] == step


def test_killed_rank_ends_the_job(data_dir, tmp_path):
    ckpt = str(tmp_path)
    p, _ = start_long_run(data_dir, ckpt)
    pids = rank_pids(p.pid)
    assert sorted(pids) == [0, 1, 2]
    os.kill(pids[1], signal.SIGKILL)
    err = assert_clean_end(p, pids, time.monotonic())
    assert err.strip().splitlines()[-1] == "error: rank 1: killed by signal SIGKILL", err
    assert_checkpoint_intact(ckpt)


def test_ctrl_c_stops_every_rank(data_dir, tmp_path):
    ckpt = str(tmp_path)
    p, _ = start_long_run(data_dir, ckpt)
    pids = rank_pids(p.pid)
    os.kill(p.pid, signal.SIGINT)
    err = assert_clean_end(p, pids, time.monotonic())
    assert "error: interrupted; stopped all 3 ranks" in err
    assert_checkpoint_intact(ckpt)


def test_launcher_names_the_rank_that_raised(tmp_path, capsys):
    """The watchdog alone, over a script whose rank 2 fails with an exception
    while the others wait on it forever (as ranks blocked on a peer would)."""
    script = tmp_path / "rank.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['RANK'] == '2':\n"
                      "    print('error: rank 2 ran out of luck', file=sys.stderr)\n"
                      "    sys.exit(1)\n"
                      "time.sleep(600)\n")
    started = time.monotonic()
    code = pipeline.launch([], 3, str(script))
    assert time.monotonic() - started < 10
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: rank 2: rank 2 ran out of luck"
