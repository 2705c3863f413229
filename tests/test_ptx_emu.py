"""The PTX kernels of asm/*.ptx, executed on the CPU by dev/ptx_emu.py.

Every `.visible .entry` in asm/*.ptx runs under the emulator with the
trainer's block size (train_gpt.cu's PTX launchers) and the argument order of
its CUDA C twin. Its results are compared with a float64 numpy reference
written from the math in the .ptx header, not from the kernel's
instructions. bf16 outputs may be off by one bf16 ulp plus a tiny absolute
term (the kernels compute in fp32 and round once). fp32 outputs may be off
by about 1e-5 relative. Inputs are bf16 bit patterns (uint16) made by
rounding float32 to nearest even.

The emulator is also a memcheck: arrays are bounds- and alignment-checked
exactly, inputs are passed read-only (a kernel that writes one fails), and
outputs are pre-filled with NaN so an element a kernel forgets comes out
wrong. Shapes are awkward on purpose: sizes that are not a multiple of the
block, grids that make the grid-stride loops go round, channels 8 and the
largest the layernorm allows, a vocabulary that is not a multiple of 8 with
padded columns full of NaN and inf, targets at column 0 and V-1.

Then the emulator itself: fma rounding against exact rational arithmetic,
bf16 packing, shfl.bfly, bar.sync with shared memory, and the errors it must
raise (out of bounds, misaligned, race, divergence, uninitialized shared
memory, unknown opcode, runaway loop).
"""

import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dev import ptx_emu as emu

ROOT = Path(__file__).resolve().parent.parent
ASM = ROOT / "asm"
PTX_FILES = sorted(ASM.glob("*.ptx"))

SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)


# -----------------------------------------------------------------------------
# helpers: bf16 by hand, read-only inputs, comparisons

def bf16(x) -> np.ndarray:
    """float -> bf16 bits (uint16), round to nearest even (inputs here are finite or inf)."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def f64(h) -> np.ndarray:
    """bf16 bits -> float64 (exact)."""
    return (np.asarray(h).astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def ro(a: np.ndarray) -> np.ndarray:
    """A read-only copy: the emulator faults if the kernel stores to it."""
    a = np.array(a)
    a.setflags(write=False)
    return a


def nan_bf16(shape) -> np.ndarray:
    return np.full(shape, 0x7FC0, np.uint16)


def bf16_ulp(ref) -> np.ndarray:
    """One bf16 ulp at |ref| (8 significant bits); 0 where ref == 0."""
    a = np.abs(np.asarray(ref, np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.where(a > 0, 2.0 ** (e - 7), 0.0)


def assert_bf16_close(got_bits, ref, atol, what):
    """Each bf16 output within one bf16 ulp of the float64 reference, plus atol (scalar or per element)."""
    got = f64(got_bits)
    ref = np.asarray(ref, np.float64)
    assert not np.isnan(got).any(), f"{what}: {int(np.isnan(got).sum())} outputs are NaN (never written?)"
    err = np.abs(got - ref)
    tol = bf16_ulp(ref) + atol
    bad = np.flatnonzero(err > tol)
    assert bad.size == 0, (f"{what}: {bad.size} of {err.size} outside 1 bf16 ulp + atol; worst at flat index "
                           f"{bad[np.argmax((err / tol).ravel()[bad])]}: got "
                           f"{got.ravel()[bad[0]]!r}, want {ref.ravel()[bad[0]]!r}")


def assert_f32_close(got, ref, rtol, atol, what):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite outputs {got[~np.isfinite(got)][:4]}"
    err = np.abs(got - ref)
    tol = rtol * np.abs(ref) + atol
    bad = np.flatnonzero(err > tol)
    assert bad.size == 0, (f"{what}: {bad.size} of {err.size} outside tolerance; first at flat index {bad[0]}: "
                           f"got {got.ravel()[bad[0]]!r}, want {ref.ravel()[bad[0]]!r}")


def kernel(file: str, name: str) -> emu.Kernel:
    return emu.load_kernel(ASM / file, name)


def grid_for(n, block):  # train_gpt.cu's grid_for
    return max(1, min((n + block - 1) // block, 65536 * 8))


TESTED = set()  # kernels exercised below; test_every_entry_is_tested checks it covers asm/*.ptx


def covers(name):
    TESTED.add(name)
    return lambda f: f


# -----------------------------------------------------------------------------
# AdamW: p, m, v fp32 in place, px the bf16 copy (or NULL); n % 4 == 0

HP = dict(lr=1e-3, b1=0.9, b2=0.95, bc1=1 - 0.9 ** 3, bc2=1 - 0.95 ** 3, eps=1e-8, wd=0.1, gs=0.5)


def adamw_inputs(n, rng):
    p = rng.normal(0, 0.1, n).astype(np.float32)
    g = rng.normal(0, 1e-2, n).astype(np.float32)
    m = rng.normal(0, 1e-3, n).astype(np.float32)
    v = np.abs(rng.normal(0, 1e-5, n)).astype(np.float32)
    g[:4], m[:4], v[:4] = 0, 0, 0           # a first step on a zero gradient: only weight decay moves p
    g[4:8] = [30.0, -30.0, 1e-20, -1e-20]   # a huge and a tiny gradient
    return p, g, m, v


def run_adamw(p, px, g, m, v, grid, hp=HP):
    n = p.size
    args = [p, px, g, m, v, n, hp["lr"], hp["b1"], hp["b2"], hp["bc1"], hp["bc2"], hp["eps"], hp["wd"], hp["gs"]]
    return emu.launch(kernel("adamw.ptx", "ptx_adamw"), grid, 256, args)


def adamw_reference(p, g, m, v, hp=HP):
    """The header's formula in float64 on the float32 inputs and hyperparameters."""
    h = {k: float(np.float32(x)) for k, x in hp.items()}
    p, g, m, v = (x.astype(np.float64) for x in (p, g, m, v))
    gi = g * h["gs"]
    m1 = h["b1"] * m + (1 - h["b1"]) * gi
    v1 = h["b2"] * v + (1 - h["b2"]) * gi * gi
    p1 = p - h["lr"] * ((m1 / h["bc1"]) / (np.sqrt(v1 / h["bc2"]) + h["eps"]) + h["wd"] * p)
    # scales for the tolerances: the size of the terms each result sums
    m_scale = np.abs(h["b1"] * m) + np.abs((1 - h["b1"]) * gi)
    v_scale = np.abs(h["b2"] * v) + np.abs((1 - h["b2"]) * gi * gi)
    return p1, m1, v1, m_scale, v_scale


@covers("ptx_adamw")
@pytest.mark.parametrize("n, grid, with_px", [
    (600, None, True),     # the trainer's grid: one block, 150 groups of 4, threads 150..255 idle
    (2800, 2, True),       # 700 groups on 512 threads: the grid-stride loop goes round
    (600, None, False),    # px = NULL (the fp32 build)
])
def test_adamw(n, grid, with_px):
    rng = np.random.default_rng(n)
    p0, g, m0, v0 = adamw_inputs(n, rng)
    p, m, v = p0.copy(), m0.copy(), v0.copy()
    px = nan_bf16(n) if with_px else None
    steps = run_adamw(p, px, ro(g), m, v, grid or grid_for((n + 3) // 4, 256))
    assert steps > 0
    p1, m1, v1, m_scale, v_scale = adamw_reference(p0, g, m0, v0)
    assert_f32_close(m, m1, 0, 1e-6 * m_scale + 1e-30, "m")
    assert_f32_close(v, v1, 0, 1e-6 * v_scale + 1e-30, "v")
    # p moves by about lr per step: 1e-6 of p plus 1e-4 of lr catches any wrong term of the update
    assert_f32_close(p, p1, 1e-6, 1e-4 * HP["lr"], "p")
    assert (p != p0).all(), "every parameter moves (weight decay alone moves those with zero gradient)"
    if with_px:
        assert (px == bf16(p)).all(), "px is bf16(p) of the kernel's own p, round to nearest even"
        assert_bf16_close(px, p1, 0, "px")


def _exact_fma(a, b, c) -> np.float32:
    return round_f32(Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c)))


@covers("ptx_adamw")
def test_adamw_is_the_c_kernels_arithmetic_bit_for_bit():
    """The header says: the same roundings as adamw_kernel in train_gpt.cu as nvcc contracts it
    (FFMA m*b1 + (1-b1)*g', FFMA v*b2 + ..., FFMA p*wd + r, FFMA -u*lr + p). Transcribed from the C
    source with float32 numpy and an exact fma (fractions), the results must be the same bits."""
    n = 64
    rng = np.random.default_rng(7)
    p0, g, m0, v0 = adamw_inputs(n, rng)
    p, m, v, px = p0.copy(), m0.copy(), v0.copy(), nan_bf16(n)
    run_adamw(p, px, ro(g), m, v, 1)
    f = np.float32
    h = {k: f(x) for k, x in HP.items()}
    for i in range(n):
        gi = g[i] * h["gs"]
        mi = _exact_fma(m0[i], h["b1"], (f(1) - h["b1"]) * gi)
        vi = _exact_fma(v0[i], h["b2"], (f(1) - h["b2"]) * gi * gi)
        r = (mi / h["bc1"]) / (f(np.sqrt(np.float64(vi / h["bc2"]))) + h["eps"])
        u = _exact_fma(p0[i], h["wd"], r)
        pi = _exact_fma(-u, h["lr"], p0[i])
        assert (m[i], v[i], p[i]) == (mi, vi, pi), f"element {i}"
    assert (px == bf16(p)).all()


# -----------------------------------------------------------------------------
# GELU (tanh form) on bf16, n % 8 == 0

def gelu_inputs(n, rng, extreme):
    x = rng.normal(0, 2, n)
    edge = [0.0, -0.0, 1e-3, -1e-3, 0.5, -0.5, 3.0, -3.0, 10.0, -10.0, 20.0, -20.0, 1e4, -1e4]
    if extreme:
        edge += [1e15, -1e15]  # x^3 overflows fp32: tanh(+-inf) = +-1 still gives x and 0
    x[:len(edge)] = edge
    return bf16(x)


def gelu_ref(x):
    return 0.5 * x * (1 + np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))


def gelu_grad_ref(x):
    th = np.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)


@covers("ptx_gelu_forward")
@pytest.mark.parametrize("n, grid", [(8 * 300, None), (8 * 1000, 1)])  # 2 blocks, last partly idle; grid stride
def test_gelu_forward(n, grid):
    x = ro(gelu_inputs(n, np.random.default_rng(n), extreme=True))
    out = nan_bf16(n)
    emu.launch(kernel("gelu.ptx", "ptx_gelu_forward"), grid or grid_for(n // 8, 256), 256, [out, x, n])
    # atol: for x < -5 fp32 rounds 1 + tanh(u) to 0 where the true GELU is a tiny negative number
    assert_bf16_close(out, gelu_ref(f64(x)), 1e-6, "gelu forward")


@covers("ptx_gelu_backward")
@pytest.mark.parametrize("n, grid", [(8 * 300, None), (8 * 1000, 1)])
def test_gelu_backward(n, grid):
    rng = np.random.default_rng(n + 1)
    x = ro(gelu_inputs(n, rng, extreme=False))
    dout = ro(bf16(rng.normal(0, 1, n)))
    dinp = nan_bf16(n)
    emu.launch(kernel("gelu.ptx", "ptx_gelu_backward"), grid or grid_for(n // 8, 256), 256, [dinp, x, dout, n])
    # atol: gelu'(x) is a difference of fp32 terms of size ~1 (it crosses zero near x = -0.75)
    assert_bf16_close(dinp, gelu_grad_ref(f64(x)) * f64(dout), 1e-6 * np.abs(f64(dout)) + 1e-30, "gelu backward")


# -----------------------------------------------------------------------------
# layernorm: one warp per row, 256 threads, (N + 7) / 8 blocks; C % 8 == 0, C <= 1792

LN_SHAPES = [
    (5, 8, None),      # one chunk per row: lanes 1..31 hold nothing; 3 of the 8 warps have no row
    (11, 768, None),   # GPT-2 small, 2 blocks
    (3, 1600, None),   # GPT-2 XL: lanes 0..7 hold 7 chunks, the rest 6
    (3, 1792, None),   # the largest C the header allows: 7 chunks in every lane
    (20, 64, 1),       # one block of 8 warps for 20 rows: the row loop goes round
]


def ln_inputs(N, C, rng):
    x = rng.normal(0.3, 1.5, (N, C))
    x[0] = 2.5  # a constant row: variance 0, rstd = 1/sqrt(1e-5)
    w = rng.normal(1, 0.3, C).astype(np.float32)
    b = rng.normal(0, 0.3, C).astype(np.float32)
    return bf16(x), w, b


def ln_stats(x):
    m = x.mean(1)
    return m, 1 / np.sqrt(((x - m[:, None]) ** 2).mean(1) + 1e-5)


@covers("ptx_layernorm_forward")
@pytest.mark.parametrize("N, C, grid", LN_SHAPES)
def test_layernorm_forward(N, C, grid):
    x, w, b = ln_inputs(N, C, np.random.default_rng(C))
    out = nan_bf16((N, C))
    mean, rstd = np.full(N, np.nan, np.float32), np.full(N, np.nan, np.float32)
    emu.launch(kernel("layernorm.ptx", "ptx_layernorm_forward"), grid or (N + 7) // 8, 256,
               [out, mean, rstd, ro(x), ro(w), ro(b), N, C])
    xf = f64(x)
    m, s = ln_stats(xf)
    norm = (xf - m[:, None]) * s[:, None]
    assert_f32_close(mean, m, 1e-6, 1e-7, "mean")
    assert_f32_close(rstd, s, 1e-5, 0, "rstd")
    ref = norm * w + b
    # atol: fp32 error of the normalised value, times the weight
    assert_bf16_close(out, ref, 1e-5 * (np.abs(norm * w) + np.abs(b)) + 1e-6, "layernorm out")


@covers("ptx_layernorm_backward_input")
@pytest.mark.parametrize("with_resid", [False, True])
@pytest.mark.parametrize("N, C, grid", LN_SHAPES)
def test_layernorm_backward_input(N, C, grid, with_resid):
    rng = np.random.default_rng(C + 1)
    x, w, _ = ln_inputs(N, C, rng)
    dout = bf16(rng.normal(0, 1, (N, C)))
    resid = bf16(rng.normal(0, 1, (N, C))) if with_resid else None
    xf, d = f64(x), f64(dout)
    m64, s64 = ln_stats(xf)
    mean, rstd = m64.astype(np.float32), s64.astype(np.float32)  # as the forward pass stored them
    dinp = nan_bf16((N, C))
    emu.launch(kernel("layernorm.ptx", "ptx_layernorm_backward_input"), grid or (N + 7) // 8, 256,
               [dinp, None if resid is None else ro(resid), ro(dout), ro(x), ro(w), ro(mean), ro(rstd), N, C])
    m, s = mean.astype(np.float64)[:, None], rstd.astype(np.float64)[:, None]
    dn = w * d
    norm = (xf - m) * s
    a = dn.mean(1, keepdims=True)
    bn = (dn * norm).mean(1, keepdims=True)
    ref = (dn - a - norm * bn) * s
    scale = (np.abs(dn) + np.abs(a) + np.abs(norm * bn)) * s  # the terms whose difference ref is
    if resid is not None:
        ref = ref + f64(resid)
        scale = scale + np.abs(f64(resid))
    assert_bf16_close(dinp, ref, 2e-6 * scale + 1e-7, "layernorm dinp")


# -----------------------------------------------------------------------------
# softmax + cross-entropy: one block of 1024 threads per row, bf16 logits in place

CE_SHAPES = [
    # V, Vp, row offsets (added to N(0, 3) logits)
    (13, 16, [0.0, 0.0]),              # 2 chunks: 1022 threads (31 whole warps) hold no column
    (1001, 1024, [0.0, 100.0, -100.0]),  # V % 8 == 1, two whole padded chunks; exp(100) overflows fp32
    (20003, 20008, [0.0, 5.0]),        # several chunks per thread
    (50257, 50304, [0.0]),             # GPT-2
    (57339, 57344, [0.0]),             # the largest padded row the header allows
]


def ce_inputs(V, Vp, offsets, rng):
    N = len(offsets)
    x = rng.normal(0, 3, (N, Vp)) + np.array(offsets)[:, None]
    x[:, 3 % V] += 8  # one clear winner per row
    logits = bf16(x)
    pad = np.array([0x7FC0, 0x7F80, 0xFF80, 0x7149], np.uint16)  # NaN, +inf, -inf, 1e30: must not matter
    logits[:, V:] = np.resize(pad, Vp - V)
    targets = np.array([[0, V - 1, V // 2][i % 3] for i in range(N)], np.int32)
    return logits, targets


def ce_reference(logits, targets, V, dloss):
    x = f64(logits)[:, :V]
    mx = x.max(1, keepdims=True)
    lse = (mx + np.log(np.exp(x - mx).sum(1, keepdims=True)))[:, 0]
    rows = np.arange(len(targets))
    losses = lse - x[rows, targets]
    grad = np.exp(x - lse[:, None])
    grad[rows, targets] -= 1
    return lse, losses, grad * dloss


@covers("ptx_crossentropy")
@pytest.mark.parametrize("V, Vp, offsets", CE_SHAPES)
def test_crossentropy(V, Vp, offsets):
    logits, targets = ce_inputs(V, Vp, offsets, np.random.default_rng(V))
    N, dloss = len(offsets), 0.37
    lse, losses_ref, grad_ref = ce_reference(logits, targets, V, dloss)
    x = logits.copy()
    losses = np.full(N, np.nan, np.float32)
    emu.launch(kernel("crossentropy.ptx", "ptx_crossentropy"), N, 1024, [x, losses, ro(targets), V, Vp, dloss, 1])
    # lse is a float32 near |lse|: a few of its ulps, absolute
    assert_f32_close(losses, losses_ref, 1e-6, 4e-7 * np.maximum(1, np.abs(lse)), "losses")
    assert (x[:, V:] == 0).all(), f"padded columns must be +0, got bits {np.unique(x[:, V:])[:8]}"
    # atol: the softmax is exp(x - lse) with lse rounded to fp32 (a few ulps of |lse|, absolute)
    atol = np.abs(grad_ref) * 1e-6 * np.maximum(1, np.abs(lse))[:, None] + 1e-9 * dloss
    assert_bf16_close(x[:, :V], grad_ref, atol, "d(logits)")


@covers("ptx_crossentropy")
@pytest.mark.parametrize("r", range(8))
def test_crossentropy_every_partial_chunk(r):
    """V % 8 = r: the last real chunk holds r real columns (r = 0: none, the chunk is all padding), and the
    target, V - 1, sits at place (r - 1) % 8 of its chunk."""
    V, Vp = 1016 + r, 1032
    logits, _ = ce_inputs(V, Vp, [0.0], np.random.default_rng(r))
    targets = np.array([V - 1], np.int32)
    lse, losses_ref, grad_ref = ce_reference(logits, targets, V, 0.5)
    x, losses = logits.copy(), np.full(1, np.nan, np.float32)
    emu.launch(kernel("crossentropy.ptx", "ptx_crossentropy"), 1, 1024, [x, losses, ro(targets), V, Vp, 0.5, 1])
    assert_f32_close(losses, losses_ref, 1e-6, 4e-7 * max(1, abs(lse[0])), "losses")
    assert (x[:, V:] == 0).all()
    assert_bf16_close(x[:, :V], grad_ref, np.abs(grad_ref) * 1e-5 + 1e-9, "d(logits)")


@covers("ptx_crossentropy")
def test_crossentropy_row_max_sees_every_column():
    """One logit 120 above the rest, so exp(x - max) overflows fp32 unless the max includes it. Row r puts
    it in the r-th of the 28 bf16 pairs a thread holds (the largest Vp: 7 chunks of 4 pairs), high or low half."""
    V, Vp, N = 57339, 57344, 28
    rng = np.random.default_rng(5)
    x = rng.normal(0, 3, (N, Vp))
    for r in range(N):
        j, word, thread = r // 4, r % 4, 37 * r + 3
        x[r, 8 * (thread + 1024 * j) + 2 * word + r % 2] = 120.0
    logits = bf16(x)
    targets = np.array([V - 1 - r for r in range(N)], np.int32)
    lse, losses_ref, grad_ref = ce_reference(logits, targets, V, 1.0)
    losses = np.full(N, np.nan, np.float32)
    emu.launch(kernel("crossentropy.ptx", "ptx_crossentropy"), N, 1024,
               [logits.copy(), losses, ro(targets), V, Vp, 1.0, 0])
    assert_f32_close(losses, losses_ref, 1e-6, 4e-7 * np.maximum(1, np.abs(lse)), "losses")


@covers("ptx_crossentropy")
def test_crossentropy_without_grad_leaves_the_logits_alone():
    V, Vp, offsets = 1001, 1024, [0.0, 20.0]
    logits, targets = ce_inputs(V, Vp, offsets, np.random.default_rng(1))
    _, losses_ref, _ = ce_reference(logits, targets, V, 1.0)
    x = logits.copy()
    losses = np.full(2, np.nan, np.float32)
    emu.launch(kernel("crossentropy.ptx", "ptx_crossentropy"), 2, 1024, [x, losses, ro(targets), V, Vp, 1.0, 0])
    assert (x == logits).all(), "write_grad = 0 must not touch the logits (padding included)"
    assert_f32_close(losses, losses_ref, 1e-6, 1e-5, "losses")


def test_every_entry_is_tested():
    entries = {e for f in PTX_FILES for e in re.findall(r"^\s*\.visible\s+\.entry\s+(\w+)", f.read_text(), re.M)}
    assert entries, "no PTX kernels found"
    assert entries <= TESTED, f"kernels in asm/*.ptx with no test here: {sorted(entries - TESTED)}"


@pytest.mark.parametrize("ptx", PTX_FILES, ids=lambda p: p.name)
def test_every_asm_module_parses(ptx):
    """Every instruction of asm/*.ptx is one the emulator knows (it raises on any other)."""
    kernels = emu.load_module(ptx)
    assert kernels and all(k.code for k in kernels.values())


# -----------------------------------------------------------------------------
# the emulator itself, on small inline kernels

HEAD = ".version 9.0\n.target sm_90a\n.address_size 64\n"


def inline(body: str, params: str = ".param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u64 pd",
           name: str = "k") -> emu.Kernel:
    return emu.parse_ptx(HEAD + f".visible .entry {name}({params})\n{{\n{body}\n}}\n", "inline.ptx")[name]


# loads a[tid], b[tid], c[tid] (f32) and stores OP(a, b, c) to d[tid]
ELEMENTWISE = """
    .reg .b32 %t;
    .reg .b64 %a, %b, %c, %d, %o;
    .reg .f32 %x, %y, %z, %w;
    ld.param.u64 %a, [pa];
    ld.param.u64 %b, [pb];
    ld.param.u64 %c, [pc];
    ld.param.u64 %d, [pd];
    mov.u32 %t, %tid.x;
    mul.wide.u32 %o, %t, 4;
    add.u64 %a, %a, %o;
    add.u64 %b, %b, %o;
    add.u64 %c, %c, %o;
    add.u64 %d, %d, %o;
    ld.global.f32 %x, [%a];
    ld.global.f32 %y, [%b];
    ld.global.f32 %z, [%c];
    OP;
    st.global.b32 [%d], %w;
    ret;
"""


def round_f32(q: Fraction) -> np.float32:
    """The float32 nearest to a rational, ties to even (subnormals and overflow included)."""
    if q == 0:
        return np.float32(0.0)
    sign, q = (-1 if q < 0 else 1), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1                            # now 2^e <= q < 2^(e+1)
    quantum = Fraction(2) ** (max(e, -126) - 23)
    n = q / quantum
    k, rem = divmod(n.numerator, n.denominator)
    if 2 * rem > n.denominator or (2 * rem == n.denominator and k % 2):
        k += 1
    v = k * quantum
    return np.float32(sign * (np.inf if v >= 2 ** 128 else float(v)))


def test_fma_rounds_once_like_exact_arithmetic():
    rng = np.random.default_rng(3)
    n = 1000
    a = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-40, 40, n) * rng.choice([-1, 1], n)).astype(np.float32)
    b = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-40, 40, n) * rng.choice([-1, 1], n)).astype(np.float32)
    c = (rng.uniform(1, 2, n) * 2.0 ** rng.integers(-80, 80, n) * rng.choice([-1, 1], n)).astype(np.float32)
    c[::3] = (-(a[::3].astype(np.float64) * b[::3]) * (1 + rng.normal(0, 1e-6, c[::3].size))).astype(np.float32)
    # the double-rounding traps: a*b + c lands, in float64, exactly halfway between two float32 values
    # while the exact sum is a hair (2^-70) to one side; rounding float64 to float32 would tie to even
    # and go the wrong way
    one = np.float32(1)
    traps = [(np.float32(2 ** -24 * (1 + 2 ** -23)), one - np.float32(2 ** -23), one + np.float32(2 ** -23)),
             (np.float32(-2 ** -24 * (1 + 2 ** -23)), one - np.float32(2 ** -23), one + np.float32(3 * 2 ** -23)),
             (np.float32(2 ** -80), np.float32(2 ** -70), np.float32(2 ** -149)),   # subnormal result
             (np.float32(3e38), np.float32(2), np.float32(-3e38)),                   # product beyond fp32
             (np.float32(3.4e38), np.float32(1.5), np.float32(0))]                   # overflow to inf
    for i, (x, y, z) in enumerate(traps):
        a[i], b[i], c[i] = x, y, z
    d = np.zeros(n, np.float32)
    emu.launch(inline(ELEMENTWISE.replace("OP", "fma.rn.f32 %w, %x, %y, %z")), 1, n, [ro(a), ro(b), ro(c), d])
    want = np.array([round_f32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                     for x, y, z in zip(a, b, c)], np.float32)
    with np.errstate(over="ignore"):
        naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert (naive[:2] != want[:2]).all(), "the traps are traps: rounding twice gets them wrong"
    bad = np.flatnonzero(d.view(np.uint32) != want.view(np.uint32))
    assert bad.size == 0, f"{bad.size} wrong, first {bad[0]}: fma({a[bad[0]]}, {b[bad[0]]}, {c[bad[0]]}) = " \
                          f"{d[bad[0]]!r}, exact rounding {want[bad[0]]!r}"


def test_cvt_bf16x2_packs_first_operand_high_and_rounds_to_nearest_even():
    one = 1.0
    sub_tie = np.array(0x00098000, np.uint32).view(np.float32)  # a subnormal halfway between 0x0009 and 0x000A
    lo = np.array([one + 2 ** -8, one + 3 * 2 ** -8, -0.0, 3.4e38, np.nan, sub_tie, -one - 2 ** -9, 1.0],
                  np.float32)
    # ties to even (down, up), -0, overflow to inf, canonical NaN, subnormal tie, a negative, exact
    want_lo = [0x3F80, 0x3F82, 0x8000, 0x7F80, 0x7FFF, 0x000A, 0xBF80, 0x3F80]
    hi = np.arange(8, dtype=np.float32) + 2  # exact in bf16
    d = np.zeros(8, np.uint32)
    emu.launch(inline(ELEMENTWISE.replace("OP", "cvt.rn.bf16x2.f32 %w, %x, %y")), 1, 8,
               [ro(hi), ro(lo), ro(lo), d])
    assert [int(v) for v in d & 0xFFFF] == want_lo
    assert ((d >> 16).astype(np.uint16) == bf16(hi)).all()


SHFL = """
    .reg .b32 %t, %v, %r, %odd;
    .reg .b64 %d, %o;
    .reg .pred %p;
    ld.param.u64 %d, [pd];
    mov.u32 %t, %tid.x;
    mad.lo.u32 %v, %t, 10, 7;
    BODY
    mul.wide.u32 %o, %t, 4;
    add.u64 %d, %d, %o;
    st.global.u32 [%d], %r;
    ret;
"""


@pytest.mark.parametrize("lane_mask", [1, 5, 16, 31])
def test_shfl_bfly_swaps_lanes_within_each_warp(lane_mask):
    k = inline(SHFL.replace("BODY", f"shfl.sync.bfly.b32 %r, %v, {lane_mask}, 0x1f, 0xffffffff;"), ".param .u64 pd")
    d = np.zeros(96, np.uint32)
    emu.launch(k, 1, 96, [d])
    t = np.arange(96)
    assert (d == (t ^ lane_mask) * 10 + 7).all()


def test_shfl_with_a_partial_membermask():
    """The even lanes only (membermask 0x55555555), exchanging with xor 2: legal, and correct."""
    k = inline(SHFL.replace("BODY", """
    and.b32 %odd, %t, 1;
    mov.u32 %r, 0;
    setp.eq.u32 %p, %odd, 1;
    @%p bra $Lskip;
    shfl.sync.bfly.b32 %r, %v, 2, 0x1f, 0x55555555;
$Lskip:"""), ".param .u64 pd")
    d = np.zeros(64, np.uint32)
    emu.launch(k, 1, 64, [d])
    t = np.arange(64)
    assert (d == np.where(t % 2, 0, (t ^ 2) * 10 + 7)).all()


def test_shfl_not_reached_by_a_lane_of_its_membermask_raises():
    k = inline(SHFL.replace("BODY", """
    and.b32 %odd, %t, 1;
    setp.eq.u32 %p, %odd, 1;
    @%p bra $Lskip;
    shfl.sync.bfly.b32 %r, %v, 2, 0x1f, 0xffffffff;
$Lskip:"""), ".param .u64 pd")
    with pytest.raises(emu.DivergenceError, match=r"inline.ptx:\d+: in k: `shfl.sync.bfly.b32.*lane 1 of warp 0"):
        emu.launch(k, 1, 64, [np.zeros(64, np.uint32)])


def test_divergent_loops_reconverge_before_a_shuffle():
    """Thread t loops t % 5 times (the lanes of a warp leave the loop at different times), then all 32 meet
    at a full-warp shfl: the min-pc schedule must have every lane there, with its own count."""
    k = inline(SHFL.replace("BODY", """
    rem.u32 %odd, %t, 5;
    mov.u32 %v, 0;
$Lloop:
    setp.eq.u32 %p, %odd, 0;
    @%p bra $Lout;
    add.u32 %v, %v, 3;
    sub.u32 %odd, %odd, 1;
    bra $Lloop;
$Lout:
    shfl.sync.bfly.b32 %r, %v, 1, 0x1f, 0xffffffff;""").replace("mad.lo.u32 %v, %t, 10, 7;", ""), ".param .u64 pd")
    d = np.zeros(64, np.uint32)
    emu.launch(k, 1, 64, [d])
    assert (d == 3 * ((np.arange(64) ^ 1) % 5)).all()


ROTATE = """
    .reg .b32 %t, %n, %c, %s, %u, %v;
    .reg .b64 %d, %o;
    .reg .pred %p;
    .shared .align 4 .b32 sh[128];
    ld.param.u64 %d, [pd];
    mov.u32 %t, %tid.x;
    mov.u32 %n, %ntid.x;
    mov.u32 %c, %ctaid.x;
    mul.lo.u32 %v, %t, 3;
    mov.u32 %s, sh;
    mad.lo.u32 %u, %t, 4, %s;
    st.shared.b32 [%u], %v;
    BARRIER
    add.u32 %u, %t, 1;
    setp.eq.u32 %p, %u, %n;
    @%p mov.u32 %u, 0;
    mad.lo.u32 %u, %u, 4, %s;
    ld.shared.b32 %v, [%u];
    mad.lo.u32 %c, %c, %n, %t;
    mul.wide.u32 %o, %c, 4;
    add.u64 %d, %d, %o;
    st.global.b32 [%d], %v;
    ret;
"""


def test_bar_sync_and_shared_memory():
    """Each thread stores 3 tid to shared memory; after the barrier it reads its neighbour's. Two blocks,
    each with its own shared memory, write the two halves of d."""
    d = np.zeros(256, np.uint32)
    emu.launch(inline(ROTATE.replace("BARRIER", "bar.sync 0;"), ".param .u64 pd"), 2, 128, [d])
    assert (d == np.tile(np.arange(1, 129) % 128, 2) * 3).all()


def test_a_missing_bar_sync_is_a_race():
    with pytest.raises(emu.RaceError, match=r"ld.shared.b32.*races with a store by thread \(1,0,0\)"):
        emu.launch(inline(ROTATE.replace("BARRIER", ""), ".param .u64 pd"), 1, 128, [np.zeros(128, np.uint32)])


def test_two_blocks_writing_the_same_bytes_race():
    k = inline(ROTATE.replace("BARRIER", "bar.sync 0;").replace("mad.lo.u32 %c, %c, %n, %t;", "mov.u32 %c, %t;"),
               ".param .u64 pd")
    with pytest.raises(emu.RaceError, match=r"block \(1,0,0\) thread \(0,0,0\): store races with a store by "
                                            r"thread \(0,0,0\) of block #0"):
        emu.launch(k, 2, 128, [np.zeros(128, np.uint32)])


def test_a_bar_sync_some_threads_skip_raises():
    skip = "setp.lt.u32 %p, %t, 64;\n @%p bra $Lover;\n bar.sync 0;\n$Lover:"
    k = inline(ROTATE.replace("BARRIER", skip), ".param .u64 pd")
    with pytest.raises(emu.DivergenceError, match=r"thread \(0,0,0\) is at line \d+ .*not at this barrier"):
        emu.launch(k, 1, 128, [np.zeros(128, np.uint32)])


def test_reading_shared_memory_never_written_raises():
    k = inline(ROTATE.replace("st.shared.b32 [%u], %v;", "").replace("BARRIER", "bar.sync 0;"), ".param .u64 pd")
    with pytest.raises(emu.MemcheckError, match=r"never wrote \(uninitialized\).*shared sh"):
        emu.launch(k, 1, 128, [np.zeros(128, np.uint32)])


def test_an_out_of_bounds_store_raises_with_kernel_line_thread_and_address():
    d = np.zeros(99, np.float32)
    k = inline(ELEMENTWISE.replace("OP", "add.rn.f32 %w, %x, %y"))
    a = np.ones(100, np.float32)
    with pytest.raises(emu.MemcheckError) as e:
        emu.launch(k, 1, 100, [a, a, a, d])
    msg = str(e.value)
    line = next(i for i, s in enumerate((HEAD + "x\n{\n" + ELEMENTWISE).splitlines(), 1) if "st.global" in s)
    assert f"inline.ptx:{line}: in k: `st.global.b32 [%d], %w`" in msg, msg
    assert "thread (99,0,0)" in msg and "out-of-bounds store of 4 bytes" in msg, msg
    assert "0 bytes past the end of pd (float32[99]" in msg, msg
    assert (d == 0).all(), "the faulting instruction stored nothing (the check comes before any store)"


def test_a_misaligned_v4_load_raises():
    k = inline("""
    .reg .b64 %a;
    .reg .f32 %x<4>;
    ld.param.u64 %a, [pa];
    ld.global.v4.f32 {%x0, %x1, %x2, %x3}, [%a+4];
    ret;""", ".param .u64 pa")
    with pytest.raises(emu.MemcheckError, match=r"misaligned load of 16 bytes \(needs 16-byte alignment\).*"
                                                r"byte 4 of pa"):
        emu.launch(k, 1, 32, [np.zeros(64, np.float32)])


def test_a_store_to_a_read_only_input_raises():
    k = inline(ELEMENTWISE.replace("OP", "add.rn.f32 %w, %x, %y"))
    a = ro(np.ones(4, np.float32))
    with pytest.raises(emu.MemcheckError, match="store to a read-only array"):
        emu.launch(k, 1, 4, [a, a, a, a])


def test_ld_global_nc_of_memory_the_kernel_writes_raises():
    k = inline("""
    .reg .b64 %a;
    .reg .f32 %x;
    ld.param.u64 %a, [pa];
    st.global.f32 [%a], 0f3F800000;
    ld.global.nc.f32 %x, [%a];
    ret;""", ".param .u64 pa")
    with pytest.raises(emu.MemcheckError, match="ld.global.nc of memory written during this launch"):
        emu.launch(k, 1, 1, [np.zeros(1, np.float32)])


@pytest.mark.parametrize("op", ["foo.bar.f32 %x, %y", "add.rz.f32 %x, %y, %y", "add.rn.f32.ftz %x, %y, %y"])
def test_an_unknown_instruction_or_modifier_raises_naming_it_and_its_line(op):
    body = "    .reg .f32 %x, %y;\n    mov.f32 %y, 0f3F800000;\n    " + op + ";\n    ret;"
    opcode = op.split()[0]
    with pytest.raises(emu.PTXSyntaxError, match=rf"inline.ptx:8: in k: unknown instruction '{re.escape(opcode)}'"):
        inline(body)


def test_an_undeclared_register_raises():
    with pytest.raises(emu.PTXSyntaxError, match=r"inline.ptx:7: .*undeclared register '%z'"):
        inline("    .reg .f32 %x;\n    mov.f32 %x, %z;\n    ret;")


def test_a_loop_that_never_ends_raises():
    k = inline("$Lspin:\n    bra.uni $Lspin;\n    ret;", "")
    with pytest.raises(emu.RunawayError, match="more than max_steps=1000"):
        emu.launch(k, 1, 32, [], max_steps=1000)


def test_launch_checks_its_arguments():
    k = kernel("gelu.ptx", "ptx_gelu_forward")
    with pytest.raises(emu.LaunchError, match="takes 3 arguments"):
        emu.launch(k, 1, 256, [np.zeros(8, np.uint16)])
    with pytest.raises(emu.LaunchError, match="prm_n is .u64"):
        emu.launch(k, 1, 256, [np.zeros(8, np.uint16), np.zeros(8, np.uint16), 8.0])
