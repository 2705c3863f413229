"""Helpers shared by the emulator tests (test_ptx_emu.py: asm/*.ptx; test_cuda_emu.py: train_gpt.cu's
kernels): bf16 by hand, read-only inputs, comparisons against float64 with the reason for each tolerance,
exact rounding of rationals, the kernels' inputs and float64 references, inline PTX."""

from fractions import Fraction

import numpy as np

from dev import ptx_emu as emu

SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)


# -----------------------------------------------------------------------------
# bf16 by hand, read-only inputs

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


def nan_f32(shape) -> np.ndarray:
    return np.full(shape, np.nan, np.float32)


def grid_for(n, block):  # train_gpt.cu's grid_for
    return max(1, min((n + block - 1) // block, 65536 * 8))


# -----------------------------------------------------------------------------
# comparisons

def bf16_ulp(ref) -> np.ndarray:
    """One bf16 ulp at |ref| (8 significant bits); 0 where ref == 0."""
    a = np.abs(np.asarray(ref, np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.where(a > 0, 2.0 ** (e - 7), 0.0)


def _report(what, got, ref, err, tol):
    bad = np.flatnonzero(err > tol)
    worst = bad[np.argmax((err / np.maximum(tol, 1e-300)).ravel()[bad])] if bad.size else 0
    return (f"{what}: {bad.size} of {err.size} outside tolerance; worst at flat index {worst}: got "
            f"{got.ravel()[worst]!r}, want {ref.ravel()[worst]!r} (tolerance {np.ravel(tol)[worst]:.3g})")


def assert_bf16_close(got_bits, ref, atol, what):
    """Each bf16 output within one bf16 ulp of the float64 reference (its own rounding), plus atol."""
    got = f64(got_bits)
    ref = np.asarray(ref, np.float64)
    assert not np.isnan(got).any(), f"{what}: {int(np.isnan(got).sum())} outputs are NaN (never written?)"
    err = np.abs(got - ref)
    tol = np.broadcast_to(bf16_ulp(ref) + atol, err.shape)
    assert (err <= tol).all(), _report(what, got, ref, err, tol)


def assert_f32_close(got, ref, rtol, atol, what):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.isfinite(got).all(), f"{what}: non-finite outputs {got[~np.isfinite(got)][:4]} (never written?)"
    err = np.abs(got - ref)
    tol = np.broadcast_to(rtol * np.abs(ref) + atol, err.shape)
    assert (err <= tol).all(), _report(what, got, ref, err, tol)


def round_f32(q: Fraction, mode: str = "rn") -> np.float32:
    """The float32 nearest to a rational (rn, ties to even), or the next one down (rm) or up (rp)."""
    if q == 0:
        return np.float32(0.0)
    sign, a = (-1 if q < 0 else 1), abs(q)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    quantum = Fraction(2) ** (max(e, -126) - 23)
    n = a / quantum
    k, rem = divmod(n.numerator, n.denominator)
    away = {"rn": 2 * rem > n.denominator or (2 * rem == n.denominator and k % 2),
            "rm": rem != 0 and sign < 0, "rp": rem != 0 and sign > 0}[mode]
    v = (k + away) * quantum
    if v >= 2 ** 128:  # overflow: inf, unless rounding toward zero's side
        big = mode == "rn" or (mode == "rm") == (sign < 0)
        return np.float32(sign * (np.inf if big else np.finfo(np.float32).max))
    return np.float32(sign * float(v))


# -----------------------------------------------------------------------------
# inputs and float64 references of the kernels both files test

def adamw_inputs(n, rng):
    p = rng.normal(0, 0.1, n).astype(np.float32)
    g = rng.normal(0, 1e-2, n).astype(np.float32)
    m = rng.normal(0, 1e-3, n).astype(np.float32)
    v = np.abs(rng.normal(0, 1e-5, n)).astype(np.float32)
    g[:4], m[:4], v[:4] = 0, 0, 0           # a first step on a zero gradient: only weight decay moves p
    g[4:8] = [30.0, -30.0, 1e-20, -1e-20]   # a huge and a tiny gradient
    return p, g, m, v


def gelu_inputs(n, rng, extreme=False):
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
    """lse, losses, d(logits) (V columns) and the softmax p, in float64."""
    x = f64(logits)[:, :V]
    mx = x.max(1, keepdims=True)
    lse = (mx + np.log(np.exp(x - mx).sum(1, keepdims=True)))[:, 0]
    rows = np.arange(len(targets))
    p = np.exp(x - lse[:, None])
    grad = p.copy()
    grad[rows, targets] -= 1
    return lse, lse - x[rows, targets], grad * dloss, p


def ln_inputs(N, C, rng):
    x = rng.normal(0.3, 1.5, (N, C))
    x[0] = 2.5  # a constant row: variance 0, rstd = 1/sqrt(1e-5)
    w = rng.normal(1, 0.3, C).astype(np.float32)
    b = rng.normal(0, 0.3, C).astype(np.float32)
    return bf16(x), w, b


def ln_stats(x):
    m = x.mean(1)
    return m, 1 / np.sqrt(((x - m[:, None]) ** 2).mean(1) + 1e-5)


def check_layernorm_forward(out, mean, rstd, x, w, b):
    """A layernorm forward kernel's out (bf16), mean and rstd (fp32) against float64."""
    xf = f64(x)
    m, s = ln_stats(xf)
    norm = (xf - m[:, None]) * s[:, None]
    # fp32 sums of C / 32 terms a lane and a 5-step butterfly: a few ulps of the mean, the variance
    assert_f32_close(mean, m, 1e-6, 1e-7, "mean")
    assert_f32_close(rstd, s, 1e-5, 0, "rstd")
    # the normalised value's fp32 error (from mean and rstd), times the weight
    assert_bf16_close(out, norm * w + b, 1e-5 * (np.abs(norm * w) + np.abs(b)) + 1e-6, "layernorm out")


def ln_backward_inputs(N, C, with_resid, rng):
    """x, w, dout, resid (or None), and mean, rstd in fp32 as the forward pass stored them."""
    x, w, _ = ln_inputs(N, C, rng)
    dout = bf16(rng.normal(0, 1, (N, C)))
    resid = bf16(rng.normal(0, 1, (N, C))) if with_resid else None
    m64, s64 = ln_stats(f64(x))
    return x, w, dout, resid, m64.astype(np.float32), s64.astype(np.float32)


def check_layernorm_backward_input(dinp, x, w, dout, resid, mean, rstd):
    """dinp = resid + (dn - mean(dn) - norm * mean(dn * norm)) * rstd, dn = w * dout, against float64."""
    m, s = mean.astype(np.float64)[:, None], rstd.astype(np.float64)[:, None]
    dn = w * f64(dout)
    norm = (f64(x) - m) * s
    a = dn.mean(1, keepdims=True)
    bn = (dn * norm).mean(1, keepdims=True)
    ref = (dn - a - norm * bn) * s
    scale = (np.abs(dn) + np.abs(a) + np.abs(norm * bn)) * s  # the terms whose difference ref is
    if resid is not None:
        ref = ref + f64(resid)
        scale = scale + np.abs(f64(resid))
    # fp32: each term a few ulps (the row sums' errors carry over), relative to the terms
    assert_bf16_close(dinp, ref, 2e-6 * scale + 1e-7, "layernorm dinp")


# -----------------------------------------------------------------------------
# small kernels written inline

HEAD = ".version 9.0\n.target sm_90a\n.address_size 64\n"
PARAMS4 = ".param .u64 pa, .param .u64 pb, .param .u64 pc, .param .u64 pd"


def inline(body: str, params: str = PARAMS4, name: str = "k", target: str = "sm_90a") -> emu.Kernel:
    head = HEAD.replace("sm_90a", target)
    return emu.parse_ptx(head + f".visible .entry {name}({params})\n{{\n{body}\n}}\n", "inline.ptx")[name]


# one element per thread: x, y, z from pa, pb, pc (f32), OP computes %w, stored to pd
ELEMENTWISE = """
    .reg .b32 %t;
    .reg .b64 %a, %b, %c, %d, %o;
    .reg .f32 %x, %y, %z, %w, %w2;
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
