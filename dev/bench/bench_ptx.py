"""
GPU benchmark of the hand-written PTX kernels (asm/*.ptx) against their CUDA C
twins in train_gpt.cu, and of the training step with and without them.

    python3 dev/bench/bench_ptx.py [--iters 20] [--steps 3] [--no-e2e]

1. Per kernel, on working sets of 256 MB or more, through the trainer's own
   launchers (gpt_cuda_ptx_bench in dev/kernel_bench.cu): the effective bandwidth
   (bytes the kernel must read and write / its time) of the CUDA C kernel and
   of the PTX one, next to a device-to-device cudaMemcpy measured in the same
   run, and the ratios. Each kernel also checks its two outputs against each
   other (bitwise differences, largest relative difference).
2. The d12 (GPT-2 124M) training step at B=32 T=1024, GPT_PTX=0 vs 1, with the
   GELU fused into cuBLASLt (the default: the PTX GELU kernels are not used)
   and unfused (GPT_FUSE_GELU=0), each in its own process: 2 warmup steps,
   then --steps timed ones.

Bounded: about 5 s for part 1 and 4 x ~7 s for part 2 on an H100; every
subprocess has a timeout. Prints a skip message and exits 0 without a GPU.
Lines starting with RESULT are for machines to read.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MB = 1 << 20
# name, kernel id, n (elements, rows or bytes), C
KERNELS = [
    ("adamw", 0, 16 * MB, 0),                  # 16M params: 480 MB moved
    ("gelu_forward", 1, 64 * MB, 0),           # 64M bf16: 256 MB moved
    ("gelu_backward", 2, 64 * MB, 0),          # 384 MB
    ("layernorm_forward", 3, 32 * 1024 * 8, 768),    # 262144 rows of 768: 805 MB
    ("layernorm_backward", 4, 32 * 1024 * 8, 768),   # 1.6 GB
    ("crossentropy", 6, 4096, 50257),          # 4096 rows of 50304 bf16 logits, read and written: 824 MB
]
COPY_BYTES = 512 * MB
# the TMA + wgmma GEMM (asm/gemm.ptx) against cuBLASLt: out (M,N) = A (M,K) @ B (N,K)^T, bf16
GEMMS = [
    ("qkv", 32768, 2304, 768),       # d12 at B=32, T=1024: the attention's input projection
    ("attproj", 32768, 768, 768),
    ("fc", 32768, 3072, 768),
    ("fcproj", 32768, 768, 3072),
    ("lm_head", 32768, 50304, 768),
    ("square4096", 4096, 4096, 4096),
]


def bench_lib():
    lib = ctypes.CDLL(str(ROOT / "build" / "libkernel_bench.so"))  # dev/kernel_bench.cu
    lib.gpt_last_error.restype = ctypes.c_char_p
    lib.gpt_cuda_ptx_bench.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_double)]
    lib.gpt_cuda_gemm_bench.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_double)]
    return lib


def run_kernel(lib, kernel, n, C, iters):
    res = (ctypes.c_double * 8)()
    if lib.gpt_cuda_ptx_bench(kernel, n, C, iters, res) != 0:
        raise RuntimeError(lib.gpt_last_error().decode())
    return list(res)


def kernels(iters: int) -> int:
    lib = bench_lib()
    copy = run_kernel(lib, 5, COPY_BYTES, 0, iters)
    copy_gbs = copy[2] / (copy[0] * 1e-3) / 1e9
    print(f"device-to-device cudaMemcpy of {COPY_BYTES // MB} MB: {copy[0]:.3f} ms, {copy_gbs:.0f} GB/s "
          f"(read + write)", flush=True)
    print(f"RESULT ptx_copy_gbs={copy_gbs:.0f}")
    print(f"{'kernel':20s} {'MB moved':>9s} {'C ms':>8s} {'C GB/s':>8s} {'PTX ms':>8s} {'PTX GB/s':>9s} "
          f"{'PTX/C':>6s} {'C/copy':>7s} {'PTX/copy':>9s}  outputs")
    failed = 0
    for name, k, n, C in KERNELS:
        try:
            ms_c, ms_p, nbytes, bad, rel, total, _, _ = run_kernel(lib, k, n, C, iters)
        except RuntimeError as e:
            print(f"{name:20s} FAILED: {e}", flush=True)
            failed += 1
            continue
        gc, gp = nbytes / (ms_c * 1e-3) / 1e9, nbytes / (ms_p * 1e-3) / 1e9
        print(f"{name:20s} {nbytes / MB:9.0f} {ms_c:8.3f} {gc:8.0f} {ms_p:8.3f} {gp:9.0f} {gp / gc:6.2f} "
              f"{gc / copy_gbs:7.2f} {gp / copy_gbs:9.2f}  {int(bad)}/{int(total)} differ, max rel {rel:.1e}",
              flush=True)
        print(f"RESULT ptx_{name}_gbs={gp:.0f} cuda_c_{name}_gbs={gc:.0f} ptx_vs_copy={gp / copy_gbs:.3f} "
              f"ptx_vs_cuda_c={gp / gc:.3f}")
    return failed


def gemms(iters: int) -> int:
    lib = bench_lib()
    print(f"\n{'GEMM (M, N, K)':30s} {'cuBLASLt ms':>11s} {'TFLOP/s':>8s} {'PTX ms':>8s} {'TFLOP/s':>8s} "
          f"{'PTX/cuBLASLt':>12s}  outputs")
    failed = 0
    for name, M, N, K in GEMMS:
        res = (ctypes.c_double * 8)()
        if lib.gpt_cuda_gemm_bench(M, N, K, iters, res) != 0:
            print(f"{name:10s} FAILED: {lib.gpt_last_error().decode()}", flush=True)
            failed += 1
            continue
        ms_lt, ms_p, flops, bad, rel, total = list(res)[:6]
        tl, tp = flops / (ms_lt * 1e-3) / 1e12, flops / (ms_p * 1e-3) / 1e12
        print(f"{name:10s} {f'({M}, {N}, {K})':19s} {ms_lt:11.3f} {tl:8.0f} {ms_p:8.3f} {tp:8.0f} {tp / tl:12.2f}"
              f"  {int(bad)}/{int(total)} differ, max rel {rel:.1e}", flush=True)
        print(f"RESULT ptx_gemm_{name}_tflops={tp:.0f} cublaslt_{name}_tflops={tl:.0f} ptx_vs_cublaslt={tp / tl:.3f}")
    return failed


STEP = """
import json, time, numpy as np, gpt_cuda
cfg = gpt_cuda.config_from_name("d12")
B, T, L = {B}, {T}, cfg["num_layers"]
m = gpt_cuda.Model(cfg, 0, L, B, T, 1)
m.init(1337)
rng = np.random.default_rng(0)
x = rng.integers(0, cfg["vocab_size"], (1, B, T)); y = rng.integers(0, cfg["vocab_size"], (1, B, T))
ops = np.array([(gpt_cuda.FWD, 0), (gpt_cuda.BWD_INPUT, 0), (gpt_cuda.BWD_WEIGHT, 0)])
times = []
for i in range(2 + {steps}):
    t0 = time.perf_counter()
    loss = m.run(ops, x, y)
    m.sum_wte_grads()
    norm = gpt_cuda.norm_from_parts(m.grad_norm_parts(), L)
    m.adamw(6e-4, 0.1, 1.0 / norm if norm > 1.0 else 1.0, i + 1)  # synchronises
    times.append(time.perf_counter() - t0)
print(json.dumps(dict(ms=1e3 * float(np.median(times[2:])), loss=float(loss))))
"""


def step_time(env: dict, steps: int, B: int, T: int, timeout: float):
    e = dict(os.environ)
    e.pop("GPT_PTX", None)
    e.pop("GPT_PROFILE", None)
    e.update(env)
    r = subprocess.run([sys.executable, "-c", STEP.format(B=B, T=T, steps=steps)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=timeout)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"exit {r.returncode}: {r.stderr.strip()[-600:]}")
    return json.loads(lines[-1])


def e2e(steps: int, B: int, T: int, budget: float) -> int:
    print(f"\nd12 training step, B={B} T={T} (median of {steps} after 2 warmup), each in its own process")
    failed, t_end = 0, time.monotonic() + budget
    for fuse in ("1", "0"):
        ms = {}
        for ptx in ("0", "1"):
            left = t_end - time.monotonic()
            if left < 5:
                print(f"  GELU fused={fuse} GPT_PTX={ptx}: SKIPPED (out of the {budget:.0f} s budget)")
                continue
            try:
                r = step_time({"GPT_PTX": ptx, "GPT_FUSE_GELU": fuse}, steps, B, T, left)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"  GELU fused={fuse} GPT_PTX={ptx}: FAILED: {e}", flush=True)
                failed += 1
                continue
            ms[ptx] = r["ms"]
            print(f"  GELU fused={fuse} GPT_PTX={ptx}: {r['ms']:.1f} ms/step, {B * T / r['ms'] * 1e-3:.0f}K tok/s "
                  f"(last loss {r['loss']:.4f})", flush=True)
        if len(ms) == 2:
            print(f"RESULT d12_step_ms_fuse_gelu{fuse}_ptx0={ms['0']:.1f} d12_step_ms_fuse_gelu{fuse}_ptx1="
                  f"{ms['1']:.1f} speedup={ms['0'] / ms['1']:.3f}")
    return failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20, help="timed launches per kernel")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per setting")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--e2e-budget", type=float, default=32.0, help="seconds for part 2")
    ap.add_argument("--no-e2e", action="store_true", help="kernels only")
    args = ap.parse_args()
    try:
        import gpt_cuda
    except ImportError:
        print("bench_ptx: SKIPPED: gpt_cuda is not built (no nvcc, or make has not run)")
        return 0
    if gpt_cuda.device_count() == 0:
        print("bench_ptx: SKIPPED: no GPU visible")
        return 0
    t0 = time.monotonic()
    failed = kernels(args.iters) + gemms(args.iters)
    print(f"(kernels: {time.monotonic() - t0:.1f} s)", flush=True)
    if not args.no_e2e:
        failed += e2e(args.steps, args.batch, args.seq, args.e2e_budget)
    print(f"(bench_ptx: {time.monotonic() - t0:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
