"""
GPU benchmark of the CUDA trainer: GPT-2 124M (d12), B=32, T=1024, one GPU.

    python3 dev/bench/bench_gpu.py [--model d12] [--batch 32] [--seq 1024] [--steps 10]

Prints, in order:
1. tokens/s and MFU of the whole training step as train.py runs it (stage_run
   of F, B, W, the d(wte) sum, the grad-norm parts, AdamW), 3 warmup steps then
   --steps timed ones, and the wall time of the F, B and W ops of one step;
   then 5 steps with GPT_ATTN=mma_sync (attention tiles loaded without cp.async);
2. the per-kernel-category GPU time of a step (the trainer's GPT_PROFILE=1
   table: cudaEvents around every kernel and cuBLASLt call);
3. dev/bench/torch_gpt2.py run in the same command (PyTorch, torch.compile,
   bf16 autocast, SDPA attention, fused AdamW) and the ratio of the two.

MFU = flops per token * tokens/s / 989e12, with flops per token = 6 * P +
12 * L * C * T (llm.c's and PaLM's count: P the parameters, wte once with its
padded rows; the attention term without a causal discount), and 989 TFLOP/s the
H100 SXM dense bf16 peak. Lines starting with RESULT are for machines to read.
"""

import argparse
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = 989e12


def step_fn(gpt_cuda, model, cfg, ops, x, y):
    def step(i: int):
        loss = model.run(ops, x[i % len(x)], y[i % len(y)])
        model.sum_wte_grads()
        norm = gpt_cuda.norm_from_parts(model.grad_norm_parts(), cfg["num_layers"])
        model.adamw(6e-4, 0.1, 1.0 / norm if norm > 1.0 else 1.0, i + 1)  # synchronises
        return loss, norm
    return step


def ours(gpt_cuda, args, cfg, x, y, ops):
    B, T, L, C = args.batch, args.seq, cfg["num_layers"], cfg["channels"]
    print(f"model {args.model} (L={L} C={C} NH={cfg['num_heads']}), B={B} T={T}, bf16 (gpt_cuda)", flush=True)
    t0 = time.perf_counter()
    model = gpt_cuda.Model(cfg, 0, L, B, T, 1)
    model.init(1337)
    nparams = sum(v.size for v in model.params().values())
    print(f"created and initialised in {time.perf_counter() - t0:.1f} s, {nparams / 1e6:.2f}M parameters", flush=True)
    step = step_fn(gpt_cuda, model, cfg, ops, x, y)
    for i in range(args.warmup):
        t1 = time.perf_counter()
        loss, norm = step(i)
        print(f"warmup step {i + 1}: loss {loss:.4f} norm {norm:.3f} {1e3 * (time.perf_counter() - t1):.1f} ms",
              flush=True)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss, norm = step(i)
    dt = time.perf_counter() - t0
    times = model.op_times(3)
    tok_s = args.steps * B * T / dt
    flops_per_token = 6 * nparams + 12 * L * C * T
    mfu = flops_per_token * tok_s / PEAK_FLOPS
    print(f"timed {args.steps} steps: {1e3 * dt / args.steps:.1f} ms/step, {tok_s:,.0f} tokens/s, MFU {100 * mfu:.1f}% "
          f"(last loss {loss:.4f})")
    print("last step's ops (wall ms): " + ", ".join(
        f"{name} {1e3 * (e - s):.1f}" for name, (s, e) in zip(("F", "B", "W"), times)))
    print(f"RESULT ours_tokens_per_s={tok_s:.0f} ours_ms_per_step={1e3 * dt / args.steps:.2f} ours_mfu={mfu:.4f}",
          flush=True)
    del model, step
    gc.collect()

    # the tensor-core attention without cp.async pipelining, for comparison
    if args.compare_attention:
        os.environ["GPT_ATTN"] = "mma_sync"
        try:
            model = gpt_cuda.Model(cfg, 0, L, B, T, 1)
            model.init(1337)
            step = step_fn(gpt_cuda, model, cfg, ops, x, y)
            for i in range(2):
                step(i)
            t0 = time.perf_counter()
            for i in range(2, 7):
                step(i)
            dt_sync = (time.perf_counter() - t0) / 5
            print(f"GPT_ATTN=mma_sync (no cp.async pipelining): {1e3 * dt_sync:.1f} ms/step, "
                  f"{B * T / dt_sync:,.0f} tokens/s")
            print(f"RESULT ours_mma_sync_tokens_per_s={B * T / dt_sync:.0f}", flush=True)
            del model, step
            gc.collect()
        finally:
            del os.environ["GPT_ATTN"]

    # the per-kernel breakdown: a fresh stage with GPT_PROFILE=1 prints its table when freed
    if args.profile_steps > 0:
        os.environ["GPT_PROFILE"] = "1"
        try:
            model = gpt_cuda.Model(cfg, 0, L, B, T, 1)
            model.init(1337)
            step = step_fn(gpt_cuda, model, cfg, ops, x, y)
            t0 = time.perf_counter()
            for i in range(args.profile_steps):
                step(i)
            print(f"profiled {args.profile_steps} steps ({1e3 * (time.perf_counter() - t0) / args.profile_steps:.1f} "
                  f"ms/step with events); the table (first step left out):", flush=True)
            del model, step
            gc.collect()
            sys.stderr.flush()
        finally:
            del os.environ["GPT_PROFILE"]

    return tok_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="d12")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--torch-timeout", type=float, default=float(os.environ.get("BENCH_TORCH_TIMEOUT", 170)))
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--no-compare-attention", dest="compare_attention", action="store_false",
                   help="skip timing the tensor-core attention without cp.async pipelining")
    args = p.parse_args()

    try:
        import gpt_cuda
    except ImportError as e:
        print(f"SKIP: gpt_cuda is not built ({e}); run make on a machine with nvcc")
        return 0
    if gpt_cuda.device_count() == 0:
        print("SKIP: no GPU visible (gpt_cuda.device_count() == 0)")
        return 0

    cfg = gpt_cuda.config_from_name(args.model)
    B, T = args.batch, args.seq
    rng = np.random.default_rng(0)
    nbatches = 4
    x = rng.integers(0, cfg["vocab_size"], (nbatches, 1, B, T))
    y = rng.integers(0, cfg["vocab_size"], (nbatches, 1, B, T))
    ops = np.array([(gpt_cuda.FWD, 0), (gpt_cuda.BWD_INPUT, 0), (gpt_cuda.BWD_WEIGHT, 0)])

    tok_s = None
    try:
        tok_s = ours(gpt_cuda, args, cfg, x, y, ops)
    except Exception as e:  # report and still run the PyTorch reference
        print(f"our benchmark failed: {type(e).__name__}: {e}", flush=True)

    if args.no_torch:
        return 0
    script = ROOT / "dev" / "bench" / "torch_gpt2.py"
    cmd = [sys.executable, str(script), "--batch", str(B), "--seq", str(T), "--steps", str(args.steps)]
    timeout = max(30.0, args.torch_timeout)
    print(f"running {' '.join(cmd[1:])} (timeout {timeout:.0f} s)", flush=True)
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out)
        print(f"torch reference: timed out after {timeout:.0f} s")
        return 0
    print(out.rstrip())
    theirs = None
    for line in out.splitlines():
        if line.startswith("RESULT torch_tokens_per_s="):
            theirs = float(line.split("=")[1].split()[0])
    if theirs and tok_s:
        print(f"RESULT ratio_ours_over_torch={tok_s / theirs:.3f} (ours {tok_s:,.0f} tokens/s, "
              f"PyTorch {theirs:,.0f} tokens/s; target >= 1.0, goal 1.25)")
    else:
        print("torch reference gave no tokens/s (see its output above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
