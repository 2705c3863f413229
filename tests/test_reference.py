"""Checks of the numpy GPT-2 reference, which in turn is the oracle for the C trainer."""

import math

import numpy as np
import pytest

from dev.reference import (
    MATRIX_PARAMS,
    PARAM_NAMES,
    Config,
    adamw_update,
    clip_scale,
    forward,
    grad_norm,
    init_params,
    loss_and_grads,
    lr_at,
    param_shapes,
    train_step,
)

# padded vocab, two layers and two heads: small enough for finite differences,
# big enough that every indexing mistake (heads, layers, padding) shows
CFG = Config(max_seq_len=8, vocab_size=23, padded_vocab_size=32, n_layer=2, n_head=2, n_embd=8)
B, T = 2, 5


def random_batch(rng: np.random.Generator, b: int = B, t: int = T):
    inputs = rng.integers(0, CFG.vocab_size, (b, t))
    targets = rng.integers(0, CFG.vocab_size, (b, t))
    return inputs, targets


def rough_params(seed: int) -> dict[str, np.ndarray]:
    """Parameters far from init, so no path hides behind ln weights of 1, zero
    biases or near-uniform attention. The padded wte rows are deliberately
    non-zero: they must still not matter."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(CFG).items():
        if name in MATRIX_PARAMS:
            params[name] = rng.normal(size=shape) / math.sqrt(shape[-1])
        elif name in ("ln1w", "ln2w", "lnfw"):
            params[name] = 1.0 + 0.3 * rng.normal(size=shape)
        else:
            params[name] = 0.3 * rng.normal(size=shape)
    return params


# -----------------------------------------------------------------------------
# gradients


@pytest.fixture(scope="module")
def grad_problem():
    rng = np.random.default_rng(1)
    params = rough_params(0)
    inputs, targets = random_batch(rng)
    inputs[0, 1] = inputs[0, 3] = inputs[1, 0]  # a repeated token: wte grads must accumulate
    _, grads = loss_and_grads(params, CFG, inputs, targets)
    return params, inputs, targets, grads


def numerical_grad(params, inputs, targets, name: str, idx: tuple) -> float:
    p = params[name]
    old = p[idx]
    h = 1e-5 * max(1.0, abs(old))
    p[idx] = old + h
    loss_plus = forward(params, CFG, inputs, targets)[0]
    p[idx] = old - h
    loss_minus = forward(params, CFG, inputs, targets)[0]
    p[idx] = old
    return (loss_plus - loss_minus) / (2 * h)


@pytest.mark.parametrize("name", PARAM_NAMES)
def test_gradient_matches_finite_differences(grad_problem, name):
    params, inputs, targets, grads = grad_problem
    # every entry, not a sample: the whole sweep takes about a second, and a
    # sample could miss e.g. the one wte row of a repeated token
    numeric = np.zeros_like(params[name])
    for idx in np.ndindex(numeric.shape):
        numeric[idx] = numerical_grad(params, inputs, targets, name, idx)
    analytic = grads[name]
    # gradients here are O(0.1); float64 central differences agree to ~1e-10
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_grads_have_param_names_and_shapes(grad_problem):
    params, _, _, grads = grad_problem
    assert list(grads) == PARAM_NAMES
    for name in PARAM_NAMES:
        assert grads[name].shape == params[name].shape


def test_padded_vocab_is_ignored(grad_problem):
    params, inputs, targets, grads = grad_problem
    V = CFG.vocab_size
    loss, logits, _ = forward(params, CFG, inputs, targets)
    assert logits.shape == (B, T, CFG.padded_vocab_size)
    assert np.abs(logits[..., V:]).min() > 0  # computed, just not used
    # inputs never index padded rows, so this is the LM head's gradient alone
    assert np.all(grads["wte"][V:] == 0.0)
    changed = {name: p.copy() for name, p in params.items()}
    changed["wte"][V + 3] += 5.0
    assert forward(changed, CFG, inputs, targets)[0] == loss


# -----------------------------------------------------------------------------
# forward behaviour


def naive_forward(params, inputs, targets):
    """GPT-2 read off its definition one position and one head at a time.
    The finite differences cannot catch a forward mistake that backward
    mirrors (a wrong head split, q/k/v order, GELU), this can."""
    p, C, NH, V = params, CFG.n_embd, CFG.n_head, CFG.vocab_size
    hs = C // NH

    def ln(x, w, b):
        mu = x.mean()
        var = ((x - mu) ** 2).mean()
        return (x - mu) / math.sqrt(var + 1e-5) * w + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    b_, t_ = inputs.shape
    logits = np.zeros((b_, t_, CFG.padded_vocab_size))
    total = 0.0
    for b in range(b_):
        xs = [p["wte"][inputs[b, t]] + p["wpe"][t] for t in range(t_)]
        for l in range(CFG.n_layer):
            qkv = [p["qkvw"][l] @ ln(x, p["ln1w"][l], p["ln1b"][l]) + p["qkvb"][l] for x in xs]
            ys = []
            for t in range(t_):
                y = np.zeros(C)
                for h in range(NH):
                    head = slice(h * hs, (h + 1) * hs)
                    q = qkv[t][:C][head]
                    scores = np.array([q @ qkv[s][C : 2 * C][head] for s in range(t + 1)]) / math.sqrt(hs)
                    w = np.exp(scores - scores.max())
                    w /= w.sum()
                    y[head] = sum(w[s] * qkv[s][2 * C :][head] for s in range(t + 1))
                ys.append(y)
            xs = [x + p["attprojw"][l] @ y + p["attprojb"][l] for x, y in zip(xs, ys)]
            xs = [
                x + p["fcprojw"][l] @ gelu(p["fcw"][l] @ ln(x, p["ln2w"][l], p["ln2b"][l]) + p["fcb"][l]) + p["fcprojb"][l]
                for x in xs
            ]
        for t in range(t_):
            logits[b, t] = p["wte"] @ ln(xs[t], p["lnfw"], p["lnfb"])
            real = logits[b, t, :V]
            total += math.log(np.exp(real - real.max()).sum()) + real.max() - real[targets[b, t]]
    return total / (b_ * t_), logits


def test_forward_matches_naive_definition():
    rng = np.random.default_rng(10)
    params = rough_params(11)
    inputs, targets = random_batch(rng)
    loss, logits, _ = forward(params, CFG, inputs, targets)
    naive_loss, naive_logits = naive_forward(params, inputs, targets)
    assert loss == pytest.approx(naive_loss, rel=1e-12)
    np.testing.assert_allclose(logits, naive_logits, rtol=1e-10, atol=1e-12)


def test_loss_at_init_is_near_ln_vocab():
    rng = np.random.default_rng(2)
    inputs, targets = random_batch(rng)
    loss, _, _ = forward(init_params(CFG, seed=0), CFG, inputs, targets)
    # small logits mean a near-uniform distribution over the 23 real tokens
    # (ln 32 = 3.47 would mean the padding leaked into the softmax)
    assert abs(loss - math.log(CFG.vocab_size)) < 0.02


def test_init_params():
    params = init_params(CFG, seed=0)
    assert list(params) == PARAM_NAMES
    for name, shape in param_shapes(CFG).items():
        assert params[name].shape == shape and params[name].dtype == np.float64
    assert np.all(params["wte"][CFG.vocab_size:] == 0.0)
    assert np.all(params["lnfw"] == 1.0) and np.all(params["qkvb"] == 0.0)
    assert params["attprojw"].std() < params["qkvw"].std()  # residual projections are scaled down


def test_attention_is_causal():
    rng = np.random.default_rng(3)
    params = rough_params(4)
    inputs, targets = random_batch(rng)
    _, logits, _ = forward(params, CFG, inputs, targets)
    future = inputs.copy()
    future[:, 3] = (future[:, 3] + 1) % CFG.vocab_size
    _, logits_future, _ = forward(params, CFG, future, targets)
    np.testing.assert_allclose(logits_future[:, :3], logits[:, :3], rtol=0, atol=1e-12)
    assert np.abs(logits_future[:, 3:] - logits[:, 3:]).min() > 1e-6


# -----------------------------------------------------------------------------
# optimiser and schedule


def test_adamw_matches_scalar_computation():
    rng = np.random.default_rng(5)
    params = rough_params(6)
    start = {name: p.copy() for name, p in params.items()}
    m = {name: np.zeros_like(p) for name, p in params.items()}
    v = {name: np.zeros_like(p) for name, p in params.items()}
    all_grads = [{name: rng.normal(size=p.shape) for name, p in params.items()} for _ in range(3)]
    lr, b1, b2, eps, wd, scale = 3e-3, 0.9, 0.95, 1e-8, 0.1, 0.5
    for step, grads in enumerate(all_grads, start=1):
        adamw_update(params, grads, m, v, step, lr, grad_scale=scale)

    # (name, index, decayed?): a matrix weight, an embedding, a bias, a layernorm weight
    for name, idx, decayed in [
        ("qkvw", (1, 5, 2), True),
        ("wte", (7, 3), True),
        ("fcb", (0, 11), False),
        ("ln2w", (1, 4), False),
    ]:
        p, mi, vi = float(start[name][idx]), 0.0, 0.0
        for step, grads in enumerate(all_grads, start=1):
            g = float(grads[name][idx]) * scale
            mi = b1 * mi + (1 - b1) * g
            vi = b2 * vi + (1 - b2) * g * g
            mhat = mi / (1 - b1**step)
            vhat = vi / (1 - b2**step)
            p -= lr * (mhat / (math.sqrt(vhat) + eps) + (wd if decayed else 0.0) * p)
        assert params[name][idx] == pytest.approx(p, rel=1e-12, abs=1e-15)
        assert m[name][idx] == pytest.approx(mi, rel=1e-12)
        assert v[name][idx] == pytest.approx(vi, rel=1e-12)


def test_weight_decay_only_on_matrices():
    params = rough_params(7)
    start = {name: p.copy() for name, p in params.items()}
    zeros = {name: np.zeros_like(p) for name, p in params.items()}
    m = {name: np.zeros_like(p) for name, p in params.items()}
    v = {name: np.zeros_like(p) for name, p in params.items()}
    lr, wd = 0.01, 0.1
    # with zero gradients Adam's term is exactly zero and only decay moves params
    adamw_update(params, zeros, m, v, step=1, lr=lr, weight_decay=wd)
    for name in PARAM_NAMES:
        expected = start[name] * (1 - lr * wd) if name in MATRIX_PARAMS else start[name]
        np.testing.assert_allclose(params[name], expected, rtol=1e-15, err_msg=name)
    assert MATRIX_PARAMS == {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}


def test_lr_schedule():
    max_lr, warmup, total = 1.0, 10, 111
    lrs = [lr_at(s, max_lr, warmup, total) for s in range(total + 5)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[4] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(1.0)  # last warmup step reaches the peak
    assert lrs[10] == pytest.approx(1.0)  # decay starts from the peak
    assert lrs[60] == pytest.approx(0.55)  # half way down the cosine
    assert lrs[110] == pytest.approx(0.1)  # floor at total_steps - 1 ...
    assert lrs[114] == pytest.approx(0.1)  # ... and after
    decay = lrs[10:111]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert max(lrs) == pytest.approx(1.0)


def test_lr_schedule_edge_cases():
    assert lr_at(0, 2.0, 0, 100) == pytest.approx(2.0)  # no warmup: start at the peak
    assert lr_at(99, 2.0, 0, 100) == pytest.approx(0.2)
    assert lr_at(0, 2.0, 0, 1) == pytest.approx(0.2)  # a single step is already the last one
    # total_steps <= warmup: warmup as usual, then straight to the floor
    assert lr_at(2, 1.0, 5, 3) == pytest.approx(0.6)
    assert lr_at(5, 1.0, 5, 3) == pytest.approx(0.1)
    assert lr_at(5, 1.0, 5, 6) == pytest.approx(0.1)


# -----------------------------------------------------------------------------
# a whole training step


def test_grad_norm_and_clip_scale():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert grad_norm(grads) == pytest.approx(5.0)
    assert clip_scale(5.0, max_norm=1.0) == pytest.approx(0.2)
    assert clip_scale(0.5, max_norm=1.0) == 1.0


def test_train_step_accumulation_matches_full_batch():
    rng = np.random.default_rng(8)
    inputs, targets = random_batch(rng, b=4)
    micro = [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]
    full_loss, full_grads = loss_and_grads(rough_params(9), CFG, inputs, targets)

    params = rough_params(9)
    m = {name: np.zeros_like(p) for name, p in params.items()}
    v = {name: np.zeros_like(p) for name, p in params.items()}
    loss, norm = train_step(params, m, v, 1, CFG, micro, lr=1e-3, max_norm=0.5)
    assert loss == pytest.approx(full_loss, rel=1e-12)
    assert norm == pytest.approx(grad_norm(full_grads), rel=1e-12)  # reported before clipping
    assert norm > 0.5

    expected = rough_params(9)
    em = {name: np.zeros_like(p) for name, p in expected.items()}
    ev = {name: np.zeros_like(p) for name, p in expected.items()}
    adamw_update(expected, full_grads, em, ev, 1, 1e-3, grad_scale=clip_scale(norm, 0.5))
    for name in PARAM_NAMES:
        # Adam divides by |g|, so a tiny rounding difference in a tiny gradient
        # moves the update by more than the gradient's own relative error
        np.testing.assert_allclose(params[name], expected[name], rtol=0, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(m[name], em[name], rtol=1e-10, atol=1e-15, err_msg=name)
