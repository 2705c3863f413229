"""The hand-written PTX kernels (asm/*.ptx, sm_90a) and their CUDA C twins in
train_gpt.cu.

Without a GPU (CI): every .ptx assembles for sm_90a with zero spill stores;
asm/ptx_registers.txt (committed) matches what ptxas reports now; every entry
point is loaded by train_gpt.cu and embedded by the build. (What each kernel
computes is checked without a GPU too, by tests/test_ptx_emu.py.)

With a GPU (skipped otherwise), every check in its own subprocess so that a
faulting kernel (a sticky CUDA error) cannot spoil the others:
- each PTX kernel against its CUDA C twin on the same inputs, through the
  trainer's launchers (gpt_cuda_ptx_bench in dev/kernel_bench.cu, iters = 0):
  AdamW bitwise (the same operations with the same roundings, see
  asm/adamw.ptx); GELU forward/backward, layernorm forward/backward and
  softmax + cross-entropy (losses and gradient) within 1/32 of the largest
  output (GELU uses tanh.approx.f32 where the C code calls tanhf, the
  cross-entropy ex2/lg2.approx where it calls expf/logf; layernorm and the
  softmax sum in a different order), which is a few bf16 ulps: a wrong kernel
  is off by O(1);
- training (head size 64, 3 AdamW steps of 2 micro-batches): GPT_PTX=adamw is
  bitwise the CUDA C run (losses and parameters); GPT_PTX=1 with GELU unfused
  (every PTX kernel in use) tracks it: each loss within 1e-2 relative, the
  parameter updates' cosine similarity >= 0.95 for every tensor (AdamW's
  first steps are about +-lr per element whatever the gradient's size, so a
  bf16-level difference flips the sign of the update where the gradient is
  near zero; a broken kernel gives NaN or a cosine far below);
- bad GPT_PTX values, the fp32 build, channels % 8 != 0 and a padded
  vocabulary over the cross-entropy kernel's 57344 columns fail with a clear
  message.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
ASM = ROOT / "asm"
PTX_FILES = sorted(ASM.glob("*.ptx"))


def _ptxas():
    nvcc = shutil.which("nvcc")
    if nvcc:
        p = Path(os.path.realpath(nvcc)).parent / "ptxas"
        if p.exists():
            return str(p)
    return shutil.which("ptxas")


PTXAS = _ptxas()
needs_ptxas = pytest.mark.skipif(PTXAS is None, reason="ptxas not found (no CUDA toolkit)")


def entries(ptx: Path) -> list[str]:
    return re.findall(r"^\s*\.visible\s+\.entry\s+(\w+)", ptx.read_text(), re.M)


def assemble(ptx: Path) -> dict:
    """ptxas -arch=sm_90a -v: {kernel: (registers, spill stores, spill loads, stack bytes)}"""
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([PTXAS, "-arch=sm_90a", "-v", str(ptx), "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"ptxas failed on {ptx.name}:\n{r.stdout}{r.stderr}"
    out, kernel, stats = r.stdout + r.stderr, None, {}
    frame = None
    for line in out.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            kernel = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            frame = tuple(int(x) for x in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            stats[kernel] = (int(m.group(1)), frame[1], frame[2], frame[0])
    return stats


# -----------------------------------------------------------------------------
# no GPU


def test_there_are_ptx_kernels():
    names = {p.stem for p in PTX_FILES}
    assert {"adamw", "gelu", "layernorm", "crossentropy"} <= names, names


@pytest.mark.parametrize("ptx", PTX_FILES, ids=lambda p: p.name)
def test_ptx_file_header(ptx):
    text = ptx.read_text()
    assert re.search(r"^\.version 9\.0$", text, re.M), "expected .version 9.0"
    assert re.search(r"^\.target sm_90a$", text, re.M), "expected .target sm_90a"
    head = text.split(".version")[0]
    assert head.startswith("//") and "Measured" in head and "Registers" in head, \
        "each .ptx opens with a comment: what it computes, its plan, what it measured"
    assert entries(ptx), "no .visible .entry"


# The memory-bound kernels keep at least 1024 threads an SM (half occupancy, enough loads in flight to reach
# the copy's bandwidth), which is 64 registers a thread at most; the GEMM holds a 64 x 128 tile of fp32
# accumulators per warpgroup (64 a thread), and its 256 threads may have up to 128 each.
MAX_REGISTERS = {"ptx_gemm_bf16": 128}


@needs_ptxas
@pytest.mark.parametrize("ptx", PTX_FILES, ids=lambda p: p.name)
def test_ptx_assembles_for_sm90a_without_spills(ptx):
    stats = assemble(ptx)
    assert set(stats) == set(entries(ptx))
    for k, (regs, spill_st, spill_ld, stack) in stats.items():
        print(f"{k}: {regs} registers, {spill_st} bytes spill stores, {spill_ld} spill loads, {stack} stack")
        assert spill_st == 0 and spill_ld == 0, f"{k} spills"
        limit = MAX_REGISTERS.get(k, 64)
        assert regs <= limit, f"{k} uses {regs} registers, over its {limit}"


@needs_ptxas
def test_recorded_registers_match_the_assembly():
    """asm/ptx_registers.txt (make ptx-registers) is what ptxas reports now."""
    recorded = {}
    for line in (ASM / "ptx_registers.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, f, regs, ss, sl, st = line.split()
            recorded[k] = (f, int(regs), int(ss), int(sl), int(st))
    now = {}
    for ptx in PTX_FILES:
        for k, (regs, ss, sl, st) in assemble(ptx).items():
            now[k] = (ptx.name, regs, ss, sl, st)
    assert recorded == now, "asm/ptx_registers.txt is stale: run make ptx-registers"


def test_every_entry_is_loaded_by_the_trainer():
    src = (ROOT / "train_gpt.cu").read_text()
    for ptx in PTX_FILES:
        assert f"ptx_cubin_{ptx.stem}" in src, f"train_gpt.cu does not load asm/{ptx.name}"
        for k in entries(ptx):
            assert f'"{k}"' in src, f"train_gpt.cu does not look up {k}"


def test_build_embeds_every_cubin():
    h = ROOT / "build" / "ptx_kernels.h"
    if not h.exists():
        pytest.skip("build/ptx_kernels.h not built (no ptxas, or make has not run)")
    text = h.read_text()
    for ptx in PTX_FILES:
        assert f"ptx_cubin_{ptx.stem}[]" in text, f"{ptx.name} is not embedded: run make"


# -----------------------------------------------------------------------------
# GPU: every check in a subprocess


try:
    import gpt_cuda
except ImportError:
    gpt_cuda = None


def _device_count() -> int:
    try:
        return gpt_cuda.device_count() if gpt_cuda else 0
    except Exception:
        return 0


needs_gpu = pytest.mark.skipif(gpt_cuda is None or _device_count() == 0,
                               reason="gpt_cuda not built" if gpt_cuda is None else
                               "no GPU visible (gpt_cuda.device_count() == 0)")


def run_py(code: str, env: dict | None = None, timeout: int = 120) -> dict:
    """Runs code (which prints one JSON line last) in a fresh process."""
    e = dict(os.environ)
    e.pop("GPT_PTX", None)
    e.update(env or {})
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True,
                       timeout=timeout)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and lines, f"subprocess failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return json.loads(lines[-1])


BENCH = """
import ctypes, json
lib = ctypes.CDLL("build/libkernel_bench.so")
lib.gpt_last_error.restype = ctypes.c_char_p
lib.gpt_cuda_ptx_bench.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_double)]
res = (ctypes.c_double * 8)()
rc = lib.gpt_cuda_ptx_bench({kernel}, {n}, {C}, 0, res)
print(json.dumps(dict(rc=rc, err=lib.gpt_last_error().decode(), res=list(res))))
"""

# (name, kernel id, n (elements or rows), C, tolerance on max |diff| / max |output|; 0: bitwise)
KERNELS = [
    ("adamw", 0, (1 << 20) + 4 * 37, 0, 0.0),
    ("gelu_forward", 1, 3 * (1 << 20) + 8 * 5, 0, 1 / 32),
    ("gelu_backward", 2, 3 * (1 << 20) + 8 * 5, 0, 1 / 32),
    ("layernorm_forward_C768", 3, 1003, 768, 1 / 32),
    ("layernorm_forward_C8", 3, 517, 8, 1 / 32),
    ("layernorm_backward_C768", 4, 1003, 768, 1 / 32),
    ("layernorm_backward_C24", 4, 517, 24, 1 / 32),
    ("layernorm_backward_C1600", 4, 301, 1600, 1 / 32),
    ("crossentropy_V50257", 6, 64, 50257, 1 / 32),   # GPT-2's vocabulary, Vp = 50304
    ("crossentropy_V300", 6, 257, 300, 1 / 32),      # V % 8 != 0: a chunk straddles V
    ("crossentropy_V5", 6, 33, 5, 1 / 32),           # one chunk: 31 of 32 warps hold nothing
]


@needs_gpu
@pytest.mark.parametrize("name,kernel,n,C,tol", KERNELS, ids=[k[0] for k in KERNELS])
def test_ptx_kernel_matches_cuda_c_twin(name, kernel, n, C, tol):
    out = run_py(BENCH.format(kernel=kernel, n=n, C=C))
    assert out["rc"] == 0, out["err"]
    _, _, _, bad, rel, total, _, _ = out["res"]
    print(f"{name}: {int(bad)} of {int(total)} output elements differ bitwise, "
          f"max |diff| / max |output| = {rel:.3e}")
    assert total > 0
    if tol == 0:
        assert bad == 0, f"{name} must be bitwise the CUDA C kernel"
    else:
        assert rel <= tol, f"{name}: max |diff| / max |output| = {rel:.3e} > {tol}"


GEMM = """
import ctypes, json
lib = ctypes.CDLL("build/libkernel_bench.so")
lib.gpt_last_error.restype = ctypes.c_char_p
lib.gpt_cuda_gemm_bench.argtypes = [ctypes.c_int] * 4 + [ctypes.POINTER(ctypes.c_double)]
res = (ctypes.c_double * 8)()
rc = lib.gpt_cuda_gemm_bench({M}, {N}, {K}, 0, res)
print(json.dumps(dict(rc=rc, err=lib.gpt_last_error().decode(), res=list(res))))
"""


# (M, N, K): GPT-2 shapes at 512 tokens, and edges that are not multiples of the 128 x 128 x 64 tiles
@needs_gpu
@pytest.mark.parametrize("M,N,K", [(512, 2304, 768), (512, 768, 3072), (384, 50304, 768), (100, 200, 72),
                                   (1, 8, 8), (257, 136, 520)])
def test_ptx_gemm_matches_cublaslt(M, N, K):
    """asm/gemm.ptx against cuBLASLt on the same bf16 inputs: both accumulate in fp32, in different orders,
    and round to bf16, so outputs differ by an ulp or so of bf16 (1/256 relative); a wrong tile, swizzle
    or descriptor is off by O(1)."""
    out = run_py(GEMM.format(M=M, N=N, K=K))
    assert out["rc"] == 0, out["err"]
    _, _, flops, bad, rel, total, _, _ = out["res"]
    print(f"gemm {M}x{N}x{K}: {int(bad)} of {int(total)} differ bitwise, max |diff| / max |out| = {rel:.3e}")
    assert total == M * N and flops == 2 * M * N * K
    assert rel <= 1 / 64


TRAIN = """
import json, numpy as np, gpt_cuda
cfg = dict(max_seq_len=256, vocab_size=300, padded_vocab_size=320, num_layers=2, num_heads=2, channels=128)
B, T, M, STEPS = 2, 80, 2, 3
m = gpt_cuda.Model(cfg, 0, 2, B, T, 1)
m.init(7)
p0 = {{k: v.copy() for k, v in m.params().items()}}
rng = np.random.default_rng(8)
ops = np.array([(k, mb) for mb in range(M) for k in (gpt_cuda.FWD, gpt_cuda.BWD_INPUT, gpt_cuda.BWD_WEIGHT)])
losses = []
for step in range(STEPS):
    x = rng.integers(0, 300, (M, B, T)); y = rng.integers(0, 300, (M, B, T))
    loss = m.run(ops, x, y) / M
    m.sum_wte_grads()
    norm = gpt_cuda.norm_from_parts(m.grad_norm_parts(), 2)
    m.adamw(3e-3, 0.1, 1.0 / norm if norm > 1.0 else 1.0, step + 1)
    losses.append(float(loss))
np.savez("{out}", **{{k: v for k, v in m.params().items()}}, **{{"init_" + k: v for k, v in p0.items()}})
print(json.dumps(dict(losses=losses)))
"""


def train(tmp_path, tag: str, env: dict):
    out = tmp_path / f"{tag}.npz"
    r = run_py(TRAIN.format(out=out), env)
    with np.load(out) as z:
        return r["losses"], {k: z[k] for k in z.files}


@needs_gpu
def test_training_with_ptx_adamw_is_bitwise_the_cuda_c_run(tmp_path):
    la, pa = train(tmp_path, "c", {"GPT_PTX": "0"})
    lb, pb = train(tmp_path, "ptx", {"GPT_PTX": "adamw"})
    print("losses CUDA C", la, "PTX adamw", lb)
    assert la == lb
    for k in pa:
        assert np.array_equal(pa[k], pb[k]), k


@needs_gpu
def test_training_with_every_ptx_kernel_tracks_the_cuda_c_run(tmp_path):
    """GELU unfused, so that every PTX kernel runs."""
    la, pa = train(tmp_path, "c", {"GPT_PTX": "0", "GPT_FUSE_GELU": "0"})
    lb, pb = train(tmp_path, "ptx", {"GPT_PTX": "1", "GPT_FUSE_GELU": "0"})
    print("losses CUDA C", la, "PTX", lb)
    for a, b in zip(la, lb):
        assert abs(a - b) / abs(a) < 1e-2
    for k in pa:
        if k.startswith("init_"):
            continue
        da = (pa[k] - pa["init_" + k]).astype(np.float64)
        db = (pb[k] - pb["init_" + k]).astype(np.float64)
        if k == "qkvb":  # the key bias has a zero gradient up to rounding (see test_model.py)
            C = da.shape[-1] // 3
            keep = np.r_[0:C, 2 * C:3 * C]
            da, db = da[..., keep], db[..., keep]
        da, db = da.ravel(), db.ravel()
        na, nb = np.linalg.norm(da), np.linalg.norm(db)
        cs = 1.0 if na == 0 and nb == 0 else float(da @ db / max(na * nb, 1e-300))
        print(f"  {k:9s} update cosine {cs:.5f}")
        assert cs >= 0.95, k


FAIL = """
import json, gpt_cuda{suffix} as g
cfg = dict(max_seq_len=256, vocab_size={V}, padded_vocab_size={Vp}, num_layers=2, num_heads=2, channels={C})
try:
    g.Model(cfg, 0, 2, 2, 16, 1)
    print(json.dumps(dict(err=None)))
except Exception as e:
    print(json.dumps(dict(err=str(e))))
"""


@needs_gpu
@pytest.mark.parametrize("case", ["bad_value", "fp32_build", "channels_not_multiple_of_8", "vocab_over_a_row"])
def test_gpt_ptx_requests_that_cannot_be_met_fail_clearly(case):
    suffix, C, V, Vp, value, expect = {
        "bad_value": ("", 128, 300, 320, "adamw,bogus", "GPT_PTX=adamw,bogus: expected"),
        "fp32_build": ("_fp32", 128, 300, 320, "1", "fp32 build"),
        "channels_not_multiple_of_8": ("", 36, 300, 320, "gelu", "channels % 8 == 0"),
        "vocab_over_a_row": ("", 128, 57345, 57352, "crossentropy", "<= 57344 (it is 57352)"),
    }[case]
    if suffix:
        pytest.importorskip("gpt_cuda_fp32")
    out = run_py(FAIL.format(suffix=suffix, C=C, V=V, Vp=Vp), {"GPT_PTX": value})
    print(out["err"])
    assert out["err"] and expect in out["err"], out["err"]
