"""The CUDA trainer (train_gpt.cu, as the modules gpt_cuda (bf16) and
gpt_cuda_fp32) against the CPU trainer (gpt) and the numpy reference.

Every test but the first needs a GPU and is skipped without one. Each test
prints what it measured (pytest -rA shows it), so one run on a GPU tells as
much as possible.

Tolerances:
- fp32 build vs the CPU trainer (both fp32, different summation orders): loss
  relative 1e-5; every gradient relative error (max abs difference / max abs
  value) 2e-4; grad-norm parts relative 1e-4; parameters after 3 AdamW steps
  (lr 1e-2): 99.9% of each tensor's entries within 1e-5 absolute, all within
  3e-3 (Adam turns the rounding of a near-zero gradient into a step of up to lr).
- bf16 build vs the CPU trainer (bf16 weights, activations and gradient
  activations; fp32 master weights, gradients and loss): one step's loss
  relative 2e-2; every gradient's cosine similarity >= 0.99 and relative error
  <= 0.15; the tensor-core attention kernels (both variants) agree with the
  simple fp32 ones: loss relative 5e-3, gradient cosine >= 0.999.
- bf16 d12 (GPT-2 124M) over 20 steps at B=4 T=64 vs the fp32 CPU trainer:
  every step's loss within 0.1 absolute, the last within 3% relative.
- S-stage pipelines (socket transport, one GPU) vs 1 stage, determinism: bitwise.
- --zero 1 and --zero 3 vs zero 0, D = 2 replicas over the socket ring on one
  GPU: bitwise (losses, norms, parameters, checkpoint files).
"""

import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import gpt
from dev import reference as ref
from tests.test_model import rough_params

ROOT = Path(__file__).resolve().parent.parent

try:
    import gpt_cuda
except ImportError:
    gpt_cuda = None
try:
    import gpt_cuda_fp32
except ImportError:
    gpt_cuda_fp32 = None


def _device_count() -> int:
    try:
        return gpt_cuda.device_count() if gpt_cuda else 0
    except Exception:
        return 0


built = pytest.mark.skipif(gpt_cuda is None or gpt_cuda_fp32 is None,
                           reason="gpt_cuda / gpt_cuda_fp32 not built (no nvcc, or make has not run)")
GPU_SKIP = ("gpt_cuda not built (no nvcc, or make has not run)" if gpt_cuda is None else
            "gpt_cuda_fp32 not built" if gpt_cuda_fp32 is None else
            "no GPU visible (gpt_cuda.device_count() == 0)")
needs_gpu = pytest.mark.skipif(gpt_cuda is None or gpt_cuda_fp32 is None or _device_count() == 0,
                               reason=GPU_SKIP)

# test_model.py's awkward small shape (head size 9: the simple attention kernels)
CFG = dict(max_seq_len=16, vocab_size=67, padded_vocab_size=80, num_layers=2, num_heads=4, channels=36)
RCFG = ref.Config(max_seq_len=16, vocab_size=67, padded_vocab_size=80, n_layer=2, n_head=4, n_embd=36)
B, T = 3, 7
# head size 64 (the tensor-core attention), T = 80: one full and one partial 64-row block
CFG64 = dict(max_seq_len=256, vocab_size=300, padded_vocab_size=320, num_layers=2, num_heads=2, channels=128)
RCFG64 = ref.Config(max_seq_len=256, vocab_size=300, padded_vocab_size=320, n_layer=2, n_head=2, n_embd=128)
B64, T64 = 2, 80
# four layers for the pipelines
CFGP = dict(CFG64, num_layers=4)
RCFGP = ref.Config(max_seq_len=256, vocab_size=300, padded_vocab_size=320, n_layer=4, n_head=2, n_embd=128)


def batches(seed: int, m: int, cfg=CFG, b=B, t=T):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, cfg["vocab_size"], (b, t)), rng.integers(0, cfg["vocab_size"], (b, t)))
            for _ in range(m)]


def stack(data):
    return np.stack([d[0] for d in data]), np.stack([d[1] for d in data])


def gentle_params(seed: int, rcfg) -> dict:
    """GPT-2's init plus a little noise on layernorms and biases (bf16 tests)."""
    return rough_params(seed, rcfg, noise=0.05, scale=3.0)


def model(mod, params, cfg=CFG, b=B, t=T, activation_buffers=1, lo=0, hi=None):
    m = mod.Model(cfg, lo, cfg["num_layers"] if hi is None else hi, b, t, activation_buffers)
    if params is not None:
        m.set_params(params)
    return m


def step_ops(mod, m: int) -> np.ndarray:
    return np.array([(k, mb) for mb in range(m) for k in (mod.FWD, mod.BWD_INPUT, mod.BWD_WEIGHT)])


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    return float(a @ b / max(na * nb, 1e-300))


def one_step(mod, params, data, cfg=CFG, b=B, t=T):
    """Loss, summed gradients (copies), the embedding's d(wte) part and grad-norm parts of one step."""
    m = model(mod, params, cfg, b, t)
    x, y = stack(data)
    loss = m.run(step_ops(mod, len(data)), x, y)
    embed = m.wte_embed_grad().copy()
    m.sum_wte_grads()
    grads = {k: v.copy() for k, v in m.grads().items()}
    return loss, grads, embed, m.grad_norm_parts()


def train(mod, params, data, steps: int, m: int, cfg=CFG, b=B, t=T, lr=1e-2, schedule=None):
    """The launcher's step sequence; returns the model and (loss, norm) per step."""
    mdl = model(mod, params, cfg, b, t)
    history = []
    for step in range(steps):
        x, y = stack(data[step * m:(step + 1) * m])
        loss = mdl.run(step_ops(mod, m), x, y) / m
        mdl.sum_wte_grads()
        norm = mod.norm_from_parts(mdl.grad_norm_parts(), cfg["num_layers"])
        step_lr = schedule(step) if schedule else lr
        mdl.adamw(step_lr, 0.1, 1.0 / norm if norm > 1.0 else 1.0, step + 1)
        history.append((loss, norm))
    return mdl, history


# -----------------------------------------------------------------------------
# no GPU: clean failures (runs wherever the modules are built)


@built
def test_no_device_fails_cleanly():
    """With no visible GPU: device_count() is 0, a stage fails with a message, nothing crashes."""
    code = ("import gpt_cuda\n"
            "print('count', gpt_cuda.device_count())\n"
            "try:\n"
            "    gpt_cuda.Model(gpt_cuda.config_from_name('tiny'), 0, 4, 2, 16)\n"
            "except gpt_cuda.GPTError as e:\n"
            "    print('error', e)\n")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    assert "count 0" in r.stdout
    assert "error no CUDA device available" in r.stdout
    binary = ROOT / "train_gpt_cu"
    if binary.exists():
        r = subprocess.run([str(binary), "-e", "tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        print(r.stdout, r.stderr)
        assert r.returncode == 1 and "no CUDA device" in r.stderr


# -----------------------------------------------------------------------------
# fp32 build against the CPU trainer


@needs_gpu
@pytest.mark.parametrize("fuse_gelu", ["1", "0"])
def test_fp32_one_step_matches_cpu(fuse_gelu, monkeypatch):
    """Loss, every gradient (both d(wte) parts), grad-norm parts: fused and unfused GELU."""
    monkeypatch.setenv("GPT_FUSE_GELU", fuse_gelu)
    params = rough_params(1)
    data = batches(2, 2)
    loss_c, grads_c, embed_c, parts_c = one_step(gpt, params, data)
    loss_g, grads_g, embed_g, parts_g = one_step(gpt_cuda_fp32, params, data)
    loss_r, grads_r = 0.0, None
    for x, y in data:  # the reference, averaged over micro-batches like the trainers
        lr_, gr_ = ref.loss_and_grads(params, RCFG, x, y)
        loss_r += lr_
        grads_r = gr_ if grads_r is None else {k: grads_r[k] + gr_[k] for k in gr_}
    grads_r = {k: v / len(data) for k, v in grads_r.items()}
    print(f"GELU fused={fuse_gelu}: loss gpu {loss_g:.7f} cpu {loss_c:.7f} ref {loss_r:.7f}")
    assert abs(loss_g - loss_c) / loss_c < 1e-5
    assert abs(loss_g - loss_r) / loss_r < 1e-5
    worst = []
    for name in ref.PARAM_NAMES:
        e_cpu = rel_err(grads_g[name], grads_c[name])
        e_ref = rel_err(grads_g[name], grads_r[name].reshape(grads_g[name].shape))
        print(f"  {name:9s} rel err vs cpu {e_cpu:.2e}  vs ref {e_ref:.2e}")
        worst.append((max(e_cpu, e_ref), name))
    e_embed = rel_err(embed_g, embed_c)
    e_parts = rel_err(parts_g, parts_c)
    print(f"  d(wte) embedding part rel err {e_embed:.2e}; grad-norm parts rel err {e_parts:.2e}")
    assert max(worst)[0] < 2e-4, f"worst gradient {max(worst)[1]}: {max(worst)[0]:.2e}"
    assert e_embed < 2e-4 and e_parts < 1e-4
    assert np.all(grads_g["wte"][CFG["vocab_size"]:] == 0.0), "padded vocabulary rows got a gradient"


@needs_gpu
def test_fp32_three_adamw_steps_match_cpu():
    params = rough_params(7)
    steps, m = 3, 2
    data = batches(8, steps * m)
    cpu, hist_c = train(gpt, params, data, steps, m)
    gpu, hist_g = train(gpt_cuda_fp32, params, data, steps, m)
    print("loss/norm cpu", hist_c, "\nloss/norm gpu", hist_g)
    for (lc, nc), (lg, ng) in zip(hist_c, hist_g):
        assert abs(lg - lc) / lc < 1e-5
        assert abs(ng - nc) / nc < 1e-4
    assert any(n > 1.0 for _, n in hist_c), "the test should exercise clipping"
    C = CFG["channels"]
    pc, pg = cpu.params(), gpu.params()
    for name in pc:
        diff = np.abs(pg[name] - pc[name])
        if name == "qkvb":  # the key bias: zero gradient up to rounding, see test_model.py
            diff = diff[:, np.r_[0:C, 2 * C:3 * C]]
        # Adam divides by sqrt(v): an entry whose gradient is close to zero
        # turns a rounding difference into a step of up to lr, so bound almost
        # all entries tightly and the few such ones by a tenth of the 3 lr
        # an entry can move
        near = np.quantile(diff, 0.999)
        print(f"  {name:9s} 99.9% within {near:.2e}, max abs diff {np.max(diff):.2e}")
        assert near < 1e-5 and np.max(diff) < 3e-3, name


@needs_gpu
def test_fp32_forward_only_sampling_and_checkpoint(tmp_path):
    params = rough_params(5)
    data = batches(6, 2)
    x, y = stack(data)
    g = model(gpt_cuda_fp32, params)
    eval_loss = g.run(np.array([(gpt.FWD, 0), (gpt.FWD, 1)]), x, y, training=False)
    train_loss = g.run(step_ops(gpt_cuda_fp32, 2), x, y)
    cpu_loss = model(gpt, params).run(np.array([(gpt.FWD, 0), (gpt.FWD, 1)]), x, y, training=False)
    print(f"forward-only {eval_loss} training {train_loss} cpu {cpu_loss}")
    assert eval_loss == train_loss
    assert abs(eval_loss - cpu_loss) / cpu_loss < 1e-5
    # sampling: seeded, and greedy picks the reference's argmax
    prompt = np.array([1, 2, 3])
    a = g.sample(prompt, 5, temperature=1.0, top_k=10, seed=42)
    b = g.sample(prompt, 5, temperature=1.0, top_k=10, seed=42)
    assert np.array_equal(a, b) and np.array_equal(a[:3], prompt)
    greedy = g.sample(prompt, 1, temperature=0.0)
    xx = np.zeros((1, 3), dtype=int) + prompt
    _, logits, _ = ref.forward(params, RCFG, xx, xx)
    assert greedy[3] == np.argmax(logits[0, -1, :CFG["vocab_size"]])
    # a GPU checkpoint loads into the CPU trainer bit for bit, and back
    g.adamw(1e-2, 0.1, 1.0, 1)
    g.write_checkpoint(str(tmp_path), 1, 0, 5)
    gpt.commit_checkpoint(str(tmp_path), 1)
    c = gpt.Model(CFG, 0, 2, B, T, 1)
    assert c.read_checkpoint(str(tmp_path), 1) == (1, 0, 5)
    g2 = gpt_cuda_fp32.Model(CFG, 0, 2, B, T, 1)
    g2.read_checkpoint(str(tmp_path), 1)
    for name, v in g.params().items():
        assert np.array_equal(c.params()[name], v), name
        assert np.array_equal(g2.params()[name], v), name
    # and the resumed GPU model continues exactly like the original
    for mdl in (g, g2):
        mdl.run(step_ops(gpt_cuda_fp32, 2), x, y)
        mdl.sum_wte_grads()
        mdl.adamw(1e-2, 0.1, 1.0, 2)
    for name, v in g.params().items():
        assert np.array_equal(g2.params()[name], v), name


# -----------------------------------------------------------------------------
# bf16 build against the CPU trainer


def bf16_compare(params, data, cfg, b, t, label):
    loss_c, grads_c, _, _ = one_step(gpt, params, data, cfg, b, t)
    loss_g, grads_g, _, _ = one_step(gpt_cuda, params, data, cfg, b, t)
    print(f"{label}: loss gpu {loss_g:.6f} cpu {loss_c:.6f} rel {abs(loss_g - loss_c) / loss_c:.2e}")
    bad = []
    for name in ref.PARAM_NAMES:
        cs, re_ = cosine(grads_g[name], grads_c[name]), rel_err(grads_g[name], grads_c[name])
        print(f"  {name:9s} cosine {cs:.6f}  rel err {re_:.2e}")
        if cs < 0.99 or re_ > 0.15:
            bad.append(f"{name} (cosine {cs:.4f}, rel err {re_:.2e})")
    return loss_g, loss_c, grads_g, bad


@needs_gpu
@pytest.mark.parametrize("attn", ["mma", "mma_sync", "simple"])
def test_bf16_one_step_close_to_cpu(attn, monkeypatch):
    """Head size 64 and T = 80: the tensor-core attention (cp.async-pipelined by
    default, mma_sync without the pipelining) or the simple one, in bf16."""
    if attn != "mma":
        monkeypatch.setenv("GPT_ATTN", attn)
    params = gentle_params(3, RCFG64)
    data = batches(4, 2, CFG64, B64, T64)
    loss_g, loss_c, _, bad = bf16_compare(params, data, CFG64, B64, T64, f"bf16 attention={attn}")
    assert abs(loss_g - loss_c) / loss_c < 2e-2
    assert not bad, "gradients off: " + ", ".join(bad)


@needs_gpu
@pytest.mark.parametrize("variant", ["mma", "mma_sync"])
def test_bf16_tensor_core_attention_matches_simple_kernel(variant, monkeypatch):
    """The mma kernels against the simple fp32 kernels, same bf16 inputs otherwise;
    T = 200 (four query blocks, the last partial)."""
    if variant != "mma":
        monkeypatch.setenv("GPT_ATTN", variant)
    params = gentle_params(13, RCFG64)
    T200 = 200
    data = batches(14, 1, CFG64, B64, T200)
    _, grads_mma, _, _ = one_step(gpt_cuda, params, data, CFG64, B64, T200)
    loss_mma = model(gpt_cuda, params, CFG64, B64, T200).run(np.array([(gpt.FWD, 0)]), *stack(data),
                                                             training=False)
    monkeypatch.setenv("GPT_ATTN", "simple")
    _, grads_simple, _, _ = one_step(gpt_cuda, params, data, CFG64, B64, T200)
    loss_simple = model(gpt_cuda, params, CFG64, B64, T200).run(np.array([(gpt.FWD, 0)]), *stack(data),
                                                                 training=False)
    print(f"{variant}: loss {loss_mma:.6f}, simple kernel {loss_simple:.6f}")
    assert abs(loss_mma - loss_simple) / loss_simple < 5e-3
    for name in ("qkvw", "qkvb", "ln1w", "wpe", "wte"):
        cs = cosine(grads_mma[name], grads_simple[name])
        print(f"  {name:9s} cosine {cs:.6f} rel err {rel_err(grads_mma[name], grads_simple[name]):.2e}")
        assert cs > 0.999, name


@needs_gpu
def test_bf16_odd_shape_close_to_cpu():
    """The awkward shape (C = 36, head size 9, V = 67) also runs in bf16."""
    params = gentle_params(21, RCFG)
    data = batches(22, 2)
    loss_g, loss_c, _, bad = bf16_compare(params, data, CFG, B, T, "bf16 odd shape")
    assert abs(loss_g - loss_c) / loss_c < 2e-2
    assert not bad, "gradients off: " + ", ".join(bad)


# -----------------------------------------------------------------------------
# pipelines on one GPU over sockets, and NCCL


def gpipe(mod, S: int, m: int) -> list:
    """GPipe-like op lists: all forwards, then backward (input, weight) per micro-batch."""
    ranks = []
    for r in range(S):
        ops = []
        for mb in range(m):
            if r > 0:
                ops.append((mod.RECV_ACT, mb))
            ops.append((mod.FWD, mb))
            if r < S - 1:
                ops.append((mod.SEND_ACT, mb))
        for mb in range(m):
            if r < S - 1:
                ops.append((mod.RECV_GRAD, mb))
            ops.append((mod.BWD_INPUT, mb))
            if r > 0:
                ops.append((mod.SEND_GRAD, mb))
            ops.append((mod.BWD_WEIGHT, mb))
        ranks.append(np.array(ops))
    return ranks, [m] * S


def library_schedule(name):
    def make(mod, S, m):
        import pipeline as P
        ranks = P.schedule(name, S, m)
        held = P.validate(ranks, m).peak_held
        return [np.array([(op.kind, op.mb) for op in r]) for r in ranks], list(held)
    return make


def run_pipeline(mod, cfg, splits, params, data, steps, m, b, t, schedule, lr=3e-3):
    """Each stage in its own thread, linked by socketpairs; returns losses, norms, params, wte copies."""
    S, L = len(splits), cfg["num_layers"]
    ranks, held = schedule(mod, S, m)
    stages = []
    for (lo, hi), activation_buffers in zip(splits, held):
        st = mod.Model(cfg, lo, hi, b, t, max(1, activation_buffers))
        names = st.params().keys()
        st.set_params({k: v if k in ("wte", "wpe", "lnfw", "lnfb") else v[lo:hi]
                       for k, v in params.items() if k in names})
        stages.append(st)
    links = [socket.socketpair() for _ in range(S - 1)]
    tied = socket.socketpair() if S > 1 else None
    for i, st in enumerate(stages):
        prev = links[i - 1][1].fileno() if i > 0 else -1
        nxt = links[i][0].fileno() if i < S - 1 else -1
        tie = (tied[0] if i == 0 else tied[1]).fileno() if tied and i in (0, S - 1) else -1
        st.set_peers(prev, nxt, tie, 20.0)
    losses, norms = [], []
    try:
        for step in range(steps):
            x, y = stack(data[step * m:(step + 1) * m])
            out, errors = [None] * S, []

            def work(i):
                try:
                    loss = stages[i].run(ranks[i], x if i == 0 else None, y if i == S - 1 else None)
                    stages[i].sum_wte_grads()
                    out[i] = (loss, stages[i].grad_norm_parts())
                except Exception as e:  # reported below, with the rank
                    errors.append(f"rank {i}: {e}")

            threads = [threading.Thread(target=work, args=(i,)) for i in range(S)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(90)
            assert not any(th.is_alive() for th in threads), "a stage hung"
            assert not errors, "; ".join(errors)
            parts = sum(o[1] for o in out)  # disjoint entries: exact
            norm = mod.norm_from_parts(parts, L)
            for st in stages:
                st.adamw(lr, 0.1, 1.0 / norm if norm > 1.0 else 1.0, step + 1)
            losses.append(out[-1][0])
            norms.append(norm)
        got = [st.params() for st in stages]
        merged = {}
        for name in got[0].keys() | got[-1].keys():
            pieces = [g[name] for g in got if name in g]
            if name in ("wte", "wpe", "lnfw", "lnfb"):
                merged[name] = pieces[0].copy()
            else:
                merged[name] = np.concatenate(pieces, axis=0)
        wte_copies = [got[0]["wte"].copy(), got[-1]["wte"].copy()]
    finally:
        for a, c in links + ([tied] if tied else []):
            a.close()
            c.close()
    return losses, norms, merged, wte_copies


SPLITS = {1: [(0, 4)], 2: [(0, 2), (2, 4)], 4: [(0, 1), (1, 2), (2, 3), (3, 4)]}


@needs_gpu
@pytest.mark.parametrize("build", ["bf16", "fp32"])
@pytest.mark.parametrize("sched", ["gpipe", "1f1b", "zb-h1"])
def test_pipeline_stages_match_one_stage_bitwise(build, sched):
    mod = gpt_cuda if build == "bf16" else gpt_cuda_fp32
    schedule = gpipe if sched == "gpipe" else library_schedule(sched)
    if sched != "gpipe":
        try:
            schedule(mod, 2, 2)
        except Exception as e:
            pytest.skip(f"pipeline.schedule('{sched}') unavailable: {e}")
    params = gentle_params(31, RCFGP)
    steps, m = 2, 3
    data = batches(32, steps * m, CFGP, B64, T64)
    base = run_pipeline(mod, CFGP, SPLITS[1], params, data, steps, m, B64, T64, gpipe)
    print(f"{build} {sched} 1 stage: losses {base[0]} norms {base[1]}")
    for S in (2, 4):
        got = run_pipeline(mod, CFGP, SPLITS[S], params, data, steps, m, B64, T64, schedule)
        print(f"{build} {sched} {S} stages: losses {got[0]} norms {got[1]}")
        assert got[0] == base[0], f"{S} stages: losses differ"
        assert got[1] == base[1], f"{S} stages: grad norms differ"
        for name, v in base[2].items():
            assert np.array_equal(got[2][name], v), f"{S} stages: {name} differs"
        assert np.array_equal(got[3][0], got[3][1]), "the two copies of wte drifted apart"


@needs_gpu
def test_fp32_replicas_over_sockets_match_cpu_replicas():
    """Two data-parallel replicas of the fp32 CUDA trainer, their gradients
    all-reduced over the socket ring through host memory, against two CPU
    replicas: test_fp32_three_adamw_steps_match_cpu's tolerances."""
    from tests.test_data_parallel import train_replicas
    params = rough_params(7)
    steps, m, D = 3, 1, 2
    data = batches(8, steps * m * D)
    cpu, hist_c = train_replicas(params, data, steps, m, 1e-2, D, 0)
    gpu, hist_g = train_replicas(params, data, steps, m, 1e-2, D, 0, trainer=gpt_cuda_fp32)
    for (lc, nc), (lg, ng) in zip(hist_c, hist_g):
        assert abs(lg - lc) / lc < 1e-5
        assert abs(ng - nc) / nc < 1e-4
    for name, c in cpu[0].params().items():
        g = gpu[1].params()[name]
        assert np.array_equal(g, gpu[0].params()[name]), f"the GPU replicas drifted apart in {name}"
        assert np.quantile(np.abs(g - c), 0.999) < 1e-5, name
    sent = gpu[0].bytes_moved()["data_parallel"][0]
    P = sum(v.size for v in gpu[0].params().values())
    assert sent == steps * 4 * 2 * (D - 1) * P // D, "an all-reduce sends 2(D-1)/D * P values a step"


@needs_gpu
@pytest.mark.parametrize("build", ["fp32", "bf16"])
def test_zero1_replicas_over_sockets_are_bitwise_zero0(build, tmp_path):
    """--zero 1 on the GPU (gradients reduce-scattered over the socket ring,
    AdamW on each replica's shard, parameters all-gathered) against zero 0 for
    the same D = 2: the ring's sums are canonical and the grad-norm parts are
    per replica chunk in both, so losses, norms, parameters and the
    checkpoint files (each replica writing its chunks under zero 1) are
    bitwise the same; the ring moves as many bytes, and m and v are half."""
    from tests.test_data_parallel import train_replicas
    mod = gpt_cuda_fp32 if build == "fp32" else gpt_cuda
    params = rough_params(7)
    steps, m, D = 3, 1, 2
    data = batches(8, steps * m * D)
    runs = {zero: train_replicas(params, data, steps, m, 1e-2, D, zero, trainer=mod) for zero in (0, 1)}
    (base, hist0), (got, hist1) = runs[0], runs[1]
    print(f"{build} zero 0: {hist0}\n{build} zero 1: {hist1}")
    assert hist1 == hist0, "losses or grad norms differ"
    for name, v in base[0].params().items():
        for d in range(D):
            assert np.array_equal(got[d].params()[name], v), f"replica {d}: {name} differs"
    assert got[0].bytes_moved()["data_parallel"] == base[0].bytes_moved()["data_parallel"]
    P = sum(v.size for v in base[0].params().values())
    shard = got[0].memory_bytes()["optimizer"]
    assert shard < base[0].memory_bytes()["optimizer"] and shard >= 8 * P // D, shard
    files = {zero: checkpoint_files(mod, models, str(tmp_path / f"zero{zero}"), steps)
             for zero, (models, _) in runs.items()}
    assert files[1][0] == files[0][0], "the model files differ"
    assert files[1][1] == files[0][1], "the optimizer state files differ"
    # each replica reads back the whole parameters and its own shard of m and v
    fresh, keep = read_replicas(mod, str(tmp_path / "zero1"), steps, D, 1)
    for d in range(D):
        for name, v in base[0].params().items():
            assert np.array_equal(fresh[d].params()[name], v), f"replica {d}: {name} after the read"
    del keep


def checkpoint_files(mod, models, ckpt: str, steps: int) -> list[bytes]:
    """Every replica's stage_write_checkpoint into ckpt, committed: the model and state files' bytes."""
    os.makedirs(ckpt)
    for model in models:
        model.write_checkpoint(ckpt, steps, 0, 0)
    mod.commit_checkpoint(ckpt, steps)
    return [Path(ckpt, f"{kind}_{steps:08d}.bin").read_bytes() for kind in ("model", "state")]


def read_replicas(mod, ckpt: str, steps: int, D: int, zero: int):
    """D fresh whole-model replicas of mod on a ring (that zero stage) that
    read the checkpoint of step `steps` (under --zero 3 their chunks, then
    gathered whole); returns them and the sockets to keep."""
    from tests.test_data_parallel import ring_of
    from tests.test_model import CFG as DCFG, B as DB, T as DT
    fresh = [mod.Model(DCFG, 0, DCFG["num_layers"], DB, DT, 1) for _ in range(D)]
    keep = ring_of(fresh, zero)
    for model in fresh:
        assert model.read_checkpoint(ckpt, steps)[0] == steps
    if zero == 3:
        unshard_all(fresh)
    return fresh, keep


def fsdp_replicas(mod, params, data, steps: int, m: int, lr: float, D: int):
    """train_replicas (tests/test_data_parallel.py) under --zero 3: D
    whole-model replicas of mod on a socket ring, each running its FSDP op
    list (pipeline.grid_schedule) with the validator's buffers. Returns the
    models (sharded), (loss, norm) per step and the sockets to keep."""
    import pipeline
    from tests.test_data_parallel import ring_of, step_replicas
    from tests.test_model import CFG as DCFG, B as DB, T as DT
    L = DCFG["num_layers"]
    models = [mod.Model(DCFG, 0, L, DB, DT, 1) for _ in range(D)]
    for model in models:
        model.set_params(params)
    keep = ring_of(models, 3)
    ranks = pipeline.grid_schedule("1f1b", 1, D, m, [L + 1], 3)[0]
    peaks = pipeline.validate_grid(ranks, 1, m, buckets=[L + 1], zero=3)
    for d, model in enumerate(models):
        model.set_layer_buffers(peaks.peak_gathered[d], peaks.peak_grads[d])
    ops = [np.array([(op.kind, op.mb, op.part) for op in r]) for r in ranks]
    history = step_replicas(models, ops, np.zeros((0, 3)), data, steps, m, lr, trainer=mod)
    return models, history, keep


def unshard_all(models) -> None:
    """stage_unshard_params on every replica at once (they gather together)."""
    from tests.test_pipeline import run_threads
    assert run_threads([model.unshard_params for model in models]) == [None] * len(models)


@needs_gpu
@pytest.mark.parametrize("build", ["fp32", "bf16"])
def test_zero3_replicas_over_sockets_are_bitwise_zero0(build, tmp_path):
    """--zero 3 on the GPU (each layer gathered into a device buffer for its
    forward and its backward, its gradient summed over the micro-batches in a
    buffer and reduce-scattered into the shard, AdamW on the shard) against
    zero 0 for the same D = 2 and two micro-batches: the ring's sums are
    canonical and the grad-norm parts are per replica chunk in both, so
    losses, norms, the checkpoint files (each replica writing its chunks)
    and the parameters once unsharded are bitwise the same; a sharded read
    of those files resumes the shards."""
    from tests.test_data_parallel import train_replicas
    mod = gpt_cuda_fp32 if build == "fp32" else gpt_cuda
    params = rough_params(7)
    steps, m, D = 3, 2, 2
    data = batches(8, steps * m * D)
    base, hist0 = train_replicas(params, data, steps, m, 1e-2, D, 0, trainer=mod)
    got, hist3, keep = fsdp_replicas(mod, params, data, steps, m, 1e-2, D)
    print(f"{build} zero 0: {hist0}\n{build} zero 3: {hist3}")
    assert hist3 == hist0, "losses or grad norms differ"
    assert got[0].params() == {}, "a sharded stage has no whole tensors to show"
    P = sum(v.size for v in base[0].params().values())
    mem = got[0].memory_bytes()
    assert mem["params"] < base[0].memory_bytes()["params"] and mem["params"] >= 4 * P // D, mem
    assert mem["gathered"] > 0 and mem["grad_buffers"] > 0, mem
    files = {zero: checkpoint_files(mod, models, str(tmp_path / f"zero{zero}"), steps)
             for zero, models in ((0, base), (3, got))}
    assert files[3][0] == files[0][0], "the model files differ"
    assert files[3][1] == files[0][1], "the optimizer state files differ"
    unshard_all(got)
    for name, v in base[0].params().items():
        for d in range(D):
            assert np.array_equal(got[d].params()[name], v), f"replica {d}: {name} differs"
    # sharded replicas read back their chunks of the parameters and of m and v
    fresh, keep_fresh = read_replicas(mod, str(tmp_path / "zero3"), steps, D, 3)
    for d in range(D):
        for name, v in base[0].params().items():
            assert np.array_equal(fresh[d].params()[name], v), f"replica {d}: {name} after the read"
    del keep, keep_fresh


@needs_gpu
def test_nccl_send_recv_to_self():
    """A one-rank communicator: the grouped ncclSend/ncclRecv of the executor, fp32 and bf16,
    then ncclAllReduce, ncclReduceScatter and ncclAllGather, the data-parallel collectives."""
    lib = ctypes.CDLL(gpt_cuda.__file__)
    lib.gpt_last_error.restype = ctypes.c_char_p
    rc = lib.gpt_cuda_nccl_selftest(1 << 20)
    assert rc == 0, lib.gpt_last_error().decode()


@needs_gpu
def test_nccl_executor_loopback_matches_plain_run():
    """A stage on a one-rank NCCL communicator runs an op list whose send and receive
    go to itself (SEND_ACT 0 lands in d(output) of mb 0, which the loss's backward
    overwrites), and computes exactly what the plain op list computes."""
    params = gentle_params(41, RCFG64)
    data = batches(42, 1, CFG64, B64, T64)
    x, y = stack(data)
    plain = model(gpt_cuda, params, CFG64, B64, T64)
    loss_p = plain.run(step_ops(gpt_cuda, 1), x, y)
    loop = model(gpt_cuda, params, CFG64, B64, T64)
    loop.set_nccl(gpt_cuda.nccl_unique_id(), 1, 0)
    ops = np.array([(gpt.FWD, 0), (gpt.SEND_ACT, 0), (gpt.RECV_GRAD, 0), (gpt.BWD_INPUT, 0), (gpt.BWD_WEIGHT, 0)])
    loss_l = loop.run(ops, x, y)
    print(f"loss plain {loss_p} loopback {loss_l}")
    assert loss_l == loss_p
    gp, gl = plain.grads(), loop.grads()
    for name in gp:
        assert np.array_equal(gp[name], gl[name]), name


@needs_gpu
def test_zero1_over_one_rank_nccl_matches_plain_run():
    """--zero 1's NCCL path (each bucket packed into its slots, reduce-scattered
    and all-gathered in place) on a one-rank communicator, the one that one
    GPU allows: two steps equal a plain run's bitwise (gradients, norms,
    parameters; the sharded AdamW is the CUDA C kernel, the plain one may be
    its PTX twin, which is bitwise the same)."""
    params = gentle_params(41, RCFG64)
    data = batches(42, 2, CFG64, B64, T64)
    buckets = CFG64["num_layers"] + 1
    compute = np.hstack([step_ops(gpt_cuda, 1), np.full((3, 1), -1)])
    scatter = np.vstack([compute, [(gpt_cuda.REDUCE_SCATTER, -1, b) for b in range(buckets)]])
    gather = np.array([(gpt_cuda.ALLGATHER, -1, b) for b in range(buckets)])
    plain = model(gpt_cuda, params, CFG64, B64, T64)
    sharded = model(gpt_cuda, params, CFG64, B64, T64)
    sharded.set_replicas(-1, -1, 0, 1, 1)
    sharded.set_replica_nccl(gpt_cuda.nccl_unique_id(), 1, 0)
    assert sharded.memory_bytes()["grad_buffers"] > 0, "the packed buffer is counted"
    for step in range(2):
        x, y = stack(data[step:step + 1])
        losses = [plain.run(compute, x, y), sharded.run(scatter, x, y)]
        norms = []
        for st in (plain, sharded):
            st.sum_wte_grads()
            norms.append(gpt_cuda.norm_from_parts(st.grad_norm_parts(), CFG64["num_layers"]))
        print(f"step {step + 1}: losses {losses} norms {norms}")
        assert losses[1] == losses[0] and norms[1] == norms[0]
        gp, gs = plain.grads(), sharded.grads()
        for name in gp:
            assert np.array_equal(gs[name], gp[name]), f"step {step + 1}: d{name}"
        for st in (plain, sharded):
            st.adamw(3e-3, 0.1, 1.0 / norms[0] if norms[0] > 1.0 else 1.0, step + 1)
        sharded.run(gather, None, None, False)
        pp, ps = plain.params(), sharded.params()
        for name in pp:
            assert np.array_equal(ps[name], pp[name]), f"step {step + 1}: {name}"


@needs_gpu
def test_zero3_over_one_rank_nccl_matches_plain_run():
    """--zero 3's NCCL path (each layer's bucket gathered into its device
    buffer through the packed slots, its gradient reduce-scattered into the
    shard) on a one-rank communicator, the one that one GPU allows: two steps
    equal a plain run's bitwise (losses, grad-norm parts, and the parameters
    once unsharded; the sharded AdamW is the CUDA C kernel, the plain one may
    be its PTX twin, which is bitwise the same)."""
    import pipeline
    params = gentle_params(41, RCFG64)
    data = batches(42, 2, CFG64, B64, T64)
    L = CFG64["num_layers"]
    # replica 0's list of two (the validator wants a ring): one replica's is the same
    ranks = pipeline.grid_schedule("1f1b", 1, 2, 1, [L + 1], 3)[0]
    peaks = pipeline.validate_grid(ranks, 1, 1, buckets=[L + 1], zero=3)
    fsdp = np.array([(op.kind, op.mb, op.part) for op in ranks[0]])
    compute = np.hstack([step_ops(gpt_cuda, 1), np.full((3, 1), -1)])
    plain = model(gpt_cuda, params, CFG64, B64, T64)
    sharded = model(gpt_cuda, params, CFG64, B64, T64)
    sharded.set_replicas(-1, -1, 0, 1, 3)
    sharded.set_layer_buffers(peaks.peak_gathered[0], peaks.peak_grads[0])
    sharded.set_replica_nccl(gpt_cuda.nccl_unique_id(), 1, 0)
    assert sharded.memory_bytes()["gathered"] > 0 and sharded.memory_bytes()["grad_buffers"] > 0
    for step in range(2):
        x, y = stack(data[step:step + 1])
        losses = [plain.run(compute, x, y), sharded.run(fsdp, x, y)]
        parts = []
        for st in (plain, sharded):
            st.sum_wte_grads()
            parts.append(st.grad_norm_parts().copy())
        norm = gpt_cuda.norm_from_parts(parts[0], L)
        print(f"step {step + 1}: losses {losses} norm {norm}")
        assert losses[1] == losses[0]
        assert np.array_equal(parts[1], parts[0]), f"step {step + 1}: grad-norm parts differ"
        for st in (plain, sharded):
            st.adamw(3e-3, 0.1, 1.0 / norm if norm > 1.0 else 1.0, step + 1)
    sharded.unshard_params()
    pp, ps = plain.params(), sharded.params()
    for name in pp:
        assert np.array_equal(ps[name], pp[name]), name


# -----------------------------------------------------------------------------
# determinism and bad input


@needs_gpu
def test_two_identical_runs_are_bitwise_equal():
    params = gentle_params(51, RCFG64)
    data = batches(52, 6, CFG64, B64, T64)
    runs = []
    for _ in range(2):
        mdl, hist = train(gpt_cuda, params, data, 3, 2, CFG64, B64, T64, lr=3e-3)
        runs.append((hist, {k: v.copy() for k, v in mdl.params().items()}))
    print("history", runs[0][0])
    assert runs[0][0] == runs[1][0]
    for name in runs[0][1]:
        assert np.array_equal(runs[0][1][name], runs[1][1][name]), name


@needs_gpu
def test_d12_shape_is_deterministic():
    """GPT-2 124M at B=8 T=1024 (the real GEMM and attention shapes), 2 steps twice."""
    cfg = gpt_cuda.config_from_name("d12")
    rng = np.random.default_rng(61)
    x = rng.integers(0, cfg["vocab_size"], (2, 1, 8, 1024))
    y = rng.integers(0, cfg["vocab_size"], (2, 1, 8, 1024))
    results = []
    for _ in range(2):
        mdl = gpt_cuda.Model(cfg, 0, 12, 8, 1024, 1)
        mdl.init(1337)
        hist = []
        for step in range(2):
            t0 = time.perf_counter()
            loss = mdl.run(step_ops(gpt_cuda, 1), x[step], y[step])
            mdl.sum_wte_grads()
            norm = gpt_cuda.norm_from_parts(mdl.grad_norm_parts(), 12)
            mdl.adamw(6e-4, 0.1, 1.0 / norm if norm > 1 else 1.0, step + 1)
            hist.append((loss, norm, round(time.perf_counter() - t0, 3)))
        results.append(hist)
        del mdl
    print("run 1", results[0], "\nrun 2", results[1])
    assert [h[:2] for h in results[0]] == [h[:2] for h in results[1]]
    assert abs(results[0][0][0] - np.log(cfg["vocab_size"])) < 0.5, "initial loss should be near ln(V)"


@needs_gpu
def test_out_of_memory_says_how_much():
    cfg = gpt_cuda.config_from_name("tiny")
    with pytest.raises(gpt_cuda.GPTError) as e:
        gpt_cuda.Model(cfg, 0, cfg["num_layers"], 16000, 1024, 1)
    print(e.value)
    assert "out of GPU memory" in str(e.value) and "MiB" in str(e.value) and "free" in str(e.value)
    # the device is still usable afterwards
    mdl = model(gpt_cuda, None, CFG, B, T)
    mdl.init(1)
    assert np.isfinite(mdl.run(np.array([(gpt.FWD, 0)]), *stack(batches(1, 1)), training=False))


@needs_gpu
def test_bad_tokens_fail_cleanly():
    mdl = model(gpt_cuda, None)
    mdl.init(1)
    x, y = stack(batches(2, 1))
    bad = x.copy()
    bad[0, 0, 3] = CFG["vocab_size"]
    with pytest.raises(gpt_cuda.GPTError, match="outside the vocabulary"):
        mdl.run(step_ops(gpt_cuda, 1), bad, y)
    assert np.isfinite(mdl.run(step_ops(gpt_cuda, 1), x, y))
    with pytest.raises(gpt_cuda.GPTError, match="micro-batch 1 of only 1"):
        mdl.run(np.array([(gpt.FWD, 0), (gpt.BWD_INPUT, 1)]), x, y)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (20240520, 1, len(tokens))
    path.write_bytes(header.tobytes() + tokens.astype(np.uint16).tobytes())


@needs_gpu
def test_standalone_binary_trains_and_profiles(tmp_path):
    binary = ROOT / "train_gpt_cu"
    if not binary.exists():
        pytest.skip("train_gpt_cu not built")
    rng = np.random.default_rng(71)
    write_shard(tmp_path / "train.bin", rng.integers(0, 50257, 20000))
    env = dict(os.environ, GPT_PROFILE="1")
    r = subprocess.run([str(binary), "-e", "tiny", "-b", "4", "-t", "64", "-n", "3", "-v", "0", "-g", "8",
                        "-i", str(tmp_path / "train.bin"), "-o", str(tmp_path), "-k", "3"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    assert "step 3/3" in r.stdout and "sample:" in r.stdout
    assert "GPT_PROFILE" in r.stderr and "matmul fwd" in r.stderr
    assert (tmp_path / "DONE_00000003").exists()


# -----------------------------------------------------------------------------
# the long one last: bf16 GPT-2 124M tracks the fp32 CPU trainer


def track_data(cfg, b, t, n):
    """Shakespeare if prepared (or preparable), else a fixed synthetic token stream."""
    shard = ROOT / "data" / "shakespeare" / "shakespeare_train_000000.bin"
    if not shard.exists():
        try:
            from dev.data.prepare import prepare
            prepare(str(ROOT / "data"), "shakespeare", progress=False)
        except Exception as e:
            print(f"no shakespeare shard ({e}); using a synthetic stream")
    if shard.exists():
        loader = gpt.Loader(str(shard), b, t)
        return [loader.next() for _ in range(n)], "shakespeare"
    rng = np.random.default_rng(81)
    # a Zipf-like stream with repeated phrases, so there is something to learn
    phrases = [rng.zipf(1.3, 16) % 5000 for _ in range(200)]
    stream = np.concatenate([phrases[i] for i in rng.integers(0, 200, (n * b * t) // 16 + 2)])
    out = []
    for i in range(n):
        chunk = stream[i * b * t:(i + 1) * b * t + 1]
        out.append((chunk[:-1].reshape(b, t), chunk[1:].reshape(b, t)))
    return out, "synthetic"


def track_run(mod, cfg, data, steps, sched, budget_s=None):
    """Losses of steps of training from init(1337); None if the first step says budget_s will not do."""
    L = cfg["num_layers"]
    b, t = data[0][0].shape
    mdl = mod.Model(cfg, 0, L, b, t, 1)
    mdl.init(1337)
    hist = []
    t0 = time.perf_counter()
    for step in range(steps):
        x, y = data[step]
        loss = mdl.run(step_ops(mod, 1), x[None], y[None])
        mdl.sum_wte_grads()
        norm = mod.norm_from_parts(mdl.grad_norm_parts(), L)
        mdl.adamw(sched(step), 0.1, 1.0 / norm if norm > 1.0 else 1.0, step + 1)
        hist.append(loss)
        if step == 0 and budget_s is not None and (time.perf_counter() - t0) * steps > budget_s:
            print(f"  first step took {time.perf_counter() - t0:.1f} s: {steps} steps would not fit {budget_s:.0f} s")
            return None, time.perf_counter() - t0
    return hist, time.perf_counter() - t0


@needs_gpu
def test_bf16_d12_tracks_the_cpu_trainer_over_20_steps():
    """d12 (GPT-2 124M) at B=4 T=64 unless the CPU is too slow for the time budget
    (GPU_CHECK_TRACK_BUDGET_S, default 75 s for the CPU side): then d6, said in the output."""
    steps = int(os.environ.get("GPU_CHECK_TRACK_STEPS", "20"))
    budget = float(os.environ.get("GPU_CHECK_TRACK_BUDGET_S", "75"))
    b, t = 4, 64
    sched = lambda step: gpt.lr_at(step, 6e-4, 3, steps)  # noqa: E731
    for name in dict.fromkeys([os.environ.get("GPU_CHECK_TRACK_MODEL", "d12"), "d6"]):
        cfg = gpt.config_from_name(name)
        data, source = track_data(cfg, b, t, steps)
        c, secs = track_run(gpt, cfg, data, steps, sched, budget if name != "d6" else None)
        if c is None:
            print(f"  {name} is too slow on this CPU: falling back to d6")
            continue
        print(f"cpu-fp32 ({name}, {source}, {secs:.1f} s): " + " ".join(f"{v:.4f}" for v in c))
        g, secs = track_run(gpt_cuda, cfg, data, steps, sched)
        print(f"gpu-bf16 ({name}, {source}, {secs:.1f} s): " + " ".join(f"{v:.4f}" for v in g))
        break
    g, c = np.array(g), np.array(c)
    print(f"model {name}: abs diff per step: " + " ".join(f"{v:.4f}" for v in np.abs(g - c)))
    assert np.all(np.abs(g - c) < 0.1), "bf16 loss strays from fp32"
    assert abs(g[-1] - c[-1]) / c[-1] < 0.03
    assert c[-1] < c[0] and g[-1] < g[0], "no learning"


# -----------------------------------------------------------------------------
# train.py on the GPU


def run_train_py(*flags: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "train.py", "--device", "cuda", *flags], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
    print(r.stdout[-3000:], r.stderr[-3000:])
    assert r.returncode == 0, r.stderr
    return r


def step_lines(out: str) -> list[str]:
    import re
    return [re.sub(r" \| \d+ ms \| \d+ tok/s", "", l) for l in out.splitlines() if l.startswith(("step ", "val"))]


def test_train_py_flags_allow_zero1_and_zero3_on_cuda():
    """Before any GPU is needed: --device cuda takes --zero 1 and --zero 3,
    each with --dp 2 or more (the one refusal left, as on the CPU)."""
    import train
    for zero in (1, 3):
        train.check_grid_flags(train.parse_args(["--device", "cuda", "--dp", "2", "--zero", str(zero)]))
        with pytest.raises(train.UsageError, match=f"--zero {zero} shards over data-parallel replicas"):
            train.check_grid_flags(train.parse_args(["--device", "cuda", "--zero", str(zero)]))


@needs_gpu
def test_train_py_defaults_to_gpt2_on_the_gpu():
    r = run_train_py("--steps", "12", "--eval-every", "12", "--sample-tokens", "16")
    assert "model L=12 NH=12 C=768 | batch 32 x 1024 tokens" in r.stdout and "| cuda" in r.stdout
    losses = [float(l.split("loss ")[1].split()[0]) for l in r.stdout.splitlines() if l.startswith("step ")]
    assert losses[-1] < losses[0] - 1.0
    assert "sample:" in r.stdout and "val loss" in r.stdout


@needs_gpu
def test_train_py_stages_sharing_one_gpu_match_one_stage():
    flags = ["--model", "d6", "--batch-size", "8", "--seq-len", "128", "--micro-batches", "4", "--steps", "3",
             "--eval-every", "3", "--sample-tokens", "0"]
    one = run_train_py(*flags)
    two = run_train_py(*flags, "--stages", "2", "--schedule", "zb-h1")
    assert step_lines(two.stdout) == step_lines(one.stdout)
    assert "bubble: measured" in two.stdout


@needs_gpu
def test_train_py_zero1_replicas_sharing_one_gpu_match_zero0(tmp_path):
    """Two replicas on one GPU (sockets: NCCL refuses two ranks on one GPU):
    --zero 1's step lines and final checkpoint are bitwise --zero 0's."""
    flags = ["--model", "d6", "--batch-size", "8", "--seq-len", "128", "--micro-batches", "2", "--steps", "3",
             "--eval-every", "3", "--sample-tokens", "0", "--dp", "2"]
    runs = {}
    for zero in (0, 1):
        ckpt = tmp_path / f"zero{zero}"
        r = run_train_py(*flags, "--zero", str(zero), "--checkpoint-dir", str(ckpt))
        runs[zero] = (step_lines(r.stdout), (ckpt / "model_00000003.bin").read_bytes(),
                      (ckpt / "state_00000003.bin").read_bytes())
    assert runs[1] == runs[0]


@needs_gpu
def test_train_py_zero3_sharing_one_gpu_matches_zero0_and_resumes(tmp_path):
    """Ranks on one GPU (sockets: NCCL refuses two ranks on one GPU): --zero
    3's step lines, final checkpoint and sample (from the parameters it
    gathers once at the end) are bitwise --zero 0's, for 1 stage x 2 replicas
    and for 2 x 2, where the comm thread's gathers run beside the pipeline's
    sends; and the 2 x 2 run's checkpoint of step 2 resumes under zero 0, one
    stage, to the same step 3."""
    flags = ["--model", "d6", "--batch-size", "8", "--seq-len", "128", "--micro-batches", "2", "--steps", "3",
             "--eval-every", "3", "--sample-tokens", "8", "--dp", "2"]

    def run(ckpt, *extra: str):
        r = run_train_py(*flags, "--checkpoint-dir", str(ckpt), *extra)
        assert "sample:" in r.stdout, r.stdout
        return (step_lines(r.stdout), r.stdout.split("sample:")[1], (ckpt / "model_00000003.bin").read_bytes(),
                (ckpt / "state_00000003.bin").read_bytes())

    zero0 = run(tmp_path / "zero0", "--zero", "0")
    assert run(tmp_path / "zero3", "--zero", "3") == zero0
    grid = tmp_path / "grid"
    assert run(grid, "--zero", "3", "--stages", "2", "--checkpoint-every", "1") == zero0
    (grid / "DONE_00000003").unlink()
    lines, sample, model, state = run(grid, "--zero", "0", "--resume")
    assert lines == zero0[0][-len(lines):] and (sample, model, state) == zero0[1:]
