"""The CUDA C kernels of train_gpt.cu, executed on the CPU by dev/ptx_emu.py.

CI has no GPU, so tests/test_cuda.py skips there. This file covers the
trainer's own kernels anyway: nvcc compiles train_gpt.cu's bf16 build to PTX
(cuda.mk's build/train_gpt_cu.ptx, part of `make`), and the emulator runs
that PTX, instruction by instruction, with its memcheck, racecheck and
divergence checks. Skipped, with the reason, where nvcc is absent.

Each kernel is launched the way train_gpt.cu's launcher launches it (grid,
block, dynamic shared memory, argument order and meaning) on small shapes,
and its results are compared with a float64 numpy reference written from the
math (softmax attention and its gradients, layernorm, GELU, ...), not from
the kernel's code. Inputs are bf16 bit patterns (uint16) made by rounding
float32 to nearest even; inputs are passed read-only, outputs pre-filled with
NaN. Each tolerance says next to it where the error it allows comes from:
bf16 rounding of the output (one bf16 ulp, in assert_bf16_close), bf16
rounding of an intermediate (the attention's P and dS feed tensor cores as
bf16), fp32 sums.

Then each kernel of asm/*.ptx against its CUDA C twin on the same inputs
(AdamW bitwise, the others within asm/README.md's tolerances), the new parts
of the emulator on small inline kernels (mma and ldmatrix fragment layouts
against the PTX ISA's tables, cp.async, atomics, warp reductions and
barriers, FMA contraction, waves of blocks), and a guard that every kernel
of train_gpt.cu but the ptxb_* benchmark helpers is tested here.
"""

import functools
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dev import ptx_emu as emu
from tests.emu_util import (ELEMENTWISE, PARAMS4, adamw_inputs, assert_bf16_close, assert_f32_close, bf16, ce_inputs,
                            ce_reference, check_layernorm_backward_input, check_layernorm_forward, f64,
                            gelu_grad_ref, gelu_inputs, gelu_ref, grid_for, ln_backward_inputs, ln_inputs, ln_stats,
                            nan_bf16, nan_f32, ro, round_f32)
from tests.emu_util import inline as _inline

ROOT = Path(__file__).resolve().parent.parent
PTX = ROOT / "build" / "train_gpt_cu.ptx"
ASM = ROOT / "asm"


# -----------------------------------------------------------------------------
# the PTX of train_gpt.cu, built by make (cuda.mk) where nvcc exists

@functools.cache
def _module():
    if shutil.which("nvcc") is None:
        return None, "nvcc not found: build/train_gpt_cu.ptx (cuda.mk) is compiled from train_gpt.cu by nvcc"
    if shutil.which("make") is None:
        return None, "make not found: build/train_gpt_cu.ptx is built by cuda.mk"
    r = subprocess.run(["make", "-s", "build/train_gpt_cu.ptx"], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        return RuntimeError(f"make build/train_gpt_cu.ptx failed:\n{r.stdout}{r.stderr}"), None
    return emu.load_module(PTX), None


def module() -> dict:
    mod, why = _module()
    if why:
        pytest.skip(why)
    if isinstance(mod, Exception):
        raise mod
    return mod


def cuda_kernel(name: str, template: str = "") -> emu.Kernel:
    """A kernel of train_gpt.cu by its C++ name; template: its mangled template arguments (ILb1E is <true>)."""
    return emu.find_entry(module(), name, template)


COVERED = set()  # (name, template) of the kernels tested here; test_every_kernel_is_tested checks them


def covers(*kernels):
    COVERED.update((k, "") if isinstance(k, str) else k for k in kernels)
    return lambda f: f


SMEM_DEFAULT = 48 << 10  # dynamic shared memory without cudaFuncSetAttribute, which train_gpt.cu never calls


# -----------------------------------------------------------------------------
# helpers: bf16 by hand, read-only inputs, comparisons

def bf16_ulps_apart(a_bits, b_bits) -> np.ndarray:
    """How many bf16 values lie between two bf16 bit patterns (0: the same value; +0 and -0 are one)."""
    def ordered(h):
        h = np.asarray(h).astype(np.int64)
        return np.where(h & 0x8000, -(h & 0x7FFF), h)
    return np.abs(ordered(a_bits) - ordered(b_bits))


# -----------------------------------------------------------------------------
# attention: qkv (B, T, 3C) holds q, k, v side by side, head h owning channels h*D .. h*D+D-1 of each;
# out (B, T, C); lse (B, NH, T) is the log2-domain logsumexp of each row of scaled scores; the backward
# writes dq, dk, dv into dqkv (B, T, 3C), laid out like qkv

LOG2E = np.float32(1.4426950408889634)


def attention_scales(D):
    """As the launchers compute them, in float32: forward scale_log2 = log2(e) / sqrtf(D); backward
    scale = 1 / sqrtf(D), scale_log2 = log2(e) * scale."""
    sq = np.float32(np.sqrt(np.float32(D)))  # sqrtf is correctly rounded
    return float(LOG2E / sq), float(np.float32(1) / sq), float(LOG2E * (np.float32(1) / sq))


def attention_inputs(B, T, NH, D, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (B, T, 3, NH, D))
    x[:, :, 0, NH - 1] *= 4  # the last head's queries 4x larger: scores up to about +-15, a peaked softmax
    qkv = bf16(x.reshape(B, T, 3 * NH * D))
    dout = bf16(rng.normal(0, 1, (B, T, NH * D)))
    return qkv, dout


def heads(a, B, T, NH, D):
    """(B, T, NH*D) -> (B, NH, T, D)."""
    return a.reshape(B, T, NH, D).transpose(0, 2, 1, 3)


def attention_reference(qkv, dout, B, T, NH, D, out=None):
    """Causal softmax attention and its gradients in float64 from the bf16 inputs, with the magnitudes the
    tolerances need. out: the forward output the backward is given (bf16), which its delta =
    rowsum(dout * out) uses (None: the exact one)."""
    C = NH * D
    x = f64(qkv)
    q, k, v = (heads(x[..., i * C:(i + 1) * C], B, T, NH, D) for i in range(3))
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    mx = s.max(-1, keepdims=True)
    e = np.exp(s - mx)
    lse = mx[..., 0] + np.log(e.sum(-1))
    P = e / e.sum(-1, keepdims=True)
    O = P @ v
    dO = heads(f64(dout), B, T, NH, D)
    dP = dO @ v.transpose(0, 1, 3, 2)
    Og = O if out is None else heads(f64(out), B, T, NH, D)
    delta = (dO * Og).sum(-1)
    dS = P * (dP - delta[..., None])
    scale = 1 / np.sqrt(D)
    r = dict(q=q, k=k, v=v, P=P, O=O, Og=Og, lse2=lse / np.log(2), dO=dO, dP=dP, delta=delta, dS=dS,
             dq=dS @ k * scale, dk=dS.transpose(0, 1, 3, 2) @ q * scale, dv=P.transpose(0, 1, 3, 2) @ dO,
             qk_abs=np.abs(q) @ np.abs(k).transpose(0, 1, 3, 2))
    return r


def unheads(a):
    """(B, NH, T, D) -> (B, T, NH*D)."""
    B, NH, T, D = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, NH * D)


def check_attention_forward(out, lse, r, T, D, eps, what):
    # out = P V / l: P is rounded (to bf16 for the tensor cores: eps = 2^-8 covers its 2^-9, and fp32 sums
    # over at most T terms), relative to the sum of |P v|
    assert_bf16_close(out, unheads(r["O"]), unheads(eps * (r["P"] @ np.abs(r["v"]))), f"{what}: out")
    # lse = max + log2(sum): the scores' fp32 dot products (D terms, at most D ulps of sum |q k| each, times
    # log2(e)/sqrt(D)), the fp32 sum of T exponentials (T ulps, /ln 2), lse's own rounding
    score_err = D * 2.0 ** -24 * (r["qk_abs"] * np.tril(np.ones((T, T)))).max(-1) * 1.4427 / np.sqrt(D)
    assert_f32_close(lse, r["lse2"], 2.0 ** -23, score_err + T * 2.0 ** -23, f"{what}: lse")


def check_attention_backward(dqkv, r, eps, what):
    """dq, dk, dv against the reference. eps is the relative rounding of P and dS before they multiply
    (2^-8 for the tensor-core kernels, which round them to bf16; fp32 sums for the simple ones); delta =
    rowsum(dout * out) is an fp32 sum of D exact products (D ulps of rowsum(|dout| |out|))."""
    C3 = dqkv.shape[-1]
    C = C3 // 3
    D = r["q"].shape[-1]
    scale = 1 / np.sqrt(D)
    P = r["P"]
    delta_err = D * 2.0 ** -24 * (np.abs(r["dO"]) * np.abs(r["Og"])).sum(-1)[..., None]
    dS_err = P * (eps * (np.abs(r["dP"]) + np.abs(r["delta"])[..., None]) + delta_err)
    dS_abs = np.abs(r["dS"])
    tol_dq = scale * ((dS_err + eps * dS_abs) @ np.abs(r["k"]))
    tol_dk = scale * ((dS_err + eps * dS_abs).transpose(0, 1, 3, 2) @ np.abs(r["q"]))
    tol_dv = eps * (P.transpose(0, 1, 3, 2) @ np.abs(r["dO"]))
    for name, i, tol in (("dq", 0, tol_dq), ("dk", 1, tol_dk), ("dv", 2, tol_dv)):
        assert_bf16_close(dqkv[..., i * C:(i + 1) * C], unheads(r[name]), unheads(tol), f"{what}: {name}")


def attention_forward_inputs(B, T, NH, D, seed):
    qkv, dout = attention_inputs(B, T, NH, D, seed)
    return qkv, dout, attention_reference(qkv, dout, B, T, NH, D)


def attention_backward_inputs(B, T, NH, D, seed):
    """What the backward launcher gets besides qkv and dout: the forward's out in bf16 and lse in fp32,
    here from the float64 reference (so that these tests do not depend on the forward kernels)."""
    qkv, dout = attention_inputs(B, T, NH, D, seed)
    r = attention_reference(qkv, dout, B, T, NH, D)
    out = bf16(unheads(r["O"]))
    return qkv, dout, out, r["lse2"].astype(np.float32), attention_reference(qkv, dout, B, T, NH, D, out)


EPS_MMA = 2.0 ** -8     # P and dS rounded to bf16 (2^-9) for mma.sync, plus fp32
EPS_SIMPLE = 2.0 ** -12  # fp32 throughout: sums of up to T terms, exp2 of scores with fp32 rounding

# (B, NH, T), head size 64: one whole tile of 64; two; four (each double buffer refilled: the tile loads
# overlap the math, with cp.async); a partial second tile (T not a multiple of 64, which the launcher
# allows: rows past T load as zeros and are masked); a single partial tile.
MMA_SHAPES = [(1, 2, 64), (2, 2, 128), (1, 2, 256), (2, 3, 100), (1, 1, 37)]
PIPE = [("ILb1E", "cp.async"), ("ILb0E", "plain loads")]


@covers(("attention_forward_mma_kernel", "ILb1E"), ("attention_forward_mma_kernel", "ILb0E"))
@pytest.mark.parametrize("template, how", PIPE, ids=[p[1] for p in PIPE])
@pytest.mark.parametrize("B, NH, T", MMA_SHAPES)
def test_attention_forward_mma(B, NH, T, template, how):
    D = 64
    qkv, _, r = attention_forward_inputs(B, T, NH, D, seed=T + B)
    out, lse = nan_bf16((B, T, NH * D)), nan_f32((B, NH, T))
    scale_log2, _, _ = attention_scales(D)
    # attention_forward: grid ((T + AT - 1) / AT, B * NH), 128 threads, (out, lse, qkv, T, NH, scale_log2)
    emu.launch(cuda_kernel("attention_forward_mma_kernel", template), ((T + 63) // 64, B * NH), 128,
               [out, lse, ro(qkv), T, NH, scale_log2])
    check_attention_forward(out, lse, r, T, D, EPS_MMA, f"forward mma ({how})")


def attention_delta(dev, dout, out, B, T, NH, D):
    """attention_delta_kernel as attention_backward launches it, checked: delta = rowsum(dout * out), in fp32
    over D exact bf16 products. Returns delta (B, NH, T) for the dq / dkv kernels."""
    delta = nan_f32((B, NH, T))
    emu.launch(cuda_kernel("attention_delta_kernel"), grid_for(B * T * NH * 32, 256), 256,
               [delta, ro(dout), ro(out), B, T, NH, D], device=dev)
    exact_delta = (heads(f64(dout), B, T, NH, D) * heads(f64(out), B, T, NH, D)).sum(-1)
    abs_delta = (np.abs(heads(f64(dout), B, T, NH, D)) * np.abs(heads(f64(out), B, T, NH, D))).sum(-1)
    assert_f32_close(delta, exact_delta, 0, D * 2.0 ** -24 * abs_delta, "delta")
    return delta


@covers("attention_delta_kernel", ("attention_backward_dkv_mma_kernel", "ILb1E"),
        ("attention_backward_dkv_mma_kernel", "ILb0E"), ("attention_backward_dq_mma_kernel", "ILb1E"),
        ("attention_backward_dq_mma_kernel", "ILb0E"))
@pytest.mark.parametrize("template, how", PIPE, ids=[p[1] for p in PIPE])
@pytest.mark.parametrize("B, NH, T", MMA_SHAPES)
def test_attention_backward_mma(B, NH, T, template, how):
    D = 64
    qkv, dout, out, lse, r = attention_backward_inputs(B, T, NH, D, seed=T + B + 1)
    _, scale, scale_log2 = attention_scales(D)
    dqkv = nan_bf16((B, T, 3 * NH * D))
    dev = emu.Device()
    # attention_backward: the delta kernel, then dK/dV and dQ on grid ((T + 63) / 64, B * NH), 128 threads
    delta = attention_delta(dev, dout, out, B, T, NH, D)
    grid = ((T + 63) // 64, B * NH)
    args = [dqkv, ro(qkv), ro(dout), ro(lse), ro(delta), T, NH, scale, scale_log2]
    emu.launch(cuda_kernel("attention_backward_dkv_mma_kernel", template), grid, 128, args, device=dev)
    emu.launch(cuda_kernel("attention_backward_dq_mma_kernel", template), grid, 128, args, device=dev)
    check_attention_backward(dqkv, r, EPS_MMA, f"backward mma ({how})")


# the fallback kernels: one warp per query (key), 4 warps a block, any head size up to 128
SIMPLE_SHAPES = [(1, 2, 64, 64), (2, 3, 37, 64), (1, 2, 50, 96), (1, 2, 40, 16)]  # (B, NH, T, D)


@covers("attention_forward_simple_kernel")
@pytest.mark.parametrize("B, NH, T, D", SIMPLE_SHAPES)
def test_attention_forward_simple(B, NH, T, D):
    qkv, _, r = attention_forward_inputs(B, T, NH, D, seed=T + D)
    out, lse = nan_bf16((B, T, NH * D)), nan_f32((B, NH, T))
    scale_log2, _, _ = attention_scales(D)
    # grid ((T + SIMPLE_WARPS - 1) / SIMPLE_WARPS, B * NH), 32 * SIMPLE_WARPS threads, SIMPLE_WARPS * (D + T)
    # floats of dynamic shared memory; (out, lse, qkv, T, NH, D, scale_log2)
    emu.launch(cuda_kernel("attention_forward_simple_kernel"), ((T + 3) // 4, B * NH), 128,
               [out, lse, ro(qkv), T, NH, D, scale_log2], shared_bytes=4 * (D + T) * 4,
               max_shared_bytes=SMEM_DEFAULT)
    check_attention_forward(out, lse, r, T, D, EPS_SIMPLE, "forward simple")


@covers("attention_backward_dq_simple_kernel", "attention_backward_dkv_simple_kernel")
@pytest.mark.parametrize("B, NH, T, D", SIMPLE_SHAPES)
def test_attention_backward_simple(B, NH, T, D):
    qkv, dout, out, lse, r = attention_backward_inputs(B, T, NH, D, seed=T + D + 1)
    _, scale, scale_log2 = attention_scales(D)
    dqkv = nan_bf16((B, T, 3 * NH * D))
    dev = emu.Device()
    delta = attention_delta(dev, dout, out, B, T, NH, D)
    grid = ((T + 3) // 4, B * NH)
    args = [dqkv, ro(dout), ro(qkv), ro(lse), ro(delta), T, NH, D, scale, scale_log2]  # dout before qkv here
    emu.launch(cuda_kernel("attention_backward_dq_simple_kernel"), grid, 128, args, device=dev,
               shared_bytes=4 * (2 * D + T) * 4, max_shared_bytes=SMEM_DEFAULT)
    emu.launch(cuda_kernel("attention_backward_dkv_simple_kernel"), grid, 128, args, device=dev,
               max_shared_bytes=SMEM_DEFAULT)
    check_attention_backward(dqkv, r, EPS_SIMPLE, "backward simple")


# -----------------------------------------------------------------------------
# softmax + cross-entropy: one block of 1024 threads per row of Vp logits (V real), in place

CE_SHAPES = [
    # V, Vp, row offsets (added to N(0, 3) logits)
    (13, 16, [0.0, 0.0]),                 # 1011 of the 1024 threads hold no column
    (1001, 1024, [0.0, 100.0, -100.0]),   # exp(100) overflows fp32: the running max must come first
    (50257, 50304, [0.0]),                # GPT-2's vocabulary: 50 columns a thread
]


def ce_loss_atol(lse, V):
    """fp32: the running sum of V / 1024 exponentials per thread and a 10-level tree (an ulp each, relative),
    logf and the loss's own rounding (ulps of |lse|)."""
    return (V / 1024 + 16) * 2.0 ** -23 + 4 * 2.0 ** -24 * np.maximum(1, np.abs(lse))


@covers("crossentropy_kernel")
@pytest.mark.parametrize("V, Vp, offsets", CE_SHAPES)
def test_crossentropy(V, Vp, offsets):
    logits, targets = ce_inputs(V, Vp, offsets, np.random.default_rng(V))
    N, dloss = len(offsets), 0.37
    lse, losses_ref, grad_ref, p = ce_reference(logits, targets, V, dloss)
    x, losses = logits.copy(), nan_f32(N)
    # stage_loss: <<<N, CE_THREADS>>>(logits, losses, targets, V, Vp, dloss, training)
    emu.launch(cuda_kernel("crossentropy_kernel"), N, 1024, [x, losses, ro(targets), V, Vp, dloss, 1])
    assert_f32_close(losses, losses_ref, 0, ce_loss_atol(lse, V), "losses")
    assert (x[:, V:] == 0).all(), "padded columns of d(logits) are 0"
    # softmax from expf(x - lse): lse's error (above) times p, expf's ulps, times dloss
    assert_bf16_close(x[:, :V], grad_ref, dloss * (ce_loss_atol(lse, V)[:, None] + 2.0 ** -22) * p + 1e-30,
                      "d(logits)")


@covers("crossentropy_kernel")
def test_crossentropy_without_grad_leaves_the_logits_alone():
    V, Vp, offsets = 1001, 1024, [0.0, 20.0]
    logits, targets = ce_inputs(V, Vp, offsets, np.random.default_rng(1))
    lse, losses_ref, _, _ = ce_reference(logits, targets, V, 1.0)
    x, losses = logits.copy(), nan_f32(2)
    emu.launch(cuda_kernel("crossentropy_kernel"), 2, 1024, [x, losses, ro(targets), V, Vp, 1.0, 0])
    assert (x == logits).all(), "training = 0 must not touch the logits (padding included)"
    assert_f32_close(losses, losses_ref, 0, ce_loss_atol(lse, V), "losses")


@covers("mean_kernel")
@pytest.mark.parametrize("n", [1, 700, 3000])  # fewer values than threads, and a loop of 3
def test_mean(n):
    v = np.random.default_rng(n).uniform(0, 12, n).astype(np.float32)
    out = nan_f32(4)
    # stage_loss: <<<1, 1024>>>(d_mb_losses + mb, losses, N), here mb = 2
    emu.launch(cuda_kernel("mean_kernel"), 1, 1024, [out[2:], ro(v), n])
    # fp32 sums: 3 terms a thread, then a 10-level tree: 13 ulps of the total, at most
    assert_f32_close(out[2], v.astype(np.float64).mean(), 16 * 2.0 ** -24, 0, "mean")
    assert np.isnan(out[[0, 1, 3]]).all(), "only d_mb_losses[mb] is written"


# -----------------------------------------------------------------------------
# layernorm: one warp per row, 256 threads, (N + 7) / 8 blocks

LN_SHAPES = [(5, 8), (11, 768), (3, 1600), (20, 64), (9, 100)]  # C = 100: not a multiple of 32


@covers("layernorm_forward_kernel")
@pytest.mark.parametrize("N, C", LN_SHAPES)
def test_layernorm_forward(N, C):
    x, w, b = ln_inputs(N, C, np.random.default_rng(C))
    out, mean, rstd = nan_bf16((N, C)), nan_f32(N), nan_f32(N)
    emu.launch(cuda_kernel("layernorm_forward_kernel"), (N + 7) // 8, 256, [out, mean, rstd, ro(x), ro(w), ro(b), N, C])
    check_layernorm_forward(out, mean, rstd, x, w, b)


@covers("layernorm_backward_input_kernel")
@pytest.mark.parametrize("with_resid", [False, True])
@pytest.mark.parametrize("N, C", LN_SHAPES)
def test_layernorm_backward_input(N, C, with_resid):
    x, w, dout, resid, mean, rstd = ln_backward_inputs(N, C, with_resid, np.random.default_rng(C + 1))
    dinp = nan_bf16((N, C))
    emu.launch(cuda_kernel("layernorm_backward_input_kernel"), (N + 7) // 8, 256,
               [dinp, None if resid is None else ro(resid), ro(dout), ro(x), ro(w), ro(mean), ro(rstd), N, C])
    check_layernorm_backward_input(dinp, x, w, dout, resid, mean, rstd)


# -----------------------------------------------------------------------------
# column sums (bias and layernorm weight gradients): partial sums per 64 columns x 256 rows, then a
# fixed-order pass; the results add into the gradients

CS_SHAPES = [(40, 24), (600, 200), (256, 64)]  # (N, OC): partial tiles, 3 row blocks and 4 column blocks


def colsum_launch(mode, out0, out1, dout, inp, mean, rstd, N, OC):
    """bias_backward (mode 0) and layernorm_backward_weight (mode 1): grid ((OC + 63) / 64, colsum_blocks(N)),
    block (32, 8); then colsum_finish_kernel<<<(OC + 255) / 256, 256>>>(out0, out1, partials, nblocks, OC)."""
    nblocks = (N + 255) // 256
    partials = nan_f32(nblocks * 2 * OC)
    dev = emu.Device()
    emu.launch(cuda_kernel("colsum_partial_kernel", f"ILi{mode}E"), ((OC + 63) // 64, nblocks), (32, 8),
               [partials, dout, inp, mean, rstd, N, OC], device=dev)
    emu.launch(cuda_kernel("colsum_finish_kernel"), (OC + 255) // 256, 256, [out0, out1, partials, nblocks, OC],
               device=dev)


def colsum_atol(terms, N):
    """fp32 sums: N / 8 terms a thread, 8 threads, N / 256 blocks, then the add into the gradient."""
    return (N / 8 + 8 + N / 256 + 2) * 2.0 ** -24 * terms


@covers(("colsum_partial_kernel", "ILi0E"), "colsum_finish_kernel")
@pytest.mark.parametrize("N, OC", CS_SHAPES)
def test_bias_backward(N, OC):
    rng = np.random.default_rng(N + OC)
    dout = bf16(rng.normal(0, 1, (N, OC)))
    dbias0 = rng.normal(0, 1, OC).astype(np.float32)  # gradients accumulate over micro-batches
    dbias = dbias0.copy()
    colsum_launch(0, dbias, None, ro(dout), None, None, None, N, OC)
    d = f64(dout)
    assert_f32_close(dbias, dbias0 + d.sum(0), 0, colsum_atol(np.abs(d).sum(0) + np.abs(dbias0), N), "dbias")


@covers(("colsum_partial_kernel", "ILi1E"), "colsum_finish_kernel")
@pytest.mark.parametrize("N, C", CS_SHAPES)
def test_layernorm_backward_weight(N, C):
    rng = np.random.default_rng(N + C + 1)
    x, _, _ = ln_inputs(N, C, rng)
    dout = bf16(rng.normal(0, 1, (N, C)))
    m64, s64 = ln_stats(f64(x))
    mean, rstd = m64.astype(np.float32), s64.astype(np.float32)
    dw0, db0 = rng.normal(0, 1, C).astype(np.float32), rng.normal(0, 1, C).astype(np.float32)
    dw, db = dw0.copy(), db0.copy()
    colsum_launch(1, db, dw, ro(dout), ro(x), ro(mean), ro(rstd), N, C)  # out0 = db, out1 = dw
    d = f64(dout)
    norm = (f64(x) - mean[:, None].astype(np.float64)) * rstd[:, None].astype(np.float64)
    assert_f32_close(db, db0 + d.sum(0), 0, colsum_atol(np.abs(d).sum(0) + np.abs(db0), N), "db")
    # each term dout * norm: three fp32 roundings of its own
    assert_f32_close(dw, dw0 + (d * norm).sum(0), 0, colsum_atol(4 * np.abs(d * norm).sum(0) + np.abs(dw0), N), "dw")


# -----------------------------------------------------------------------------
# GELU (tanh form): grid_for(n, 256) x 256, a grid-stride loop

@covers("gelu_forward_kernel")
@pytest.mark.parametrize("n", [1000, 2400])
def test_gelu_forward(n):
    x = ro(gelu_inputs(n, np.random.default_rng(n)))
    out = nan_bf16(n)
    emu.launch(cuda_kernel("gelu_forward_kernel"), grid_for(n, 256), 256, [out, x, n])
    # atol: for x < -5 fp32 rounds 1 + tanh(u) to a multiple of 2^-24 where the true value is tiny
    assert_bf16_close(out, gelu_ref(f64(x)), 1e-6, "gelu forward")


@covers("gelu_backward_kernel")
@pytest.mark.parametrize("n", [1000, 2400])
def test_gelu_backward(n):
    rng = np.random.default_rng(n + 1)
    x = ro(gelu_inputs(n, rng))
    dout = ro(bf16(rng.normal(0, 1, n)))
    dinp = nan_bf16(n)
    emu.launch(cuda_kernel("gelu_backward_kernel"), grid_for(n, 256), 256, [dinp, x, dout, n])
    # atol: gelu'(x) is a difference of fp32 terms of size ~1 (it crosses zero near x = -0.75)
    assert_bf16_close(dinp, gelu_grad_ref(f64(x)) * f64(dout), 1e-6 * np.abs(f64(dout)) + 1e-30, "gelu backward")


# -----------------------------------------------------------------------------
# AdamW, and the bookkeeping kernels

HP = dict(lr=1e-3, b1=0.9, b2=0.95, bc1=1 - 0.9 ** 3, bc2=1 - 0.95 ** 3, eps=1e-8, wd=0.1, gs=0.5)


def adamw_args(p, px, g, m, v, hp=HP):
    return [p, px, g, m, v, p.size, hp["lr"], hp["b1"], hp["b2"], hp["bc1"], hp["bc2"], hp["eps"], hp["wd"], hp["gs"]]


@covers("adamw_kernel")
@pytest.mark.parametrize("n, with_px", [(640, True), (640, False)])  # the bf16 build passes px, fp32 NULL
def test_adamw(n, with_px):
    rng = np.random.default_rng(n)
    p0, g, m0, v0 = adamw_inputs(n, rng)
    p, m, v = p0.copy(), m0.copy(), v0.copy()
    px = nan_bf16(n) if with_px else None
    # adamw: <<<grid_for(n, 256), 256>>>(p, px, g, m, v, n, lr, b1, b2, bc1, bc2, eps, wd, grad_scale)
    emu.launch(cuda_kernel("adamw_kernel"), grid_for(n, 256), 256, adamw_args(p, px, ro(g), m, v))
    h = {k: float(np.float32(x)) for k, x in HP.items()}
    p64, g64, m64, v64 = (x.astype(np.float64) for x in (p0, g, m0, v0))
    gi = g64 * h["gs"]
    m1 = h["b1"] * m64 + (1 - h["b1"]) * gi
    v1 = h["b2"] * v64 + (1 - h["b2"]) * gi * gi
    p1 = p64 - h["lr"] * ((m1 / h["bc1"]) / (np.sqrt(v1 / h["bc2"]) + h["eps"]) + h["wd"] * p64)
    # m, v: a few fp32 roundings of the terms they sum
    assert_f32_close(m, m1, 0, 1e-6 * (np.abs(h["b1"] * m64) + np.abs((1 - h["b1"]) * gi)) + 1e-30, "m")
    assert_f32_close(v, v1, 0, 1e-6 * (np.abs(h["b2"] * v64) + np.abs((1 - h["b2"]) * gi * gi)) + 1e-30, "v")
    # p: its own rounding (an ulp of p, 4 allowed), and the update's (about lr, a few fp32 roundings)
    assert_f32_close(p, p1, 2.0 ** -22, 1e-6 * HP["lr"], "p")
    assert (p != p0).all(), "every parameter moves (weight decay alone moves those with zero gradient)"
    if with_px:
        assert (px == bf16(p)).all(), "px is bf16(p) of the kernel's own p, round to nearest even"


@covers("to_floatx_kernel")
def test_to_floatx():
    n = 1000
    src = np.random.default_rng(3).normal(0, 10, n).astype(np.float32)
    src[:6] = [0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40]  # overflow to inf, a subnormal
    dst = nan_bf16(n)
    # refresh_params_x: <<<grid_for(P_dev, 256), 256>>>(d_params_x, d_params, P_dev)
    emu.launch(cuda_kernel("to_floatx_kernel"), grid_for(n, 256), 256, [dst, ro(src), n])
    assert (dst == bf16(src)).all(), "__float2bfloat16: round to nearest even"


@covers("add_kernel")
def test_add():
    n = 777
    rng = np.random.default_rng(4)
    a0, b = rng.normal(0, 1, n).astype(np.float32), rng.normal(0, 1, n).astype(np.float32)
    a = a0.copy()
    # sum_wte_grads: <<<grid_for(n, 256), 256>>>(head, embed, n)
    emu.launch(cuda_kernel("add_kernel"), grid_for(n, 256), 256, [a, ro(b), n])
    assert (a == a0 + b).all(), "one fp32 addition each"


NORM_SEG = np.dtype([("offset", "<u8"), ("n", "<u8"), ("first_block", "<i4"), ("nblocks", "<i4"), ("part", "<i4")],
                    align=True)  # train_gpt.cu's NormSeg: 32 bytes


@covers("sumsq_kernel")
def test_sumsq():
    """grad_norm_parts: one block of NORM_THREADS per NORM_CHUNK (16384) elements of a segment, each the
    sum of its chunk's squares in double; segments as stage_create lays them out (128-element padding)."""
    sizes = [40000, 100, 16384, 7]
    segs = np.zeros(len(sizes), NORM_SEG)
    off = blocks = 0
    block_seg = []
    for i, n in enumerate(sizes):
        nb = (n + 16383) // 16384
        segs[i] = (off, n, blocks, nb, 3 * i + 1)
        block_seg += [i] * nb
        blocks += nb
        off += (n + 127) // 128 * 128
    g = np.random.default_rng(5).normal(0, 1, off).astype(np.float32)
    out = np.full(blocks, np.nan)
    emu.launch(cuda_kernel("sumsq_kernel"), blocks, 256, [out, ro(g), ro(segs), ro(np.array(block_seg, np.int32))])
    want = []
    for s in segs:
        for k in range(s["nblocks"]):
            lo = s["offset"] + k * 16384
            chunk = g[lo:min(lo + 16384, s["offset"] + s["n"])].astype(np.float64)
            want.append((chunk * chunk).sum())
    # float64 sums of exact squares: 64 terms a thread and an 8-level tree
    assert_f32_close(out, np.array(want), 1e-14, 0, "sum of squares")


@covers("lm_head_row_kernel")
def test_lm_head_row():
    V, C, T, used = 50, 72, 6, 4
    rng = np.random.default_rng(6)
    lnf, wte = bf16(rng.normal(0, 1, (T, C))), bf16(rng.normal(0, 1, (64, C)))  # wte has padded rows
    logits = nan_f32(V + 3)
    # sample: <<<(V + 7) / 8, 256>>>(d_sample_logits, lnf + (used - 1) * C, wte, V, C)
    emu.launch(cuda_kernel("lm_head_row_kernel"), (V + 7) // 8, 256, [logits, ro(lnf[used - 1]), ro(wte), V, C])
    x, w = f64(lnf[used - 1]), f64(wte[:V])
    # fp32 sums of exact bf16 products: C / 32 a lane, then a 5-step butterfly
    assert_f32_close(logits[:V], w @ x, 0, (C / 32 + 6) * 2.0 ** -24 * (np.abs(w) @ np.abs(x)), "logits")
    assert np.isnan(logits[V:]).all()


# -----------------------------------------------------------------------------
# the embedding: forward from the fp32 master weights; backward into wte by token buckets, into wpe over b

@covers("encoder_forward_kernel")
def test_encoder_forward():
    B, T, C, V = 2, 5, 24, 50
    rng = np.random.default_rng(7)
    tok = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = rng.normal(0, 1, (V, C)).astype(np.float32), rng.normal(0, 1, (T + 3, C)).astype(np.float32)
    n = B * T * C
    out = nan_bf16((B, T, C))
    # stage_forward: <<<grid_for(n, 256), 256>>>(x0, inputs, wte, wpe, T, C, n)
    emu.launch(cuda_kernel("encoder_forward_kernel"), grid_for(n, 256), 256, [out, ro(tok), ro(wte), ro(wpe), T, C, n])
    ref = wte[tok].astype(np.float64) + wpe[:T].astype(np.float64)
    # an fp32 sum (half an fp32 ulp) rounded to bf16
    assert_bf16_close(out, ref, 2.0 ** -24 * np.abs(ref), "x0")


def token_buckets(tokens):
    """stage_set_inputs' counting sort: the distinct tokens in increasing order, where each one's positions
    start in pos, and the positions (b*T + t), in increasing order within each token."""
    flat = tokens.ravel()
    uniq, counts = np.unique(flat, return_counts=True)
    start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    pos = np.argsort(flat, kind="stable").astype(np.int32)
    return uniq.astype(np.int32), start, pos


@covers("encoder_backward_wte_kernel")
def test_encoder_backward_wte():
    B, T, C, V = 3, 17, 300, 20  # C > 256: each thread does two channels; repeated tokens
    rng = np.random.default_rng(8)
    tok = rng.integers(0, V, (B, T)).astype(np.int32)
    tok[0, :5] = 7  # a token at many positions
    dout = bf16(rng.normal(0, 1, (B * T, C)))
    uniq, start, pos = token_buckets(tok)
    dwte0 = rng.normal(0, 1, (V, C)).astype(np.float32)
    dwte = dwte0.copy()
    # stage_backward_weight: <<<nuniq, 256>>>(d_dwte_embed, dresid, bk_tok, bk_start, bk_pos, C)
    emu.launch(cuda_kernel("encoder_backward_wte_kernel"), len(uniq), 256,
               [dwte, ro(dout), ro(uniq), ro(start), ro(pos), C])
    d = f64(dout)
    ref, mag = dwte0.astype(np.float64), np.abs(dwte0).astype(np.float64)
    count = np.zeros(V)
    for p, t in enumerate(tok.ravel()):
        ref[t] += d[p]
        mag[t] += np.abs(d[p])
        count[t] += 1
    # fp32: a sum of count terms in position order, then the add
    assert_f32_close(dwte, ref, 0, (count[:, None] + 1) * 2.0 ** -24 * mag, "dwte")
    assert (dwte[np.setdiff1d(np.arange(V), uniq)] == dwte0[np.setdiff1d(np.arange(V), uniq)]).all()


@covers("encoder_backward_wpe_kernel")
def test_encoder_backward_wpe():
    B, T, C = 3, 9, 40
    rng = np.random.default_rng(9)
    dout = bf16(rng.normal(0, 1, (B, T, C)))
    dwpe0 = rng.normal(0, 1, (T, C)).astype(np.float32)
    dwpe = dwpe0.copy()
    # <<<grid_for(T * C, 256), 256>>>(dwpe, dresid, B, T, C)
    emu.launch(cuda_kernel("encoder_backward_wpe_kernel"), grid_for(T * C, 256), 256, [dwpe, ro(dout), B, T, C])
    d = f64(dout)
    assert_f32_close(dwpe, dwpe0 + d.sum(0), 0, (B + 1) * 2.0 ** -24 * (np.abs(d).sum(0) + np.abs(dwpe0)), "dwpe")


# -----------------------------------------------------------------------------
# asm/*.ptx against their CUDA C twins, on the same inputs, each launched as train_gpt.cu launches it
# (the PTX twins: the same arguments; asm/README.md's tolerances)

def asm_kernel(file, name):
    return emu.load_kernel(ASM / file, name)


@covers("adamw_kernel")
def test_adamw_twins_are_bitwise_equal():
    """asm/README.md: the same operations with the same roundings as adamw_kernel as ptxas compiles it
    (mul.f32 then sub.f32 contracted into FFMA -u*lr + p, which the emulator models)."""
    n = 2048
    p0, g, m0, v0 = adamw_inputs(n, np.random.default_rng(11))
    res = []
    for k, grid in ((cuda_kernel("adamw_kernel"), grid_for(n, 256)),
                    (asm_kernel("adamw.ptx", "ptx_adamw"), grid_for((n + 3) // 4, 256))):
        p, m, v, px = p0.copy(), m0.copy(), v0.copy(), nan_bf16(n)
        emu.launch(k, grid, 256, adamw_args(p, px, ro(g), m, v))
        res.append((p, m, v, px))
    for name, c, a in zip("p m v px".split(), *res):
        assert (c.view(np.uint8) == a.view(np.uint8)).all(), f"{name}: {int((c != a).sum())} of {n} differ"


def assert_ulps_apart(c_bits, a_bits, ulps, atol, what):
    """Twins within `ulps` bf16 ulps of each other, or atol apart (near zero, where ulps shrink)."""
    assert not np.isnan(f64(c_bits)).any() and not np.isnan(f64(a_bits)).any(), f"{what}: NaN outputs"
    far = (bf16_ulps_apart(c_bits, a_bits) > ulps) & (np.abs(f64(c_bits) - f64(a_bits)) > atol)
    assert not far.any(), (f"{what}: {int(far.sum())} of {far.size} more than {ulps} bf16 ulps apart, first "
                           f"{f64(c_bits).ravel()[np.argmax(far)]} vs {f64(a_bits).ravel()[np.argmax(far)]}")


@covers("gelu_forward_kernel", "gelu_backward_kernel")
def test_gelu_twins():
    """asm/README.md: within a bf16 ulp or two (tanh.approx.f32 where C calls tanhf). Below x = -5 both
    round 1 + tanh(u) in fp32, whose ulp is large next to the result: 1e-6 absolute there."""
    n = 8 * 300
    rng = np.random.default_rng(12)
    x, dout = ro(gelu_inputs(n, rng)), ro(bf16(rng.normal(0, 1, n)))
    c_out, a_out, c_din, a_din = nan_bf16(n), nan_bf16(n), nan_bf16(n), nan_bf16(n)
    emu.launch(cuda_kernel("gelu_forward_kernel"), grid_for(n, 256), 256, [c_out, x, n])
    emu.launch(asm_kernel("gelu.ptx", "ptx_gelu_forward"), grid_for(n // 8, 256), 256, [a_out, x, n])
    emu.launch(cuda_kernel("gelu_backward_kernel"), grid_for(n, 256), 256, [c_din, x, dout, n])
    emu.launch(asm_kernel("gelu.ptx", "ptx_gelu_backward"), grid_for(n // 8, 256), 256, [a_din, x, dout, n])
    assert_ulps_apart(c_out, a_out, 2, 1e-6, "gelu forward")
    assert_ulps_apart(c_din, a_din, 2, 1e-6 * np.abs(f64(dout)), "gelu backward")


@covers("layernorm_forward_kernel", "layernorm_backward_input_kernel")
@pytest.mark.parametrize("N, C", [(11, 768), (3, 1600), (20, 64)])  # the PTX twins need C % 8 == 0, C <= 1792
def test_layernorm_twins(N, C):
    """asm/README.md: within a bf16 ulp (the fp32 sums run in another order); mean and rstd to fp32 rounding."""
    rng = np.random.default_rng(C + 13)
    x, w, b = ln_inputs(N, C, rng)
    dout, resid = bf16(rng.normal(0, 1, (N, C))), bf16(rng.normal(0, 1, (N, C)))
    fwd, bwd = [], []
    for k_fwd, k_bwd in ((cuda_kernel("layernorm_forward_kernel"), cuda_kernel("layernorm_backward_input_kernel")),
                         (asm_kernel("layernorm.ptx", "ptx_layernorm_forward"),
                          asm_kernel("layernorm.ptx", "ptx_layernorm_backward_input"))):
        out, mean, rstd = nan_bf16((N, C)), nan_f32(N), nan_f32(N)
        emu.launch(k_fwd, (N + 7) // 8, 256, [out, mean, rstd, ro(x), ro(w), ro(b), N, C])
        fwd.append((out, mean, rstd))
        dinp = nan_bf16((N, C))
        m, s = fwd[0][1], fwd[0][2]  # both backwards from the C forward's statistics
        emu.launch(k_bwd, (N + 7) // 8, 256, [dinp, ro(resid), ro(dout), ro(x), ro(w), ro(m), ro(s), N, C])
        bwd.append(dinp)
    (c_out, c_mean, c_rstd), (a_out, a_mean, a_rstd) = fwd
    assert_f32_close(a_mean, c_mean, 1e-6, 1e-7, "mean")
    assert_f32_close(a_rstd, c_rstd, 1e-5, 0, "rstd")
    assert_ulps_apart(c_out, a_out, 1, 1e-6, "layernorm forward")
    assert_ulps_apart(bwd[0], bwd[1], 1, 1e-6, "layernorm backward")


@covers("crossentropy_kernel")
@pytest.mark.parametrize("V, Vp, offsets", [(1001, 1024, [0.0, 100.0, -100.0]), (50257, 50304, [0.0])])
def test_crossentropy_twins(V, Vp, offsets):
    """asm/README.md: losses to ~1e-6 relative (ex2/lg2.approx and one sum after the max, where C calls
    expf/logf with an online max and sum), gradients within a bf16 ulp."""
    logits, targets = ce_inputs(V, Vp, offsets, np.random.default_rng(V + 14))
    N = len(offsets)
    res = []
    for k in (cuda_kernel("crossentropy_kernel"), asm_kernel("crossentropy.ptx", "ptx_crossentropy")):
        x, losses = logits.copy(), nan_f32(N)
        emu.launch(k, N, 1024, [x, losses, ro(targets), V, Vp, 0.37, 1])
        res.append((x, losses))
    (c_x, c_loss), (a_x, a_loss) = res
    assert_f32_close(a_loss, c_loss, 1e-6, 1e-6, "losses")
    assert (c_x[:, V:] == 0).all() and (a_x[:, V:] == 0).all()
    assert_ulps_apart(c_x[:, :V], a_x[:, :V], 1, 1e-9, "d(logits)")


# -----------------------------------------------------------------------------
# the emulator's new parts, on small inline kernels


def inline(body: str, params: str, name: str = "k") -> emu.Kernel:
    return _inline(body, params, name, target="sm_90")


def pack_bf16(lo, hi) -> np.ndarray:
    """Two bf16 bit patterns in one .b32, the first in the low half."""
    return np.asarray(lo).astype(np.uint32) | (np.asarray(hi).astype(np.uint32) << 16)


MMA = """
    .reg .b32 %t, %a<4>, %b<2>;
    .reg .f32 %c<4>, %d<4>;
    .reg .b64 %pa, %pb, %pc, %pd, %o;
    ld.param.u64 %pa, [pa];
    ld.param.u64 %pb, [pb];
    ld.param.u64 %pc, [pc];
    ld.param.u64 %pd, [pd];
    mov.u32 %t, %tid.x;
    mul.wide.u32 %o, %t, 16;
    add.u64 %pa, %pa, %o;
    add.u64 %pc, %pc, %o;
    add.u64 %pd, %pd, %o;
    ld.global.v4.b32 {%a0, %a1, %a2, %a3}, [%pa];
    ld.global.v4.f32 {%c0, %c1, %c2, %c3}, [%pc];
    mul.wide.u32 %o, %t, 8;
    add.u64 %pb, %pb, %o;
    ld.global.v2.b32 {%b0, %b1}, [%pb];
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%d0, %d1, %d2, %d3}, {%a0, %a1, %a2, %a3},
        {%b0, %b1}, {%c0, %c1, %c2, %c3};
    st.global.v4.f32 [%pd], {%d0, %d1, %d2, %d3};
    ret;
"""
def test_mma_fragments_follow_the_ptx_isa_tables():
    """PTX ISA, mma.m16n8k16 with .bf16: groupID = lane >> 2, threadID_in_group = lane % 4; A element a_i
    (i = 0..7, two to a register) is at row groupID for i < 2 or 4 <= i < 6, else groupID + 8, and column
    threadID_in_group * 2 + (i & 1), plus 8 for i >= 4; B element b_i (i = 0..3) at row threadID_in_group * 2
    + (i & 1), plus 8 for i >= 2, column groupID; C and D element c_i at row groupID, plus 8 for i >= 2,
    column threadID_in_group * 2 + (i & 1). Two warps with their own matrices."""
    rng = np.random.default_rng(20)
    nw = 2
    A, B = bf16(rng.normal(0, 1, (nw, 16, 16))), bf16(rng.normal(0, 1, (nw, 16, 8)))
    C = rng.normal(0, 1, (nw, 16, 8)).astype(np.float32)
    a, b = np.zeros((nw, 32, 8), np.uint16), np.zeros((nw, 32, 4), np.uint16)
    c, want_idx = np.zeros((nw, 32, 4), np.float32), np.zeros((32, 4, 2), int)
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for i in range(8):
            row = g if i < 2 or 4 <= i < 6 else g + 8
            a[:, lane, i] = A[:, row, t * 2 + (i & 1) + (8 if i >= 4 else 0)]
        for i in range(4):
            b[:, lane, i] = B[:, t * 2 + (i & 1) + (8 if i >= 2 else 0), g]
            want_idx[lane, i] = (g + (8 if i >= 2 else 0), t * 2 + (i & 1))
            c[:, lane, i] = C[:, want_idx[lane, i, 0], want_idx[lane, i, 1]]
    pa, pb = pack_bf16(a[..., 0::2], a[..., 1::2]), pack_bf16(b[..., 0::2], b[..., 1::2])
    d = np.full((nw, 32, 4), np.nan, np.float32)
    emu.launch(inline(MMA, PARAMS4), 1, 32 * nw, [ro(pa), ro(pb), ro(c), d])
    D = f64(A) @ f64(B) + C  # the bf16 products are exact; one rounding to fp32 at the end
    want = D[:, want_idx[..., 0], want_idx[..., 1]]
    assert_f32_close(d, want, 2.0 ** -24, 0, "mma D")


def test_mma_needs_the_whole_warp():
    body = MMA.replace("    mma.sync", "    setp.ne.u32 %p, %t, 5;\n    @%p mma.sync").replace(
        ".reg .b32 %t,", ".reg .pred %p;\n    .reg .b32 %t,")
    z = np.zeros((32, 4), np.uint32)
    with pytest.raises(emu.DivergenceError, match=r"mma.sync.*membermask 0xffffffff names lane 5 of warp 0, which "
                                                  r"is here but predicated off"):
        emu.launch(inline(body, PARAMS4), 1, 32, [ro(z), ro(z), ro(z.view(np.float32)), np.zeros((32, 4), np.float32)])


LDMATRIX = """
    .reg .b32 %t, %i, %r, %s, %u, %v, %x<4>, %y<4>;
    .reg .b64 %pa, %pd, %o;
    .shared .align 16 .b8 sh[1024];
    ld.param.u64 %pa, [pa];
    ld.param.u64 %pd, [pd];
    mov.u32 %t, %tid.x;
    mov.u32 %s, sh;
    mul.wide.u32 %o, %t, 32;
    add.u64 %pa, %pa, %o;
    ld.global.v4.b32 {%x0, %x1, %x2, %x3}, [%pa];
    ld.global.v4.b32 {%y0, %y1, %y2, %y3}, [%pa+16];
    mad.lo.u32 %u, %t, 32, %s;
    st.shared.v4.b32 [%u], {%x0, %x1, %x2, %x3};
    st.shared.v4.b32 [%u+16], {%y0, %y1, %y2, %y3};
    bar.sync 0;
    // lane 8 i + r: the row r of matrix i, stored at 32-byte slot 31 - (8 i + r), its second 16 bytes
    sub.u32 %v, 31, %t;
    mad.lo.u32 %v, %v, 32, %s;
    ldmatrix.sync.aligned.m8n8.x4.TRANS.shared.b16 {%x0, %x1, %x2, %x3}, [%v+16];
    mul.wide.u32 %o, %t, 16;
    add.u64 %pd, %pd, %o;
    st.global.v4.b32 [%pd], {%x0, %x1, %x2, %x3};
    ret;
"""


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_follows_the_ptx_isa(trans):
    """PTX ISA, ldmatrix .m8n8 .x4 .b16: lanes 8 i .. 8 i + 7 give the addresses of rows 0..7 of matrix i;
    each lane then holds, in register i, two elements of matrix i: row lane / 4, columns 2 (lane % 4) and
    2 (lane % 4) + 1 (with .trans the matrix is read column-major: column lane / 4, rows 2 (lane % 4) and
    2 (lane % 4) + 1)."""
    M = bf16(np.random.default_rng(21).normal(0, 1, (4, 8, 8)))  # 4 matrices of 8 x 8
    src = np.zeros((32, 16), np.uint16)  # 32-byte slots; the rows go in the second half of slot 31 - (8 i + r)
    for i in range(4):
        for r in range(8):
            src[31 - (8 * i + r), 8:] = M[i, r]
    src[:, :8] = 0xFFFF
    out = np.zeros((32, 4), np.uint32)
    emu.launch(inline(LDMATRIX.replace(".TRANS", ".trans" if trans else ""), ".param .u64 pa, .param .u64 pd"),
               1, 32, [ro(src), out])
    for lane in range(32):
        for i in range(4):
            if trans:
                lo, hi = M[i, 2 * (lane % 4), lane // 4], M[i, 2 * (lane % 4) + 1, lane // 4]
            else:
                lo, hi = M[i, lane // 4, 2 * (lane % 4)], M[i, lane // 4, 2 * (lane % 4) + 1]
            assert out[lane, i] == pack_bf16(lo, hi), f"lane {lane}, register {i}"


CP_ASYNC = """
    .reg .b32 %t, %s, %u, %v, %n, %x<4>;
    .reg .b64 %pa, %pd, %o;
    .reg .pred %p;
    .shared .align 16 .b8 sh[1024];
    ld.param.u64 %pa, [pa];
    ld.param.u64 %pd, [pd];
    mov.u32 %t, %tid.x;
    mov.u32 %s, sh;
    mul.wide.u32 %o, %t, 16;
    add.u64 %pa, %pa, %o;
    add.u64 %pd, %pd, %o;
    mad.lo.u32 %u, %t, 16, %s;
    rem.u32 %n, %t, 3;
    mul.lo.u32 %n, %n, 8;
    cp.async.cg.shared.global [%u], [%pa], 16, %n;
    cp.async.commit_group;
    cp.async.cg.shared.global [%u+512], [%pa+512], 16;
    cp.async.commit_group;
    WAIT
    add.u32 %v, %t, 1;
    and.b32 %v, %v, 31;
    mad.lo.u32 %v, %v, 16, %s;
    ld.shared.v4.b32 {%x0, %x1, %x2, %x3}, [%v+OFFSET];
    st.global.v4.b32 [%pd], {%x0, %x1, %x2, %x3};
    ret;
"""


def cp_async_kernel(wait, offset=0):
    return inline(CP_ASYNC.replace("WAIT", wait).replace("OFFSET", str(offset)), ".param .u64 pa, .param .u64 pd")


def test_cp_async_copies_zero_fills_and_lands_at_the_wait():
    """Thread t copies 16 bytes, of which (t % 3) * 8 from global and the rest zeros; after its
    wait_group 0 and a bar.sync, thread t - 1 reads them."""
    src = np.random.default_rng(22).integers(1, 2 ** 32, (64, 4), dtype=np.uint32)
    out = np.zeros((32, 4), np.uint32)
    emu.launch(cp_async_kernel("cp.async.wait_group 0;\n bar.sync 0;"), 1, 32, [ro(src), out])
    want = src[:32].copy()
    for t in range(32):
        want[t, 2 * (t % 3):] = 0
    assert (out == np.roll(want, -1, axis=0)).all()


def test_cp_async_wait_group_1_leaves_the_newest_group_in_flight():
    src = np.ones((64, 4), np.uint32)
    out = np.zeros((32, 4), np.uint32)
    emu.launch(cp_async_kernel("cp.async.wait_group 1;\n bar.sync 0;"), 1, 32, [ro(src), out])  # the first: fine
    with pytest.raises(emu.MemcheckError, match=r"ld.shared.*: load of shared memory that a cp.async is still "
                                                r"writing .*byte 528 of shared sh"):
        emu.launch(cp_async_kernel("cp.async.wait_group 1;\n bar.sync 0;", 512), 1, 32, [ro(src), out])


def test_cp_async_read_before_its_wait_raises():
    with pytest.raises(emu.MemcheckError, match="cp.async is still writing"):
        emu.launch(cp_async_kernel("bar.sync 0;"), 1, 32,
                   [ro(np.ones((64, 4), np.uint32)), np.zeros((32, 4), np.uint32)])


def test_cp_async_data_needs_a_barrier_after_the_wait():
    """The copy lands as a store of the issuing thread: another thread must not read it before a bar.sync."""
    with pytest.raises(emu.RaceError, match=r"load races with a store by thread \(1,0,0\)"):
        emu.launch(cp_async_kernel("cp.async.wait_group 0;"), 1, 32,
                   [ro(np.ones((64, 4), np.uint32)), np.zeros((32, 4), np.uint32)])


ATOM = """
    .reg .b32 %t, %c, %n, %old, %v;
    .reg .b64 %pa, %pd, %o;
    ld.param.u64 %pa, [pa];
    ld.param.u64 %pd, [pd];
    mov.u32 %t, %tid.x;
    mov.u32 %c, %ctaid.x;
    mov.u32 %n, %ntid.x;
    mad.lo.u32 %t, %c, %n, %t;
    atom.global.add.u32 %old, [%pa], 1;
    mul.lo.u32 %v, %t, 37;
    rem.u32 %v, %v, 101;
    atom.global.max.u32 %v, [%pa+4], %v;
    mul.wide.u32 %o, %t, 4;
    add.u64 %pd, %pd, %o;
    st.global.u32 [%pd], %old;
    ret;
"""


def test_atomics_all_apply_when_threads_meet_in_one_step():
    counters, old = np.zeros(2, np.uint32), np.full(192, 0xFFFFFFFF, np.uint32)
    emu.launch(inline(ATOM, ".param .u64 pa, .param .u64 pd"), 3, 64, [counters, old])
    assert counters[0] == 192, "every atom.add applied"
    assert sorted(old) == list(range(192)), "each thread saw the counter at a different moment"
    assert counters[1] == max(t * 37 % 101 for t in range(192))


REDUX = """
    .reg .b32 %t, %v, %s, %m;
    .reg .b64 %pd, %o;
    ld.param.u64 %pd, [pd];
    mov.u32 %t, %tid.x;
    mul.lo.u32 %v, %t, 7;
    rem.u32 %v, %v, 23;
    redux.sync.add.u32 %s, %v, 0xffffffff;
    redux.sync.max.u32 %m, %v, 0xffffffff;
    mul.wide.u32 %o, %t, 8;
    add.u64 %pd, %pd, %o;
    st.global.v2.u32 [%pd], {%s, %m};
    ret;
"""


def test_redux_sync_reduces_each_warp():
    out = np.zeros((64, 2), np.uint32)
    emu.launch(inline(REDUX, ".param .u64 pd"), 1, 64, [out])
    v = np.arange(64) * 7 % 23
    for w in range(2):
        assert (out[32 * w:32 * w + 32, 0] == v[32 * w:32 * w + 32].sum()).all()
        assert (out[32 * w:32 * w + 32, 1] == v[32 * w:32 * w + 32].max()).all()


WARP_SYNC = """
    .reg .b32 %t, %s, %u, %v;
    .reg .b64 %pd, %o;
    .shared .align 4 .b32 sh[64];
    ld.param.u64 %pd, [pd];
    mov.u32 %t, %tid.x;
    mov.u32 %s, sh;
    mad.lo.u32 %u, %t, 4, %s;
    st.shared.b32 [%u], %t;
    SYNC
    xor.b32 %v, %t, 1;
    mad.lo.u32 %v, %v, 4, %s;
    ld.shared.b32 %v, [%v];
    mul.wide.u32 %o, %t, 4;
    add.u64 %pd, %pd, %o;
    st.global.b32 [%pd], %v;
    ret;
"""


def test_bar_warp_sync_orders_a_warps_shared_memory():
    out = np.zeros(64, np.uint32)
    emu.launch(inline(WARP_SYNC.replace("SYNC", "bar.warp.sync -1;"), ".param .u64 pd"), 1, 64, [out])
    assert (out == np.arange(64) ^ 1).all()
    with pytest.raises(emu.RaceError, match=r"races with a store by thread \(1,0,0\)"):
        emu.launch(inline(WARP_SYNC.replace("SYNC", ""), ".param .u64 pd"), 1, 64, [out])


def test_fma_rm_rounds_toward_minus_infinity():
    rng = np.random.default_rng(23)
    n = 512
    a = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-30, 30, n) * rng.choice([-1, 1], n)).astype(np.float32)
    b = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-30, 30, n) * rng.choice([-1, 1], n)).astype(np.float32)
    c = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-60, 60, n) * rng.choice([-1, 1], n)).astype(np.float32)
    c[::4] = -(a[::4].astype(np.float64) * b[::4]).astype(np.float32)  # near-cancellation
    a[:3], b[:3], c[:3] = [1.5, 3e38, 2.0], [2.0, 4.0, 3.0], [-3.0, 0.0, -6.0]  # exact zeros, an overflow
    # expf's pattern: fma.rm(t, 254, 12582913) puts floor(254 t) + 1 in the low mantissa bits
    a[3:7], b[3:7], c[3:7] = [0.3, 0.7, 0.25, 1e-8], 254.0, 12582913.0
    d = np.zeros(n, np.float32)
    emu.launch(inline(ELEMENTWISE.replace("OP", "fma.rm.f32 %w, %x, %y, %z"), PARAMS4), 1, n, [ro(a), ro(b), ro(c), d])
    want = np.array([round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)), "rm")
                     for x, y, z in zip(a, b, c)], np.float32)
    want[[0, 2]] = np.float32(-0.0)  # x + (-x) is -0 when rounding toward -inf (IEEE 754)
    bad = np.flatnonzero(d.view(np.uint32) != want.view(np.uint32))
    assert bad.size == 0, f"{bad.size} wrong, first {bad[0]}: fma.rm({a[bad[0]]}, {b[bad[0]]}, {c[bad[0]]}) = " \
                          f"{d[bad[0]]!r}, want {want[bad[0]]!r}"


@pytest.mark.parametrize("op, fused", [
    ("mul.f32 %w, %x, %y;\n sub.f32 %w, %z, %w", True),        # AdamW's p - lr * u: one FFMA
    ("mul.f32 %w2, %x, %y;\n add.f32 %w, %w2, %z", True),
    ("mul.rn.f32 %w2, %x, %y;\n add.f32 %w, %w2, %z", False),  # .rn forbids the fusion
    ("mul.f32 %w2, %x, %y;\n add.f32 %w, %w2, %z;\n add.f32 %w, %w, %w2", False),  # the product used twice
])
def test_ptxas_contraction_of_mul_and_add(op, fused):
    """ptxas (--fmad=true, its default) fuses a bare mul.f32 into the one bare add/sub.f32 that uses it."""
    n = 1000
    rng = np.random.default_rng(24)
    x, y = rng.normal(0, 1, (2, n)).astype(np.float32)
    z = (x.astype(np.float64) * y * (1 + rng.normal(0, 1e-6, n))).astype(np.float32)  # cancellation: rounding shows
    d = np.zeros(n, np.float32)
    emu.launch(inline(ELEMENTWISE.replace("OP", op), PARAMS4), 1, n, [ro(x), ro(y), ro(z), d])
    sub = "sub.f32" in op
    exact = np.array([round_f32((Fraction(float(c)) - Fraction(float(a)) * Fraction(float(b))) if sub else
                                (Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))))
                      for a, b, c in zip(x, y, z)], np.float32)
    twice = np.float32(x * y)
    separate = (z - twice) if sub else (twice + z)
    if "%w, %w2" in op and op.count("add.f32") == 2:
        separate = separate + twice
        assert (d == separate).all(), "not fused: separately rounded"
    elif fused:
        assert (d == exact).all(), "fused: rounded once"
        assert (exact != separate).sum() > 10, "the inputs tell the two apart"
    else:
        assert (d == separate).all(), "not fused: separately rounded"


MISC = """
    .reg .b32 %t, %r<8>;
    .reg .b16 %h<3>;
    .reg .b64 %pd, %o, %wide;
    .reg .f32 %f<4>;
    .reg .pred %p;
    ld.param.u64 %pd, [pd];
    mov.u32 %t, %tid.x;
    mad.lo.u32 %r0, %t, 65793, 305419896;
    mov.b32 {%h0, %h1}, %r0;           // unpack: low half first
    mov.b32 %r1, {%h1, %h0};           // pack: swapped halves
    cvt.u64.u32 %wide, %r0;
    shl.b64 %wide, %wide, 20;
    cvt.u16.u32 %h2, %wide;             // a 64-bit source for a u32 conversion: truncated
    cvt.u32.u16 %r2, %h2;
    bfi.b32 %r3, %t, %r0, 4, 5;        // bits 4..8 of r0 replaced by t's low 5 bits
    cvt.rn.f32.u32 %f0, %t;
    sub.rn.f32 %f0, %f0, 0f41800000;   // t - 16
    mul.rn.f32 %f1, %f0, 0f3D800000;   // (t - 16) / 16
    cvt.sat.f32.f32 %f2, %f1;
    copysign.f32 %f3, %f0, 0f40400000; // 3 with the sign of t - 16
    mov.b32 %r4, %f2;
    mov.b32 %r5, %f3;
    shfl.sync.down.b32 %r6|%p, %t, 5, 31, -1;
    selp.u32 %r7, 1, 0, %p;
    mul.wide.u32 %o, %t, 32;
    add.u64 %pd, %pd, %o;
    st.global.v4.b32 [%pd], {%r1, %r2, %r3, %r4};
    st.global.v4.b32 [%pd+16], {%r5, %r6, %r7, %r0};
    ret;
"""


def test_pack_unpack_cvt_bfi_sat_copysign_and_shfl_predicate():
    out = np.zeros((32, 8), np.uint32)
    emu.launch(inline(MISC, ".param .u64 pd"), 1, 32, [out])
    t = np.arange(32, dtype=np.uint64)
    r0 = (t * 65793 + 305419896) & 0xFFFFFFFF
    assert (out[:, 7] == r0).all()
    assert (out[:, 0] == ((r0 & 0xFFFF) << 16 | r0 >> 16)).all()
    assert (out[:, 1] == ((r0 << 20) & 0xFFFF)).all()
    assert (out[:, 2] == (r0 & ~np.uint64(0x1F0) | (t & 31) << 4)).all()
    assert (out[:, 3].view(np.float32) == np.clip((t - 16.0) / 16, 0, 1)).all()
    assert (out[:, 4].view(np.float32) == np.copysign(3, t - 16.0)).all()
    assert (out[:, 5] == np.where(t + 5 <= 31, t + 5, t)).all(), "shfl.down past the top: own value"
    assert (out[:, 6] == (t + 5 <= 31)).all(), "its predicate: whether the source lane was in range"


@covers(("attention_forward_mma_kernel", "ILb1E"))
def test_waves_of_blocks_do_not_change_results():
    """The blocks of a launch run in waves, vectorised together; one block at a time gives the same bits."""
    B, T, NH, D = 2, 128, 2, 64
    qkv, _ = attention_inputs(B, T, NH, D, 30)
    res = []
    for wave in (None, 1):
        out, lse = nan_bf16((B, T, NH * D)), nan_f32((B, NH, T))
        emu.launch(cuda_kernel("attention_forward_mma_kernel", "ILb1E"), (2, B * NH), 128,
                   [out, lse, ro(qkv), T, NH, attention_scales(D)[0]], wave_blocks=wave)
        res.append((out, lse))
    assert (res[0][0] == res[1][0]).all() and (res[0][1].view(np.uint32) == res[1][1].view(np.uint32)).all()


@covers("attention_forward_simple_kernel")
def test_dynamic_shared_memory_is_the_launch_size():
    """The simple kernel with one float less than its launcher's SIMPLE_WARPS * (D + T) floats faults; a
    shape over 48 KiB cannot launch without cudaFuncSetAttribute (the launcher's limit: T <= 3008 at D = 64)."""
    B, T, NH, D = 1, 8, 1, 64
    qkv, _ = attention_inputs(B, T, NH, D, 31)
    args = [nan_bf16((B, T, NH * D)), nan_f32((B, NH, T)), ro(qkv), T, NH, D, attention_scales(D)[0]]
    k = cuda_kernel("attention_forward_simple_kernel")
    with pytest.raises(emu.MemcheckError, match="out-of-bounds .* past the end of shared smem"):
        emu.launch(k, ((T + 3) // 4, B * NH), 128, args, shared_bytes=4 * (D + T) * 4 - 4,
                   max_shared_bytes=SMEM_DEFAULT)
    with pytest.raises(emu.LaunchError, match="more than 49152"):
        emu.launch(k, ((T + 3) // 4, B * NH), 128, args, shared_bytes=4 * (D + 3009) * 4,
                   max_shared_bytes=SMEM_DEFAULT)


# -----------------------------------------------------------------------------
# the guard

def test_every_kernel_is_tested():
    entries = set(module())
    benches = {e for e in entries if "ptxb_" in e}
    tested = {emu.find_entry(module(), name, template).name for name, template in COVERED}
    assert len(tested) >= 27, sorted(tested)  # the 27 kernels of train_gpt.cu's bf16 build when this was written
    untested = sorted(entries - benches - tested)
    assert not untested, f"kernels of train_gpt.cu with no test here: {untested}"
