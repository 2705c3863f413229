"""Data parallelism: D replicas of the pipeline, each on its slice of every
global batch, their gradients summed over a ring of sockets.

Invariants: for a fixed D, every stage count, schedule and zero stage gives
bitwise the same losses, parameters and optimizer state, because each
element's sum over the replicas runs in one order that depends only on its
chunk and D (common.h, ring_collective). Across D the sums are reordered, so
results agree with the 1-rank run within fp32 rounding and with the float64
reference within test_model's tolerances. The transport's byte counts equal
the formulas, and the stage's allocations the sum of their parts (under
--zero 3: the shards and the validator's buffers). Bad grids are one-line
errors; a killed rank of a 2 x 2 grid, or of an FSDP run, ends the job, and
resuming is bitwise, across zero stages too."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import gpt
import pipeline
from dev import reference as ref
from tests.conftest import ROOT, run_train
from tests.test_model import CFG, RCFG, B, T, batches, rough_params, step_ops
from tests.test_pipeline import FLAGS, assert_clean_end, rank_pids, results, run_threads, start_long_run

# -----------------------------------------------------------------------------
# replicas in one process, one thread each (stage_run releases the GIL)


def ring_of(models: list, zero: int) -> list:
    """Joins the models into a data-parallel ring; returns the sockets to keep."""
    D = len(models)
    links = [socket.socketpair() for _ in range(D)]  # links[d]: replica d -> d+1
    for d, model in enumerate(models):
        model.set_replicas(links[d - 1][1].fileno(), links[d][0].fileno(), d, D, zero)
    return links


def train_replicas(params: dict, data: list, steps: int, m: int, lr: float, D: int, zero: int, trainer=gpt):
    """steps AdamW steps of D whole-model replicas of the trainer module; step
    k's global batch is data[k*m*D:(k+1)*m*D], replica d taking the d-th m of
    it, as train.py does. Returns the models and (loss, norm) per step."""
    models = [trainer.Model(CFG, 0, CFG["num_layers"], B, T, 1) for _ in range(D)]
    for model in models:
        model.set_params(params)
    keep = ring_of(models, zero) if D > 1 else []
    buckets = CFG["num_layers"] + 1
    train_ops, after_ops = pipeline.data_parallel_ops(buckets, zero) if D > 1 else ([], [])
    ops = np.vstack([np.hstack([step_ops(m), np.full((3 * m, 1), -1)])] + [np.array([op]) for op in train_ops])
    history = step_replicas(models, [ops] * D, np.array(after_ops).reshape(-1, 3), data, steps, m, lr, trainer)
    del keep
    return models, history


def step_replicas(models: list, ops: list, after: np.ndarray, data: list, steps: int, m: int, lr: float,
                  trainer=gpt) -> list:
    """steps AdamW steps of replicas already on their ring, replica d running
    its op list ops[d] on the d-th m of each global batch, then `after` (the
    op list after the optimizer, may be empty). Returns (loss, norm) per step."""
    D = len(models)
    history, losses = [], [0.0] * D
    for step in range(steps):
        batch = data[step * m * D:(step + 1) * m * D]

        def replica(d):
            x = np.stack([xy[0] for xy in batch[d * m:(d + 1) * m]])
            y = np.stack([xy[1] for xy in batch[d * m:(d + 1) * m]])
            losses[d] = models[d].run(ops[d], x, y)
            models[d].sum_wte_grads()
        assert run_threads([lambda d=d: replica(d) for d in range(D)]) == [None] * D
        parts = sum(model.grad_norm_parts() for model in models)  # in replica order, as the launcher adds them
        norm = trainer.norm_from_parts(parts, CFG["num_layers"])
        for model in models:
            model.adamw(lr, 0.1, 1.0 / norm if norm > 1.0 else 1.0, step + 1)
        if len(after):
            assert run_threads([lambda d=d: models[d].run(after, None, None, False) for d in range(D)]) == [None] * D
        history.append((sum(losses) / (m * D), norm))
    return history


@pytest.mark.parametrize("D,zero", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_replicas_match_one_rank_and_the_reference(D, zero):
    """Tolerances: against the 1-rank run over the same micro-batches, losses
    within 5e-7 relative and norms within 1e-6: the two runs differ only in
    the order the D partial gradients are added, which costs a few fp32 eps
    (1.2e-7) per step, carried into the next step's parameters (measured: at
    most 7e-8 and 2e-8 over 3 steps); parameters within 5e-6 absolute, since
    Adam turns a near-zero gradient's rounding into a step of up to lr
    (measured: 8e-7). Against float64, test_model's tolerances (1e-5, 1e-4,
    1e-4)."""
    params = rough_params(7)
    steps, m, lr = 3, 1, 1e-2
    data = batches(8, steps * m * D)
    models, history = train_replicas(params, data, steps, m, lr, D, zero)
    one, one_history = train_replicas(params, data, steps, m * D, lr, 1, 0)
    p = {k: v.copy() for k, v in params.items()}
    mom = {k: np.zeros_like(v) for k, v in p.items()}
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    clipped = False
    for step in range(steps):
        loss, norm = ref.train_step(p, mom, vel, step + 1, RCFG, data[step * m * D:(step + 1) * m * D], lr)
        clipped |= norm > 1.0
        assert abs(history[step][0] - loss) / loss < 1e-5
        assert abs(history[step][1] - norm) / norm < 1e-4
        assert abs(history[step][0] - one_history[step][0]) / loss < 5e-7
        assert abs(history[step][1] - one_history[step][1]) / norm < 1e-6
    assert clipped, "the test should exercise clipping"
    C = CFG["channels"]
    for d in range(D):  # every replica ends with the same parameters, bitwise
        for name, value in models[d].params().items():
            assert np.array_equal(value, models[0].params()[name]), f"replica {d}: {name}"
    for name, c in models[0].params().items():
        diff, diff_one = np.abs(c - p[name].reshape(c.shape)), np.abs(c - one[0].params()[name])
        if name == "qkvb":  # the key bias: a zero gradient in exact arithmetic (see test_model)
            diff, diff_one = (x[:, np.r_[0:C, 2 * C:3 * C]] for x in (diff, diff_one))
        assert np.max(diff) < 1e-4, f"{name}: {np.max(diff):.2e} from float64 after {steps} steps"
        assert np.max(diff_one) < 5e-6, f"{name}: {np.max(diff_one):.2e} from the 1-rank run"


def test_ring_sums_in_its_canonical_order():
    """Each chunk's sum starts on the replica after its owner and ends on the
    owner: with three replicas holding 1e8, 1 and -1e8 in fp32 (where 1e8 + 1
    rounds to 1e8), chunk 0 is (1 + -1e8) + 1e8 = 0, chunk 1 is (-1e8 + 1e8)
    + 1 = 1 and chunk 2 is (1e8 + 1) + -1e8 = 0, on every replica."""
    D = 3
    cfg = dict(max_seq_len=4, vocab_size=6, padded_vocab_size=6, num_layers=1, num_heads=1, channels=3)
    models = [gpt.Model(cfg, 0, 1, 1, 2, 1) for _ in range(D)]
    keep = ring_of(models, 0)
    values = (1e8, 1.0, -1e8)
    for d, model in enumerate(models):
        for g in model.grads().values():
            g[...] = values[d]
    # an op list without micro-batches leaves the gradients as they are
    ops = np.array([pipeline.Op(gpt.ALLREDUCE, -1, 0)])
    assert run_threads([lambda d=d: models[d].run(ops) for d in range(D)]) == [None] * D
    del keep
    for model in models:
        for name in ("ln1w", "qkvw", "fcprojw"):
            g = model.grads()[name].ravel()
            size = -(-g.size // D)
            want = np.concatenate([np.full(min(size, g.size - j * size), v) for j, v in enumerate((0.0, 1.0, 0.0))])
            assert np.array_equal(g, want), name


# -----------------------------------------------------------------------------
# the validator over a grid


def test_grid_validator_checks_collectives_like_sends():
    S, D, m = 2, 2, 2
    train, after = pipeline.grid_schedule("1f1b", S, D, m, [3, 3], 0)
    result = pipeline.validate_grid(train, S, m, buckets=[3, 3])
    assert result.peak_held == pipeline.validate(pipeline.schedule("1f1b", S, m), m).peak_held * D
    assert pipeline.validate_grid(after, S, 0, training=False).peak_held == [0] * 4
    AR = pipeline.ALLREDUCE

    def fails(ranks, *words, **kw):
        with pytest.raises(pipeline.ScheduleError) as e:
            pipeline.validate_grid(ranks, S, m, **kw)
        assert all(w in str(e.value) for w in words), str(e.value)

    swapped = [list(ops) for ops in train]
    swapped[2][-2:] = swapped[2][-1:-3:-1]  # replica 1's stage 0 reduces its buckets in another order
    fails(swapped, "rank 2: collective 1 of stage 0 is ALLREDUCE bucket 2, but rank 0's is ALLREDUCE bucket 1")
    fails([ops[:-1] if r == 3 else ops for r, ops in enumerate(train)], "rank 3: collective 2 of stage 1 is nothing")
    fails(train, "ALLREDUCE bucket 2, but stage 0 has 2 buckets", buckets=[2, 3])
    # the cycle: rank 0 waits in its all-reduce for rank 2, which waits in the
    # pipeline for rank 3, which waits in its all-reduce for rank 1, which
    # waits for rank 0's activations
    pipe = pipeline.schedule("1f1b", S, m)
    ar = pipeline.Op(AR, -1, 0)
    cycle = [[ar] + pipe[0], pipe[1] + [ar], pipe[0] + [ar], [ar] + pipe[1]]
    fails(cycle, "deadlock", "rank 0 waits at position 0 (ALLREDUCE bucket 0) for rank 2")
    one = pipeline.grid_schedule("1f1b", S, 1, m, [3, 3], 0)[0]
    fails([ops + [ar] for ops in one], "ALLREDUCE bucket 0 but the stage has no other replica")


def test_fsdp_validator_checks_gathers_frees_and_their_order():
    """--zero 3 lists: the peaks of gathered layers and of layer gradients
    are counted from the list; compute on a layer that is not gathered, a
    FREE of a bucket that is not held and replicas that reduce-scatter in
    another order are one-line errors."""
    S, D, m, buckets = 2, 2, 2, [3, 3]
    Op, AG, FREE, RS = pipeline.Op, pipeline.ALLGATHER, pipeline.FREE, pipeline.REDUCE_SCATTER
    train, after = pipeline.grid_schedule("zb-h1", S, D, m, buckets, 3)
    assert after == [[]] * (S * D)
    result = pipeline.validate_grid(train, S, m, buckets=buckets, zero=3)
    # a layer computes while the next is gathered; zb-h1 defers the Ws, so
    # both layers' gradients are held from the first micro-batch's W to the last one's
    assert result.peak_gathered == [2] * 4 and result.peak_grads == [2] * 4
    assert result.peak_held == pipeline.validate(pipeline.schedule("zb-h1", S, m), m).peak_held * D

    def fails(ranks, *words):
        with pytest.raises(pipeline.ScheduleError) as e:
            pipeline.validate_grid(ranks, S, m, buckets=buckets, zero=3)
        first = str(e.value).splitlines()[0]
        assert all(w in first for w in words), first

    ungathered = [list(ops) for ops in train]
    i = ungathered[1].index(Op(pipeline.FWD, 0, 1))
    j = max(k for k in range(i) if ungathered[1][k] == Op(AG, -1, 1))
    del ungathered[1][i + 1], ungathered[1][j]  # rank 1's FWD of layer 1 without its ALLGATHER and FREE
    fails(ungathered, "rank 1: FWD mb 0 layer 1: bucket 1 is not gathered")
    unheld = [[Op(FREE, -1, 0)] + ops if r == 0 else ops for r, ops in enumerate(train)]
    fails(unheld, "rank 0: FREE bucket 0: FREE of a bucket that is not held")
    swapped = [list(ops) for ops in train]
    assert swapped[2][-3:] == [Op(RS, -1, 0), Op(RS, -1, 2), Op(FREE, -1, 2)]
    swapped[2][-3:-1] = swapped[2][-2:-4:-1]  # replica 1's stage 0 reduces its last two buckets the other way round
    fails(swapped, "rank 2: collective", "is REDUCE_SCATTER bucket 2, but rank 0's is REDUCE_SCATTER bucket 0")


def tiny_bucket_sizes(lo: int, hi: int) -> list[int]:
    """Values per bucket of a tiny stage [lo, hi): each layer's, then its whole tensors'."""
    params = gpt.Model(gpt.config_from_name("tiny"), lo, hi, 1, 16, 1).params()
    layer = sum(v[0].size for k, v in params.items() if k not in ("wte", "wpe", "lnfw", "lnfb"))
    return [layer] * (hi - lo) + [sum(v.size for k, v in params.items() if k in ("wte", "wpe", "lnfw", "lnfb"))]


def test_fsdp_allocates_its_shards_and_the_validators_buffers():
    """stage_memory_bytes against the sum of its parts, counted here from the
    stage's tensors: zero 0 keeps P parameters, gradients and AdamW moments;
    zero 1 chunk d of every (tensor, layer) segment of the moments; zero 3
    chunk d of all three, plus the gathered and gradient buffers it was
    given (a layer's 12 tensors each) and the whole tensors' two buffers."""
    cfg, D = gpt.config_from_name("tiny"), 2
    whole = ("wte", "wpe", "lnfw", "lnfb")
    params = gpt.Model(cfg, 0, 4, 1, 16, 1).params()

    def chunk(n: int, d: int) -> int:  # common.h's chunk_range: ceil(n/D) each, the last ones shorter
        size = -(-n // D)
        return max(0, min(n, (d + 1) * size) - min(n, d * size))
    for d in range(D):
        shard = sum(chunk(v.size if k in whole else v[0].size, d) * (1 if k in whole else len(v))
                    for k, v in params.items())
        layer, whole_bucket = tiny_bucket_sizes(0, 4)[0], tiny_bucket_sizes(0, 4)[-1]
        P, wte = sum(v.size for v in params.values()), params["wte"].size
        for zero, want in [(0, (P, P + wte, 2 * P, 0, 0)), (1, (P, P + wte, 2 * shard, 0, 0)),
                           (3, (shard, shard + wte, 2 * shard, 2 * layer + whole_bucket, 3 * layer + whole_bucket))]:
            model = gpt.Model(cfg, 0, 4, 1, 16, 1)
            a, b = socket.socketpair()
            model.set_replicas(a.fileno(), b.fileno(), d, D, zero)
            if zero == 3:
                model.set_layer_buffers(2, 3)
                assert model.params() == {}, "a sharded stage has no whole tensors to show"
            got = model.memory_bytes()
            assert (got["params"], got["grads"], got["optimizer"], got["gathered"], got["grad_buffers"]) == \
                tuple(4 * n for n in want), (zero, d, got)
            a.close(); b.close()


# -----------------------------------------------------------------------------
# whole runs: train.py over a grid of processes

def grid_run(data_dir: str, ckpt: str, stages: int, dp: int, zero: int, schedule: str = "1f1b",
             micro: int = 2, steps: int = 3, *extra: str):
    r = run_train("--data-dir", data_dir, *FLAGS, "--steps", str(steps), "--checkpoint-dir", ckpt,
                  "--stages", str(stages), "--dp", str(dp), "--zero", str(zero), "--schedule", schedule,
                  "--micro-batches", str(micro), *extra)
    return results(r, ckpt, steps), r


@pytest.fixture(scope="module")
def two_replicas(data_dir, tmp_path_factory):
    return grid_run(data_dir, str(tmp_path_factory.mktemp("dp2")), 1, 2, 0)[0]


@pytest.mark.parametrize("stages,zero,schedule", [(1, 1, "1f1b"), (2, 0, "zb-h1"), (2, 1, "gpipe"), (1, 3, "1f1b"),
                                                  (2, 3, "zb-h1")])
def test_fixed_dp_is_bitwise_across_stages_schedules_and_zero(data_dir, tmp_path, two_replicas, stages, zero,
                                                              schedule):
    (lines, model, state), r = grid_run(data_dir, str(tmp_path), stages, 2, zero, schedule)
    assert float(re.search(r"norm ([\d.]+)", lines[0]).group(1)) > 1.0, "clipping should be active"
    assert lines == two_replicas[0]
    assert model == two_replicas[1], "parameters differ from the 1-stage, zero-0 run"
    assert state == two_replicas[2], "optimizer state differs from the 1-stage, zero-0 run"


def test_three_replicas_bitwise_across_stages_and_zero(data_dir, tmp_path):
    """D = 3, where the order of a sum matters (with two, a + b = b + a)."""
    flags = ("--batch-size", "6")
    a, _ = grid_run(data_dir, str(tmp_path / "a"), 1, 3, 0, "1f1b", 1, 2, *flags)
    b, _ = grid_run(data_dir, str(tmp_path / "b"), 2, 3, 1, "zb-h1", 1, 2, *flags)
    assert a == b


def test_across_dp_close_to_one_rank(data_dir, tmp_path, two_replicas):
    """The same 4 micro-batches per step on one rank: losses within 5e-7
    relative (see test_replicas_match_one_rank_and_the_reference)."""
    (lines, _, _), _ = grid_run(data_dir, str(tmp_path), 1, 1, 0, "1f1b", 4)
    for mine, theirs in zip(two_replicas[0], lines):
        a, b = (float(re.search(r"loss ([\d.]+)", l).group(1)) for l in (mine, theirs))
        assert abs(a - b) / b < 5e-7, (mine, theirs)


def test_checkpoint_of_two_replicas_resumes_on_one(data_dir, tmp_path):
    """A 2-replica checkpoint (each replica writing its chunks, --zero 1) is
    one llm.c file: one rank resumes from it, and its step 3 is within the
    across-D tolerance of the 2-replica run's."""
    ckpt = str(tmp_path)
    _, first = grid_run(data_dir, ckpt, 1, 2, 1, "1f1b", 2, 3, "--checkpoint-every", "1")
    os.remove(f"{ckpt}/DONE_{3:08d}")
    gpt.Model(gpt.config_from_name("tiny"), 0, 4, 1, 16).load(f"{ckpt}/model_{2:08d}.bin")
    (lines, _, _), resumed = grid_run(data_dir, ckpt, 1, 1, 0, "1f1b", 4, 3, "--resume")
    assert "resumed from" in resumed.stdout
    a, b = (float(re.search(r"step 3/3 \| loss ([\d.]+)", out).group(1)) for out in (resumed.stdout, first.stdout))
    assert abs(a - b) / b < 5e-7 and lines[0].startswith("step 3/3")


def traffic(out: str) -> dict[int, dict[str, tuple[int, int]]]:
    found = {}
    for m in re.finditer(r"traffic per step: rank (\d+) .*?: pipeline sent (\d+) B received (\d+) B \| tied sent "
                         r"(\d+) B received (\d+) B \| data-parallel sent (\d+) B received (\d+) B", out):
        v = list(map(int, m.groups()))
        found[v[0]] = {"pipeline": (v[1], v[2]), "tied": (v[3], v[4]), "dp": (v[5], v[6])}
    return found


def fsdp_values_moved(ops: list, sizes: list[int], D: int) -> int:
    """--zero 3's ring traffic each way in values, from the op list: a bucket
    gathered g_b times and reduce-scattered once moves (g_b + 1)(D-1)/D * P_b."""
    gathers = [sum(op.kind == pipeline.ALLGATHER and op.part == b for op in ops) for b in range(len(sizes))]
    return sum((g + 1) * (D - 1) * P_b // D for g, P_b in zip(gathers, sizes))


def test_fsdp_formula_is_three_times_the_shard_traffic_for_one_micro_batch():
    """With one micro-batch every layer is gathered twice (forward, backward)
    and reduce-scattered once: 3(D-1)/D * P_layers, and the whole tensors,
    gathered once for the step, 2(D-1)/D * P_whole."""
    D, sizes = 2, tiny_bucket_sizes(0, 4)
    ops = pipeline.grid_schedule("1f1b", 1, D, 1, [5], 3)[0][0]
    assert fsdp_values_moved(ops, sizes, D) == 3 * (D - 1) * sum(sizes[:-1]) // D + 2 * (D - 1) * sizes[-1] // D


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_bytes_moved_match_the_formulas(data_dir, tmp_path, zero):
    """Per step and rank of a 2 x 2 grid, in fp32 bytes: the pipeline sends
    b*T*C values per micro-batch across its boundary and receives as many
    (2*b*T*C in all); the tied swap Vp*C each way; the data-parallel ring
    2(D-1)/D * P_stage each way (an all-reduce, or a reduce-scatter plus an
    all-gather), and under zero 3 the formula of the rank's op list
    (fsdp_values_moved); exactly, since D = 2 divides every segment of the
    tiny model."""
    S, D, m, b, T = 2, 2, 2, 1, 16
    _, r = grid_run(data_dir, str(tmp_path), S, D, zero, "1f1b", m, 2, "--eval-every", "0")
    got = traffic(r.stdout)
    assert sorted(got) == [0, 1, 2, 3], r.stdout
    cfg = gpt.config_from_name("tiny")
    C, Vp = cfg["channels"], cfg["padded_vocab_size"]
    bounds = pipeline.partition(cfg, S, T)
    train_ops = pipeline.grid_schedule("1f1b", S, D, m, [hi - lo + 1 for lo, hi in bounds], zero)[0]
    for rank, moved in got.items():
        lo, hi = bounds[rank % S]
        sizes = tiny_bucket_sizes(lo, hi)
        assert moved["pipeline"] == (4 * m * b * T * C,) * 2
        assert moved["tied"] == (4 * Vp * C,) * 2
        values = fsdp_values_moved(train_ops[rank], sizes, D) if zero == 3 else 2 * (D - 1) * sum(sizes) // D
        assert moved["dp"] == (4 * values,) * 2


@pytest.mark.parametrize("flags,words", [
    (["--dp", "3"], ["--batch-size 4", "--dp 3"]),
    (["--zero", "1"], ["--zero 1", "--dp 2"]),
    (["--zero", "3"], ["--zero 3", "--dp 2"]),
    (["--dp", "0"], ["--dp 0", "between 1 and"]),
    (["--dp", "2", "--micro-batches", "3"], ["--batch-size 4", "--dp 2", "--micro-batches 3"]),
])
def test_bad_grid_flags(data_dir, flags, words):
    r = run_train("--data-dir", data_dir, *FLAGS, "--steps", "1", *flags)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(w in last for w in words), r.stderr


@pytest.mark.parametrize("model,S,D,m,zero", [("tiny", 1, 2, 1, 3), ("tiny", 2, 2, 4, 3), ("tiny", 4, 3, 2, 1),
                                              ("d12", 4, 8, 8, 0), ("d12", 1, 4, 16, 3), ("d12", 12, 1, 24, 0)])
def test_plan_fits_the_bound_its_receivers_set(model, S, D, m, zero):
    """Under an outside launcher rank 0 broadcasts the grid plan's JSON and
    the others refuse more than plan_bytes_bound: every real plan must fit,
    and the bound must not be so loose that it bounds nothing."""
    import argparse
    from dataclasses import asdict
    import json
    import train
    config = gpt.config_from_name(model)
    args = argparse.Namespace(stages=S, dp=D, micro_batches=m, seq_len=64, schedule="zb-h1" if S > 1 else "1f1b",
                              zero=zero)
    size = len(json.dumps(asdict(train.make_grid_plan(args, config))).encode())
    bound = train.plan_bytes_bound(args, config, S * D)
    assert size <= bound < 20 * size + 4096, (size, bound)


def test_a_plan_in_the_environment_longer_than_the_bound_is_refused(monkeypatch):
    """GPT_PLAN, our launcher's copy of the plan, is held to the same bound
    as the rendezvous' broadcast: one byte over it is refused before it is parsed."""
    import argparse
    import types
    import train
    config = gpt.config_from_name("tiny")
    args = argparse.Namespace(stages=2, dp=1, micro_batches=2, seq_len=64, schedule="1f1b", zero=0)
    bound = train.plan_bytes_bound(args, config, 2)
    monkeypatch.setenv("GPT_PLAN", " " * (bound + 1))
    with pytest.raises(ValueError, match=f"GPT_PLAN: {bound + 1} bytes, more than a plan for these flags can take"):
        train.grid_plan_of(args, types.SimpleNamespace(world=2, rank=1), config)
    monkeypatch.setenv("GPT_PLAN", " " * bound)  # within the bound it reaches the parser, which refuses it
    with pytest.raises(ValueError, match="plan from the launcher"):
        train.grid_plan_of(args, types.SimpleNamespace(world=2, rank=1), config)


def test_world_size_must_be_stages_times_dp(data_dir):
    env = dict(os.environ, RANK="0", WORLD_SIZE="3", MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
               GPT_JOB_TOKEN="a-shared-secret-of-32-characters")
    r = subprocess.run([sys.executable, "train.py", "--data-dir", data_dir, *FLAGS, "--stages", "2", "--dp", "2"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == "error: WORLD_SIZE 3 is not --stages 2 x --dp 2 ranks", r.stderr


def test_killed_rank_of_an_fsdp_run_ends_the_job(data_dir, tmp_path):
    """kill -9 of replica 1 of a 1 x 2 --zero 3 run: its peer, waiting in a
    ring step, sees the link close; the job ends within seconds, naming it."""
    p, _ = start_long_run(data_dir, str(tmp_path), 1, "--micro-batches", "2", "--dp", "2", "--zero", "3")
    pids = rank_pids(p.pid)
    assert sorted(pids) == [0, 1]
    started = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    err = assert_clean_end(p, pids, started)
    assert err.strip().splitlines()[-1] == "error: rank 1: killed by signal SIGKILL", err


@pytest.mark.parametrize("written,resumed", [(3, 0), (0, 3)])
def test_checkpoint_resumes_bitwise_across_zero_3(data_dir, tmp_path, two_replicas, written, resumed):
    """A checkpoint of step 2 written under one zero stage, resumed under the
    other, ends at step 3 bitwise where the uninterrupted zero-0 run does."""
    ckpt = str(tmp_path)
    grid_run(data_dir, ckpt, 1, 2, written, "1f1b", 2, 3, "--checkpoint-every", "1")
    os.remove(f"{ckpt}/DONE_{3:08d}")
    (lines, model, state), r = grid_run(data_dir, ckpt, 1, 2, resumed, "1f1b", 2, 3, "--resume")
    assert f"resumed from {ckpt} at step 2" in r.stdout
    assert lines == two_replicas[0][-len(lines):]
    assert model == two_replicas[1] and state == two_replicas[2]


@pytest.mark.parametrize("rank,zero", [(0, 0), (1, 3), (2, 3)])
def test_killed_rank_of_a_grid_ends_the_job(data_dir, tmp_path, rank, zero):
    """kill -9 of each other rank of a 2 x 2 grid (rank 3's is below, with the
    resume), under zero 0 and zero 3, whose comm threads wait on the ring
    beside the pipeline's sends: the job ends within seconds, naming it, and
    leaves no rank behind."""
    p, _ = start_long_run(data_dir, str(tmp_path), 2, "--micro-batches", "2", "--dp", "2", "--zero", str(zero))
    pids = rank_pids(p.pid)
    assert sorted(pids) == [0, 1, 2, 3]
    started = time.monotonic()
    os.kill(pids[rank], signal.SIGKILL)
    err = assert_clean_end(p, pids, started)
    assert err.strip().splitlines()[-1] == f"error: rank {rank}: killed by signal SIGKILL", err


def test_killed_rank_of_a_grid_ends_the_job_and_resume_is_bitwise(data_dir, tmp_path):
    """kill -9 of rank 3 (stage 1 of replica 1) of a 2 x 2 grid; then the
    checkpoint resumes as 1 stage x 2 replicas with --zero 1 and ends bitwise
    where an uninterrupted 2 x 2 run does."""
    ckpt, steps = str(tmp_path / "killed"), 30
    p, _ = start_long_run(data_dir, ckpt, 2, "--micro-batches", "2", "--steps", str(steps), "--dp", "2")
    pids = rank_pids(p.pid)
    assert sorted(pids) == [0, 1, 2, 3]
    started = time.monotonic()
    os.kill(pids[3], signal.SIGKILL)
    err = assert_clean_end(p, pids, started)
    assert err.strip().splitlines()[-1] == "error: rank 3: killed by signal SIGKILL", err
    last = gpt.checkpoint_latest_step(ckpt)
    assert 2 <= last < steps
    resumed = run_train("--data-dir", data_dir, *FLAGS, "--micro-batches", "2", "--steps", str(steps), "--stages",
                        "1", "--dp", "2", "--zero", "1", "--checkpoint-dir", ckpt, "--resume")
    assert f"resumed from {ckpt} at step {last}" in resumed.stdout, resumed.stderr
    (lines_r, model_r, state_r) = results(resumed, ckpt, steps)
    (lines_u, model_u, state_u), _ = grid_run(data_dir, str(tmp_path / "whole"), 2, 2, 0, "1f1b", 2, steps)
    assert lines_r == lines_u[-len(lines_r):]
    assert model_r == model_u and state_r == state_u
