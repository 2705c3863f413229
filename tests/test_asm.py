"""The assembly GEMMs of asm/ (asm/sgemm.h around asm/sgemm_avx512.S and
asm/sgemm_avx2.S), each kernel this CPU runs, forced with GPT_ASM.

Through build/test_sgemm: every product against a float64 triple loop on
random data, on shapes chosen to miss every tile and block size (8x48 and
4x24 tiles, KC = 384 and 256, MC = 256 on L2s of 768 KiB and more, NC = 768)
and on dimensions of 1;
the backward's strided A in every layout, with and without accumulation;
bitwise the same output for 1, 2 and 3 threads. Through the Python module: a
few training steps on each kernel match the portable C path (GPT_NO_ASM=1)
within fp32 tolerance, and are bitwise the same for 1 and 2 threads.

The AVX2 kernel runs on AVX-512 machines too, so some assembly is tested on
every x86-64 CPU made since 2015; a kernel the CPU cannot run skips, saying
so. `pytest -rA tests/test_asm.py` shows test_kernels_this_cpu_runs's list."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DRIVER = os.path.join(ROOT, "build", "test_sgemm")
KERNELS = ["avx512", "avx2"]  # asm/sgemm.h's sg_kernels, best first
NEEDS = {"avx512": "AVX-512 F", "avx2": "AVX2 and FMA"}


def driver_env(kernel: str | None = None, threads: int | None = None, no_asm: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("GPT_NO_ASM", None)
    env.pop("GPT_ASM", None)
    if kernel:
        env["GPT_ASM"] = kernel
    if no_asm:
        env["GPT_NO_ASM"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def cpu_runs() -> dict:
    """{kernel: whether this CPU runs it}, as the driver sees it; every kernel when the driver is missing,
    so that every test fails on that."""
    if not os.path.exists(DRIVER):
        return {k: True for k in KERNELS}
    r = subprocess.run([DRIVER, "kernels"], capture_output=True, text=True, env=driver_env(), timeout=30)
    return {name: flag == "1" for name, flag in (line.split() for line in r.stdout.splitlines())}


RUNS = cpu_runs()
if not any(RUNS.values()):
    pytest.skip("this CPU (or OS) has neither AVX-512 nor AVX2 with FMA: no assembly kernel runs here, "
                "the GEMMs take the portable C path", allow_module_level=True)


@pytest.fixture(params=KERNELS)
def kernel(request) -> str:
    """Each asm kernel in turn; one the CPU cannot run skips with the reason."""
    k = request.param
    if not RUNS.get(k):
        pytest.skip(f"this CPU lacks {NEEDS[k]}: the {k} kernel cannot run here")
    return k


@pytest.fixture(autouse=True)
def driver_built():
    assert os.path.exists(DRIVER), "build/test_sgemm is missing: run `make`"


def run_driver(kernel: str, *args, threads: int = 2) -> dict:
    r = subprocess.run([DRIVER, *map(str, args)], capture_output=True, text=True,
                       env=driver_env(kernel, threads), timeout=120)
    assert r.returncode == 0, r.stderr
    f = r.stdout.split()
    out = dict(zip(f[0::2], f[1::2]))
    return {"maxerr": float(out["maxerr"]), "tol": float(out["tol"]), "hash": out["hash"]}


def check(kernel: str, *args, threads: int = 2) -> str:
    r = run_driver(kernel, *args, threads=threads)
    assert r["maxerr"] <= r["tol"], f"{kernel} {args}: error {r['maxerr']:.3g} over the bound {r['tol']:.3g}"
    return r["hash"]


def test_kernels_this_cpu_runs():
    """Which kernels the tests below ran (printed; pytest -rA shows it), and that the default is the best."""
    ran = [k for k in KERNELS if RUNS[k]]
    print(f"asm kernels tested on this CPU: {', '.join(ran)}; skipped: "
          f"{', '.join(k for k in KERNELS if not RUNS[k]) or 'none'}")
    r = subprocess.run([DRIVER, "avail"], capture_output=True, text=True, env=driver_env(), timeout=30)
    assert r.returncode == 0 and r.stdout.split()[:2] == ["kernel", ran[0]], r.stdout + r.stderr


# (M, K, N): whole tiles of both kernels, one past them, one short, dimensions
# of 1, K across the KC blocks (256, 384), M across MC (256), N across NC
# (768), and the LM head's N with small M
SHAPES = [
    (8, 384, 48), (9, 385, 49), (7, 383, 47), (4, 256, 24), (5, 257, 25), (3, 255, 23),
    (1, 1, 1), (1, 768, 1), (5, 1, 7), (256, 1, 96), (1, 64, 50304), (3, 770, 50304),
    (13, 1000, 100), (63, 800, 770), (300, 50, 20), (515, 400, 97), (40, 3, 1600), (17, 769, 1),
    (1, 1, 3000),
]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [0, 1])
def test_nt_matches_reference(kernel, M, K, N, bias):
    check(kernel, "nt", M, K, N, bias, 1000 * M + N + bias)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("layout,acc", [("row", 0), ("col", 1), ("row", 1), ("col", 0)])
def test_nn_matches_reference(kernel, M, K, N, layout, acc):
    check(kernel, "nn", M, K, N, layout, acc, 7 * M + K + acc)


# the backward's tall products: many rows split between threads, few columns
@pytest.mark.parametrize("M,K,N", [(50304, 3, 8), (2500, 17, 1), (777, 256, 130)])
def test_nn_tall(kernel, M, K, N):
    check(kernel, "nn", M, K, N, "col", 1, 5)


@pytest.mark.parametrize("layout", ["rowpad", "colpad", "gen"])
@pytest.mark.parametrize("M,K,N", [(13, 70, 100), (9, 385, 49), (1, 5, 1)])
def test_nn_other_strides(kernel, M, K, N, layout):
    check(kernel, "nn", M, K, N, layout, 1, 3)


# every way the output can be split: 1, 2, 3 threads; edges in every direction
DET = [("nt", 515, 800, 97, 1, 11), ("nt", 256, 768, 3072, 1, 12), ("nt", 3, 64, 50304, 0, 13),
       ("nn", 256, 1000, 770, "row", 0, 14), ("nn", 2307, 256, 145, "col", 1, 15),
       ("nn", 50, 13, 3001, "gen", 1, 16)]


@pytest.mark.parametrize("args", DET, ids=[f"{a[0]}-{a[1]}x{a[2]}x{a[3]}" for a in DET])
def test_bitwise_same_for_any_thread_count(kernel, args):
    hashes = {t: check(kernel, *args, threads=t) for t in (1, 2, 3)}
    assert len(set(hashes.values())) == 1, hashes


def avail(**env) -> subprocess.CompletedProcess:
    return subprocess.run([DRIVER, "avail"], capture_output=True, text=True, env=env, timeout=30)


def test_gpt_no_asm_turns_it_off():
    assert avail(**driver_env(no_asm=True)).stdout.strip() == "kernel none (portable C)"
    assert avail(**driver_env(kernel="avx2", no_asm=True)).stdout.strip() == "kernel none (portable C)"
    r = avail(**dict(driver_env(), GPT_NO_ASM="0"))
    assert r.stdout.split()[1] == next(k for k in KERNELS if RUNS[k])


def test_gpt_asm_picks_the_kernel(kernel):
    assert avail(**driver_env(kernel)).stdout.split()[1] == kernel


def test_gpt_asm_refuses_an_unknown_kernel():
    r = avail(**dict(driver_env(), GPT_ASM="avx3"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["test_sgemm: GPT_ASM=avx3: no such kernel "
                                             "(expected avx512 or avx2, or unset)"]


def test_gpt_asm_refuses_a_kernel_the_cpu_lacks():
    lacking = [k for k in KERNELS if not RUNS[k]]
    if not lacking:
        pytest.skip(f"this CPU runs every kernel ({', '.join(KERNELS)}): none to refuse")
    r = avail(**driver_env(lacking[0]))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"test_sgemm: GPT_ASM={lacking[0]}: this CPU lacks "
                                             f"{NEEDS[lacking[0]]} (unset GPT_ASM for the best kernel it runs)"]


def test_stage_create_refuses_a_bad_gpt_asm():
    """The trainer checks GPT_ASM before step 1: the Python module's Model raises with the message."""
    code = ("import gpt\ncfg = dict(max_seq_len=8, vocab_size=50, padded_vocab_size=64, num_layers=1, "
            "num_heads=2, channels=16)\ngpt.Model(cfg, 0, 1, 1, 8, 1)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(driver_env(), GPT_ASM="avx3"), timeout=60)
    assert r.returncode != 0 and "GPT_ASM=avx3: no such kernel" in r.stderr, r.stderr


# A few AdamW steps of a small GPT-2 through the Python module, in a fresh
# process (the asm-or-C choice is made once per process). Prints the losses
# and the parameters' bytes hashed, as JSON.
TRAIN = r"""
import hashlib, json, sys
import numpy as np
import gpt
gpt.set_threads(int(sys.argv[1]))
cfg = dict(max_seq_len=32, vocab_size=300, padded_vocab_size=320, num_layers=2, num_heads=4, channels=72)
B, T, L = 4, 24, cfg["num_layers"]
model = gpt.Model(cfg, 0, L, B, T, 1)
model.init(0)
rng = np.random.default_rng(0)
ops = np.array([(gpt.FWD, 0), (gpt.BWD_INPUT, 0), (gpt.BWD_WEIGHT, 0)])
x, y = rng.integers(0, cfg["vocab_size"], (2, 1, B, T))  # one batch, learnt by heart
losses = []
for step in range(1, 7):
    losses.append(float(model.run(ops, x, y)))
    model.sum_wte_grads()
    norm = gpt.norm_from_parts(model.grad_norm_parts(), L)
    model.adamw(3e-3, 0.1, min(1.0, 1.0 / norm), step)
h = hashlib.sha256()
for name, p in sorted(model.params().items()):
    h.update(np.ascontiguousarray(p).tobytes())
print(json.dumps({"losses": losses, "params": h.hexdigest()}))
"""


def train(threads: int, kernel: str | None) -> dict:
    """kernel None: the portable C path"""
    r = subprocess.run([sys.executable, "-c", TRAIN, str(threads)], cwd=ROOT, capture_output=True, text=True,
                       env=driver_env(kernel, no_asm=kernel is None), timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_training_with_asm_matches_the_c_path(kernel):
    asm, c = train(2, kernel), train(2, None)
    assert len(asm["losses"]) == 6
    for a, b in zip(asm["losses"], c["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b), (asm["losses"], c["losses"])
    assert asm["losses"][-1] < asm["losses"][0]
    # the two paths sum in different orders, so bitwise equality would mean
    # the asm GEMM never ran
    assert asm["params"] != c["params"], "GPT_NO_ASM made no difference: is the asm GEMM linked in?"


def test_training_with_asm_is_bitwise_the_same_for_1_and_2_threads(kernel):
    assert train(1, kernel) == train(2, kernel)
