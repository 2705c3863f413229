"""The C trainer (through the binding) against the numpy float64 reference.

Tolerances: fp32 against float64 on tiny shapes, relative error (max abs
difference over max abs value) below 1e-4 for the loss and every gradient,
and parameters after 3 AdamW steps (lr 1e-2) within 1e-4 absolute, 1/300 of
the 3e-2 a parameter can move: Adam divides by sqrt(v), so an entry whose
gradient is close to zero turns its fp32 rounding into a visible step."""

import numpy as np
import pytest

import gpt
from dev import reference as ref

# awkward on purpose: C not a multiple of the GEMM tiles, V not of the padding,
# T smaller than the context, two layers so layer offsets matter
CFG = dict(max_seq_len=16, vocab_size=67, padded_vocab_size=80, num_layers=2, num_heads=4, channels=36)
RCFG = ref.Config(max_seq_len=16, vocab_size=67, padded_vocab_size=80, n_layer=2, n_head=4, n_embd=36)
B, T = 3, 7


def batches(seed: int, m: int):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, CFG["vocab_size"], (B, T)), rng.integers(0, CFG["vocab_size"], (B, T)))
            for _ in range(m)]


def rough_params(seed: int, rcfg: ref.Config = RCFG, noise: float = 0.1, scale: float = 5.0) -> dict:
    """Reference init plus noise on layernorms and biases, so no path hides
    behind weights of 1 and zero biases; scale sharpens the attention and
    enlarges the activations. (The CUDA tests share it.)"""
    params = ref.init_params(rcfg, seed)
    rng = np.random.default_rng(seed + 1)
    for name in ("ln1w", "ln1b", "ln2w", "ln2b", "lnfw", "lnfb", "qkvb", "attprojb", "fcb", "fcprojb"):
        params[name] = params[name] + noise * rng.standard_normal(params[name].shape)
    for name in ("qkvw", "attprojw", "fcw", "fcprojw", "wte", "wpe"):
        params[name] = params[name] * scale
    params["wte"][rcfg.vocab_size:] = 0.0
    return params


def c_model(params: dict, activation_buffers: int = 1) -> gpt.Model:
    model = gpt.Model(CFG, 0, CFG["num_layers"], B, T, activation_buffers)
    model.set_params(params)
    return model


def step_ops(m: int) -> np.ndarray:
    return np.array([(k, mb) for mb in range(m) for k in (gpt.FWD, gpt.BWD_INPUT, gpt.BWD_WEIGHT)])


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def test_loss_and_every_gradient_match_reference():
    params = rough_params(1)
    (x, y), = batches(2, 1)
    loss_ref, grads_ref = ref.loss_and_grads(params, RCFG, x, y)
    model = c_model(params)
    loss = model.run(step_ops(1), x[None], y[None])
    model.sum_wte_grads()
    assert abs(loss - loss_ref) / loss_ref < 1e-5
    grads = model.grads()
    for name in ref.PARAM_NAMES:
        err = rel_err(grads[name], grads_ref[name].reshape(grads[name].shape))
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
    # padded vocabulary rows get no gradient at all
    assert np.all(grads["wte"][CFG["vocab_size"]:] == 0.0)


def test_wte_contributions_are_kept_apart_until_summed():
    params = rough_params(3)
    (x, y), = batches(4, 1)
    model = c_model(params)
    model.run(step_ops(1), x[None], y[None])
    head = model.grads()["wte"].copy()
    embed = model.wte_embed_grad().copy()
    # the embedding only touches rows of tokens that occur in the input
    untouched = np.setdiff1d(np.arange(CFG["vocab_size"]), x)
    assert np.all(embed[untouched] == 0.0) and np.any(embed[x.ravel()] != 0.0)
    model.sum_wte_grads()
    assert np.array_equal(model.grads()["wte"], head + embed)


def test_forward_only_loss_matches_training_loss():
    params = rough_params(5)
    data = batches(6, 2)
    x = np.stack([d[0] for d in data]); y = np.stack([d[1] for d in data])
    model = c_model(params)
    eval_loss = model.run(np.array([(gpt.FWD, 0), (gpt.FWD, 1)]), x, y, training=False)
    train_loss = model.run(step_ops(2), x, y)
    assert eval_loss == train_loss
    want = sum(ref.forward(params, RCFG, a, b)[0] for a, b in data)
    assert abs(eval_loss - want) / want < 1e-5


def train_c(params: dict, data, steps: int, m: int, lr: float = 1e-2, threads: int = 0):
    """steps of the launcher's step sequence; returns the model and (loss, norm) per step."""
    if threads:
        gpt.set_threads(threads)
    model = c_model(params)
    history = []
    for step in range(steps):
        chunk = data[step * m:(step + 1) * m]
        x = np.stack([d[0] for d in chunk]); y = np.stack([d[1] for d in chunk])
        loss = model.run(step_ops(m), x, y) / m
        model.sum_wte_grads()
        norm = gpt.norm_from_parts(model.grad_norm_parts(), CFG["num_layers"])
        model.adamw(lr, 0.1, 1.0 / norm if norm > 1.0 else 1.0, step + 1)
        history.append((loss, norm))
    return model, history


def test_three_adamw_steps_with_accumulation_and_clipping_match_reference():
    params = rough_params(7)
    steps, m, lr = 3, 2, 1e-2
    data = batches(8, steps * m)
    model, history = train_c(params, data, steps, m, lr)
    p = {k: v.copy() for k, v in params.items()}
    mom = {k: np.zeros_like(v) for k, v in p.items()}
    vel = {k: np.zeros_like(v) for k, v in p.items()}
    clipped = False
    for step in range(steps):
        loss, norm = ref.train_step(p, mom, vel, step + 1, RCFG, data[step * m:(step + 1) * m], lr)
        clipped |= norm > 1.0
        assert abs(history[step][0] - loss) / loss < 1e-5
        assert abs(history[step][1] - norm) / norm < 1e-4
    assert clipped, "the test should exercise clipping"
    C = CFG["channels"]
    for name, c in model.params().items():
        diff = np.abs(c - p[name].reshape(c.shape))
        if name == "qkvb":
            # the key bias has an exactly zero gradient (it shifts every score
            # of a query alike, which the softmax ignores); in fp32 it is
            # rounding noise that Adam normalises into a full-size step
            diff = diff[:, np.r_[0:C, 2 * C:3 * C]]
        err = np.max(diff)
        assert err < 1e-4, f"{name}: max abs difference {err:.2e} after {steps} steps"


def test_results_do_not_depend_on_thread_count():
    params = rough_params(9)
    data = batches(10, 4)
    runs = []
    for threads in (1, 2):
        model, history = train_c(params, data, 2, 2, threads=threads)
        runs.append((history, {k: v.copy() for k, v in model.params().items()}))
    gpt.set_threads(0)
    assert runs[0][0] == runs[1][0]
    for name in runs[0][1]:
        assert np.array_equal(runs[0][1][name], runs[1][1][name]), name


def test_lr_schedule_matches_reference():
    for step in range(12):
        assert gpt.lr_at(step, 6e-4, 3, 10) == pytest.approx(ref.lr_at(step, 6e-4, 3, 10), rel=1e-6)


def test_sampling_is_seeded_and_greedy_is_argmax():
    params = rough_params(11)
    model = c_model(params)
    prompt = np.array([1, 2, 3])
    a = model.sample(prompt, 5, temperature=1.0, top_k=10, seed=42)
    b = model.sample(prompt, 5, temperature=1.0, top_k=10, seed=42)
    assert np.array_equal(a, b) and np.array_equal(a[:3], prompt)
    assert np.all((a >= 0) & (a < CFG["vocab_size"]))
    greedy = model.sample(prompt, 1, temperature=0.0)
    x = np.zeros((1, 3), dtype=int) + prompt
    _, logits, _ = ref.forward(params, RCFG, x, x)
    assert greedy[3] == np.argmax(logits[0, -1, :CFG["vocab_size"]])


def test_stage_arguments_are_checked():
    with pytest.raises(gpt.GPTError, match="sequence length 17"):
        gpt.Model(CFG, 0, 2, B, 17)
    with pytest.raises(gpt.GPTError, match="layer range"):
        gpt.Model(CFG, 1, 1, B, T)
    with pytest.raises(gpt.GPTError, match="unknown model 'huge'"):
        gpt.config_from_name("huge")
