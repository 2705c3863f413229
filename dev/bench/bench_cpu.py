"""
CPU training speed: GPT-2 124M (d12) at B=4, T=64 on the CPU, ms per step and
effective GFLOP/s (6 x parameters x tokens plus attention, as nanoGPT counts
it), printed next to numpy's sgemm GFLOP/s measured in the same run on the
same cores: the practical fp32 ceiling here.

    python dev/bench/bench_cpu.py [--model d12] [--steps 5] [--threads 2]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import gpt  # noqa: E402


def sgemm_gflops(m: int, k: int, n: int, repeat: int = 10) -> float:
    """numpy (OpenBLAS) fp32 matmul (m,k) @ (k,n), best of repeat."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeat))
    return 2 * m * k * n / best / 1e9


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def train_step_seconds(model_name: str, B: int, T: int, steps: int) -> tuple[float, float]:
    """Seconds per training step (median of steps after one warm-up) and FLOPs per step."""
    cfg = gpt.config_from_name(model_name)
    model = gpt.Model(cfg, 0, cfg["num_layers"], B, T, 1)
    model.init(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg["vocab_size"], (1, B, T))
    y = rng.integers(0, cfg["vocab_size"], (1, B, T))
    ops = np.array([(gpt.FWD, 0), (gpt.BWD_INPUT, 0), (gpt.BWD_WEIGHT, 0)])

    def step(i: int) -> None:
        model.run(ops, x, y)
        model.sum_wte_grads()
        norm = gpt.norm_from_parts(model.grad_norm_parts(), cfg["num_layers"])
        model.adamw(1e-4, 0.1, min(1.0, 1.0 / norm), i + 1)

    times = [timed(lambda: step(i)) for i in range(steps + 1)][1:]
    nparams = sum(p.size for p in model.params().values())
    L, C = cfg["num_layers"], cfg["channels"]
    flops = B * T * (6 * nparams + 12 * L * C * T)
    return float(np.median(times)), flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="d12")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    gpt.set_threads(args.threads)
    print(f"numpy {np.__version__} sgemm, GFLOP/s:")
    shapes = [(256, 768, 3072), (256, 3072, 768), (256, 768, 50304), (2048, 2048, 2048)]
    ref = {s: sgemm_gflops(*s) for s in shapes}
    for s, g in ref.items():
        print(f"  {s[0]}x{s[1]} @ {s[1]}x{s[2]}: {g:7.1f}")
    sec, flops = train_step_seconds(args.model, args.batch_size, args.seq_len, args.steps)
    gflops = flops / sec / 1e9
    gpt2 = float(np.mean([ref[s] for s in shapes[:3]]))
    print(f"{args.model} B={args.batch_size} T={args.seq_len}, {args.threads} threads: "
          f"{sec * 1e3:.0f} ms/step, {gflops:.1f} GFLOP/s effective "
          f"= {gflops / gpt2:.2f} x numpy sgemm on GPT-2 shapes ({gpt2:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
