"""
Pipeline parallelism on the 2 CPU cores: m micro-batches per step, 2 stages
with one thread each, against one stage with one thread and with two.
Prints tokens/s and, for the pipeline, the measured bubble fraction next to
the simulator's prediction for the measured op costs, with the measured
transfer time and with free transfers.

    python3 dev/bench/bench_pipeline.py [--model d12] [--micro 8] [--steps 4]

The default is GPT-2 124M, whose LM head weighs about five layers: the
partition then splits it evenly into two stages (tiny, whose head outweighs
its four layers, cannot be balanced).
"""

import argparse
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(model: str, micro: int, steps: int, stages: int, threads: int, schedule: str) -> dict:
    cmd = [sys.executable, "train.py", "--model", model, "--batch-size", str(micro), "--seq-len", "64",
           "--micro-batches", str(micro), "--steps", str(steps), "--eval-every", "0", "--sample-tokens", "0",
           "--threads", str(threads), "--stages", str(stages), "--schedule", schedule]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    tok = [float(t) for t in re.findall(r"\| (\d+) tok/s", r.stdout)][1:]  # the first step warms up
    out = {"tok/s": float(np.median(tok))}
    m = re.search(r"bubble: measured ([\d.]+)%, simulator ([\d.]+)% .*\(([\d.]+) ms, the median\), "
                  r"([\d.]+)% with free transfers", r.stdout)
    if m:
        out["measured"], out["predicted"], out["transfer_ms"], out["free"] = map(float, m.groups())
    p = re.search(r"^partition: .*$", r.stdout, re.M)
    if p:
        out["partition"] = p.group(0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="d12")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    print(f"{args.model}, {args.micro} micro-batches of 1 x 64 tokens per step, CPU with {os.cpu_count()} cores")
    base1 = run(args.model, args.micro, args.steps, 1, 1, "1f1b")
    base2 = run(args.model, args.micro, args.steps, 1, 2, "1f1b")
    print(f"  1 stage,  1 thread : {base1['tok/s']:7.0f} tok/s")
    print(f"  1 stage,  2 threads: {base2['tok/s']:7.0f} tok/s")
    for schedule in ("gpipe", "1f1b", "zb-h1"):
        r = run(args.model, args.micro, args.steps, 2, 1, schedule)
        print(f"  2 stages x 1 thread, {schedule:5}: {r['tok/s']:7.0f} tok/s "
              f"({r['tok/s'] / base1['tok/s']:.2f}x one thread, {r['tok/s'] / base2['tok/s']:.2f}x two) | "
              f"bubble measured {r['measured']:.1f}%, simulator {r['predicted']:.1f}% "
              f"({r['transfer_ms']:.1f} ms a transfer; {r['free']:.1f}% if free)")
    print(f"  {r['partition']}")


if __name__ == "__main__":
    main()
