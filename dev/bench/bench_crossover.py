"""
The pipeline against FSDP on this machine, with the links paced to a few
speeds (train.py --link-gbps): plan.py's step time, computed from op costs
measured here, next to the step time train.py measures, and the link speed
below which the pipeline beats FSDP, predicted and measured, for two model
sizes. Writes dev/bench/crossover.png (with matplotlib: pip install matplotlib).

    python3 dev/bench/bench_crossover.py [--models d12 d24] [--steps 3]

(about 4 minutes for d12 and 10 for d24 on the 2 cores while other work
shared them, most of it the 0.1 Gb/s runs: the tied embedding's swap.)

Every run is 2 ranks with 1 thread each on the 2 cores, a global batch of 8
sequences of 64 tokens: the pipeline (2 stages, 1F1B) in 8 micro-batches of
1; data parallel and FSDP (once train.py has FSDP, --zero 3) 2 replicas
of one micro-batch of 4. plan is given the op costs of the measured pipeline
run itself, from its trace: the executor's time for each forward, input
backward and weight backward (per sequence: a layer's from the first stage,
the head's from what the last stage has beyond its layers), so that the
check is of the model of the step (bubble, transfers, the tied embedding's
swap, optimizer) rather than of how busy the cores were during another run.
AdamW's time per parameter is measured in-process, and the socket's speed
unpaced (a paced link is never faster than it). Other work sharing the cores
moves every figure: each is the least of the steps after the first, and its
prediction uses the op costs of that same step.
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

SPEEDS = (None, 10.0, 1.0, 0.1)  # Gb/s; None: unpaced
SEQUENCES, T = 8, 64


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


def traced_costs(cfg: dict, trace: str, step: int, optimizer: float) -> plan.OpCosts:
    """Per-sequence op costs of one step of a pipeline run (whose micro-batches are one sequence
    each), from its trace: the first stage's
    layers give a layer's F/B/W, the last stage's rest is the head's (the embedding's few ms
    count as layers)."""
    events = [e for e in json.load(open(trace))["traceEvents"] if e["ph"] == "X" and e["args"]["step"] == step]
    mean = {(e["tid"], e["cat"]): [] for e in events}
    for e in events:
        mean[e["tid"], e["cat"]].append(e["dur"] * 1e-6)
    bounds = pipeline.partition(cfg, 2, T)
    costs = []
    for kind in ("FWD", "BWD_INPUT", "BWD_WEIGHT"):
        first, last = (float(np.mean(mean[r, kind])) for r in (0, 1))
        layer = first / (bounds[0][1] - bounds[0][0])
        costs.append((0.0, layer, last - layer * (bounds[1][1] - bounds[1][0])))
    return plan.OpCosts(*costs, optimizer)


def loopback_gbps(nbytes: int = 64 << 20) -> float:
    """Unpaced socket speed between two threads: what 'unthrottled' means here."""
    a, b = socket.socketpair()
    data = bytes(nbytes)

    def drain():
        got = 0
        while got < nbytes:
            got += len(b.recv(1 << 20))
    t = threading.Thread(target=drain)
    t0 = time.perf_counter()
    t.start()
    a.sendall(data)
    t.join()
    dt = time.perf_counter() - t0
    a.close(), b.close()
    return nbytes * 8 / dt / 1e9

# -----------------------------------------------------------------------------
# the runs


def has_dp() -> bool:
    """Whether train.py runs both layouts the pipeline is compared with: DP
    (--dp with --zero 0) and FSDP (--zero 3); until then both are only predicted."""
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    return "--dp" in r.stdout and re.search(r"--zero \{[0-9,]*3", r.stdout) is not None


def measure(model: str, layout: str, gbps: float | None, steps: int, trace: str) -> tuple[float, int]:
    """Least seconds per step of train.py after the first step (which warms up), and which step:
    other work shares these cores, and the least is the step it disturbed least. A pipeline
    run's timeline goes to trace (train.py traces pipelines only: --trace needs --stages 2)."""
    flags = {"pp": ["--stages", "2", "--schedule", "1f1b", "--micro-batches", str(SEQUENCES)],
             "dp": ["--stages", "1", "--dp", "2", "--zero", "0", "--micro-batches", "1"],
             "fsdp": ["--stages", "1", "--dp", "2", "--zero", "3", "--micro-batches", "1"]}[layout]
    cmd = [sys.executable, "train.py", "--model", model, "--batch-size", str(SEQUENCES), "--seq-len", str(T),
           "--steps", str(steps), "--eval-every", "0", "--sample-tokens", "0", "--threads", "1",
           *(["--trace", trace] if layout == "pp" else []), *flags]
    if gbps is not None:
        cmd += ["--link-gbps", str(gbps)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    ms = [float(v) for v in re.findall(r"\| (\d+) ms \|", r.stdout)]
    best = min(range(1, len(ms)), key=ms.__getitem__)
    return ms[best] / 1e3, best + 1


def predict(cfg: dict, layout: str, gbps: float, costs: dict, loopback: float) -> float:
    """plan's step: 2 ranks on one node, links at the paced speed (at most the socket's own),
    collectives blocking the rank (the CPU executor runs one op at a time). Costs are per
    sequence, so the pipeline's micro-batch of 1 and a replica's of 4 share them."""
    wire = plan.link(min(gbps, loopback), 0.0)
    cluster = plan.Cluster(2, 2, wire, wire, flops=1.0, achieved=1.0, memory=float("inf"), hbm=1.0,
                           overlap=False, precision=plan.CPU_BYTES)
    layout_, micro = {"pp": (plan.Layout(2, 1, 0, "1f1b"), 1), "dp": (plan.Layout(1, 2, 0), SEQUENCES // 2),
                      "fsdp": (plan.Layout(1, 2, 3), SEQUENCES // 2)}[layout]
    return plan.evaluate(cfg, cluster, plan.Batch(SEQUENCES, micro, T), layout_, costs).step


def crossover(gbps: np.ndarray, pp: np.ndarray, fsdp: np.ndarray) -> float | None:
    """The link speed (log-interpolated) below which the pipeline's step is shorter."""
    d = np.log(pp) - np.log(fsdp)
    for i in range(len(gbps) - 1):
        if d[i] * d[i + 1] <= 0 and d[i] != d[i + 1]:
            x0, x1 = np.log(gbps[i]), np.log(gbps[i + 1])
            return float(np.exp(x0 + (x1 - x0) * d[i] / (d[i] - d[i + 1])))
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["d12", "d24"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--chart", default=os.path.join(ROOT, "dev", "bench", "crossover.png"))
    args = p.parse_args()
    gpt.set_threads(1)
    dp = has_dp()
    layouts = ["pp", "dp", "fsdp"] if dp else ["pp"]
    loop = loopback_gbps()
    print(f"CPU: {os.cpu_count()} cores, 2 ranks x 1 thread; batch {SEQUENCES} x {T} tokens; "
          f"unpaced socket {loop:.1f} Gb/s (measured)")
    if not dp:
        print("train.py has no FSDP (--zero 3) yet: DP and FSDP are predicted, not measured")
    grid = np.logspace(-2, 2, 41)  # plan's curves, 0.01 to 100 Gb/s
    curves, points = {}, {}
    trace = os.path.join(tempfile.mkdtemp(), "trace.json")
    for model in args.models:
        cfg = dict(gpt.config_from_name(model), tied=True)
        optimizer = optimizer_seconds_per_param(cfg)
        print(f"{model}: AdamW and the grad norm {optimizer * 1e9:.1f} ns/parameter; each prediction takes "
              f"its op costs from the pipeline run at the same speed (the curves and the crossover from "
              f"the run with the least op costs, the one other work disturbed least)")
        least = float("inf")
        print(f"  {'link':>11} {'layout':>6} {'predicted s':>12} {'measured s':>11} {'ratio':>6}   op costs per sequence")
        for gbps in SPEEDS:
            speed = loop if gbps is None else gbps
            name = "unpaced" if gbps is None else f"{gbps:g} Gb/s"
            points[model, "pp", speed], step = measure(model, "pp", gbps, args.steps, trace)
            costs = traced_costs(cfg, trace, step, optimizer)
            load = sum(costs.f) + sum(costs.b) + sum(costs.w)
            if gbps is None or load < least:  # the curves: from the run other work disturbed least
                least = load
                for layout in ("pp", "dp", "fsdp"):
                    curves[model, layout] = np.array([predict(cfg, layout, g, costs, loop) for g in grid])
            for layout in ("pp", "dp", "fsdp"):
                predicted = predict(cfg, layout, speed, costs, loop)
                if layout in layouts and layout != "pp":
                    points[model, layout, speed] = measure(model, layout, gbps, args.steps, trace + ".dp")[0]
                if layout in layouts:
                    measured = points[model, layout, speed]
                    print(f"  {name:>11} {layout:>6} {predicted:12.2f} {measured:11.2f} {predicted / measured:6.2f}"
                          + (f"   layer F/B/W {costs.f[1] * 1e3:.0f}/{costs.b[1] * 1e3:.0f}/{costs.w[1] * 1e3:.0f} "
                             f"ms, head {costs.f[2] * 1e3:.0f}/{costs.b[2] * 1e3:.0f}/{costs.w[2] * 1e3:.0f} ms"
                             if layout == "pp" else ""), flush=True)
                else:
                    print(f"  {name:>11} {layout:>6} {predicted:12.2f} {'-':>11} {'-':>6}", flush=True)
        cross = crossover(grid, curves[model, "pp"], curves[model, "fsdp"])
        said = f"{cross:.2f} Gb/s" if cross else "none between 0.01 and 100 Gb/s"
        if dp:
            xs = np.array(sorted(s for (m, l, s) in points if m == model and l == "pp"))
            got = crossover(xs, *[np.array([points[model, l, s] for s in xs]) for l in ("pp", "fsdp")])
            said += f", measured {got:.2f} Gb/s" if got else ", measured: none within the speeds run"
        else:
            said += ", measured: needs FSDP (--zero 3)"
        print(f"  crossover (the pipeline is faster below it): predicted {said}")
    draw(args.chart, args.models, grid, curves, points, loop, dp)


def draw(path: str, models: list[str], grid, curves: dict, points: dict, loop: float, dp: bool) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is not installed (pip install matplotlib; it is optional)")
        return
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colours = {"pp": "tab:blue", "fsdp": "tab:red", "dp": "tab:grey"}
    names = {"pp": "pipeline, 2 stages", "fsdp": "FSDP, 2 ranks", "dp": "data parallel, 2 ranks"}
    for model, style, marker in zip(models, ("-", "--"), ("o", "s")):
        for layout in ("pp", "fsdp"):
            ax.plot(grid, curves[model, layout], style, color=colours[layout],
                    label=f"{model} {names[layout]}: plan")
            xs = sorted(s for (m, l, s) in points if m == model and l == layout)
            if xs:
                ax.plot(xs, [points[model, layout, s] for s in xs], marker, color=colours[layout],
                        label=f"{model} {names[layout]}: measured")
    ax.axvline(loop, color="k", lw=0.6, ls=":")
    ax.text(loop, ax.get_ylim()[1] * 0.9, " unpaced", fontsize=8)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("link speed (Gb/s, each direction)"), ax.set_ylabel("seconds per step")
    title = "2 ranks x 1 thread on 2 CPU cores, batch 8 x 64 tokens"
    if not dp:
        title += "\nFSDP: plan only (train.py has no --dp/--zero yet)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7), ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    print(f"chart: {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
