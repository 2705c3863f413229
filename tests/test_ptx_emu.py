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
padded columns full of NaN and inf, targets at column 0 and V-1, GEMM sizes
below and between the 128 x 128 x 64 tiles.

Then the emulator itself: fma rounding against exact rational arithmetic,
bf16 packing, shfl.bfly, bar.sync with shared memory, TMA copies and their
swizzles, mbarrier phases, wgmma against numpy, and the errors it must raise
(out of bounds, misaligned, race, divergence, uninitialized shared memory,
unknown opcode, runaway loop, asynchronous results used too early).
"""

import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dev import ptx_emu as emu
from tests.emu_util import (ELEMENTWISE, HEAD, adamw_inputs, assert_bf16_close, assert_f32_close, bf16, ce_inputs,
                            ce_reference, check_layernorm_backward_input, check_layernorm_forward, f64,
                            gelu_grad_ref, gelu_inputs, gelu_ref, grid_for, inline, ln_backward_inputs, ln_inputs,
                            nan_bf16, nan_f32, ro, round_f32)

ROOT = Path(__file__).resolve().parent.parent
ASM = ROOT / "asm"
PTX_FILES = sorted(ASM.glob("*.ptx"))


# -----------------------------------------------------------------------------
# the kernels under test (bf16, comparisons and references: tests/emu_util.py)

def kernel(file: str, name: str) -> emu.Kernel:
    return emu.load_kernel(ASM / file, name)


TESTED = set()  # kernels exercised below; test_every_entry_is_tested checks it covers asm/*.ptx


def covers(name):
    TESTED.add(name)
    return lambda f: f


# -----------------------------------------------------------------------------
# AdamW: p, m, v fp32 in place, px the bf16 copy (or NULL); n % 4 == 0

HP = dict(lr=1e-3, b1=0.9, b2=0.95, bc1=1 - 0.9 ** 3, bc2=1 - 0.95 ** 3, eps=1e-8, wd=0.1, gs=0.5)


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


@covers("ptx_layernorm_forward")
@pytest.mark.parametrize("N, C, grid", LN_SHAPES)
def test_layernorm_forward(N, C, grid):
    x, w, b = ln_inputs(N, C, np.random.default_rng(C))
    out, mean, rstd = nan_bf16((N, C)), nan_f32(N), nan_f32(N)
    emu.launch(kernel("layernorm.ptx", "ptx_layernorm_forward"), grid or (N + 7) // 8, 256,
               [out, mean, rstd, ro(x), ro(w), ro(b), N, C])
    check_layernorm_forward(out, mean, rstd, x, w, b)


@covers("ptx_layernorm_backward_input")
@pytest.mark.parametrize("with_resid", [False, True])
@pytest.mark.parametrize("N, C, grid", LN_SHAPES)
def test_layernorm_backward_input(N, C, grid, with_resid):
    x, w, dout, resid, mean, rstd = ln_backward_inputs(N, C, with_resid, np.random.default_rng(C + 1))
    dinp = nan_bf16((N, C))
    emu.launch(kernel("layernorm.ptx", "ptx_layernorm_backward_input"), grid or (N + 7) // 8, 256,
               [dinp, None if resid is None else ro(resid), ro(dout), ro(x), ro(w), ro(mean), ro(rstd), N, C])
    check_layernorm_backward_input(dinp, x, w, dout, resid, mean, rstd)


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


@covers("ptx_crossentropy")
@pytest.mark.parametrize("V, Vp, offsets", CE_SHAPES)
def test_crossentropy(V, Vp, offsets):
    logits, targets = ce_inputs(V, Vp, offsets, np.random.default_rng(V))
    N, dloss = len(offsets), 0.37
    lse, losses_ref, grad_ref, _ = ce_reference(logits, targets, V, dloss)
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
    lse, losses_ref, grad_ref, _ = ce_reference(logits, targets, V, 0.5)
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
    lse, losses_ref, grad_ref, _ = ce_reference(logits, targets, V, 1.0)
    losses = np.full(N, np.nan, np.float32)
    emu.launch(kernel("crossentropy.ptx", "ptx_crossentropy"), N, 1024,
               [logits.copy(), losses, ro(targets), V, Vp, 1.0, 0])
    assert_f32_close(losses, losses_ref, 1e-6, 4e-7 * np.maximum(1, np.abs(lse)), "losses")


@covers("ptx_crossentropy")
def test_crossentropy_without_grad_leaves_the_logits_alone():
    V, Vp, offsets = 1001, 1024, [0.0, 20.0]
    logits, targets = ce_inputs(V, Vp, offsets, np.random.default_rng(1))
    _, losses_ref, _, _ = ce_reference(logits, targets, V, 1.0)
    x = logits.copy()
    losses = np.full(2, np.nan, np.float32)
    emu.launch(kernel("crossentropy.ptx", "ptx_crossentropy"), 2, 1024, [x, losses, ro(targets), V, Vp, 1.0, 0])
    assert (x == logits).all(), "write_grad = 0 must not touch the logits (padding included)"
    assert_f32_close(losses, losses_ref, 1e-6, 1e-5, "losses")


# -----------------------------------------------------------------------------
# the TMA + wgmma GEMM: out (M,N) = A (M,K) @ B (N,K)^T, bf16 in and out, fp32 accumulation

GEMM_SMEM = 4 * 32768 + 1024  # train_gpt.cu's GEMM_SMEM


@covers("ptx_gemm_bf16")
@pytest.mark.parametrize("M, N, K", [
    (128, 128, 64),    # one tile, one K-tile
    (64, 8, 8),        # N and K far below the 128 x 64 boxes: the TMA fills the rest with zeros
    (200, 136, 520),   # edges in M and N, 9 K-tiles: each stage refilled twice (the parity flips)
    (256, 256, 320),   # 2 x 2 tiles, the second warpgroup's rows, and 5 K-tiles over 4 stages
])
def test_gemm(M, N, K):
    rng = np.random.default_rng(M * N + K)
    A, B = bf16(rng.uniform(-1, 1, (M, K))), bf16(rng.uniform(-1, 1, (N, K)))
    out = np.full((M, N), 0x7FC0, np.uint16)  # NaN: every output must be written
    # the host's cuTensorMapEncodeTiled: (K, rows) with K innermost, boxes of 64 x 128, 128-byte swizzle
    ta = emu.TensorMap(ro(A), box=(64, 128), swizzle=128)
    tb = emu.TensorMap(ro(B), box=(64, 128), swizzle=128)
    grid = ((N + 127) // 128, (M + 127) // 128)
    emu.launch(kernel("gemm.ptx", "ptx_gemm_bf16"), grid, 256, [ta, tb, out, M, N, K], shared_bytes=GEMM_SMEM)
    ref = f64(A) @ f64(B).T
    # fp32 accumulation of K products, each exact: an error of at most K ulps of fp32 of sum |a b|
    atol = K * 2.0 ** -24 * (np.abs(f64(A)) @ np.abs(f64(B)).T)
    assert_bf16_close(out, ref, atol, f"gemm {M}x{N}x{K}")


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

# loads a[tid], b[tid], c[tid] (f32) and stores OP(a, b, c) to d[tid]
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


# the asynchronous units: TMA (cp.async.bulk.tensor), mbarriers, wgmma. The expectations come from the
# PTX ISA's tables and figures, written out here, not from the emulator's code.

# 5.5.7 "Swizzling Modes": position p of 128-byte line j of the destination holds 16-byte chunk
# SWIZZLE_TABLES[mode][j % rows][p] of that line (the table's rows start on a 256/512/1024-byte boundary)
SWIZZLE_TABLES = {
    0: [[0, 1, 2, 3, 4, 5, 6, 7]],
    32: [[0, 1, 2, 3, 4, 5, 6, 7], [1, 0, 3, 2, 5, 4, 7, 6]],
    64: [[0, 1, 2, 3, 4, 5, 6, 7], [1, 0, 3, 2, 5, 4, 7, 6], [2, 3, 0, 1, 6, 7, 4, 5], [3, 2, 1, 0, 7, 6, 5, 4]],
    128: [[0, 1, 2, 3, 4, 5, 6, 7], [1, 0, 3, 2, 5, 4, 7, 6], [2, 3, 0, 1, 6, 7, 4, 5], [3, 2, 1, 0, 7, 6, 5, 4],
          [4, 5, 6, 7, 0, 1, 2, 3], [5, 4, 7, 6, 1, 0, 3, 2], [6, 7, 4, 5, 2, 3, 0, 1], [7, 6, 5, 4, 3, 2, 1, 0]],
}

TMA_PARAMS = ".param .align 64 .b8 ptmap[128], .param .u64 pout, .param .u32 pdst, .param .s32 pc0, .param .s32 pc1"

# thread 0 copies the box at (c0, c1) to shared memory at a 1024-aligned base + pdst, everyone waits for the
# mbarrier, then the block copies the box's NBYTES bytes from there to out
TMA_BOX = """
    .reg .pred %p, %leader, %ready;
    .reg .b32 %t, %smem, %mb, %dst, %u, %c0, %c1, %i, %v<4>;
    .reg .b64 %tm, %out, %a, %o;
    .shared .align 8 .b64 mbar;
    .extern .shared .align 1024 .b8 smem[];
    mov.u32 %t, %tid.x;
    setp.eq.u32 %leader, %t, 0;
    mov.u32 %mb, mbar;
    mov.u32 %smem, smem;
    add.u32 %smem, %smem, 1023;
    and.b32 %smem, %smem, 0xFFFFFC00;
    ld.param.u32 %u, [pdst];
    add.u32 %dst, %smem, %u;
    ld.param.s32 %c0, [pc0];
    ld.param.s32 %c1, [pc1];
    @%leader mbarrier.init.shared::cta.b64 [%mb], 1;
    @%leader fence.mbarrier_init.release.cluster;
    bar.sync 0;
    mov.b64 %tm, ptmap;
    cvta.param.u64 %tm, %tm;
    @%leader mbarrier.arrive.expect_tx.shared::cta.b64 _, [%mb], NBYTES;
    @%leader cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%dst], [%tm, {%c0, %c1}], [%mb];
$Lwait:
    mbarrier.try_wait.parity.shared::cta.b64 %ready, [%mb], 0;
    @!%ready bra $Lwait;
    ld.param.u64 %out, [pout];
    mov.u32 %i, %t;
$Lcopy:
    setp.ge.u32 %p, %i, NCHUNKS;
    @%p bra $Ldone;
    shl.b32 %u, %i, 4;
    add.u32 %u, %u, %dst;
    ld.shared.v4.b32 {%v0, %v1, %v2, %v3}, [%u];
    mul.wide.u32 %o, %i, 16;
    add.u64 %a, %out, %o;
    st.global.v4.b32 [%a], {%v0, %v1, %v2, %v3};
    add.u32 %i, %i, 32;
    bra $Lcopy;
$Ldone:
    ret;
"""


def tma_box(A, box, swizzle, c0, c1, dst):
    """Run TMA_BOX: the bytes the copy put in shared memory at dst (relative to a 1024-aligned base)."""
    nbytes = box[0] * box[1] * 2
    out = np.zeros(nbytes, np.uint8)
    k = inline(TMA_BOX.replace("NBYTES", str(nbytes)).replace("NCHUNKS", str(nbytes // 16)), TMA_PARAMS)
    emu.launch(k, 1, 32, [emu.TensorMap(ro(A), box=box, swizzle=swizzle), out, dst, c0, c1], shared_bytes=4096)
    return out


def expected_box(A, box, swizzle, c0, c1, dst):
    """The box, rows of box[0] bf16 from (c0, c1), zero outside A, laid out by the ISA's swizzle table."""
    rows, cols = A.shape
    logical = np.zeros((box[1], box[0]), np.uint16)
    for r in range(box[1]):
        for c in range(box[0]):
            if 0 <= c1 + r < rows and 0 <= c0 + c < cols:
                logical[r, c] = A[c1 + r, c0 + c]
    chunks = logical.view(np.uint8).reshape(-1, 8, 16)  # 128-byte lines of 16-byte chunks
    table = SWIZZLE_TABLES[swizzle]
    out = np.empty_like(chunks)
    for j in range(chunks.shape[0]):
        pattern_row = table[(dst // 128 + j) % len(table)]  # the ISA's base offset: (dstMem / 128) % rows
        for p in range(8):
            out[j, p] = chunks[j, pattern_row[p]]
    return out.reshape(-1)


@pytest.mark.parametrize("swizzle, box, dst", [(128, (64, 8), 0), (128, (64, 16), 1024), (128, (64, 8), 384),
                                               (64, (32, 16), 512), (32, (16, 32), 256), (0, (24, 8), 128)])
def test_tma_copy_swizzles_16_byte_chunks_as_the_isa_tables_say(swizzle, box, dst):
    A = ((np.arange(40 * 200) * 7 + 3) % 65536).astype(np.uint16).reshape(40, 200)  # all chunks differ
    got = tma_box(A, box, swizzle, 8, 5, dst)
    assert (got == expected_box(A, box, swizzle, 8, 5, dst)).all()
    if swizzle:
        assert not (got == expected_box(A, box, 0, 8, 5, dst)).all(), "the swizzle moved something"


@pytest.mark.parametrize("swizzle, box, c0, c1", [(0, (32, 8), -8, 5), (128, (64, 8), -16, -3), (128, (64, 8), 40, 9)])
def test_tma_copy_fills_out_of_bounds_elements_with_zeros(swizzle, box, c0, c1):
    """A 10 x 24 tensor and boxes hanging over its edges (negative coordinates too, and one entirely outside):
    the rest is zeros, and the complete-tx counts the whole box (else the wait would never end)."""
    A = (np.arange(10 * 24) + 1).astype(np.uint16).reshape(10, 24)
    got = tma_box(A, box, swizzle, c0, c1, 0)
    assert (got == expected_box(A, box, swizzle, c0, c1, 0)).all()
    assert (got == 0).any() and ((got != 0).any() or c0 >= 24)


def test_tma_destination_must_be_128_byte_aligned_and_tensor_map_generic():
    A = np.zeros((8, 64), np.uint16)
    with pytest.raises(emu.MemcheckError, match="shared destination .* is not 128-byte aligned"):
        tma_box(A, (64, 8), 128, 0, 0, 64)
    k = inline(TMA_BOX.replace("NBYTES", "1024").replace("NCHUNKS", "64").replace("cvta.param.u64 %tm, %tm;", ""),
               TMA_PARAMS)
    with pytest.raises(emu.MemcheckError, match="the .param-space address of ptmap; .* wants its generic address"):
        emu.launch(k, 1, 32, [emu.TensorMap(ro(A), box=(64, 8), swizzle=128), np.zeros(1024, np.uint8), 0, 0, 0],
                   shared_bytes=4096)


@pytest.mark.parametrize("change, error, message", [
    ("$Lwait:", emu.RaceError, r"ld.shared.* of shared memory that the cp.async.bulk.tensor of line \d+ writes, "
                               r"while it is in flight"),
    ("@!%ready bra $Lwait;", emu.RaceError,  # one try_wait, no loop: it returns false (the copy in flight)
     r"before this thread saw the mbarrier at 0x[0-9a-f]+ complete phase 0"),
    ("@%leader fence.mbarrier_init.release.cluster;", emu.AsyncError, "not made visible to the async proxy"),
])
def test_tma_misuse_raises(change, error, message):
    body = TMA_BOX.replace("NBYTES", "1024").replace("NCHUNKS", "64")
    if change == "$Lwait:":  # the block reads the box before waiting for it
        body = body.replace("$Lwait:", "    ld.shared.b32 %u, [%dst];\n$Lwait:")
    else:
        body = body.replace(change, "")
    with pytest.raises(error, match=message):
        emu.launch(inline(body, TMA_PARAMS), 1, 32, [emu.TensorMap(ro(np.ones((8, 64), np.uint16)), box=(64, 8),
                   swizzle=128), np.zeros(1024, np.uint8), 0, 0, 0], shared_bytes=4096)


# mbarrier accounting: count 2, a 16-byte copy; thread 0 records test_wait.parity results in out[k]
MBAR = """
    .reg .pred %leader, %second, %r;
    .reg .b32 %t, %mb, %buf, %x;
    .reg .b64 %tm, %out;
    .shared .align 8 .b64 mbar;
    .shared .align 128 .b8 buf[128];
    mov.u32 %t, %tid.x;
    setp.eq.u32 %leader, %t, 0;
    setp.eq.u32 %second, %t, 1;
    mov.u32 %mb, mbar;
    mov.u32 %buf, buf;
    ld.param.u64 %out, [pout];
    INIT
    @%leader fence.mbarrier_init.release.cluster;
    bar.sync 0;
    mov.b64 %tm, ptmap;
    cvta.param.u64 %tm, %tm;
    BODY
    ret;
"""


def mbar_kernel(body, init="@%leader mbarrier.init.shared::cta.b64 [%mb], 2;"):
    def record(k, parity):
        return (f"mbarrier.test_wait.parity.shared::cta.b64 %r, [%mb], {parity};\n    selp.u32 %x, 1, 0, %r;\n"
                f"    @%leader st.global.u32 [%out+{4 * k}], %x;")
    body = re.sub(r"RECORD\((\d), (\d)\)", lambda m: record(int(m.group(1)), int(m.group(2))), body)
    return inline(MBAR.replace("INIT", init).replace("BODY", body), ".param .align 64 .b8 ptmap[128], .param .u64 pout")


COPY16 = ("@%leader cp.async.bulk.tensor.1d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%buf], "
          "[%tm, {0}], [%mb];")


def run_mbar(k, max_steps=100_000):
    out = np.full(8, 7, np.uint32)
    emu.launch(k, 1, 32, [emu.TensorMap(ro(np.arange(8, dtype=np.uint16)), box=(8,)), out], max_steps=max_steps)
    return list(out)


def test_mbarrier_phases_parity_and_tx_count():
    k = mbar_kernel(f"""
    RECORD(0, 0)
    @%leader mbarrier.arrive.expect_tx.shared::cta.b64 _, [%mb], 16;
    RECORD(1, 0)
    @%second mbarrier.arrive.shared::cta.b64 _, [%mb];
    RECORD(2, 0)
    {COPY16}
    RECORD(3, 0)
    RECORD(4, 0)
    RECORD(5, 1)
    @%leader mbarrier.arrive.shared::cta.b64 _, [%mb];
    @%second mbarrier.arrive.shared::cta.b64 _, [%mb];
    RECORD(6, 1)
    RECORD(7, 0)""")
    # phase 0 incomplete: no arrivals; one of two; two, but 16 bytes expected; the copy in flight when the
    # wait looks (it then completes); phase 0 complete; phase 1 current; phase 1 complete; phase 2 current
    assert run_mbar(k) == [0, 0, 0, 0, 1, 0, 1, 0]


def test_mbarrier_misuse_raises():
    with pytest.raises(emu.MemcheckError, match="where no mbarrier.init made an mbarrier"):
        run_mbar(mbar_kernel("RECORD(0, 0)", init=""))
    with pytest.raises(emu.MemcheckError, match=r"arrives 1 time\(s\) on the mbarrier at .*, whose phase expects "
                                                r"only 0 more"):
        run_mbar(mbar_kernel("""@%leader mbarrier.arrive.expect_tx.shared::cta.b64 _, [%mb], 16;
    @%second mbarrier.arrive.shared::cta.b64 _, [%mb];
    @%second mbarrier.arrive.shared::cta.b64 _, [%mb];"""))  # the phase waits for its bytes, not a third arrival
    with pytest.raises(emu.RaceError, match=r"on the mbarrier .* that thread \(0,0,0\) initialized .* with no "
                                            r"bar.sync since"):
        run_mbar(mbar_kernel("RECORD(0, 0)", init="@%leader mbarrier.init.shared::cta.b64 [%mb], 2;\n"
                                                  "    mbarrier.test_wait.parity.shared::cta.b64 %r, [%mb], 0;"))
    with pytest.raises(emu.MemcheckError, match="load of the bytes of an mbarrier object"):
        run_mbar(mbar_kernel("ld.shared.u32 %x, [%mb];"))


def test_an_expect_tx_that_no_copy_fulfils_spins_until_max_steps():
    k = mbar_kernel(f"""
    @%leader mbarrier.arrive.expect_tx.shared::cta.b64 _, [%mb], 32;
    @%second mbarrier.arrive.shared::cta.b64 _, [%mb];
    {COPY16}
$Lspin:
    mbarrier.try_wait.parity.shared::cta.b64 %r, [%mb], 0;
    @!%r bra $Lspin;""")
    with pytest.raises(emu.RunawayError, match=r"more than max_steps=2000 .* spin on the mbarrier wait of line \d+: "
                                               r"the mbarrier at 0x[0-9a-f]+ never completes its phase \(phase 0 "
                                               r"\(parity 0\), 0 of 2 arrivals pending, tx-count 16\)"):
        run_mbar(k, max_steps=2000)


# wgmma: one warpgroup copies a host-made 24 KB image of A (64 x 16 at +0) and B (N x 16 at +8192) to a
# 1024-aligned shared base, loads C into its accumulators, multiplies, and stores D
def wgmma_kernel(n: int, remove: str = "") -> emu.Kernel:
    d = [f"%d{i}" for i in range(n // 2)]
    # ISA 9.7.15.5.1.1.1, the accumulator figure: thread 32 w + 4 g + q holds d[4 j + v] at row
    # 16 w + g + 8 (v / 2), column 8 j + 2 q + v % 2: offset from (16 w + g, 2 q) in floats
    off = [4 * (8 * ((i % 4) // 2) * n + 8 * (i // 4) + i % 2) for i in range(n // 2)]
    loads = "\n".join(f"    ld.global.f32 {r}, [%c+{o}];" for r, o in zip(d, off))
    stores = "\n".join(f"    st.global.f32 [%out+{o}], {r};" for r, o in zip(d, off))
    text = f"""
    .reg .pred %p, %scale;
    .reg .b32 %t, %w, %l, %smem, %u, %i, %row, %col, %v<4>;
    .reg .b64 %img, %c, %out, %ahi, %bhi, %da, %db, %a, %o;
    .reg .f32 %d<{n // 2}>;
    .extern .shared .align 1024 .b8 smem[];
    mov.u32 %t, %tid.x;
    mov.u32 %smem, smem;
    add.u32 %smem, %smem, 1023;
    and.b32 %smem, %smem, 0xFFFFFC00;
    ld.param.u64 %img, [pimg];
    mov.u32 %i, %t;
$Lcopy:
    setp.ge.u32 %p, %i, 1536;
    @%p bra $Lcopied;
    mul.wide.u32 %o, %i, 16;
    add.u64 %a, %img, %o;
    ld.global.v4.u32 {{%v0, %v1, %v2, %v3}}, [%a];
    shl.b32 %u, %i, 4;
    add.u32 %u, %u, %smem;
    st.shared.v4.u32 [%u], {{%v0, %v1, %v2, %v3}};
    add.u32 %i, %i, 128;
    bra $Lcopy;
$Lcopied:
    fence.proxy.async.shared::cta;
    bar.sync 0;
    ld.param.u64 %ahi, [pahi];
    ld.param.u64 %bhi, [pbhi];
    cvt.u64.u32 %da, %smem;
    shr.u64 %da, %da, 4;
    and.b64 %da, %da, 0x3FFF;
    or.b64 %da, %da, %ahi;
    add.u32 %u, %smem, 8192;
    cvt.u64.u32 %db, %u;
    shr.u64 %db, %db, 4;
    and.b64 %db, %db, 0x3FFF;
    or.b64 %db, %db, %bhi;
    shr.u32 %w, %t, 5;
    and.b32 %l, %t, 31;
    shl.b32 %row, %w, 4;
    shr.u32 %u, %l, 2;
    add.u32 %row, %row, %u;
    and.b32 %col, %l, 3;
    shl.b32 %col, %col, 1;
    mad.lo.u32 %u, %row, {n}, %col;
    mul.wide.u32 %o, %u, 4;
    ld.param.u64 %c, [pc];
    add.u64 %c, %c, %o;
    ld.param.u64 %out, [pout];
    add.u64 %out, %out, %o;
{loads}
    ld.param.u32 %u, [pscale];
    setp.ne.u32 %scale, %u, 0;
    wgmma.fence.sync.aligned;
    wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{', '.join(d)}}}, %da, %db, %scale, 1, 1, 0, 0;
    wgmma.commit_group.sync.aligned;
    wgmma.wait_group.sync.aligned 0;
{stores}
    ret;"""
    assert remove in text
    return inline(text.replace(remove, "", 1), ".param .u64 pimg, .param .u64 pc, .param .u64 pout, .param .u64 pahi, "
                                               ".param .u64 pbhi, .param .u32 pscale")


def cute_swizzle(offset: int, b: int) -> int:
    """CuTe's Swizzle<b, 4, 3>, which the ISA's canonical-layout table names: bits 7.. XORed into bits 4.."""
    mask = ((1 << b) - 1) << 7
    return offset ^ ((offset & mask) >> 3)


def smem_image(img, base, M, swizzle):
    """Put the rows x 16 bf16 matrix M at img[base:], K-major as ISA 9.7.15.5.1.2.1.3 lays it out (in bytes, with
    T = 8 elements per 16 bytes): no swizzle ((8,m),(T,2k)):((1T,SBO),(1,LBO)) with LBO 128, SBO 256; a W-byte
    swizzle ((8,m),(T,2k)):((W/2,SBO),(1,T)) with SBO = 8 W, then Swizzle<log2(W/16),4,3>. Returns the
    descriptor's bits other than the start address: LBO >> 4 at 16, SBO >> 4 at 32, the mode at 62."""
    for r in range(M.shape[0]):
        for k in range(16):
            if swizzle == 0:
                off = 16 * (r % 8) + 256 * (r // 8) + 2 * (k % 8) + 128 * (k // 8)
            else:
                off = cute_swizzle(swizzle * (r % 8) + 8 * swizzle * (r // 8) + 2 * k, {32: 1, 64: 2, 128: 3}[swizzle])
            img[base + off:base + off + 2] = M[r, k:k + 1].view(np.uint8)
    lbo, sbo = (128, 256) if swizzle == 0 else (16, 8 * swizzle)
    return (lbo >> 4) << 16 | (sbo >> 4) << 32 | {0: 0, 128: 1, 64: 2, 32: 3}[swizzle] << 62


@pytest.mark.parametrize("n, swizzle, scale_d", [(8, 0, True), (8, 128, False), (128, 0, False), (128, 128, True),
                                                 (64, 64, True), (16, 32, False)])
def test_wgmma_m64nNk16_against_numpy(n, swizzle, scale_d):
    rng = np.random.default_rng(n + swizzle)
    A, B = bf16(rng.uniform(-2, 2, (64, 16))), bf16(rng.uniform(-2, 2, (n, 16)))
    C = rng.uniform(-4, 4, (64, n)).astype(np.float32)
    img = rng.integers(0, 256, 24576, dtype=np.uint8)  # the unused bytes are garbage
    ahi, bhi = smem_image(img, 0, A, swizzle), smem_image(img, 8192, B, swizzle)
    out = np.full((64, n), np.nan, np.float32)
    emu.launch(wgmma_kernel(n), 1, 128, [ro(img), ro(C), out, ahi, bhi, int(scale_d)], shared_bytes=24576 + 1024)
    ref = f64(A) @ f64(B).T + (C.astype(np.float64) if scale_d else 0)
    bound = (np.abs(f64(A)) @ np.abs(f64(B)).T + np.abs(C)) * 2.0 ** -23  # one fp32 rounding
    assert np.isfinite(out).all() and (np.abs(out - ref) <= bound).all()
    if not scale_d:
        assert (out == (f64(A) @ f64(B).T).astype(np.float32)).all(), "scale-d false: C is ignored"


@pytest.mark.parametrize("change, error, message", [
    ("    wgmma.wait_group.sync.aligned 0;\n", emu.AsyncError,
     r"%d0 is an accumulator of the wgmma.mma_async of line \d+, which no wgmma.wait_group has retired yet"),
    ("    wgmma.fence.sync.aligned;\n", emu.AsyncError, "no wgmma.fence before it"),
    ("    fence.proxy.async.shared::cta;\n", emu.RaceError, "a plain store wrote with no fence.proxy.async"),
])
def test_wgmma_misuse_raises(change, error, message):
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, 24576, dtype=np.uint8)
    ahi = smem_image(img, 0, bf16(rng.uniform(-1, 1, (64, 16))), 0)
    bhi = smem_image(img, 8192, bf16(rng.uniform(-1, 1, (8, 16))), 0)
    with pytest.raises(error, match=message):
        emu.launch(wgmma_kernel(8, remove=change), 1, 128, [ro(img), ro(np.zeros((64, 8), np.float32)),
                   np.zeros((64, 8), np.float32), ahi, bhi, 1], shared_bytes=24576 + 1024)
