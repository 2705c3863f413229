"""
The assembly GEMM of asm/ (the kernel asm/sgemm.h picks, or the one --kernel
names) against numpy's sgemm (OpenBLAS), GFLOP/s on the GPT-2 shapes at
M = B*T = 256 (every forward and backward product the trainer runs) and
2048^3, same threads, same run. Each product is laid out as the trainer lays
it out:

    fwd    out = inp @ W^T + bias        inp (M,K), W (N,K)         asm_gemm_nt
    bwdin  dinp = dout @ W               dout (M,K), W (K,N)        asm_gemm_nn, sm=K, sk=1
    bwdw   dW += dout^T @ inp            dout (K,M), inp (K,N)      asm_gemm_nn, sm=1, sk=M

    python3 dev/bench/bench_sgemm.py [--threads 2] [--kernel avx2] [--rounds 3]

Needs build/test_sgemm (`make`); the asm side runs there, in a subprocess.
OPENBLAS_CORETYPE, which can make OpenBLAS pick a slower kernel, is dropped
for numpy's side (this process only). Targets: >= 1.0x numpy with the AVX2
kernel on an AVX2-only machine (issue 10), >= 0.8x with AVX-512.
"""

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(ROOT, "build", "test_sgemm")

# (variant, M, K, N): the first nine are the GPT-2 shapes the targets are about
SHAPES = [
    ("fwd", 256, 768, 3072), ("fwd", 256, 3072, 768), ("fwd", 256, 768, 50304),
    ("bwdin", 256, 3072, 768), ("bwdin", 256, 768, 3072), ("bwdin", 256, 50304, 768),
    ("bwdw", 3072, 256, 768), ("bwdw", 768, 256, 3072), ("bwdw", 50304, 256, 768),
    ("fwd", 2048, 2048, 2048), ("bwdin", 2048, 2048, 2048),
]
GPT2 = 9


def numpy_gflops(np, variant: str, M: int, K: int, N: int) -> float:
    """numpy's GFLOP/s on the product as the trainer lays it out, best of enough runs for ~0.3 s."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    if variant == "fwd":
        a, w, bias = rng.standard_normal((M, K), f32), rng.standard_normal((N, K), f32), rng.standard_normal(N, f32)
        out = np.empty((M, N), f32)

        def run():
            np.matmul(a, w.T, out=out)
            np.add(out, bias, out=out)
    elif variant == "bwdin":
        a, b = rng.standard_normal((M, K), f32), rng.standard_normal((K, N), f32)
        out = np.empty((M, N), f32)

        def run():
            np.matmul(a, b, out=out)
    else:
        a, b = rng.standard_normal((K, M), f32), rng.standard_normal((K, N), f32)
        out, tmp = np.zeros((M, N), f32), np.empty((M, N), f32)

        def run():
            np.matmul(a.T, b, out=tmp)
            np.add(out, tmp, out=out)
    run()
    best, total, i = float("inf"), 0.0, 0
    while i < 3 or (total < 0.3 and i < 200):
        t0 = time.perf_counter()
        run()
        t = time.perf_counter() - t0
        best, total, i = min(best, t), total + t, i + 1
    return 2.0 * M * K * N / best / 1e9


def blas_name() -> str:
    """The BLAS numpy runs on, and its core type, from threadpoolctl when it is installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}" for i in blas) or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernel", choices=["avx512", "avx2"], help="force this kernel (GPT_ASM); default: the best")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of both sides (best of each)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: expected at least 1")
    if not os.path.exists(DRIVER):
        sys.exit(f"{DRIVER} is missing: run `make` first")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    env.pop("GPT_NO_ASM", None)
    env.pop("GPT_ASM", None)
    if args.kernel:
        env["GPT_ASM"] = args.kernel
    # numpy's OpenBLAS reads these when it loads
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    coretype = os.environ.pop("OPENBLAS_CORETYPE", None)
    import numpy as np

    # The two sides alternate, round after round, and each keeps its best per
    # shape: on a shared virtual machine whole stretches of seconds run at
    # 60% speed (seen on the 2-core EPYC, both sides alike), and one pass of
    # each would compare a slow stretch with a fast one.
    spec = [str(x) for v, m, k, n in SHAPES for x in (m, k, n, v)]
    asm, ref = [0.0] * len(SHAPES), [0.0] * len(SHAPES)
    for _ in range(args.rounds):
        r = subprocess.run([DRIVER, "bench", *spec], capture_output=True, text=True, env=env)
        if r.returncode == 3:
            sys.exit("no assembly kernel runs on this CPU: nothing to measure")
        if r.returncode != 0:
            sys.exit(r.stderr.strip())
        lines = r.stdout.splitlines()
        kernel = lines[0].removeprefix("# kernel ")
        asm = [max(a, float(line.split()[-1])) for a, line in zip(asm, lines[1:])]
        ref = [max(b, numpy_gflops(np, *s)) for b, s in zip(ref, SHAPES)]

    print(f"asm kernel {kernel} vs numpy {np.__version__} sgemm ({blas_name()}), {args.threads} threads, "
          f"GFLOP/s, best of {args.rounds} alternating rounds")
    if coretype:
        print(f"  (OPENBLAS_CORETYPE={coretype} was dropped for numpy)")
    print(f"  {'product':<7} {'M':>6} {'K':>6} {'N':>6}   {'asm':>7} {'numpy':>7}  asm/numpy")
    for (v, m, k, n), a, b in zip(SHAPES, asm, ref):
        print(f"  {v:<7} {m:>6} {k:>6} {n:>6}   {a:7.1f} {b:7.1f}  {a / b:9.2f}")
    ga, gr = sum(asm[:GPT2]) / GPT2, sum(ref[:GPT2]) / GPT2
    worst = min(a / b for a, b in zip(asm[:GPT2], ref[:GPT2]))
    print(f"GPT-2 shapes: asm {ga:.1f}, numpy {gr:.1f} GFLOP/s on average: {ga / gr:.2f} x numpy "
          f"(worst shape {worst:.2f} x)")


if __name__ == "__main__":
    main()
