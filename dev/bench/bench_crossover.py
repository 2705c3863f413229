"""
The pipeline against data parallelism and FSDP on this machine, with the
links paced to a few speeds (train.py --link-gbps): plan.py's step time,
computed from op costs measured here, next to the step time train.py
measures, and the link speed below which the pipeline beats FSDP, predicted
and measured, for two model sizes. Writes dev/bench/crossover.png (with
matplotlib: pip install matplotlib).

    python3 dev/bench/bench_crossover.py [--models d12 d24] [--steps 3] [--slow-steps 2]

(26 minutes for d12 and d24 on the 2 cores of an AVX-512 Xeon with no other
jobs; most of it the 0.1 Gb/s runs.)

Every run is 2 ranks with 1 thread each on the 2 cores, a global batch of 8
sequences of 64 tokens: the pipeline (2 stages, 1F1B) in 8 micro-batches of
1; data parallel (--zero 0) and FSDP (--zero 3) 2 replicas of one
micro-batch of 4. plan is given each run's own op costs, from its trace:
the executor's time for each forward, input backward and weight backward,
per sequence (traced_costs), so that the check is of the model of the step
(bubble, transfers, the tied embedding's swap, the gathers and
reduce-scatters, the optimizer) rather than of how busy the cores were
during another run; FSDP, whose comm thread's copies share the cores with
its compute, is given DP's compute and the share of the cores the copies
take (plan.Cluster.comm_cpu), and its own traced costs are printed beside. AdamW's time per parameter is measured in-process. The
links are given plan at the speed the trainer's transport delivered at that
pace just before the runs (transport_gbps). plan models the collectives as
the executor runs them (plan.EXECUTOR_OVERLAP). Other work sharing the
cores moves every figure: each is the least of the steps after the first.
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import gpt  # noqa: E402
import pipeline  # noqa: E402
import plan  # noqa: E402

SPEEDS = (None, 10.0, 3.0, 1.0, 0.1)  # Gb/s; None: unpaced. 3: where the crossovers fell in an earlier run
SEQUENCES, T = 8, 64
MICRO = SEQUENCES // 2  # a replica's micro-batch under data parallelism and FSDP


# -----------------------------------------------------------------------------
# calibration: the op times the executor reports


def optimizer_seconds_per_param(cfg: dict) -> float:
    """The grad norm and AdamW after a step, per parameter (what each rank runs on what it owns);
    the least of three, as other work shares these cores."""
    L = cfg["num_layers"]
    model = gpt.Model(cfg, 0, L, 1, T, 1)
    model.init(0)
    times = []
    for step in range(3):
        t0 = time.perf_counter()
        gpt.norm_from_parts(model.grad_norm_parts(), L)
        model.adamw(1e-4, 0.1, 1.0, step + 1)
        times.append(time.perf_counter() - t0)
    return min(times) / plan.model_params(dict(cfg, tied=True))


def traced_costs(cfg: dict, layout: str, trace: str, step: int, optimizer: float) -> plan.OpCosts:
    """Per-sequence op costs of one step of a run, from its trace (every compute op's time is the
    compute's alone: under --zero 3 it starts once its gather is in). The pipeline (micro-batches
    of one sequence): the first stage's layers give a layer's F/B/W, the last stage's rest is the
    head's (the embedding's few ms count as layers). FSDP (a replica's micro-batch of 4, a layer
    per op, the embedding with layer 0 and the head with the last): the middle layers give a
    layer's, the ends the embedding's and the head's. Data parallel (whole-stage ops): each
    kind's total split as the FLOPs split (pipeline.stage_costs): only its sum matters to its
    step, whose all-reduces block the compute."""
    events = [e for e in json.load(open(trace))["traceEvents"]
              if e["ph"] == "X" and e["args"]["step"] == step and e["cat"] in ("FWD", "BWD_INPUT", "BWD_WEIGHT")]
    L = cfg["num_layers"]
    times = {}  # (stage, kind, layer or -1) -> seconds, over every replica
    for e in events:
        part = int(e["name"].split(".")[1]) if "." in e["name"] else -1
        times.setdefault((e["tid"], e["cat"], part), []).append(e["dur"] * 1e-6)
    mean = {key: float(np.mean(v)) for key, v in times.items()}
    costs = []
    for kind in ("FWD", "BWD_INPUT", "BWD_WEIGHT"):
        if layout == "pp":
            bounds = pipeline.partition(cfg, 2, T)
            first, last = mean[0, kind, -1], mean[1, kind, -1]
            layer = first / (bounds[0][1] - bounds[0][0])
            costs.append((0.0, layer, last - layer * (bounds[1][1] - bounds[1][0])))
        elif layout == "fsdp":
            per = [mean[0, kind, l] / MICRO for l in range(L)]
            layer = float(np.mean(per[1:-1]))
            costs.append((max(0.0, per[0] - layer), layer, max(0.0, per[-1] - layer)))
        else:
            flops = pipeline.stage_costs(cfg, T)
            total = mean[0, kind, -1] / MICRO / pipeline.range_cost(flops, L, 0, L)
            costs.append(tuple(total * c for c in flops))
    return plan.OpCosts(*costs, optimizer)


def transport_gbps(gbps: float | None) -> float:
    """What the trainer's own transport delivers here with its links paced to gbps (None:
    unpaced): Gb/s each way of the tied embedding's swap, both directions at once as in a ring
    step, between two stages on two threads over a socket pair; the least of two tries. On
    these shared cores it is below the pace at 1 Gb/s and up (the copies, and a rank that
    sleeps for its pacer gets its core back late), so plan is given this, not the pace."""
    C = 256 if gbps is None or gbps >= 1 else 32  # about 0.3 s a try: 51 MB, 6.4 MB at 0.1 Gb/s
    cfg = dict(max_seq_len=16, vocab_size=50257, padded_vocab_size=50304, num_layers=2, num_heads=2, channels=C)
    nbytes = cfg["padded_vocab_size"] * C * 4
    gpt.set_link_pace(gbps or 0.0, 0.0)
    best = float("inf")
    try:
        for _ in range(2):
            a, b = socket.socketpair()
            stages = [gpt.Model(cfg, 0, 1, 1, 8, 1), gpt.Model(cfg, 1, 2, 1, 8, 1)]
            stages[0].set_peers(-1, -1, a.fileno(), 60.0)
            stages[1].set_peers(-1, -1, b.fileno(), 60.0)
            threads = [threading.Thread(target=stage.sum_wte_grads) for stage in stages]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            best = min(best, time.perf_counter() - t0)
            a.close(), b.close()
    finally:
        gpt.set_link_pace(0.0, 0.0)
    return nbytes * 8 / best / 1e9


# -----------------------------------------------------------------------------
# the runs


def measure(model: str, layout: str, gbps: float | None, steps: int, trace: str) -> tuple[float, int]:
    """Least seconds per step of train.py after the first step (which warms up; a 1-step run's
    only step), and which step: other work shares these cores, and the least is the step it
    disturbed least. The run's timeline goes to trace."""
    flags = {"pp": ["--stages", "2", "--schedule", "1f1b", "--micro-batches", str(SEQUENCES)],
             "dp": ["--stages", "1", "--dp", "2", "--zero", "0", "--micro-batches", "1"],
             "fsdp": ["--stages", "1", "--dp", "2", "--zero", "3", "--micro-batches", "1"]}[layout]
    cmd = [sys.executable, "train.py", "--model", model, "--batch-size", str(SEQUENCES), "--seq-len", str(T),
           "--steps", str(steps), "--eval-every", "0", "--sample-tokens", "0", "--threads", "1",
           *flags, "--trace", trace]
    if gbps is not None:
        cmd += ["--link-gbps", str(gbps)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    ms = [float(v) for v in re.findall(r"\| (\d+) ms \|", r.stdout)]
    best = min(range(1 if len(ms) > 1 else 0, len(ms)), key=ms.__getitem__)
    return ms[best] / 1e3, best + 1


def predict(cfg: dict, layout: str, gbps: float, costs: plan.OpCosts, comm_cpu: float) -> float:
    """plan's step: 2 ranks on one node, links of gbps, collectives overlapping compute as
    the CPU executor runs them (plan.EXECUTOR_OVERLAP), a hidden transfer costing the compute
    comm_cpu of its time (the socket copies run on the cores that compute). Costs are per
    sequence."""
    wire = plan.link(gbps, 0.0)
    cluster = plan.Cluster(2, 2, wire, wire, flops=1.0, achieved=1.0, memory=float("inf"), hbm=1.0,
                           overlap=plan.EXECUTOR_OVERLAP, precision=plan.CPU_BYTES, comm_cpu=comm_cpu)
    layout_, micro = {"pp": (plan.Layout(2, 1, 0, "1f1b"), 1), "dp": (plan.Layout(1, 2, 0), MICRO),
                      "fsdp": (plan.Layout(1, 2, 3), MICRO)}[layout]
    return plan.evaluate(cfg, cluster, plan.Batch(SEQUENCES, micro, T), layout_, costs).step


def crossover(gbps: np.ndarray, pp: np.ndarray, fsdp: np.ndarray) -> float | None:
    """The link speed (log-interpolated) below which the pipeline's step is shorter."""
    d = np.log(pp) - np.log(fsdp)
    for i in range(len(gbps) - 1):
        if d[i] * d[i + 1] <= 0 and d[i] != d[i + 1]:
            x0, x1 = np.log(gbps[i]), np.log(gbps[i + 1])
            return float(np.exp(x0 + (x1 - x0) * d[i] / (d[i] - d[i + 1])))
    return None


def uptime() -> str:
    with open("/proc/loadavg") as f:
        return "load average " + ", ".join(f.read().split()[:3])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["d12", "d24"])
    p.add_argument("--steps", type=int, default=3, help="steps per run (the first warms up)")
    p.add_argument("--slow-steps", type=int, default=2,
                   help="steps per run at 1 Gb/s and below, where the link, not the cores, sets the step "
                        "(1 measures the first step, whose warm-up plan does not model: 1.5-2.5 s at d12)")
    p.add_argument("--chart", default=os.path.join(ROOT, "dev", "bench", "crossover.png"))
    args = p.parse_args()
    started = time.perf_counter()
    gpt.set_threads(1)
    print(f"CPU: {os.cpu_count()} cores, 2 ranks x 1 thread; batch {SEQUENCES} x {T} tokens; {uptime()} at the start")
    grid = np.logspace(-2, 2, 41)  # plan's curves, 0.01 to 100 Gb/s
    curves, points, series = {}, {}, {}  # series: (delivered Gb/s, measured s) per model and layout
    trace = os.path.join(tempfile.mkdtemp(), "trace.json")
    summary = []
    for model in args.models:
        cfg = dict(gpt.config_from_name(model), tied=True)
        optimizer = optimizer_seconds_per_param(cfg)
        delivered = {gbps: transport_gbps(gbps) for gbps in SPEEDS}
        loop = delivered[None]
        print(f"{model}: AdamW and the grad norm {optimizer * 1e9:.1f} ns/parameter; the transport delivers "
              + ", ".join(f"{delivered[g]:.2f} Gb/s {'unpaced' if g is None else f'at {g:g}'}" for g in SPEEDS))
        costs, least = {}, {}  # (layout, speed) -> its op costs; layout -> the least disturbed run's
        for gbps in SPEEDS:
            speed = loop if gbps is None else gbps
            steps = args.steps if speed > 1.0 else args.slow_steps
            for layout in ("pp", "dp", "fsdp"):
                points[model, layout, speed], step = measure(model, layout, gbps, steps, trace)
                c = costs[layout, speed] = traced_costs(cfg, layout, trace, step, optimizer)
                load = sum(c.f) + sum(c.b) + sum(c.w)
                if layout not in least or load < least[layout][0]:  # its curve: from the least disturbed run
                    least[layout] = (load, c)
            print(f"  measured at {'unpaced' if gbps is None else f'{gbps:g} Gb/s'}: " + ", ".join(
                f"{layout} {points[model, layout, speed]:.2f} s" for layout in ("pp", "dp", "fsdp")), flush=True)
        # FSDP's compute is DP's (the same matmuls on the same micro-batch): its own trace's is
        # slower by what its comm thread's copies take of the cores, which plan models as
        # comm_cpu: the unpaced transport is bound by the cores' copying, so a transfer at a
        # delivered g Gb/s spends g / unpaced of its time copying
        def comm_cpu(g: float) -> float:
            return min(1.0, g / loop)
        print(f"  {'link':>11} {'layout':>6} {'measured s':>11} {'plan s':>8} {'ratio':>6}   "
              f"op costs per sequence, layer F/B/W and head F/B/W: the run's own (FSDP: DP's; then its own)")
        for gbps in SPEEDS:
            speed = loop if gbps is None else gbps
            for layout in ("pp", "dp", "fsdp"):
                c = costs["dp" if layout == "fsdp" else layout, speed]
                measured = points[model, layout, speed]
                got = predict(cfg, layout, delivered[gbps], c, comm_cpu(delivered[gbps]))
                shown = [c] + ([costs["fsdp", speed]] if layout == "fsdp" else [])
                print(f"  {'unpaced' if gbps is None else f'{gbps:g} Gb/s':>11} {layout:>6} {measured:11.2f} "
                      f"{got:8.2f} {got / measured:6.2f}   " + "; ".join(
                          f"{k.f[1] * 1e3:.1f}/{k.b[1] * 1e3:.1f}/{k.w[1] * 1e3:.1f} ms, "
                          f"{k.f[2] * 1e3:.1f}/{k.b[2] * 1e3:.1f}/{k.w[2] * 1e3:.1f} ms" for k in shown))
        # the curves and the chart against the speed the link delivered (the 10 Gb/s pace delivers
        # about what the unpaced transport does here)
        for layout in ("pp", "dp", "fsdp"):
            calibration = least["dp" if layout == "fsdp" else layout][1]
            curves[model, layout] = np.array([predict(cfg, layout, g, calibration, comm_cpu(g)) for g in grid])
        order = sorted(SPEEDS, key=lambda g: delivered[g])
        xs = np.array([delivered[g] for g in order])
        for layout in ("pp", "dp", "fsdp"):
            series[model, layout] = (xs, np.array([points[model, layout, loop if g is None else g] for g in order]))
        cross = [crossover(grid, curves[model, "pp"], curves[model, "fsdp"]),
                 crossover(xs, series[model, "pp"][1], series[model, "fsdp"][1])]
        faster = [("the pipeline" if pp[0] < fsdp[0] else "FSDP") + " faster throughout" for pp, fsdp in
                  ((curves[model, "pp"], curves[model, "fsdp"]), (series[model, "pp"][1], series[model, "fsdp"][1]))]
        said = [f"{c:.2f} Gb/s" if c else f"none ({why})" for c, why in zip(cross, faster)]
        summary.append(f"  {model}: plan {said[0]} (0.01 to 100 Gb/s), measured {said[1]} "
                       f"({xs[0]:.2f} to {xs[-1]:.2f} Gb/s)")
        print(summary[-1], flush=True)
    print("\n".join(["crossover, the delivered link speed below which the pipeline is faster than FSDP "
                     f"(batch {SEQUENCES} x {T} tokens, 2 ranks):", *summary]))
    print(f"bench: {(time.perf_counter() - started) / 60:.1f} minutes; {uptime()} at the end")
    draw(args.chart, args.models, grid, curves, series, loop)


def draw(path: str, models: list[str], grid, curves: dict, series: dict, loop: float) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed (pip install matplotlib; it is optional)")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colours = {"pp": "tab:blue", "fsdp": "tab:red"}
    names = {"pp": "pipeline, 2 stages", "fsdp": "FSDP, 2 ranks"}
    for model, style, marker in zip(models, ("-", "--"), ("o", "s")):
        for layout in ("pp", "fsdp"):
            ax.plot(grid, curves[model, layout], style, color=colours[layout], label=f"{model} {names[layout]}: plan")
            ax.plot(*series[model, layout], marker, color=colours[layout], label=f"{model} {names[layout]}: measured")
    ax.axvline(loop, color="k", lw=0.6, ls=":")
    ax.text(loop, ax.get_ylim()[1] * 0.9, " the unpaced transport", fontsize=8)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("link speed delivered (Gb/s, each direction; paced to 0.1, 1, 3, 10 and unpaced)")
    ax.set_ylabel("seconds per step")
    title = f"2 ranks x 1 thread on 2 CPU cores, batch {SEQUENCES} x {T} tokens"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7), ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart: {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
