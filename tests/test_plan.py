"""plan.py against hand-computed cases: the pipeline simulator, the alpha-beta
formulas, the trainer's own parameter counts, and bad input."""

import os
import subprocess
import sys

from dataclasses import replace

import pytest

import gpt
import pipeline
import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(plan.model_config("d12"))
FREE = plan.Link(float("inf"), 0.0)


def cluster(gpus: int, via: plan.Link = FREE, overlap: str = "all", per_node: int = 8) -> plan.Cluster:
    return plan.Cluster(gpus, per_node, via, via, flops=1e15, achieved=0.5, memory=80 * 2**30, hbm=3e12,
                        overlap=overlap)


def layer_costs(f: float, b: float, w: float, optimizer: float = 0.0) -> plan.OpCosts:
    """Every layer the same and no embedding or head: a balanced pipeline."""
    return plan.OpCosts((0.0, f, 0.0), (0.0, b, 0.0), (0.0, w, 0.0), optimizer)


@pytest.mark.parametrize("schedule", list(pipeline.SCHEDULES))
def test_pipeline_with_free_communication_is_the_simulators_bubble(schedule):
    # a vocabulary small enough that the partition cuts 12 layers into 4 x 3
    cfg, S, m = dict(CFG, vocab_size=100, padded_vocab_size=128), 4, 8
    assert pipeline.partition(cfg, S, 64) == [(0, 3), (3, 6), (6, 9), (9, 12)]
    costs = layer_costs(1.0, 1.2, 0.7)
    got = plan.evaluate(cfg, cluster(S), plan.Batch(m, 1, 64), plan.Layout(S, 1, 0, schedule), costs)
    per_stage = 3
    timeline = pipeline.simulate(pipeline.schedule(schedule, S, m),
                                 pipeline.Costs(per_stage * 1.0, per_stage * 1.2, per_stage * 0.7))
    assert got.comm == 0.0
    assert got.step == pytest.approx(timeline.step_time, rel=1e-12)
    assert got.bubble / got.step == pytest.approx(timeline.bubble_fraction, rel=1e-12)


def test_unbalanced_pipeline_step_is_the_simulators_plus_the_optimizer():
    # the real per-layer formula (the head outweighs layers), the optimizer after the pipeline
    S, m, batch = 2, 4, plan.Batch(4, 1, 64)
    costs = plan.flop_costs(CFG, batch, cluster(S))
    got = plan.evaluate(CFG, cluster(S), batch, plan.Layout(S, 1, 0, "1f1b"), costs)
    bounds = pipeline.partition(CFG, S, 64)
    f, b, w = zip(*(costs.stage(CFG, lo, hi, 1) for lo, hi in bounds))
    timeline = pipeline.simulate(pipeline.schedule("1f1b", S, m), pipeline.Costs(list(f), list(b), list(w)))
    optimizer = max(plan.stage_params(CFG, lo, hi) for lo, hi in bounds) * costs.optimizer
    assert got.step == pytest.approx(timeline.step_time + optimizer, rel=1e-12)
    assert got.compute == pytest.approx(max(m * (f[r] + b[r] + w[r]) + plan.stage_params(CFG, *bounds[r])
                                            * costs.optimizer for r in range(S)), rel=1e-12)


def ring_gather(nbytes: float, g: int, bandwidth: float, latency: float) -> float:
    return (g - 1) / g * nbytes / bandwidth + (g - 1) * latency  # written out here, not taken from plan


def executor_fsdp_seconds(m: int, precision: plan.Precision, bandwidth: float, latency: float) -> float:
    """The collectives of the executor's own --zero 3 op list (pipeline.fsdp_ops) for one stage of
    CFG and m micro-batches, each priced by ring_gather at its bucket's size: layer l is bucket l,
    the whole tensors (wte, wpe, lnf) the last."""
    L, C = CFG["num_layers"], CFG["channels"]
    layer = 12 * C * C + 13 * C
    whole = CFG["padded_vocab_size"] * C + CFG["max_seq_len"] * C + 2 * C
    ops = pipeline.fsdp_ops(pipeline.schedule("1f1b", 1, m)[0], L)
    total = 0.0
    for op in ops:
        n = whole if op.part == L else layer
        if op.kind == pipeline.ALLGATHER:
            total += ring_gather(n * precision.gathered, D_FSDP, bandwidth, latency)
        elif op.kind == pipeline.REDUCE_SCATTER:
            total += ring_gather(n * precision.gradient, D_FSDP, bandwidth, latency)
    return total


D_FSDP = 4


@pytest.mark.parametrize("precision", [plan.GPU_BYTES, plan.CPU_BYTES])
@pytest.mark.parametrize("m", [1, 3])
def test_fsdp_communication_without_overlap_is_the_executors_collectives(m, precision):
    # every ALLGATHER and REDUCE_SCATTER of the op list the executor runs, exposed: per
    # micro-batch two gathers of each layer, once per step the whole bucket's gather and
    # every bucket's reduce-scatter. By hand, for 12 layers: 24 m + 1 gathers, 13 reduce-scatters.
    via = plan.Link(25e9, 5e-6)
    blocking = replace(cluster(D_FSDP, via, overlap="none"), precision=precision)
    got = plan.evaluate(CFG, blocking, plan.Batch(D_FSDP * m, 1, 64), plan.Layout(1, D_FSDP, 3),
                        layer_costs(1.0, 1.0, 1.0))
    assert got.comm == pytest.approx(executor_fsdp_seconds(m, precision, 25e9, 5e-6), rel=1e-12)
    ops = pipeline.fsdp_ops(pipeline.schedule("1f1b", 1, m)[0], CFG["num_layers"])
    assert [op.kind for op in ops].count(pipeline.ALLGATHER) == 24 * m + 1
    assert [op.kind for op in ops].count(pipeline.REDUCE_SCATTER) == 13


def test_fsdp_overlap_hides_all_but_the_first_gathers_and_the_last_reduce_scatter():
    # a prefetch with every layer's compute far longer than any transfer: per micro-batch the
    # forward's first gather (layer 0) and the input backward's (the last layer); per step the
    # whole bucket's gather and reduce-scatter and layer 0's reduce-scatter, the last
    D, m, via = 4, 2, plan.Link(25e9, 5e-6)
    got = plan.evaluate(CFG, cluster(D, via), plan.Batch(D * m, 1, 64), plan.Layout(1, D, 3),
                        layer_costs(10.0, 10.0, 10.0))
    (layer, *_), whole = plan.stage_buckets(CFG, 0, CFG["num_layers"])
    want = m * 2 * ring_gather(2 * layer, D, 25e9, 5e-6) + ring_gather(2 * whole, D, 25e9, 5e-6) \
        + ring_gather(4 * whole, D, 25e9, 5e-6) + ring_gather(4 * layer, D, 25e9, 5e-6)
    assert got.comm == pytest.approx(want, rel=1e-12)


def test_data_parallel_all_reduce_after_the_last_backward():
    D, via = 8, plan.Link(50e9, 2e-6)
    got = plan.evaluate(CFG, cluster(D, via, overlap="none"), plan.Batch(D, 1, 64), plan.Layout(1, D, 0),
                        layer_costs(1.0, 1.0, 1.0))
    P = plan.model_params(CFG)
    buckets = len(pipeline.data_parallel_ops(CFG["num_layers"] + 1, 0)[0])  # an all-reduce per layer, and the rest
    assert buckets == 13
    assert got.comm == pytest.approx(2 * (D - 1) / D * 4 * P / 50e9 + buckets * 2 * (D - 1) * 2e-6, rel=1e-12)


@pytest.mark.parametrize("zero", [0, 3])
def test_the_cpu_executor_overlaps_only_fsdp(zero):
    # EXECUTOR_OVERLAP: --zero 3's collectives hide as a stream of their own would hide them;
    # --zero 0's all-reduces, in the op list after the whole-stage backward, block as with none
    D, via = 4, plan.Link(25e9, 5e-6)
    got = {overlap: plan.evaluate(CFG, cluster(D, via, overlap), plan.Batch(D, 1, 64), plan.Layout(1, D, zero),
                                  layer_costs(10.0, 10.0, 10.0)).comm for overlap in plan.OVERLAPS}
    assert got["fsdp"] == got["all" if zero == 3 else "none"] and got["all"] < got["none"]
    with pytest.raises(plan.PlanError, match="overlap 'some': expected one of all, fsdp, none"):
        plan.evaluate(CFG, cluster(D, via, "some"), plan.Batch(D, 1, 64), plan.Layout(1, D, zero),
                      layer_costs(1.0, 1.0, 1.0))


def trainer_params(cfg: dict, lo: int, hi: int) -> int:
    model = gpt.Model({k: v for k, v in cfg.items() if k != "tied"}, lo, hi, 1, 8, 1)
    return sum(v.size for v in model.params().values())


def test_parameter_counts_are_the_trainers():
    cfg = plan.model_config("tiny")
    assert plan.model_params(cfg) == trainer_params(cfg, 0, 4)
    assert plan.stage_params(cfg, 0, 2) + plan.stage_params(cfg, 2, 4) == \
        trainer_params(cfg, 0, 2) + trainer_params(cfg, 2, 4)  # the last stage holds a copy of wte


@pytest.mark.parametrize("layout", [plan.Layout(1, 4, 0), plan.Layout(1, 4, 3), plan.Layout(4, 1, 0, "gpipe"),
                                    plan.Layout(2, 2, 3, "zb-h1")])
def test_memory_per_gpu_is_the_sum_of_its_parts(layout):
    m = 4
    batch = plan.Batch(m * layout.dp, 1, 128)
    got = plan.evaluate(CFG, cluster(4), batch, layout, layer_costs(1.0, 1.0, 1.0))
    mem = got.memory
    assert mem.total == mem.weights + mem.gradients + mem.optimizer + mem.activations + mem.gathered
    # its fullest rank, part by part: 6 + 4 + 8 bytes per parameter it owns (a 1/D share under FSDP),
    # the validator's peak of micro-batches held times one micro-batch's activations
    ops = pipeline.schedule(layout.schedule, layout.stages, m)
    peak = pipeline.validate(ops, m).peak_held
    share = 1 / layout.dp if layout.zero == 3 else 1
    totals = []
    for r, (lo, hi) in enumerate(pipeline.partition(CFG, layout.stages, 128)):
        P = plan.stage_params(CFG, lo, hi)
        gathered = 0.0
        if layout.zero == 3:  # the whole bucket, a layer (two with the prefetch), their full gradients
            C = CFG["channels"]
            layer = 12 * C * C + 13 * C
            whole = P - (hi - lo) * layer
            grads = hi - lo if m > 1 else 1
            gathered = (whole + 2 * layer) * 2 + (whole + grads * layer) * 4
        totals.append(18 * P * share + peak[r] * plan.activations_bytes(CFG, lo, hi, batch, plan.GPU_BYTES) + gathered)
    assert mem.total == pytest.approx(max(totals), rel=1e-12)
    assert got.fits == (mem.total <= 80 * 2**30)


@pytest.mark.parametrize("S,m,schedule", [(1, 1, "1f1b"), (1, 4, "1f1b"), (2, 4, "zb-h1")])
def test_fsdp_buffers_are_the_validators_peaks(S, m, schedule):
    # the executor allocates the validator's peaks of gathered layers and layers' full gradients;
    # a prefetch (plan.EXECUTOR_OVERLAP) holds two layers gathered, and two layers' gradients
    # when one is reduce-scattered during the next one's weight backward
    bounds = pipeline.partition(CFG, S, 64)
    buckets = [hi - lo + 1 for lo, hi in bounds]
    train, _ = pipeline.grid_schedule(schedule, S, 2, m, buckets, 3)
    got = pipeline.validate_grid(train, S, m, buckets=buckets, zero=3)
    for r, (lo, hi) in enumerate(bounds):
        assert plan.fsdp_buffers(hi - lo, m, plan.EXECUTOR_OVERLAP != "none") == \
            (got.peak_gathered[r], got.peak_grads[r])


def plan_cli(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "pipeline.py", "plan", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("flags,message", [
    (("--gpus", "6", "--gpus-per-node", "6", "--stages", "4"), "--stages 4: does not divide the 6 GPUs"),
    (("--model", "tiny", "--gpus", "8", "--stages", "8"), "--stages 8: must be between 1 and the model's 4 layers"),
    (("--gpus", "8", "--tp", "3"), "--tp 3: does not divide the 8 GPUs"),
    (("--model", "gpt3-175b", "--gpus", "8", "--batch", "8"), "fits nowhere: the smallest layout"),
    (("--achieved", "0",), "--achieved 0.0: expected a finite number above 0"),
    (("--inter-gbps", "nan",), "--inter-gbps nan: expected a finite number above 0"),
    (("--model", "d99",), "--model d99: expected a preset"),
])
def test_bad_input_is_one_line_naming_the_constraint(flags, message):
    r = plan_cli(*flags)
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr


def test_a_layout_the_batch_does_not_divide_says_so_in_its_row():
    r = plan_cli("--model", "d12", "--gpus", "8", "--batch", "12", "--seq-len", "256")
    assert r.returncode == 0, r.stderr
    rows = {line.split("  ")[0].strip(): line for line in r.stdout.splitlines()[3:]}
    assert "--batch 12: does not divide into 8 replicas" in rows["DP"], r.stdout
    assert "<- best" in r.stdout


@pytest.mark.parametrize("comm_cpu", [0.0, 0.3, 1.0])
def test_fsdp_overlap_on_shared_cores_costs_the_copies_share(comm_cpu):
    # a prefetch whose transfers all hide behind compute (each layer's 10 s against ms of
    # transfer) still costs the compute comm_cpu of every hidden transfer: 0 is the overlap
    # of a NIC, 1 no overlap at all (the copies run on the cores that compute)
    D, m, via = 4, 1, plan.Link(25e9, 5e-6)
    batch, layout, costs = plan.Batch(D * m, 1, 64), plan.Layout(1, D, 3), layer_costs(10.0, 10.0, 10.0)
    comm = {c: plan.evaluate(CFG, replace(cluster(D, via), comm_cpu=c), batch, layout, costs).comm
            for c in (0.0, comm_cpu)}
    blocking = plan.evaluate(CFG, cluster(D, via, "none"), batch, layout, costs).comm
    assert comm[comm_cpu] == pytest.approx(comm[0.0] + comm_cpu * (blocking - comm[0.0]), rel=1e-12)
