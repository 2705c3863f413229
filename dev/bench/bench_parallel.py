"""
The grid of ranks on this machine, in one run: 1 rank, a 2-stage pipeline
(PP 2), 2 data-parallel replicas (DP 2, --zero 0 and --zero 1), FSDP 2
(--zero 3) and 2 x 2, each on the same global batch. Prints tokens/s, the
bytes each rank moved per step (pipeline and data-parallel apart) next to the
formulas, each rank's peak resident memory and what its stage allocated.

    python3 dev/bench/bench_parallel.py [--model d12] [--batch 8] [--micro 4] [--steps 3]

Every rank runs 1 thread, except the 1-rank run, which is also timed with 2:
on 2 cores, PP 2 and DP 2 use each core once and 2 x 2 runs 4 ranks on 2
cores (2x oversubscribed, so its time says little; its bytes and memory are
what it is there for). FSDP runs one micro-batch per replica (see main).
"""

import argparse
import os
import re
import resource
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import gpt  # noqa: E402
import pipeline  # noqa: E402

T = 64


def run(model: str, batch: int, micro: int, steps: int, stages: int, dp: int, zero: int, threads: int) -> dict:
    """tok/s of the timed steps, and per rank what train.py reports."""
    cmd = [sys.executable, "train.py", "--model", model, "--batch-size", str(batch), "--seq-len", str(T),
           "--micro-batches", str(micro), "--steps", str(steps), "--eval-every", "0", "--sample-tokens", "0",
           "--threads", str(threads), "--stages", str(stages), "--dp", str(dp), "--zero", str(zero)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    out = r.stdout
    ms = [float(t) for t in re.findall(r"\| (\d+) ms \|", out)][1:]  # the first step warms up
    result = {"tok/s": batch * T / (np.median(ms) / 1e3), "ranks": {}}
    for m in re.finditer(r"traffic per step: rank (\d+) .*?: pipeline sent (\d+) B received \d+ B \| tied sent "
                         r"(\d+) B received \d+ B \| data-parallel sent (\d+) B received \d+ B \| peak RSS (\d+) MiB "
                         r"\| allocated (.*) MiB", out):
        r, pipe, tied, dp_bytes, rss = map(int, m.groups()[:5])
        words = m.group(6).split()
        allocated = sum(float(v) for v in words[1::2])
        result["ranks"][r] = {"pipeline": pipe, "tied": tied, "dp": dp_bytes, "rss": rss, "allocated": allocated,
                              "parts": " ".join(f"{k} {v}" for k, v in zip(words[::2], words[1::2]))}
    return result


def peak_rss_mib_of_children() -> float:
    """The largest peak of the processes run so far (Linux: KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def formulas(config: dict, stages: int, dp: int, micro: int, batch: int, zero: int) -> list[dict]:
    """Per rank, the bytes the formulas say it sends per step (fp32). Under
    --zero 3 each layer is gathered twice per micro-batch (forward, backward)
    and reduce-scattered once, the whole tensors gathered once per step:
    (2m+1)(D-1)/D * P_layers + 2(D-1)/D * P_whole, which is 3(D-1)/D * P_layers
    for m = 1 (pipeline.fsdp_ops places them)."""
    C, Vp, L = config["channels"], config["padded_vocab_size"], config["num_layers"]
    b = batch // (dp * micro)
    layer = 12 * C * C + 13 * C  # ln1, qkv, attproj, ln2, fc, fcproj: weights and biases
    out = []
    for r in range(stages * dp):
        lo, hi = pipeline.partition(config, stages, T)[r % stages]
        first, last = lo == 0, hi == L
        whole = (Vp * C if first or last else 0) + (config["max_seq_len"] * C if first else 0) + (2 * C if last else 0)
        P = (hi - lo) * layer + whole
        boundaries = (not first) + (not last)  # each boundary: b*T*C values sent per micro-batch
        dp_values = (2 * micro + 1) * (hi - lo) * layer + 2 * whole if zero == 3 else 2 * P
        out.append({"P": P,
                    "pipeline": 4 * micro * b * T * C * boundaries,
                    "tied": 4 * Vp * C if stages > 1 and (first or last) else 0,
                    "dp": 4 * (dp - 1) * dp_values // dp})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="d12")
    p.add_argument("--batch", type=int, default=8, help="sequences of 64 tokens per step")
    p.add_argument("--micro", type=int, default=4, help="micro-batches per step of the 1-rank run")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    config = gpt.config_from_name(args.model)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"{args.model}, {args.batch} x {T} tokens per step, {args.steps} steps (the first not timed), "
          f"{cpu}, {os.cpu_count()} cores")
    print("formulas, per rank and step, fp32: pipeline 2*b*T*C values per boundary per micro-batch (b*T*C each "
          "way); tied d(wte) swap Vp*C each way; all-reduce 2(D-1)/D*P each way, P the stage's parameters "
          "(--zero 1: reduce-scatter + all-gather, as much); --zero 3 (2m+1)(D-1)/D*P_layers + 2(D-1)/D*P_whole "
          "(each layer gathered for its forward and its backward of each of m micro-batches, reduce-scattered "
          "once; the whole tensors gathered once)")
    base = None
    grid = [("1 rank, 2 threads", 1, 1, 0, 2), ("1 rank, 1 thread", 1, 1, 0, 1), ("PP 2", 2, 1, 0, 1),
            ("DP 2, zero 0", 1, 2, 0, 1), ("DP 2, zero 1", 1, 2, 1, 1), ("FSDP 2 (zero 3)", 1, 2, 3, 1),
            ("2 x 2 (4 ranks, 2 cores)", 2, 2, 0, 1)]
    for name, S, D, zero, threads in grid:
        # FSDP with one micro-batch per replica: with m > 1 a layer's whole
        # gradient is held from the first micro-batch's backward to the last
        # one's (what keeps zero 3 bitwise equal to zero 0), i.e. all of them
        micro = 1 if zero == 3 else max(1, args.micro // D)
        r = run(args.model, args.batch, micro, args.steps, S, D, zero, threads)
        base = base or r["tok/s"]
        line = f"  {name:26}: {r['tok/s']:6.0f} tok/s ({r['tok/s'] / base:.2f}x 1 rank with 2 threads)"
        if S * D == 1:  # the 1-rank runs come first: the children's peak so far is theirs
            print(line + f" | peak RSS {peak_rss_mib_of_children():.0f} MiB")
            continue
        print(line)
        for rank, (got, want) in enumerate(zip([r["ranks"][k] for k in sorted(r["ranks"])],
                                               formulas(config, S, D, micro, args.batch, zero))):
            print(f"      rank {rank} (stage {rank % S}, replica {rank // S}, P={want['P'] / 1e6:.1f}M): "
                  f"pipeline {got['pipeline'] / 2**20:.2f} MiB (formula {want['pipeline'] / 2**20:.2f}) | "
                  f"tied {got['tied'] / 2**20:.1f} MiB ({want['tied'] / 2**20:.1f}) | "
                  f"data-parallel {got['dp'] / 2**20:.1f} MiB ({want['dp'] / 2**20:.1f}) | "
                  f"peak RSS {got['rss']} MiB | allocated {got['allocated']:.0f} MiB ({got['parts']})")


if __name__ == "__main__":
    main()
