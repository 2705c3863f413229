"""The AVX-512 GEMM of asm/ (asm/sgemm.h around asm/sgemm_avx512.S).

Through build/test_sgemm: every product against a float64 triple loop on
random data, on shapes chosen to miss every block size (8-row and 48-column
tiles, KC = 384, MC = 256, NC = 768) and on dimensions of 1; the backward's
strided A in every layout, with and without accumulation; bitwise the same
output for 1, 2 and 3 threads. Through the Python module: a few training
steps with the asm GEMM match the portable C path (GPT_NO_ASM=1) within fp32
tolerance, and are bitwise the same for 1 and 2 threads.

Everything skips, with the reason, on a CPU without AVX-512."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DRIVER = os.path.join(ROOT, "build", "test_sgemm")


def driver_env(threads: int | None = None, no_asm: bool = False) -> dict:
    env = dict(os.environ)
    env.pop("GPT_NO_ASM", None)
    if no_asm:
        env["GPT_NO_ASM"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def avx512() -> bool:
    """What the driver says; True when it is missing, so that every test fails on that."""
    if not os.path.exists(DRIVER):
        return True
    r = subprocess.run([DRIVER, "avail"], capture_output=True, text=True, env=driver_env())
    return r.returncode != 0 or r.stdout.strip() != "avx512 0"


if not avx512():
    pytest.skip("this CPU (or OS) has no AVX-512: the asm GEMM is never used here", allow_module_level=True)


@pytest.fixture(autouse=True)
def driver_built():
    assert os.path.exists(DRIVER), "build/test_sgemm is missing: run `make`"


def run_driver(*args, threads: int = 2) -> dict:
    r = subprocess.run([DRIVER, *map(str, args)], capture_output=True, text=True, env=driver_env(threads),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    f = r.stdout.split()
    out = dict(zip(f[0::2], f[1::2]))
    return {"maxerr": float(out["maxerr"]), "tol": float(out["tol"]), "hash": out["hash"]}


def check(*args, threads: int = 2) -> str:
    r = run_driver(*args, threads=threads)
    assert r["maxerr"] <= r["tol"], f"{args}: error {r['maxerr']:.3g} over the bound {r['tol']:.3g}"
    return r["hash"]


# (M, K, N): whole tiles, one past them, one short, dimensions of 1, K across
# the KC blocks, M across MC, N across NC, and the LM head's N with small M
SHAPES = [
    (8, 384, 48), (9, 385, 49), (7, 383, 47), (1, 1, 1), (1, 768, 1), (5, 1, 7), (256, 1, 96),
    (1, 64, 50304), (3, 770, 50304), (13, 1000, 100), (63, 800, 770), (300, 50, 20),
    (515, 400, 97), (40, 3, 1600), (17, 769, 1), (1, 1, 3000),
]


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [0, 1])
def test_nt_matches_reference(M, K, N, bias):
    check("nt", M, K, N, bias, 1000 * M + N + bias)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("layout,acc", [("row", 0), ("col", 1), ("row", 1), ("col", 0)])
def test_nn_matches_reference(M, K, N, layout, acc):
    check("nn", M, K, N, layout, acc, 7 * M + K + acc)


# the backward's tall products: many rows split between threads, few columns
@pytest.mark.parametrize("M,K,N", [(50304, 3, 8), (2500, 17, 1), (777, 256, 130)])
def test_nn_tall(M, K, N):
    check("nn", M, K, N, "col", 1, 5)


@pytest.mark.parametrize("layout", ["rowpad", "colpad", "gen"])
@pytest.mark.parametrize("M,K,N", [(13, 70, 100), (9, 385, 49), (1, 5, 1)])
def test_nn_other_strides(M, K, N, layout):
    check("nn", M, K, N, layout, 1, 3)


# every way the output can be split: 1, 2, 3 threads; edges in every direction
DET = [("nt", 515, 800, 97, 1, 11), ("nt", 256, 768, 3072, 1, 12), ("nt", 3, 64, 50304, 0, 13),
       ("nn", 256, 1000, 770, "row", 0, 14), ("nn", 2307, 256, 145, "col", 1, 15),
       ("nn", 50, 13, 3001, "gen", 1, 16)]


@pytest.mark.parametrize("args", DET, ids=[f"{a[0]}-{a[1]}x{a[2]}x{a[3]}" for a in DET])
def test_bitwise_same_for_any_thread_count(args):
    hashes = {t: check(*args, threads=t) for t in (1, 2, 3)}
    assert len(set(hashes.values())) == 1, hashes


def test_gpt_no_asm_turns_it_off():
    r = subprocess.run([DRIVER, "avail"], capture_output=True, text=True, env=driver_env(no_asm=True))
    assert r.stdout.strip() == "avx512 0"
    r = subprocess.run([DRIVER, "avail"], capture_output=True, text=True,
                       env=dict(driver_env(), GPT_NO_ASM="0"))
    assert r.stdout.strip() == "avx512 1"


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


def train(threads: int, no_asm: bool) -> dict:
    r = subprocess.run([sys.executable, "-c", TRAIN, str(threads)], cwd=ROOT, capture_output=True, text=True,
                       env=driver_env(no_asm=no_asm), timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_training_with_asm_matches_the_c_path():
    asm, c = train(2, no_asm=False), train(2, no_asm=True)
    assert len(asm["losses"]) == 6
    for a, b in zip(asm["losses"], c["losses"]):
        assert abs(a - b) <= 1e-4 * abs(b), (asm["losses"], c["losses"])
    assert asm["losses"][-1] < asm["losses"][0]
    # the two paths sum in different orders, so bitwise equality would mean
    # the asm GEMM never ran
    assert asm["params"] != c["params"], "GPT_NO_ASM made no difference: is the asm GEMM linked in?"


def test_training_with_asm_is_bitwise_the_same_for_1_and_2_threads():
    assert train(1, no_asm=False) == train(2, no_asm=False)
