"""
A float64 numpy GPT-2: forward, hand-written backward and AdamW.

This is the test oracle for the C trainer, so it favours being obviously
correct over being fast. The layout of the parameters (names, order, shapes,
(out, in) linear weights) follows llm.c so tensors can be compared one to one.
"""

import math
from dataclasses import dataclass

import numpy as np

# -----------------------------------------------------------------------------
# config and parameters


@dataclass
class Config:
    max_seq_len: int
    vocab_size: int
    padded_vocab_size: int  # wte has this many rows; the extra ones never see the loss
    n_layer: int
    n_head: int
    n_embd: int


PARAM_NAMES = [
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb",
]

# the tensors that get weight decay: the matmul weights and the embeddings
MATRIX_PARAMS = {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}

LN_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)


def param_shapes(cfg: Config) -> dict[str, tuple]:
    Vp, maxT, L, C = cfg.padded_vocab_size, cfg.max_seq_len, cfg.n_layer, cfg.n_embd
    return {
        "wte": (Vp, C),
        "wpe": (maxT, C),
        "ln1w": (L, C),
        "ln1b": (L, C),
        "qkvw": (L, 3 * C, C),
        "qkvb": (L, 3 * C),
        "attprojw": (L, C, C),
        "attprojb": (L, C),
        "ln2w": (L, C),
        "ln2b": (L, C),
        "fcw": (L, 4 * C, C),
        "fcb": (L, 4 * C),
        "fcprojw": (L, C, 4 * C),
        "fcprojb": (L, C),
        "lnfw": (C,),
        "lnfb": (C,),
    }


def init_params(cfg: Config, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = param_shapes(cfg)
    # GPT-2 scales the projections that write into the residual stream so its
    # variance does not grow with depth (two such writes per layer)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    params = {}
    for name in PARAM_NAMES:
        shape = shapes[name]
        if name in ("attprojw", "fcprojw"):
            params[name] = rng.normal(0.0, residual_std, shape)
        elif name in MATRIX_PARAMS:
            params[name] = rng.normal(0.0, 0.02, shape)
        elif name in ("ln1w", "ln2w", "lnfw"):
            params[name] = np.ones(shape)
        else:
            params[name] = np.zeros(shape)
    params["wte"][cfg.vocab_size:] = 0.0
    return params


# -----------------------------------------------------------------------------
# layers: each forward returns what its backward needs


@dataclass
class LNCache:
    xhat: np.ndarray  # (B,T,C) normalised input
    rstd: np.ndarray  # (B,T,1)


def layernorm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, LNCache]:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased, as in PyTorch
    rstd = 1.0 / np.sqrt(var + LN_EPS)
    xhat = (x - mean) * rstd
    return xhat * w + b, LNCache(xhat, rstd)


def layernorm_backward(dout: np.ndarray, cache: LNCache, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dw = (dout * cache.xhat).sum(axis=(0, 1))
    db = dout.sum(axis=(0, 1))
    dxhat = dout * w
    # xhat depends on x through both the mean and the rstd, hence the two
    # projections removed from dxhat
    dx = cache.rstd * (
        dxhat
        - dxhat.mean(axis=-1, keepdims=True)
        - cache.xhat * (dxhat * cache.xhat).mean(axis=-1, keepdims=True)
    )
    return dx, dw, db


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    return x @ w.T + b  # (B,T,in) -> (B,T,out)


def linear_backward(dout: np.ndarray, x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    dx = dout @ w
    dw = dout.reshape(-1, dout.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (out,in)
    db = dout.sum(axis=(0, 1))
    return dx, dw, db


def gelu_forward(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(GELU_SCALE * (x + 0.044715 * x**3)))


def gelu_backward(dout: np.ndarray, x: np.ndarray) -> np.ndarray:
    th = np.tanh(GELU_SCALE * (x + 0.044715 * x**3))
    dth = (1.0 - th**2) * GELU_SCALE * (1.0 + 3 * 0.044715 * x**2)
    return dout * (0.5 * (1.0 + th) + 0.5 * x * dth)


def split_heads(x: np.ndarray, n_head: int) -> np.ndarray:
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)  # (B,NH,T,hs)


def merge_heads(x: np.ndarray) -> np.ndarray:
    B, NH, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)  # (B,T,C)


def attention_forward(qkv: np.ndarray, n_head: int) -> tuple[np.ndarray, tuple]:
    q, k, v = (split_heads(t, n_head) for t in np.split(qkv, 3, axis=-1))  # (B,NH,T,hs)
    T, hs = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(hs)
    preatt = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B,NH,T,T)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    preatt = np.where(future, -np.inf, preatt)
    # the diagonal is never masked, so every row max is finite
    att = np.exp(preatt - preatt.max(axis=-1, keepdims=True))
    att /= att.sum(axis=-1, keepdims=True)
    y = merge_heads(att @ v)  # (B,T,C)
    return y, (q, k, v, att)


def attention_backward(dy: np.ndarray, cache: tuple, n_head: int) -> np.ndarray:
    q, k, v, att = cache
    scale = 1.0 / math.sqrt(q.shape[-1])
    dy = split_heads(dy, n_head)  # (B,NH,T,hs)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B,NH,T,T)
    dv = att.transpose(0, 1, 3, 2) @ dy
    # softmax backward; masked entries have att == 0 so they get no gradient
    dpreatt = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dq = (dpreatt @ k) * scale
    dk = (dpreatt.transpose(0, 1, 3, 2) @ q) * scale
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)  # (B,T,3C)


# -----------------------------------------------------------------------------
# the model


@dataclass
class LayerCache:
    ln1: LNCache
    h: np.ndarray  # (B,T,C) ln1 output
    attn: tuple  # q, k, v (B,NH,T,hs) and att (B,NH,T,T)
    y: np.ndarray  # (B,T,C) attention output, heads merged
    ln2: LNCache
    h2: np.ndarray  # (B,T,C) ln2 output
    fc: np.ndarray  # (B,T,4C) before GELU
    f: np.ndarray  # (B,T,4C) after GELU


@dataclass
class Cache:
    inputs: np.ndarray  # (B,T)
    targets: np.ndarray  # (B,T)
    layers: list[LayerCache]
    lnf: LNCache
    xf: np.ndarray  # (B,T,C) final layernorm output
    probs: np.ndarray  # (B,T,V) softmax over the real vocab only


def forward(
    params: dict[str, np.ndarray], cfg: Config, inputs: np.ndarray, targets: np.ndarray
) -> tuple[float, np.ndarray, Cache]:
    """Returns (mean loss, logits (B,T,Vp), cache for backward)."""
    p = params
    B, T = inputs.shape
    assert T <= cfg.max_seq_len
    x = p["wte"][inputs] + p["wpe"][:T]  # (B,T,C)
    layers = []
    for l in range(cfg.n_layer):
        h, ln1 = layernorm_forward(x, p["ln1w"][l], p["ln1b"][l])
        qkv = linear_forward(h, p["qkvw"][l], p["qkvb"][l])  # (B,T,3C)
        y, attn = attention_forward(qkv, cfg.n_head)
        x = x + linear_forward(y, p["attprojw"][l], p["attprojb"][l])
        h2, ln2 = layernorm_forward(x, p["ln2w"][l], p["ln2b"][l])
        fc = linear_forward(h2, p["fcw"][l], p["fcb"][l])  # (B,T,4C)
        f = gelu_forward(fc)
        x = x + linear_forward(f, p["fcprojw"][l], p["fcprojb"][l])
        layers.append(LayerCache(ln1, h, attn, y, ln2, h2, fc, f))
    xf, lnf = layernorm_forward(x, p["lnfw"], p["lnfb"])
    logits = xf @ p["wte"].T  # (B,T,Vp)

    # the padded columns are not tokens: leave them out of the softmax entirely
    z = logits[..., : cfg.vocab_size]
    z = z - z.max(axis=-1, keepdims=True)
    logsumexp = np.log(np.exp(z).sum(axis=-1, keepdims=True))
    logprobs = z - logsumexp  # (B,T,V)
    loss = -np.take_along_axis(logprobs, targets[..., None], axis=-1).mean()
    cache = Cache(inputs, targets, layers, lnf, xf, np.exp(logprobs))
    return float(loss), logits, cache


def backward(params: dict[str, np.ndarray], cfg: Config, cache: Cache) -> dict[str, np.ndarray]:
    """Gradients of the mean loss of the forward that produced cache."""
    p = params
    grads = {name: np.zeros_like(p[name]) for name in PARAM_NAMES}
    B, T = cache.inputs.shape

    # softmax + cross-entropy; the 1/(B*T) is the mean over positions
    one_hot = np.eye(cfg.vocab_size)[cache.targets]  # (B,T,V)
    dz = (cache.probs - one_hot) / (B * T)
    dlogits = np.zeros((B, T, cfg.padded_vocab_size))
    dlogits[..., : cfg.vocab_size] = dz

    grads["wte"] += dlogits.reshape(B * T, -1).T @ cache.xf.reshape(B * T, -1)
    dxf = dlogits @ p["wte"]  # (B,T,C)
    dx, grads["lnfw"], grads["lnfb"] = layernorm_backward(dxf, cache.lnf, p["lnfw"])

    for l in reversed(range(cfg.n_layer)):
        lc = cache.layers[l]
        # MLP: the residual passes dx straight through, the branch adds to it
        df, grads["fcprojw"][l], grads["fcprojb"][l] = linear_backward(dx, lc.f, p["fcprojw"][l])
        dfc = gelu_backward(df, lc.fc)
        dh2, grads["fcw"][l], grads["fcb"][l] = linear_backward(dfc, lc.h2, p["fcw"][l])
        dln2, grads["ln2w"][l], grads["ln2b"][l] = layernorm_backward(dh2, lc.ln2, p["ln2w"][l])
        dx = dx + dln2
        # attention
        dy, grads["attprojw"][l], grads["attprojb"][l] = linear_backward(dx, lc.y, p["attprojw"][l])
        dqkv = attention_backward(dy, lc.attn, cfg.n_head)
        dh, grads["qkvw"][l], grads["qkvb"][l] = linear_backward(dqkv, lc.h, p["qkvw"][l])
        dln1, grads["ln1w"][l], grads["ln1b"][l] = layernorm_backward(dh, lc.ln1, p["ln1w"][l])
        dx = dx + dln1

    # a token may appear several times, so accumulate rather than assign
    np.add.at(grads["wte"], cache.inputs, dx)
    grads["wpe"][:T] = dx.sum(axis=0)
    return grads


def loss_and_grads(
    params: dict[str, np.ndarray], cfg: Config, inputs: np.ndarray, targets: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    loss, _, cache = forward(params, cfg, inputs, targets)
    return loss, backward(params, cfg, cache)


# -----------------------------------------------------------------------------
# optimisation


def grad_norm(grads: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float((g * g).sum()) for g in grads.values()))


def clip_scale(norm: float, max_norm: float = 1.0) -> float:
    return max_norm / norm if norm > max_norm else 1.0


def adamw_update(
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    m: dict[str, np.ndarray],
    v: dict[str, np.ndarray],
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step (step counts from 1), updating params, m and v in place."""
    for name in PARAM_NAMES:
        g = grads[name] * grad_scale
        m[name] *= beta1
        m[name] += (1.0 - beta1) * g
        v[name] *= beta2
        v[name] += (1.0 - beta2) * g * g
        mhat = m[name] / (1.0 - beta1**step)
        vhat = v[name] / (1.0 - beta2**step)
        wd = weight_decay if name in MATRIX_PARAMS else 0.0
        params[name] -= lr * (mhat / (np.sqrt(vhat) + eps) + wd * params[name])


def lr_at(step: int, max_lr: float, warmup: int, total_steps: int, min_lr_frac: float = 0.1) -> float:
    """Linear warmup, then cosine decay to min_lr_frac * max_lr at step total_steps-1."""
    min_lr = min_lr_frac * max_lr
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total_steps - 1:
        return min_lr
    # here warmup <= step < total_steps-1, so the denominator is positive
    progress = (step - warmup) / (total_steps - 1 - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def train_step(
    params: dict[str, np.ndarray],
    m: dict[str, np.ndarray],
    v: dict[str, np.ndarray],
    step: int,
    cfg: Config,
    micro_batches: list[tuple[np.ndarray, np.ndarray]],
    lr: float,
    max_norm: float = 1.0,
) -> tuple[float, float]:
    """Accumulate over micro-batches, clip by global norm, AdamW. Returns (mean loss, pre-clip norm)."""
    n = len(micro_batches)
    total_loss = 0.0
    grads = {name: np.zeros_like(params[name]) for name in PARAM_NAMES}
    for inputs, targets in micro_batches:
        loss, g = loss_and_grads(params, cfg, inputs, targets)
        total_loss += loss
        for name in PARAM_NAMES:
            grads[name] += g[name]
    for name in PARAM_NAMES:
        grads[name] /= n
    norm = grad_norm(grads)
    adamw_update(params, grads, m, v, step, lr, grad_scale=clip_scale(norm, max_norm))
    return total_loss / n, norm
