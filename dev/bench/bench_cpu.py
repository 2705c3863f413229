"""
CPU training speed: GPT-2 124M (d12) at B=4, T=64 on the CPU, ms per step and
effective GFLOP/s (6 x parameters x tokens plus attention, as nanoGPT counts
it), printed next to numpy's sgemm GFLOP/s measured in the same run on the
same cores: the practical fp32 ceiling here. Prints the GEMM kernel the
trainer ran on and where a step's time goes (forward, the two backward
halves, the gradient norm, AdamW; median ms).

    python3 dev/bench/bench_cpu.py [--model d12] [--steps 5] [--threads 2] [--kernel avx2|avx512|c]

Targets (issue 10): >= 0.6x numpy sgemm with the AVX2 kernel on an AVX2-only
machine; no regression from 0.72x with AVX-512. OPENBLAS_CORETYPE, which can
make OpenBLAS pick a slower kernel, is dropped in this process (the C
trainer does not use OpenBLAS).
"""

import argparse
import os
import subprocess
import sys
import time

CORETYPE = os.environ.pop("OPENBLAS_CORETYPE", None)  # before numpy loads OpenBLAS
import numpy as np  # noqa: E402

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


def train_step_seconds(model_name: str, B: int, T: int, steps: int) -> tuple[float, float, dict]:
    """Seconds per training step (median of steps after one warm-up), FLOPs per step, and the median
    seconds of each part of a step."""
    cfg = gpt.config_from_name(model_name)
    model = gpt.Model(cfg, 0, cfg["num_layers"], B, T, 1)
    model.init(0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg["vocab_size"], (1, B, T))
    y = rng.integers(0, cfg["vocab_size"], (1, B, T))
    ops = np.array([(gpt.FWD, 0), (gpt.BWD_INPUT, 0), (gpt.BWD_WEIGHT, 0)])

    parts: dict[str, list[float]] = {}

    def step(i: int) -> None:
        model.run(ops, x, y)
        op = model.op_times(len(ops))
        for name, (t0, t1) in zip(("forward", "backward input", "backward weight"), op):
            parts.setdefault(name, []).append(t1 - t0)
        t0 = time.perf_counter()
        model.sum_wte_grads()
        norm = gpt.norm_from_parts(model.grad_norm_parts(), cfg["num_layers"])
        t1 = time.perf_counter()
        model.adamw(1e-4, 0.1, min(1.0, 1.0 / norm), i + 1)
        t2 = time.perf_counter()
        parts.setdefault("wte sum + grad norm", []).append(t1 - t0)
        parts.setdefault("AdamW", []).append(t2 - t1)

    times = [timed(lambda: step(i)) for i in range(steps + 1)][1:]
    nparams = sum(p.size for p in model.params().values())
    L, C = cfg["num_layers"], cfg["channels"]
    flops = B * T * (6 * nparams + 12 * L * C * T)
    return float(np.median(times)), flops, {k: float(np.median(v[1:])) for k, v in parts.items()}


def kernel_name() -> str:
    """The GEMM kernel asm/sgemm.h picks in this environment (build/test_sgemm runs the same choice)."""
    driver = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "build", "test_sgemm")
    r = subprocess.run([driver, "avail"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(r.stderr.strip() or f"{driver} failed: run `make`")
    return r.stdout.strip().removeprefix("kernel ")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="d12")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernel", choices=["avx512", "avx2", "c"],
                   help="the GEMM kernel (GPT_ASM, or GPT_NO_ASM=1 for c); default: the best")
    args = p.parse_args()
    if args.kernel == "c":
        os.environ["GPT_NO_ASM"] = "1"
    elif args.kernel:
        os.environ.pop("GPT_NO_ASM", None)
        os.environ["GPT_ASM"] = args.kernel
    gpt.set_threads(args.threads)
    if CORETYPE:
        print(f"(OPENBLAS_CORETYPE={CORETYPE} was dropped for numpy)")
    print(f"numpy {np.__version__} sgemm, GFLOP/s:")
    shapes = [(256, 768, 3072), (256, 3072, 768), (256, 768, 50304), (2048, 2048, 2048)]
    ref = {s: sgemm_gflops(*s) for s in shapes}
    for s, g in ref.items():
        print(f"  {s[0]}x{s[1]} @ {s[1]}x{s[2]}: {g:7.1f}")
    sec, flops, parts = train_step_seconds(args.model, args.batch_size, args.seq_len, args.steps)
    gflops = flops / sec / 1e9
    gpt2 = float(np.mean([ref[s] for s in shapes[:3]]))
    print(f"GEMM kernel: {kernel_name()}; by part, ms: " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in parts.items()))
    print(f"{args.model} B={args.batch_size} T={args.seq_len}, {args.threads} threads: "
          f"{sec * 1e3:.0f} ms/step, {gflops:.1f} GFLOP/s effective "
          f"= {gflops / gpt2:.2f} x numpy sgemm on GPT-2 shapes ({gpt2:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
