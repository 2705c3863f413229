"""A small PTX emulator: runs GPU kernels on the CPU, the hand-written ones of asm/*.ptx and the PTX
that nvcc makes of train_gpt.cu (cuda.mk's build/train_gpt_cu.ptx).

CI has no GPU, so on its own it can only check that the kernels compile
(ptxas, nvcc). This module runs the same PTX text with numpy, so
tests/test_ptx_emu.py and tests/test_cuda_emu.py can compare every kernel
with a float64 reference. It also checks the memory accesses and the
synchronisation as it goes, without a GPU:

    k = load_kernel("asm/gelu.ptx", "ptx_gelu_forward")
    launch(k, grid=(2, 1, 1), block=(256, 1, 1), args=[out, inp, n])
    k = find_entry(load_module("build/train_gpt_cu.ptx"), "attention_forward_mma_kernel", "ILb1E")  # <true>

numpy arrays in `args` become device pointers to those arrays, and the kernel
writes straight into them. Python ints and floats become the .param values
(.u64/.s32/.f32...). None is NULL. launch(..., shared_bytes=n) is the third
launch parameter: the size of the kernel's .extern .shared array. A
TensorMap(array, box, swizzle) is what the host's cuTensorMapEncodeTiled makes
for a TMA copy; it goes to a `.param .align 64 .b8 name[128]` parameter:

    ta = TensorMap(A, box=(64, 128), swizzle=128)  # A (rows, cols): dims (cols, rows)
    launch(k, grid, 256, [ta, tb, out, M, N, K], shared_bytes=4 * 32768 + 1024)

The file has five sections, in reading order:

1. parse: the PTX subset that asm/*.ptx and nvcc's PTX of train_gpt.cu use,
   turned into Kernel objects (parameters, register and shared declarations,
   labels, decoded instructions). An instruction, modifier, directive,
   register or label that it does not know is a PTXSyntaxError naming it and
   its line. Nothing is silently ignored but .pragma (a hint to ptxas, such
   as "nounroll"). find_entry finds a C++ kernel by its unmangled name.
2. registers: a register holds raw bits, one numpy array per register, one
   element per thread (uint16/32/64, bool for predicates). Each instruction
   reads them as its own type (ld, st and cvt also take wider registers, as
   PTX allows). Registers start out as a poison pattern (a NaN as f32, an
   unmapped address as an integer), because a GPU does not zero them either.
3. instructions: the opcode table, one entry per opcode spelling. Adding an
   opcode is usually one line: `_alu("min.f32", "f32", "f32 f32", np.fmin)`.
   Warp-wide instructions (shfl, redux, bar.warp.sync, ldmatrix, mma) see the
   whole warp at once. The table ends with ptxas's FMA contraction (below).
4. scheduler: blocks run in waves, several at once, vectorized over all their
   threads, and each thread has its own pc. A step runs the instruction at
   the lowest pc among the live threads, for all the threads that are at it.
   A @p guard narrows the set further. This "min-pc" schedule reconverges
   structured control flow. It also makes the .sync instructions meeting
   points: when one of them is the lowest pc, every thread it names must be
   there (the block for bar.sync, the membermask for shfl.sync and the like,
   the whole warp for ldmatrix and mma). A thread that is somewhere else took
   another path, which is a real bug on a GPU, so the emulator raises
   DivergenceError. Loops stop at max_steps (RunawayError). Results do not
   depend on how blocks are grouped into waves unless blocks race, which the
   racecheck reports.
5. memory: fake 64-bit device addresses for the arrays passed in, and a
   shared window per block. Every access is bounds-checked against its
   allocation and alignment-checked (a memcheck): a .v4 of 4-byte elements
   needs 16 bytes, a .v2 8, a scalar its size. A read of shared bytes the
   block never wrote is an error. Two threads touching the same bytes with no
   barrier in between (bar.sync; bar.warp.sync for two threads of a warp), or
   from two blocks, is an error (a racecheck). So is ld.global.nc of memory
   the launch writes, and any access to shared bytes that a cp.async is still
   writing. cp.async reads global memory when it issues and writes shared
   memory when the issuing thread's cp.async.wait_group retires its group (the
   latest a GPU may), as a store of that thread: the other threads need a
   bar.sync after the wait too.

Hopper's asynchronous units, as section 3 models them from the PTX ISA (each
subsection there cites its sections and states what is checked):
- TMA, cp.async.bulk.tensor: a box of a tensor map's tensor to shared memory,
  zero-filled out of bounds, 32/64/128-byte swizzled as the ISA's tables say
  (chunk address bits 4.. XOR bits 7..), then a complete-tx of its bytes on an
  mbarrier. The bytes land at issue but the complete-tx only when a wait finds
  the phase incomplete (so a try_wait outside a loop is caught), and reading
  them before seeing that phase complete, or overwriting bytes another thread
  read with no bar.sync or mbarrier hand-off since, is a RaceError.
- mbarriers: phases, arrivals, tx-count, try_wait/test_wait.parity; misuse
  (uninitialized, no bar.sync or fence.mbarrier_init after init, too many
  arrivals) is an error. A wait loop whose release sits at a higher pc never
  ends under the min-pc scheduler (RunawayError, naming the mbarrier).
- wgmma: m64nNk16 with bf16/f16 from shared memory through matrix descriptors
  (K-major, swizzled or not), fp32 accumulators. The operands are read at
  mma_async and must be unchanged when the wgmma.wait_group that retires it
  computes D; touching the accumulators in between, or without wgmma.fence,
  is an AsyncError.

Numerics. Registers keep the exact bits. add/sub/mul.rn.f32 are numpy
float32 operations, which are IEEE correctly rounded. fma.rn.f32 is exact:
the product in float64 (exact for float32 inputs), a TwoSum for the error of
the sum, and a correction where rounding float64 to float32 would otherwise
double-round; fma.rm/rp/rz step from that result by the sign of the
remaining error. div/rcp/sqrt.rn are float64 then rounded once, which is
correct because 53 >= 2 * 24 + 2 bits. .ftz flushes subnormal inputs and
results to zero, keeping the sign. ex2/lg2/tanh/rcp.approx are computed
exactly (float64, rounded to float32). The GPU approximates them (relative
error about 2^-22 for ex2/lg2, 2^-11 for tanh), so the emulator is more
accurate than the hardware there, and tests should compare with tolerances,
not bits. cvt.rn.bf16x2.f32 rounds to nearest even and puts its first operand
in the upper half. mma.sync (bf16 in, fp32 accumulation) sums the exact
products and the accumulator in float64 and rounds once; the tensor cores'
internal rounding is undocumented and may differ by about an fp32 ulp of the
largest term. add/sub/mul.f32 with no rounding modifier round to nearest, and
ptxas may fuse them: a mul.f32 whose value only one add/sub.f32 of its basic
block reads becomes one FFMA there (its default --fmad=true). The emulator
makes the same fusions (_contract), so nvcc's PTX rounds where the SASS does.

Not modelled: timing, caches, occupancy, register counts (.maxnreg is
recorded, not enforced; .maxntid and .reqntid are checked at launch, and
shared memory against max_shared_bytes). Memory ordering is only modelled as
far as the race check goes: kernels whose blocks must talk to each other
(other than through atomics) are out of scope, and within a block memory is
sequentially consistent. The racecheck tracks the last writer of each byte;
the last reader of shared bytes only serves the TMA's write-after-read check,
so a plain store after another thread's read with no barrier between them
(write-after-read) is not caught; atomics do not count as writers. A
bar.warp.sync with a partial membermask orders nothing for the racecheck (it
can only report too much). NaN payloads are kept where a GPU would return its
canonical NaN. Textures, generic addressing, local memory, .func calls,
clusters (and multicast), non-tensor bulk copies, tensor maps outside .param,
wgmma with A in registers, M/N-major operands, non-zero descriptor base
offsets or integer/fp8/tf32 types are not supported: the parser or the launch
rejects them.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import itertools
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np


class PTXError(Exception):
    """Base class of every error about a kernel."""


class PTXSyntaxError(PTXError):
    """Text outside the supported subset: unknown instruction, modifier, directive, register or label."""


class LaunchError(PTXError):
    """launch() arguments that do not fit the kernel's parameters or limits."""


class MemcheckError(PTXError):
    """An access out of bounds, misaligned, to shared bytes never written, to a read-only array, or
    ld.global.nc of memory that the launch writes."""


class RaceError(MemcheckError):
    """Two threads touched the same bytes, at least one writing, with no bar.sync between (or from two blocks)."""


class DivergenceError(PTXError):
    """A shfl.sync or bar.sync not reached by every thread it names; a bra.uni that diverges."""


class RunawayError(PTXError):
    """More than max_steps steps in a block, or a thread ran past the last instruction."""


class AsyncError(PTXError):
    """Misuse of the asynchronous units: a wgmma accumulator touched before the wgmma.wait_group that retires
    it, a missing wgmma.fence, differing descriptors, an mbarrier not made visible to the async proxy, a block
    exiting with work in flight."""


# =============================================================================
# 1. parse

# PTX type -> numpy dtype of its values (bf16 has none in numpy: its raw 16 bits)
TYPES = {
    "pred": np.bool_,
    "b8": np.uint8, "u8": np.uint8, "s8": np.int8,
    "b16": np.uint16, "u16": np.uint16, "s16": np.int16, "f16": np.float16, "bf16": np.uint16,
    "b32": np.uint32, "u32": np.uint32, "s32": np.int32, "f32": np.float32,
    "b64": np.uint64, "u64": np.uint64, "s64": np.int64, "f64": np.float64,
}
UNSIGNED = {8: np.uint8, 16: np.uint16, 32: np.uint32, 64: np.uint64}
SIGNED = {8: np.int8, 16: np.int16, 32: np.int32, 64: np.int64}


def bits(t: str) -> int:
    """Width of a PTX type in bits (1 for .pred)."""
    return 1 if t == "pred" else np.dtype(TYPES[t]).itemsize * 8


SPECIAL_REGS = {f"%{r}.{d}" for r in ("tid", "ntid", "ctaid", "nctaid") for d in "xyz"} | {"%laneid", "%warpid"}
SHARED_BASE = 0x1000  # first byte of the shared window: small addresses (a zeroed register) are caught
SHARED_GAP = 64       # bytes left unmapped after each shared variable, so overruns fault
# The swizzles of TMA and wgmma are functions of shared address bits 4..9 (section 3), so the window must
# start on a 1024-byte boundary, and its addresses must fit the 18 bits a wgmma descriptor encodes.
assert SHARED_BASE % 1024 == 0 and SHARED_BASE + (240 << 10) <= 1 << 18  # 227 KiB at most (launch)
PARAM_BASE = 0x100_0000             # .param window: `mov.b64 %r, param` gives PARAM_BASE + the parameter's offset
PARAM_GENERIC = 0x7E00_0000_0000    # and cvta.param.u64 maps it to PARAM_GENERIC + the offset (a generic address)
LINE_DIRECTIVES = (".version", ".target", ".address_size")  # the directives that end at a newline
KERNEL_DIRECTIVES = (".maxnreg", ".maxntid", ".reqntid", ".minnctapersm")


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int  # 1: predicate


@dataclass(frozen=True)
class Imm:
    value: object  # numpy scalar of the instruction's operand type


@dataclass(frozen=True)
class Special:
    name: str  # %tid.x ...


@dataclass(frozen=True)
class Addr:
    base: Reg | None  # None: an absolute address (a shared variable, a number)
    offset: int
    param: str | None = None  # ld.param: the parameter's name


@dataclass
class Instr:
    line: int
    text: str                # the source, for messages
    opcode: str              # e.g. "ld.global.nc.v4.f32"
    operands: list[str]      # raw operand text
    guard: Reg | None = None
    guard_neg: bool = False
    op: object = None        # the opcode table entry (section 3)
    dst: object = None       # decoded operands, as the op wants them
    srcs: list = field(default_factory=list)
    addr: Addr | None = None
    target: int = -1         # branch target: index into Kernel.code
    acc_touch: tuple = ()    # wgmma accumulator registers it names (section 3, _mark_accumulator_accesses)


@dataclass
class Kernel:
    name: str
    file: str
    params: list[tuple[str, str]]              # (name, PTX type), in order (an array parameter: its element type)
    regs: dict[str, str]                       # register name -> PTX type
    shared: dict[str, tuple[int, int]]         # shared variable -> (address, bytes)
    code: list[Instr]
    labels: dict[str, int]
    directives: dict[str, tuple[int, ...]]     # .maxnreg, .maxntid, ... as written
    dynamic_shared: str | None = None          # the .extern .shared array, sized at launch (shared_bytes)
    param_arrays: dict[str, int] = field(default_factory=dict)   # .param .align A .b8 name[N] -> N bytes
    param_addr: dict[str, int] = field(default_factory=dict)     # parameter -> its .param-space address
    param_align: dict[str, int] = field(default_factory=dict)    # parameter -> its alignment (.align or size)
    wgmma_regs: frozenset = frozenset()        # registers that some wgmma.mma_async uses as accumulators

    def where(self, ins: Instr) -> str:
        return f"{self.file}:{ins.line}: in {self.name}: `{ins.text}`"


def _strip_comments(text: str) -> str:
    """Comments become spaces, keeping every newline, so offsets and line numbers stay the same."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group())
    return re.sub(r"//[^\n]*", blank, re.sub(r"/\*.*?\*/", blank, text, flags=re.S))


def _split(text: str) -> list[tuple[int, str]]:
    """(offset, statement) pairs; '{' and '}' of blocks are statements of their own. A '{' after the
    start of an instruction (not just labels) opens a vector operand {%a, %b} and stays in the instruction."""
    out, start, vec = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "\n" and text[start:i].strip().startswith(LINE_DIRECTIVES):
            out.append((start, text[start:i]))
            start = i + 1
        elif ch == ";":
            out.append((start, text[start:i]))
            start = i + 1
        elif ch == "{":
            pending = text[start:i]
            if pending.strip() and ".entry" not in pending and ".func" not in pending and \
                    not re.fullmatch(r"(\s*[A-Za-z_$][\w$]*\s*:)+\s*", pending):
                vec += 1
            else:
                out += [(start, pending), (i, "{")]
                start = i + 1
        elif ch == "}":
            if vec:
                vec -= 1
            else:
                out += [(start, text[start:i]), (i, "}")]
                start = i + 1
    out.append((start, text[start:]))
    return [(off + len(s) - len(s.lstrip()), s.strip()) for off, s in out if s.strip()]


def _split_operands(s: str) -> list[str]:
    """Split on the commas that are not inside [] or {}."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_ptx(text: str, filename: str = "<ptx>") -> dict[str, Kernel]:
    """Every .entry of a PTX module, by name."""
    clean = _strip_comments(text)
    newlines = [i for i, c in enumerate(clean) if c == "\n"]
    line_of = lambda off: bisect.bisect_left(newlines, off) + 1
    err = lambda off, msg: PTXSyntaxError(f"{filename}:{line_of(off)}: {msg}")
    stmts = _split(clean)
    kernels, module_shared, i = {}, [], 0
    while i < len(stmts):
        off, s = stmts[i]
        if s.startswith(LINE_DIRECTIVES):
            i += 1
            continue
        if s.startswith((".shared", ".extern .shared")):
            module_shared.append((line_of(off), s))
            i += 1
            continue
        m = re.fullmatch(r"(?:\.visible\s+)?\.entry\s+([\w$]+)\s*\((.*?)\)\s*(.*)", s, re.S)
        if not m:
            raise err(off, f"unsupported module-level statement: {s.split()[0]!r} (only .entry kernels, "
                           f".shared, .extern .shared, {', '.join(LINE_DIRECTIVES)} are supported)")
        name, plist, tail = m.groups()
        params, arrays, offset, addr, aligns = [], {}, 0, {}, {}
        for p in filter(None, (x.strip() for x in plist.split(","))):
            # .param .u64 x, or an array: .param .align 128 .b8 tmap[128] (a CUtensorMap passed by value)
            pm = re.fullmatch(r"\.param\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+([\w$]+)(?:\s*\[\s*(\d+)\s*\])?", p)
            if not pm or pm.group(2) not in TYPES or pm.group(2) == "pred" or (pm.group(1) and not pm.group(4)):
                raise err(off, f"unsupported kernel parameter {p!r} in {name}")
            size = bits(pm.group(2)) // 8
            align = int(pm.group(1) or size)
            offset = -(-offset // align) * align  # the parameter's place in the .param window, as ptxas lays it out
            addr[pm.group(3)], aligns[pm.group(3)] = PARAM_BASE + offset, align
            if pm.group(4):
                arrays[pm.group(3)] = size * int(pm.group(4))
            offset += size * int(pm.group(4) or 1)
            params.append((pm.group(3), pm.group(2)))
        directives = {}
        for dm in re.finditer(r"(\.\w+)\s*([\d,\s]*)", tail):
            if dm.group(1) not in KERNEL_DIRECTIVES:
                raise err(off, f"unsupported kernel directive {dm.group(1)!r} on {name}")
            directives[dm.group(1)] = tuple(int(x) for x in dm.group(2).replace(",", " ").split())
        if i + 1 >= len(stmts) or stmts[i + 1][1] != "{":
            raise err(off, f"{name}: expected '{{' after the kernel's header")
        body, depth, i = [], 1, i + 2
        while depth:
            if i >= len(stmts):
                raise err(off, f"{name}: no closing '}}'")
            boff, b = stmts[i]
            depth += {"{": 1, "}": -1}.get(b, 0)  # nested scoping blocks are flattened
            if b not in ("{", "}"):
                body.append((line_of(boff), b))
            i += 1
        kernels[name] = _build_kernel(name, filename, params, directives, module_shared + body, arrays, addr, aligns)
    return kernels


@functools.lru_cache(maxsize=None)
def _load_cached(path: str, mtime: float) -> dict[str, Kernel]:
    return parse_ptx(Path(path).read_text(), path)


def load_module(path) -> dict[str, Kernel]:
    p = Path(path)
    return _load_cached(str(p), p.stat().st_mtime)


def load_kernel(path, name: str) -> Kernel:
    kernels = load_module(path)
    if name not in kernels:
        raise PTXSyntaxError(f"{path}: no kernel {name!r} (it has {', '.join(kernels)})")
    return kernels[name]


def find_entry(kernels: dict[str, Kernel], name: str, template: str = "") -> Kernel:
    """A kernel of nvcc's PTX by its C++ name: the entry whose mangled name is _Z<len><name> followed by
    the mangled template arguments `template` (e.g. "ILb1E" for <true>, "ILi0E" for <0>), or by none when
    template is "" (an extern "C" name also matches as itself)."""
    mangled = f"_Z{len(name)}{name}"
    hits = [k for e, k in kernels.items() if e == name and not template or e.startswith(mangled) and
            (e[len(mangled):].startswith(template) if template else not e[len(mangled):].startswith("I"))]
    if len(hits) != 1:
        raise PTXSyntaxError(f"{len(hits)} entries match {name}{template!r}: {[k.name for k in hits] or list(kernels)}")
    return hits[0]


def _build_kernel(name, file, params, directives, body, param_arrays, param_addr, param_align) -> Kernel:
    k = Kernel(name, file, params, {}, {}, [], {}, directives, param_arrays=param_arrays, param_addr=param_addr,
               param_align=param_align)
    err = lambda line, msg: PTXSyntaxError(f"{file}:{line}: in {name}: {msg}")
    next_shared = SHARED_BASE
    for line, s in body:
        while m := re.match(r"([A-Za-z_$][\w$]*)\s*:(?!:)", s):  # labels
            if m.group(1) in k.labels:
                raise err(line, f"label {m.group(1)} defined twice")
            k.labels[m.group(1)] = len(k.code)
            s = s[m.end():].strip()
        if not s:
            continue
        if s.startswith(".reg"):
            m = re.fullmatch(r"\.reg\s+\.(\w+)\s+(.+)", s, re.S)
            if not m or m.group(1) not in TYPES:
                raise err(line, f"unsupported register declaration {s!r}")
            for decl in (d.strip() for d in m.group(2).split(",")):
                dm = re.fullmatch(r"(%[A-Za-z_$][\w$]*)(?:<(\d+)>)?", decl)
                if not dm:
                    raise err(line, f"bad register name {decl!r}")
                names = [dm.group(1)] if dm.group(2) is None else [f"{dm.group(1)}{j}" for j in range(int(dm.group(2)))]
                for r in names:
                    if r in k.regs:
                        raise err(line, f"register {r} declared twice")
                    k.regs[r] = m.group(1)
        elif s.startswith(".shared"):
            m = re.fullmatch(r"\.shared\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+([A-Za-z_$][\w$]*)"
                             r"((?:\s*\[\s*\d+\s*\])*)", s)
            if not m or m.group(2) not in TYPES or m.group(2) == "pred":
                raise err(line, f"unsupported shared declaration {s!r}")
            count = int(np.prod([int(x) for x in re.findall(r"\d+", m.group(4))] or [1]))
            size = count * bits(m.group(2)) // 8
            align = max(int(m.group(1) or 1), bits(m.group(2)) // 8, 16)
            next_shared = -(-next_shared // align) * align
            k.shared[m.group(3)] = (next_shared, size)
            next_shared += size + SHARED_GAP
        elif s.startswith(".extern"):  # dynamic shared memory: placed after the static arrays, below
            m = re.fullmatch(r"\.extern\s+\.shared\s+(?:\.align\s+(\d+)\s+)?\.(\w+)\s+([A-Za-z_$][\w$]*)"
                             r"\s*\[\s*\]", s)
            if not m or m.group(2) not in TYPES or m.group(2) == "pred" or k.dynamic_shared:
                raise err(line, f"unsupported .extern declaration {s!r} (one .extern .shared array[] is)")
            k.dynamic_shared = m.group(3)
            dyn_align = max(int(m.group(1) or 1), bits(m.group(2)) // 8, 16)
        elif s.startswith(".pragma"):
            pass  # a hint to ptxas ("nounroll"): no effect on what the code computes
        elif s.startswith("."):
            raise err(line, f"unsupported directive {s.split()[0]!r}")
        else:
            m = re.fullmatch(r"(?:@(!?)(%[\w$]+)\s+)?([a-z][\w.:]*)\s*(.*)", s, re.S)
            if not m:
                raise err(line, f"cannot parse {s!r}")
            ins = Instr(line, " ".join(s.split()), m.group(3), _split_operands(m.group(4)))
            if m.group(2):
                ins.guard, ins.guard_neg = _reg(k, ins, m.group(2), "pred"), m.group(1) == "!"
            k.code.append(ins)
    if k.dynamic_shared:  # after every static array; its size is the launch's shared_bytes
        k.shared[k.dynamic_shared] = (-(-next_shared // dyn_align) * dyn_align, 0)
    for ins in k.code:
        ins.op = OPCODES.get(ins.opcode)
        if ins.op is None:
            near = difflib.get_close_matches(ins.opcode, OPCODES, n=4, cutoff=0.75)
            raise err(ins.line, f"unknown instruction {ins.opcode!r}" +
                      (f" (known near it: {', '.join(near)})" if near else "") +
                      " - add it to the opcode table in dev/ptx_emu.py")
        ins.op.decode(k, ins)
    _contract(k)
    _mark_accumulator_accesses(k)
    return k


def _syntax(k: Kernel, ins: Instr, msg: str) -> PTXSyntaxError:
    return PTXSyntaxError(f"{k.where(ins)}: {msg}")


def _arity(k, ins, n):
    if len(ins.operands) != n:
        raise _syntax(k, ins, f"{ins.opcode} takes {n} operands, got {len(ins.operands)}")


def _reg(k: Kernel, ins: Instr, text: str, t: str, at_least: bool = False) -> Reg:
    """A register operand of PTX type t: the same width (or, at_least, no narrower), predicates only for .pred."""
    if text not in k.regs:
        raise _syntax(k, ins, f"undeclared register {text!r}")
    r = Reg(text, bits(k.regs[text]))
    want = bits(t)
    if (r.bits == 1) != (want == 1) or (r.bits < want if at_least else r.bits != want):
        raise _syntax(k, ins, f"register {text} is .{k.regs[text]}, {ins.opcode} wants a {want}-bit operand")
    return r


def _imm(k: Kernel, ins: Instr, text: str, t: str):
    """An immediate of PTX type t as a numpy scalar: decimal, 0x hex, 0b, octal, 0fXXXXXXXX, 0dX..X, 1.5."""
    s = text.strip()
    try:
        if re.fullmatch(r"0[fF][0-9a-fA-F]{8}", s) and t == "f32":
            return np.array(int(s[2:], 16), np.uint32).view(np.float32)[()]
        if re.fullmatch(r"0[dD][0-9a-fA-F]{16}", s) and t == "f64":
            return np.array(int(s[2:], 16), np.uint64).view(np.float64)[()]
        if t in ("f16", "f32", "f64"):
            return TYPES[t](float(s))
        v = s.rstrip("Uu")
        neg = v.startswith("-")
        v = v.lstrip("+-")
        n = int(v, 8) if re.fullmatch(r"0[0-7]+", v) else int(v, 0)
        n = -n if neg else n
    except ValueError:
        raise _syntax(k, ins, f"bad immediate {text!r} for .{t}") from None
    if t == "pred":
        return np.bool_(n)
    w = bits(t)
    return np.array(n & ((1 << w) - 1), UNSIGNED[w]).view(TYPES[t])[()]


def _value(k: Kernel, ins: Instr, text: str, t: str):
    """A source operand of type t: register, immediate, special register, or a shared variable (its address)."""
    if text in SPECIAL_REGS:
        if bits(t) != 32:
            raise _syntax(k, ins, f"{text} is 32 bits, {ins.opcode} wants {bits(t)}")
        return Special(text)
    if text.startswith("%"):
        return _reg(k, ins, text, t)
    if text in k.shared:
        if t not in ("b32", "u32", "s32", "b64", "u64", "s64"):
            raise _syntax(k, ins, f"the address of {text} is an integer, not .{t}")
        return Imm(_imm(k, ins, str(k.shared[text][0]), t))
    if text in k.param_addr:  # the .param-space address of a kernel parameter (PTX ISA 5.1.6.1)
        if t not in ("b32", "u32", "s32", "b64", "u64", "s64"):
            raise _syntax(k, ins, f"the address of parameter {text} is an integer, not .{t}")
        return Imm(_imm(k, ins, str(k.param_addr[text]), t))
    if re.match(r"[-+]?(\d|\.\d)", text):
        return Imm(_imm(k, ins, text, t))
    raise _syntax(k, ins, f"bad operand {text!r}")


def _addr(k: Kernel, ins: Instr, text: str, space: str) -> Addr:
    """[%reg], [%reg+imm], [%reg-imm], [%reg+-imm] (nvcc writes that), [symbol], [symbol+imm], [imm]."""
    m = re.fullmatch(r"\[\s*([^\]]+?)\s*(?:([+-])\s*([+-]?\w+))?\s*\]", text)
    if not m:
        raise _syntax(k, ins, f"bad address {text!r}")
    base, sign, off = m.groups()
    offset = 0 if off is None else int(_imm(k, ins, off, "s64")) * (-1 if sign == "-" else 1)
    if space == "param":  # [name], or [name+offset] into an array parameter
        if base not in dict(k.params) or (offset and base not in k.param_arrays):
            raise _syntax(k, ins, f"ld.param wants [a parameter of {k.name}], got {text!r}")
        return Addr(None, offset, base)
    if base.startswith("%"):
        if base not in k.regs or bits(k.regs[base]) not in (32, 64):
            raise _syntax(k, ins, f"address register {base} must be a declared 32- or 64-bit register")
        return Addr(Reg(base, bits(k.regs[base])), offset)
    if base in k.shared and space == "shared":
        return Addr(None, k.shared[base][0] + offset)
    if re.fullmatch(r"[-+]?\w+", base) and base[0] in "+-0123456789":
        return Addr(None, int(_imm(k, ins, base, "s64")) + offset)
    raise _syntax(k, ins, f"unknown symbol {base!r} in {text!r} (for the .{space} space)")


def _vector(k: Kernel, ins: Instr, text: str, n: int) -> list[str]:
    if n == 1:
        return [text]
    m = re.fullmatch(r"\{(.*)\}", text.strip(), re.S)
    parts = [p.strip() for p in m.group(1).split(",")] if m else []
    if len(parts) != n:
        raise _syntax(k, ins, f"{ins.opcode} wants a vector of {n} registers, got {text!r}")
    return parts


# =============================================================================
# 2. registers

EXITED = np.iinfo(np.int64).max  # the pc of a thread that has executed ret/exit
# the GPU leaves registers undefined: start from values that show up if used
POISON = {1: False, 8: 0xCB, 16: 0x7FCB, 32: 0x7FCBADBA, 64: 0x7FF8BADBADBADBAD}


def _new_register(t: str, n: int) -> np.ndarray:
    w = bits(t)
    return np.full(n, POISON[w], np.bool_ if w == 1 else UNSIGNED[w])


def _extend(v: np.ndarray, t: str, reg_bits: int) -> np.ndarray:
    """A loaded value of type t into a register of reg_bits (ld's relaxed rule: zero/sign-extended), raw bits."""
    if reg_bits == bits(t):
        return v.view(UNSIGNED[reg_bits])
    wide = SIGNED[reg_bits] if t.startswith("s") else UNSIGNED[reg_bits]
    return v.astype(wide).view(UNSIGNED[reg_bits])


# =============================================================================
# 3. instructions
#
# OPCODES maps each full opcode spelling to an object with decode(kernel,
# instr) (check and resolve the operands, once, at load time) and
# execute(block, instr, idx, idx_all): idx are the threads that execute it
# (at this pc and guard true), idx_all those at this pc. Arithmetic is the
# Alu kind: the types of the destination and sources, and a numpy function of
# the sources (typed arrays or scalars) that returns the destination's dtype.

class Alu:
    control = False

    def __init__(self, dst: str, srcs: str, fn):
        self.dst, self.srcs, self.fn = dst, tuple(srcs.split()), fn

    def decode(self, k, ins):
        _arity(k, ins, 1 + len(self.srcs))
        if "|" in ins.operands[0]:
            raise _syntax(k, ins, "a second predicate destination (p|q) is not supported")
        ins.dst = _reg(k, ins, ins.operands[0], self.dst)
        ins.srcs = [_value(k, ins, o, t) for o, t in zip(ins.operands[1:], self.srcs)]

    def execute(self, blk, ins, idx, idx_all):
        vals = [blk.read(o, t, idx) for o, t in zip(ins.srcs, self.srcs)]
        blk.write(ins.dst, self.dst, self.fn(*vals), idx)


OPCODES: dict[str, object] = {}


def _alu(name: str, dst: str, srcs: str, fn):
    OPCODES[name] = Alu(dst, srcs, fn)


# ---- floating point helpers

F32_MIN_NORMAL = np.float32(2.0 ** -126)


def _f64(x):
    return np.asarray(x, np.float64)


def _to_f32(x):
    """Round float64 to float32, to nearest even (numpy's cast)."""
    return np.asarray(x, np.float64).astype(np.float32)


def _ftz(x):
    """Flush float32 subnormals to zero of the same sign (.ftz)."""
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < F32_MIN_NORMAL, np.copysign(np.float32(0), x), x).astype(np.float32)


def _fma_f32(a, b, c):
    """a * b + c rounded once to float32 (fma.rn.f32).

    The product of two float32 is exact in float64. The sum s = fl64(p + c)
    is not, but TwoSum gives its error e exactly (p + c = s + e). Rounding s
    to float32 is then correct unless s lies exactly halfway between two
    float32 values and e != 0, because then the true sum is on e's side of
    the midpoint while the cast would round to even."""
    a, b, c = np.broadcast_arrays(*(np.atleast_1d(_f64(x)) for x in (a, b, c)))
    p = a * b
    s = p + c
    bv = s - p
    e = (p - (s - bv)) + (c - bv)
    r = s.astype(np.float32)
    fix = np.isfinite(s) & (e != 0)
    if fix.any():
        sf, ef, rf = s[fix], e[fix], r[fix]
        big = np.copysign(2.0 ** 128, sf)  # where float32 rounding overflows, "inf" sits at 2^128
        r64 = np.where(np.isinf(rf), big, _f64(rf))
        other = np.nextafter(rf, np.where(sf > r64, np.float32(np.inf), np.float32(-np.inf)))
        o64 = np.where(np.isinf(other), big, _f64(other))
        flip = (sf == (r64 + o64) * 0.5) & ((ef > 0) == (o64 > r64))
        r[fix] = np.where(flip, other, rf)
    return r


def _bf16(x):
    """float32 -> bf16 bits (in a uint32), round to nearest even; NaN -> 0x7FFF."""
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(np.isnan(x), 0x7FFF, r).astype(np.uint32)


def _bf16x2(fn):
    """A bf16x2 operation from a float32 one: each half widened exactly, fn applied, rounded back."""
    def op(a, b):
        a, b = np.asarray(a, np.uint32), np.asarray(b, np.uint32)
        hi = fn((a & np.uint32(0xFFFF0000)).view(np.float32), (b & np.uint32(0xFFFF0000)).view(np.float32))
        lo = fn((a << np.uint32(16)).view(np.float32), (b << np.uint32(16)).view(np.float32))
        return (_bf16(hi) << np.uint32(16)) | _bf16(lo)
    return op


def _prmt(a, b, c):
    """prmt.b32 d, a, b, c (default mode): byte i of d is byte (nibble i of c) & 7 of {b, a} (a = bytes
    0-3); if the nibble's bit 3 is set, that byte's sign bit replicated instead."""
    x = (np.asarray(b, np.uint64) << np.uint64(32)) | np.asarray(a, np.uint64)
    c = np.asarray(c, np.uint64)
    d = np.zeros(np.broadcast(x, c).shape, np.uint64)
    for i in range(4):
        sel = (c >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (x >> ((sel & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        byte = np.where(sel & np.uint64(8), np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0)), byte)
        d |= byte << np.uint64(8 * i)
    return d.astype(np.uint32)


def _f32_to_s32_rz(a):
    t = np.clip(np.trunc(_f64(a)), -2.0 ** 31, 2.0 ** 31 - 1)
    return np.where(np.isnan(t), 0, t).astype(np.int32)


def _sign_flip(a, mask):
    a = np.asarray(a, np.float32)
    return (a.view(np.uint32) ^ np.uint32(mask)).view(np.float32)


def _fneq(a, b):  # ordered not-equal: false when either is NaN
    return (a != b) & ~np.isnan(a) & ~np.isnan(b)


FLOAT_CMP = {
    "eq": np.equal, "ne": _fneq, "lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "equ": lambda a, b: (a == b) | np.isnan(a) | np.isnan(b), "neu": np.not_equal,
    "ltu": lambda a, b: ~(a >= b), "leu": lambda a, b: ~(a > b),
    "gtu": lambda a, b: ~(a <= b), "geu": lambda a, b: ~(a < b),
    "num": lambda a, b: ~np.isnan(a) & ~np.isnan(b), "nan": lambda a, b: np.isnan(a) | np.isnan(b),
}
INT_CMP = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
           "gt": np.greater, "ge": np.greater_equal}
UNSIGNED_CMP = {"lo": np.less, "ls": np.less_equal, "hi": np.greater, "hs": np.greater_equal}


def _shl(a, b, w):
    a, b = np.asarray(a), np.asarray(b, np.uint32)
    return np.where(b >= w, 0, a << np.minimum(b, w - 1).astype(a.dtype)).astype(a.dtype)


def _shr(a, b, w):  # arithmetic for signed a, logical for unsigned: amounts >= w clamp to w
    a, b = np.asarray(a), np.asarray(b, np.uint32)
    if a.dtype.kind == "i":
        return (a >> np.minimum(b, w - 1).astype(a.dtype)).astype(a.dtype)
    return np.where(b >= w, 0, a >> np.minimum(b, w - 1).astype(a.dtype)).astype(a.dtype)


def _idiv(a, b):
    """Integer division truncating toward zero (C's /); x / 0, machine-specific in PTX, is all ones here."""
    a, b = np.asarray(a), np.asarray(b)
    safe = np.where(b == 0, 1, b).astype(a.dtype)
    q = a // safe  # floors: step back toward zero where the signs differ and there is a remainder
    if a.dtype.kind == "i":
        q = np.where((a % safe != 0) & ((a < 0) != (safe < 0)), q + 1, q).astype(a.dtype)
    return np.where(b == 0, ~np.zeros((), a.dtype), q).astype(a.dtype)


def _irem(a, b):
    """Remainder with the sign of the dividend (C's %); x % 0 is x here."""
    a, b = np.asarray(a), np.asarray(b)
    return (a - _idiv(a, b) * np.where(b == 0, 0, b).astype(a.dtype)).astype(a.dtype)


def _apply_ftz(fn):
    return lambda *xs: _ftz(fn(*(_ftz(x) for x in xs)))


def _fma_f32_directed(mode: str):
    """fma.rm / .rp / .rz .f32: the correctly rounded result (_fma_f32), moved one float32 step toward
    -inf, +inf or 0 where it lies on the wrong side of the exact a * b + c. The exact value is s + e
    (TwoSum, as in _fma_f32), and r - s is exact (Sterbenz), so the side is the sign of (r - s) - e."""
    def op(a, b, c):
        r = _fma_f32(a, b, c)
        a, b, c = np.broadcast_arrays(*(np.atleast_1d(_f64(x)) for x in (a, b, c)))
        p = a * b
        s = p + c
        bv = s - p
        e = (p - (s - bv)) + (c - bv)
        d = np.where(np.isinf(r), np.copysign(np.inf, r), _f64(r) - s) - e  # > 0: r is above the exact value
        exact = p + c  # NaN where the result is NaN
        down = {"rm": d > 0, "rp": np.zeros_like(d, bool), "rz": (d > 0) & (exact > 0)}[mode]
        up = {"rm": np.zeros_like(d, bool), "rp": d < 0, "rz": (d < 0) & (exact < 0)}[mode]
        r = np.where(down, np.nextafter(r, np.float32(-np.inf)), r)
        r = np.where(up, np.nextafter(r, np.float32(np.inf)), r)
        if mode == "rm":  # an exact zero sum is -0 when rounding toward -inf, unless both terms are +0
            r = np.where((exact == 0) & (np.signbit(p) | np.signbit(c)), np.float32(-0.0), r)
        return r.astype(np.float32)
    return op


def _fma_f64(a, b, c):
    """fma.rn.f64: a * b + c rounded once. The product's rounding error comes from Dekker's TwoProduct;
    where it is 0 (always for operands converted from float32) one float64 addition is the answer, the
    rest (rare) goes through exact rational arithmetic."""
    a, b, c = np.broadcast_arrays(*(np.atleast_1d(_f64(x)) for x in (a, b, c)))
    p = a * b
    split = lambda x: (x * 134217729.0 - (x * 134217729.0 - x), x - (x * 134217729.0 - (x * 134217729.0 - x)))
    (ah, al), (bh, bl) = split(a), split(b)
    err = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    out = p + c
    slow = np.flatnonzero(np.isfinite(out) & np.isfinite(err) & (err != 0))
    for i in slow:  # float() of a Fraction rounds correctly, ties to even
        out[i] = float(Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i])))
    return out


def _bfi(a, b, pos, length):
    """bfi.b32 d, a, b, pos, len: b with bits pos .. pos+len-1 replaced by the low bits of a (pos and len
    are taken mod 256; the field ends at bit 31)."""
    a, b = np.asarray(a, np.uint64), np.asarray(b, np.uint64)
    pos = np.asarray(pos, np.uint64) & np.uint64(0xFF)
    length = np.minimum(np.asarray(length, np.uint64) & np.uint64(0xFF), np.uint64(32) - np.minimum(pos, 32))
    mask = ((np.uint64(1) << length) - np.uint64(1)) << np.minimum(pos, 32)
    return ((b & ~mask) | ((a << np.minimum(pos, 32)) & mask)).astype(np.uint32)


# ---- the table

# float32 arithmetic: .rn is round to nearest even; .ftz flushes subnormal inputs and result
for ftz in ("", ".ftz"):
    wrap = _apply_ftz if ftz else (lambda f: f)
    _alu(f"add.rn{ftz}.f32", "f32", "f32 f32", wrap(np.add))
    _alu(f"sub.rn{ftz}.f32", "f32", "f32 f32", wrap(np.subtract))
    _alu(f"mul.rn{ftz}.f32", "f32", "f32 f32", wrap(np.multiply))
    _alu(f"fma.rn{ftz}.f32", "f32", "f32 f32 f32", wrap(_fma_f32))
    _alu(f"div.rn{ftz}.f32", "f32", "f32 f32", wrap(lambda a, b: _to_f32(_f64(a) / _f64(b))))
    _alu(f"rcp.rn{ftz}.f32", "f32", "f32", wrap(lambda a: _to_f32(1.0 / _f64(a))))
    _alu(f"sqrt.rn{ftz}.f32", "f32", "f32", wrap(lambda a: _to_f32(np.sqrt(_f64(a)))))
    _alu(f"max{ftz}.f32", "f32", "f32 f32", wrap(np.fmax))   # a NaN operand gives the other one
    _alu(f"min{ftz}.f32", "f32", "f32 f32", wrap(np.fmin))
    _alu(f"neg{ftz}.f32", "f32", "f32", wrap(lambda a: _sign_flip(a, 0x80000000)))
    _alu(f"abs{ftz}.f32", "f32", "f32", wrap(lambda a: _sign_flip(np.abs(a), 0)))
    # .approx: exact here (float64 rounded once), approximate on the GPU
    _alu(f"ex2.approx{ftz}.f32", "f32", "f32", wrap(lambda a: _to_f32(np.exp2(_f64(a)))))
    _alu(f"lg2.approx{ftz}.f32", "f32", "f32", wrap(lambda a: _to_f32(np.log2(_f64(a)))))
    _alu(f"rcp.approx{ftz}.f32", "f32", "f32", wrap(lambda a: _to_f32(1.0 / _f64(a))))
    # no rounding modifier: round to nearest even, but ptxas may fuse a mul.f32 into the add.f32 or
    # sub.f32 that uses it (see _contract, which does the same)
    _alu(f"add{ftz}.f32", "f32", "f32 f32", wrap(np.add))
    _alu(f"sub{ftz}.f32", "f32", "f32 f32", wrap(np.subtract))
    _alu(f"mul{ftz}.f32", "f32", "f32 f32", wrap(np.multiply))
    for rnd in ("rm", "rp", "rz"):  # toward -inf, +inf, zero
        _alu(f"fma.{rnd}{ftz}.f32", "f32", "f32 f32 f32", wrap(_fma_f32_directed(rnd)))
_alu("tanh.approx.f32", "f32", "f32", lambda a: _to_f32(np.tanh(_f64(a))))
_alu("cvt.sat.f32.f32", "f32", "f32", lambda a: np.where(np.isnan(a), 0, np.clip(a, 0, 1)).astype(np.float32))
_alu("copysign.f32", "f32", "f32 f32", lambda a, b: np.copysign(b, a).astype(np.float32))  # |b| with a's sign

# float64: numpy's float64 operations are IEEE, round to nearest even
for rn in ("", ".rn"):
    _alu(f"add{rn}.f64", "f64", "f64 f64", np.add)
    _alu(f"sub{rn}.f64", "f64", "f64 f64", np.subtract)
    _alu(f"mul{rn}.f64", "f64", "f64 f64", np.multiply)
_alu("fma.rn.f64", "f64", "f64 f64 f64", _fma_f64)
_alu("neg.f64", "f64", "f64", np.negative)
_alu("abs.f64", "f64", "f64", np.abs)
_alu("cvt.f64.f32", "f64", "f32", _f64)  # exact
_alu("cvt.rn.f32.f64", "f32", "f64", _to_f32)

# packed bf16 pairs (a .b32 register holds two bf16: element 0 low, element 1 high)
_alu("max.bf16x2", "b32", "b32 b32", _bf16x2(np.fmax))  # exact: the max is one of the inputs
_alu("min.bf16x2", "b32", "b32 b32", _bf16x2(np.fmin))

# integers: add/sub/mul.lo/mad.lo wrap around, the same bits signed or unsigned
for t in ("s16", "u16", "s32", "u32", "s64", "u64"):
    u = "u" + t[1:]
    _alu(f"add.{t}", u, f"{u} {u}", np.add)
    _alu(f"sub.{t}", u, f"{u} {u}", np.subtract)
    _alu(f"mul.lo.{t}", u, f"{u} {u}", np.multiply)
    _alu(f"mad.lo.{t}", u, f"{u} {u} {u}", lambda a, b, c: a * b + c)
    _alu(f"div.{t}", t, f"{t} {t}", _idiv)
    _alu(f"rem.{t}", t, f"{t} {t}", _irem)
    _alu(f"min.{t}", t, f"{t} {t}", np.minimum)
    _alu(f"max.{t}", t, f"{t} {t}", np.maximum)
_alu("mul.wide.s32", "s64", "s32 s32", lambda a, b: np.asarray(a, np.int64) * np.asarray(b, np.int64))
_alu("mul.wide.u32", "u64", "u32 u32", lambda a, b: np.asarray(a, np.uint64) * np.asarray(b, np.uint64))
_alu("mul.wide.s16", "s32", "s16 s16", lambda a, b: np.asarray(a, np.int32) * np.asarray(b, np.int32))
_alu("mul.wide.u16", "u32", "u16 u16", lambda a, b: np.asarray(a, np.uint32) * np.asarray(b, np.uint32))

# bits and shifts: a shift amount is .u32, amounts >= the width clamp to it
for w in (16, 32, 64):
    b = f"b{w}"
    _alu(f"and.{b}", b, f"{b} {b}", np.bitwise_and)
    _alu(f"or.{b}", b, f"{b} {b}", np.bitwise_or)
    _alu(f"xor.{b}", b, f"{b} {b}", np.bitwise_xor)
    _alu(f"not.{b}", b, b, np.invert)
    _alu(f"shl.{b}", b, f"{b} u32", functools.partial(_shl, w=w))
    for t in (b, f"u{w}", f"s{w}"):
        _alu(f"shr.{t}", t, f"{t} u32", functools.partial(_shr, w=w))
_alu("prmt.b32", "b32", "b32 b32 b32", _prmt)
_alu("bfi.b32", "b32", "b32 b32 u32 u32", _bfi)
_alu("and.pred", "pred", "pred pred", np.logical_and)
_alu("or.pred", "pred", "pred pred", np.logical_or)
_alu("xor.pred", "pred", "pred pred", np.logical_xor)
_alu("not.pred", "pred", "pred", np.logical_not)

# comparisons and selects
for t in ("f32", "f64"):
    for cmp, fn in FLOAT_CMP.items():
        _alu(f"setp.{cmp}.{t}", "pred", f"{t} {t}", fn)
for w in (16, 32, 64):
    for cmp in ("eq", "ne"):
        _alu(f"setp.{cmp}.b{w}", "pred", f"b{w} b{w}", INT_CMP[cmp])
    for cmp, fn in INT_CMP.items():
        _alu(f"setp.{cmp}.s{w}", "pred", f"s{w} s{w}", fn)
    for cmp, fn in (INT_CMP | UNSIGNED_CMP).items():
        _alu(f"setp.{cmp}.u{w}", "pred", f"u{w} u{w}", fn)
for t in ("b16", "u16", "s16", "b32", "u32", "s32", "f32", "b64", "u64", "s64", "f64"):
    _alu(f"selp.{t}", t, f"{t} {t} pred", lambda a, b, c: np.where(c, a, b))
    _alu(f"mov.{t}", t, t, np.asarray)  # also special registers and the address of a shared variable
_alu("mov.pred", "pred", "pred", np.asarray)


class Mov(Alu):
    """mov.b32 / mov.b64: a copy (Alu), or a vector operand packed or unpacked: mov.b32 %r, {%h0, %h1}
    puts %h0 in the low half of %r, and mov.b32 {%h0, %h1}, %r takes it back out (2 or 4 pieces)."""

    def decode(self, k, ins):
        if not any(o.startswith("{") for o in ins.operands):
            return super().decode(k, ins)
        _arity(k, ins, 2)
        w, unpack = bits(self.dst), ins.operands[0].startswith("{")
        parts = [x.strip() for x in ins.operands[0 if unpack else 1].strip("{}").split(",")]
        if len(parts) not in (2, 4) or w // len(parts) not in (8, 16, 32):
            raise _syntax(k, ins, f"{ins.opcode} packs 2 or 4 pieces, got {len(parts)}")
        piece = f"b{w // len(parts)}"
        if unpack:
            ins.dst = [_reg(k, ins, x, piece) for x in parts]
            ins.srcs = [_value(k, ins, ins.operands[1], self.dst)]
        else:
            ins.dst = _reg(k, ins, ins.operands[0], self.dst)
            ins.srcs = [_value(k, ins, x, piece) for x in parts]

    def execute(self, blk, ins, idx, idx_all):
        w = bits(self.dst)
        if isinstance(ins.dst, list):  # unpack: piece j is bits j*pw .. (j+1)*pw - 1
            v = np.asarray(blk.read(ins.srcs[0], self.dst, idx)).astype(np.uint64)
            pw = w // len(ins.dst)
            for j, r in enumerate(ins.dst):
                blk.write(r, f"b{pw}", ((v >> np.uint64(j * pw)) & np.uint64((1 << pw) - 1)).astype(UNSIGNED[pw]), idx)
        elif len(ins.srcs) > 1:
            pw = w // len(ins.srcs)
            v = np.zeros(blk.count(idx), np.uint64)
            for j, o in enumerate(ins.srcs):
                v |= np.asarray(blk.read(o, f"b{pw}", idx)).astype(np.uint64) << np.uint64(j * pw)
            blk.write(ins.dst, self.dst, v.astype(UNSIGNED[w]), idx)
        else:
            super().execute(blk, ins, idx, idx_all)


OPCODES["mov.b32"], OPCODES["mov.b64"] = Mov("b32", "b32", np.asarray), Mov("b64", "b64", np.asarray)


# conversions

class Cvt(Alu):
    """cvt between integers: C's casts (sign- or zero-extend by the source type, or truncate). Like ld and st,
    cvt takes registers wider than its types: a wider source is truncated to the source type first, a wider
    destination gets the result sign- or zero-extended by the destination type."""

    def decode(self, k, ins):
        _arity(k, ins, 2)
        ins.dst = _reg(k, ins, ins.operands[0], self.dst, at_least=True)
        o = ins.operands[1]
        ins.srcs = [_reg(k, ins, o, self.srcs[0], at_least=True) if o in k.regs else _value(k, ins, o, self.srcs[0])]

    def execute(self, blk, ins, idx, idx_all):
        o, st = ins.srcs[0], self.srcs[0]
        if type(o) is Reg and o.bits > bits(st):
            a = blk.regs[o.name][idx].astype(UNSIGNED[bits(st)]).view(TYPES[st])
        else:
            a = blk.read(o, st, idx)
        blk.regs[ins.dst.name][idx] = _extend(np.asarray(a).astype(TYPES[self.dst]), self.dst, ins.dst.bits)


for dt, st in itertools.product(("u16", "s16", "u32", "s32", "u64", "s64"), repeat=2):
    if dt != st:
        OPCODES[f"cvt.{dt}.{st}"] = Cvt(dt, st, None)
_alu("cvt.rn.f32.s32", "f32", "s32", lambda a: np.asarray(a).astype(np.float32))
_alu("cvt.rn.f32.u32", "f32", "u32", lambda a: np.asarray(a).astype(np.float32))
_alu("cvt.rzi.s32.f32", "s32", "f32", _f32_to_s32_rz)
_alu("cvt.rn.bf16x2.f32", "b32", "f32 f32", lambda a, b: (_bf16(a) << np.uint32(16)) | _bf16(b))  # a: upper half
_alu("cvt.rn.bf16.f32", "b16", "f32", lambda a: _bf16(a).astype(np.uint16))
_alu("cvt.f32.bf16", "f32", "b16", lambda a: (np.asarray(a, np.uint32) << np.uint32(16)).view(np.float32))
_alu("cvta.to.global.u64", "u64", "u64", np.asarray)  # generic and global addresses are the same numbers here


# ---- memory instructions

class Load:
    control = False

    def __init__(self, space: str, vec: int, t: str, nc: bool = False):
        self.space, self.vec, self.t, self.nc = space, vec, t, nc

    def decode(self, k, ins):
        _arity(k, ins, 2)
        relaxed = self.t[0] in "bus" and self.space != "param"
        ins.dst = [_reg(k, ins, r, self.t, at_least=relaxed) for r in _vector(k, ins, ins.operands[0], self.vec)]
        ins.addr = _addr(k, ins, ins.operands[1], self.space)
        if self.space == "param" and ins.addr.param in k.param_arrays:
            if ins.addr.offset < 0 or ins.addr.offset + bits(self.t) // 8 > k.param_arrays[ins.addr.param]:
                raise _syntax(k, ins, f"reads past the {k.param_arrays[ins.addr.param]} bytes of {ins.addr.param}")
        elif self.space == "param" and bits(dict(k.params)[ins.addr.param]) != bits(self.t):
            raise _syntax(k, ins, f"parameter {ins.addr.param} is .{dict(k.params)[ins.addr.param]}, "
                                  f"not {bits(self.t)} bits")

    def execute(self, blk, ins, idx, idx_all):
        if self.space == "param":
            v = blk.params[ins.addr.param]
            if isinstance(v, TensorMap):
                raise _Fault(MemcheckError, f"ld.param of the tensor map {ins.addr.param}: a CUtensorMap is opaque "
                                            f"(only cp.async.bulk.tensor reads it)", None)
            if ins.addr.param in blk.k.param_arrays:  # raw bytes of an array parameter
                n = bits(self.t) // 8
                v = v[ins.addr.offset:ins.addr.offset + n].copy().view(TYPES[self.t])[0]
            vals = [np.asarray(v).view(TYPES[self.t])]
        else:
            size = bits(self.t) // 8
            raw = blk.memory(self.space).load(blk.address(ins.addr, idx), size * self.vec, size * self.vec,
                                              blk.access(idx, self.nc))
            vals = list(raw.view(TYPES[self.t]).T)
        for r, v in zip(ins.dst, vals):
            blk.regs[r.name][idx] = _extend(np.asarray(v), self.t, r.bits)


class Store:
    control = False

    def __init__(self, space: str, vec: int, t: str):
        self.space, self.vec, self.t = space, vec, t

    def decode(self, k, ins):
        _arity(k, ins, 2)
        ins.addr = _addr(k, ins, ins.operands[0], self.space)
        relaxed = self.t[0] in "bus"
        ins.srcs = [_reg(k, ins, o, self.t, at_least=relaxed) if o.startswith("%") else _value(k, ins, o, self.t)
                    for o in _vector(k, ins, ins.operands[1], self.vec)]

    def execute(self, blk, ins, idx, idx_all):
        n = blk.count(idx)
        w = bits(self.t)
        cols = []
        for o in ins.srcs:  # the low w bits of each source (st's relaxed rule truncates wider registers)
            v = blk.regs[o.name][idx] if isinstance(o, Reg) else np.asarray(o.value).view(UNSIGNED[w])
            cols.append(np.broadcast_to(np.asarray(v).astype(UNSIGNED[w]), (n,)))
        data = np.ascontiguousarray(np.stack(cols, axis=1)).view(np.uint8).reshape(n, -1)
        blk.memory(self.space).store(blk.address(ins.addr, idx), data, data.shape[1], blk.access(idx, False))


_LDST_TYPES = ("b8", "u8", "s8", "b16", "u16", "s16", "b32", "u32", "s32", "f32", "b64", "u64", "s64", "f64")
for t in _LDST_TYPES:
    OPCODES[f"ld.param.{t}"] = Load("param", 1, t)
    for vec, n in (("", 1), (".v2", 2), (".v4", 4)):
        if n * bits(t) > 128:
            continue
        for cache in ("", ".ca", ".cg", ".cs", ".lu", ".cv", ".nc"):
            OPCODES[f"ld.global{cache}{vec}.{t}"] = Load("global", n, t, nc=cache == ".nc")
        for cache in ("", ".wb", ".cg", ".cs", ".wt"):
            OPCODES[f"st.global{cache}{vec}.{t}"] = Store("global", n, t)
        OPCODES[f"ld.shared{vec}.{t}"] = Load("shared", n, t)
        OPCODES[f"st.shared{vec}.{t}"] = Store("shared", n, t)


class Atom:
    """atom.global.OP.TYPE d, [a], b: d = the old value, and OP(old, b) is stored. Several threads on one
    address in one step all apply, one after another in thread order (any order is a valid schedule).
    Atomics are not races with each other; one after another thread's plain store with no barrier
    between is."""
    control = False

    def __init__(self, space: str, t: str, fn):
        self.space, self.t, self.fn = space, t, fn

    def decode(self, k, ins):
        _arity(k, ins, 3)
        ins.dst = _reg(k, ins, ins.operands[0], self.t)
        ins.addr = _addr(k, ins, ins.operands[1], self.space)
        ins.srcs = [_value(k, ins, ins.operands[2], self.t)]

    def execute(self, blk, ins, idx, idx_all):
        vals = np.broadcast_to(blk.read(ins.srcs[0], self.t, idx), (blk.count(idx),))
        old = blk.memory(self.space).atomic(blk.address(ins.addr, idx), vals, self.t, self.fn, blk.access(idx, False))
        blk.write(ins.dst, self.t, old, idx)


for t in ("u32", "s32", "u64"):
    for op, fn in (("add", np.add), ("max", np.maximum), ("min", np.minimum), ("exch", lambda a, b: b)):
        OPCODES[f"atom.global.{op}.{t}"] = Atom("global", t, fn)


# cp.async: a copy from global to shared memory that completes later. Modelled at the two ends of the
# time it may take: the global bytes are read when cp.async issues (bounds, alignment and race checked
# then); the shared bytes are written when the issuing thread's cp.async.wait_group retires the
# copy's group (and only then count as written by that thread, so other threads also need a bar.sync
# after the wait). In between, the destination bytes are in flight: any load or store of them, by any
# thread, is a MemcheckError. cp.async.commit_group closes the thread's group of copies issued since
# its last commit; wait_group N waits until at most N of its committed groups are pending. Copies
# still in flight when the thread exits are dropped (nothing can read them).

@dataclass
class _AsyncCopy:
    gids: np.ndarray   # issuing threads (wave indices)
    dst: np.ndarray    # shared addresses
    data: np.ndarray   # (n, size) bytes, read from global at issue
    group: np.ndarray  # the issuing thread's commit count at issue: the group the copy belongs to
    line: int


class CpAsync:
    """cp.async.{ca,cg}.shared.global [dst], [src], cp-size[, src-size]: cp-size bytes (4, 8 or 16; .cg
    16) of which the first src-size come from src and the rest are zeros (src-size 0 reads nothing)."""
    control = False

    def __init__(self, sizes):
        self.sizes = sizes

    def decode(self, k, ins):
        if len(ins.operands) not in (3, 4):
            raise _syntax(k, ins, f"{ins.opcode} takes [dst], [src], cp-size[, src-size]")
        ins.addr = _addr(k, ins, ins.operands[0], "shared")
        size = int(_imm(k, ins, ins.operands[2], "u32"))
        if size not in self.sizes:
            raise _syntax(k, ins, f"{ins.opcode}: cp-size must be one of {self.sizes}, got {size}")
        ins.srcs = [_addr(k, ins, ins.operands[1], "global"), size,
                    _value(k, ins, ins.operands[3], "u32") if len(ins.operands) == 4 else None]

    def execute(self, blk, ins, idx, idx_all):
        src_addr, size, src_size = ins.srcs
        g = blk.gid[idx]
        dst, src = blk.address(ins.addr, idx), blk.address(src_addr, idx)
        n = len(g)
        take = np.full(n, size, np.int64) if src_size is None else \
            np.broadcast_to(blk.read(src_size, "u32", idx), (n,)).astype(np.int64)
        if (take > size).any():
            i = int(np.argmax(take > size))
            raise _Fault(MemcheckError, f"src-size {take[i]} is larger than cp-size {size}", int(g[i]))
        data = np.zeros((n, size), np.uint8)
        for s in np.unique(take[take > 0]):
            rows = np.flatnonzero(take == s)
            data[rows, :s] = blk.device.memory.load(src[rows], int(s), size, blk.access(g[rows], False))
        blk.shared.reserve(dst, size, blk.access(g, False))
        blk.async_copies.append(_AsyncCopy(g, dst, data, blk.ncommit[g].copy(), ins.line))


class CpAsyncCommit:
    control = False

    def decode(self, k, ins):
        _arity(k, ins, 0)

    def execute(self, blk, ins, idx, idx_all):
        blk.ncommit[blk.gid[idx]] += 1


class CpAsyncWait:
    """cp.async.wait_group N (wait_all: commit, then wait_group 0): the copies of this thread's groups
    older than its N newest committed ones land, in the order they were issued."""
    control = False

    def __init__(self, commit_first: bool):
        self.commit_first = commit_first

    def decode(self, k, ins):
        _arity(k, ins, 0 if self.commit_first else 1)
        ins.srcs = [0 if self.commit_first else int(_imm(k, ins, ins.operands[0], "u32"))]

    def execute(self, blk, ins, idx, idx_all):
        g = blk.gid[idx]
        if self.commit_first:
            blk.ncommit[g] += 1
        waiting = np.zeros(blk.N, bool)
        waiting[g] = True
        limit = blk.ncommit - ins.srcs[0]
        keep = []
        for c in blk.async_copies:
            done = waiting[c.gids] & (c.group < limit[c.gids])
            if done.any():
                rows = np.flatnonzero(done)
                try:
                    blk.shared.store(c.dst[rows], c.data[rows], c.data.shape[1], blk.access(c.gids[rows], False),
                                     landing=True)
                except _Fault as f:
                    raise _Fault(f.cls, f"the cp.async of line {c.line} lands here: {f.msg}", f.thread) from None
            if not done.all():
                rest = np.flatnonzero(~done)
                keep.append(_AsyncCopy(c.gids[rest], c.dst[rest], c.data[rest], c.group[rest], c.line))
        blk.async_copies = keep


OPCODES["cp.async.cg.shared.global"] = CpAsync((16,))
OPCODES["cp.async.ca.shared.global"] = CpAsync((4, 8, 16))
OPCODES["cp.async.commit_group"] = CpAsyncCommit()
OPCODES["cp.async.wait_group"] = CpAsyncWait(False)
OPCODES["cp.async.wait_all"] = CpAsyncWait(True)


# ---- warp shuffles, reductions, barriers, control flow

FULL_MASK = 0xFFFFFFFF


class Shfl:
    """shfl.sync.MODE.b32 d[|p], a, b, c, membermask: d = a of lane j (PTX ISA's pseudocode): bfly j = lane ^ b,
    up j = lane - b, down j = lane + b, idx j = b; c = segment mask << 8 | clamp; out of range: own value,
    and p (if given) false. Every lane in membermask must execute this instruction together, and only
    those lanes."""
    control = False

    def __init__(self, mode: str):
        self.mode = mode

    def decode(self, k, ins):
        _arity(k, ins, 5)
        d, _, p = ins.operands[0].partition("|")
        ins.dst = (_reg(k, ins, d.strip(), "b32"), _reg(k, ins, p.strip(), "pred") if p else None)
        ins.srcs = [_value(k, ins, o, "b32") for o in ins.operands[1:]]

    def execute(self, blk, ins, idx, idx_all):
        g = blk.gid[idx]
        lane = (g & 31).astype(np.int64)
        b, c, mask = (np.broadcast_to(blk.read(o, "u32", idx), g.shape).astype(np.int64) for o in ins.srcs[1:])
        blk.check_warp_members(ins, idx, mask)
        bval, cval, segmask = b & 31, c & 31, (c >> 8) & 31
        min_lane = lane & segmask
        max_lane = min_lane | (cval & ~segmask)
        if self.mode == "bfly":
            j = lane ^ bval
        elif self.mode == "up":
            j = lane - bval
        elif self.mode == "down":
            j = lane + bval
        else:
            j = min_lane | (bval & ~segmask)
        ok = j >= max_lane if self.mode == "up" else j <= max_lane  # else the thread's own value
        src = g - lane + np.where(ok, j, lane)  # warps never straddle blocks in a wave (see _Wave)
        if not ((mask >> (src & 31)) & 1).all():
            bad = int(np.argmin((mask >> (src & 31)) & 1))
            raise _Fault(DivergenceError, f"reads lane {src[bad] & 31}, which is not in membermask", int(g[bad]))
        a = blk.read(ins.srcs[0], "b32", slice(None))
        blk.write(ins.dst[0], "b32", np.broadcast_to(a, (blk.N,))[src], idx)
        if ins.dst[1] is not None:
            blk.write(ins.dst[1], "pred", np.asarray(ok, bool), idx)


class Redux:
    """redux.sync.OP.TYPE d, a, membermask: every lane of membermask gets OP over their a (add wraps around)."""
    control = False
    IDENTITY = {"add": 0, "max": np.iinfo(np.int64).min, "min": np.iinfo(np.int64).max,
                "and": -1, "or": 0, "xor": 0}
    UFUNC = {"add": np.add, "max": np.maximum, "min": np.minimum, "and": np.bitwise_and, "or": np.bitwise_or,
             "xor": np.bitwise_xor}

    def __init__(self, op: str, t: str):
        self.op, self.t = op, t

    def decode(self, k, ins):
        _arity(k, ins, 3)
        ins.dst = _reg(k, ins, ins.operands[0], self.t)
        ins.srcs = [_value(k, ins, ins.operands[1], self.t), _value(k, ins, ins.operands[2], "u32")]

    def execute(self, blk, ins, idx, idx_all):
        n = blk.count(idx)
        mask = np.broadcast_to(blk.read(ins.srcs[1], "u32", idx), (n,)).astype(np.int64)
        blk.check_warp_members(ins, idx, mask)
        v = np.broadcast_to(blk.read(ins.srcs[0], self.t, idx), (n,)).astype(np.int64)
        w = blk.gid[idx] >> 5
        acc = np.full(blk.nwarps, self.IDENTITY[self.op], np.int64)
        self.UFUNC[self.op].at(acc, w, v)
        blk.write(ins.dst, self.t, acc[w].astype(TYPES[self.t]), idx)


class WarpSync:
    """bar.warp.sync membermask: the lanes of membermask meet here (all must arrive). A full mask also orders
    the warp's shared and global memory accesses for the racecheck, like bar.sync for the block; a partial
    mask orders nothing there (which can only report more races, never hide one)."""
    control = False

    def decode(self, k, ins):
        _arity(k, ins, 1)
        ins.srcs = [_value(k, ins, ins.operands[0], "u32")]

    def execute(self, blk, ins, idx, idx_all):
        g = blk.gid[idx]
        mask = np.broadcast_to(blk.read(ins.srcs[0], "u32", idx), g.shape).astype(np.int64)
        blk.check_warp_members(ins, idx, mask)
        blk.wepoch[np.unique(g[mask == FULL_MASK] >> 5)] += 1


class Bar:
    """bar.sync id: every thread of the block that has not exited must arrive here."""
    control = False

    def decode(self, k, ins):
        if len(ins.operands) != 1:
            raise _syntax(k, ins, "only bar.sync with a barrier id and no thread count is supported")
        ins.srcs = [_value(k, ins, ins.operands[0], "u32")]

    def execute(self, blk, ins, idx, idx_all):
        here = np.zeros(blk.N, bool)
        here[idx] = True
        blocks = np.zeros(blk.nb, bool)  # the wave's blocks that meet here
        blocks[blk.blk[idx]] = True
        missing = (blk.pcs != EXITED) & ~here & blocks[blk.blk]
        if missing.any():
            t = int(np.argmax(missing))
            raise _Fault(DivergenceError, f"thread {blk.tid3(int(blk.tid[t]))} {blk.whereabouts(t)}, not at this "
                                          f"barrier", None, block=int(blk.blk[t]))
        blk.epoch[blocks] += 1
        for seen in blk.observed.values():  # what one thread saw of an mbarrier, all have seen after bar.sync
            per_block = seen.reshape(blk.nb, blk.Tp).max(1)
            seen[blocks[blk.blk]] = per_block[blk.blk][blocks[blk.blk]]


class Branch:
    control = True

    def __init__(self, uniform: bool):
        self.uniform = uniform

    def decode(self, k, ins):
        _arity(k, ins, 1)
        if ins.operands[0] not in k.labels:
            raise _syntax(k, ins, f"unknown label {ins.operands[0]!r}")
        ins.target = k.labels[ins.operands[0]]

    def execute(self, blk, ins, idx, idx_all):
        if self.uniform and ins.guard is not None:  # .uni: the active threads of a warp all go one way
            taken = np.zeros(blk.N, bool)
            taken[idx] = True
            here = np.zeros(blk.N, bool)
            here[idx_all] = True
            split = (taken.reshape(-1, 32).any(1)) & (here & ~taken).reshape(-1, 32).any(1)
            if split.any():
                w = int(np.argmax(split))
                raise _Fault(DivergenceError, f"bra.uni diverges in warp {w % blk.wpb}", None,
                             block=w // blk.wpb)
        blk.pcs[idx_all] = blk.cur + 1
        blk.pcs[idx] = ins.target


class Exit:
    control = True

    def decode(self, k, ins):
        _arity(k, ins, 0)

    def execute(self, blk, ins, idx, idx_all):
        blk.pcs[idx_all] = blk.cur + 1
        blk.pcs[idx] = EXITED


for mode in ("bfly", "up", "down", "idx"):
    OPCODES[f"shfl.sync.{mode}.b32"] = Shfl(mode)
for op in ("add", "max", "min"):
    for t in ("u32", "s32"):
        OPCODES[f"redux.sync.{op}.{t}"] = Redux(op, t)
for op in ("and", "or", "xor"):
    OPCODES[f"redux.sync.{op}.b32"] = Redux(op, "b32")
OPCODES["bar.warp.sync"] = WarpSync()
OPCODES["bar.sync"] = OPCODES["barrier.sync"] = OPCODES["barrier.sync.aligned"] = Bar()
OPCODES["bra"], OPCODES["bra.uni"] = Branch(False), Branch(True)
OPCODES["ret"] = OPCODES["exit"] = Exit()


# ---- tensor cores: ldmatrix and mma.sync (whole warps; layouts from the PTX ISA)
#
# A .b32 register holds two 16-bit elements, the one with the lower index in the low half. With
# g = lane / 4 and q = lane % 4:
#   ldmatrix .m8n8 .xN: lane 8 i + r gives the address of row r (16 bytes) of matrix i; register i of
#     lane l is row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i (.trans: rows 2 (l % 4) and
#     2 (l % 4) + 1 of column l / 4, i.e. the matrix transposed).
#   mma .m16n8k16 .row.col, bf16 A (16 x 16), B (16 x 8), fp32 C and D (16 x 8):
#     A: a0 = (g, 2q..2q+1), a1 = (g+8, 2q..), a2 = (g, 2q+8..), a3 = (g+8, 2q+8..)
#     B: b0 = rows (k) 2q, 2q+1 of column g, b1 = rows 2q+8, 2q+9
#     C, D: c0, c1 = (g, 2q), (g, 2q+1); c2, c3 = (g+8, 2q), (g+8, 2q+1)
# Numerics of mma: the bf16 products are exact in float64; the 16 of them and c are summed in float64
# and rounded once to fp32 (round to nearest even). The tensor cores' internal order and truncation
# are not documented, so the GPU can differ by an fp32 ulp or so of the largest term; compare with
# tolerances.

_LANE = np.arange(32)
_G, _Q = _LANE >> 2, _LANE & 3


def _bf16_to_f64(h):
    return (np.asarray(h).astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


class LdMatrix:
    control = False

    def __init__(self, num: int, trans: bool):
        self.num, self.trans = num, trans

    def decode(self, k, ins):
        _arity(k, ins, 2)
        ins.dst = [_reg(k, ins, r, "b32") for r in _vector(k, ins, ins.operands[0], self.num)]
        ins.addr = _addr(k, ins, ins.operands[1], "shared")

    def execute(self, blk, ins, idx, idx_all):
        blk.check_warp_members(ins, idx, FULL_MASK)
        g = blk.gid[idx]
        nw = len(g) // 32
        giver = (g & 31) < 8 * self.num  # the lanes whose row addresses are used
        raw = blk.shared.load(blk.address(ins.addr, idx)[giver], 16, 16, blk.access(g[giver], False))
        rows = raw.view(np.uint16).reshape(nw, 8 * self.num, 8)  # [warp, 8 * matrix + row, column]
        r, c = _LANE // 4, 2 * (_LANE % 4)
        for i, reg in enumerate(ins.dst):
            m = rows[:, 8 * i:8 * i + 8]
            lo, hi = (m[:, c, r], m[:, c + 1, r]) if self.trans else (m[:, r, c], m[:, r, c + 1])
            blk.write(reg, "b32", (lo.astype(np.uint32) | (hi.astype(np.uint32) << np.uint32(16))).reshape(-1), idx)


class MmaBf16:
    """mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d0..d3}, {a0..a3}, {b0, b1}, {c0..c3}: D = A B + C."""
    control = False

    def decode(self, k, ins):
        _arity(k, ins, 4)
        ins.dst = [_reg(k, ins, r, "f32") for r in _vector(k, ins, ins.operands[0], 4)]
        ins.srcs = ([_reg(k, ins, r, "b32") for r in _vector(k, ins, ins.operands[1], 4)] +
                    [_reg(k, ins, r, "b32") for r in _vector(k, ins, ins.operands[2], 2)] +
                    [_value(k, ins, r, "f32") for r in _vector(k, ins, ins.operands[3], 4)])

    def execute(self, blk, ins, idx, idx_all):
        blk.check_warp_members(ins, idx, FULL_MASK)
        n = blk.count(idx)
        nw = n // 32
        get = lambda o, t: np.broadcast_to(blk.read(o, t, idx), (n,)).reshape(nw, 32)
        A, B, C = np.empty((nw, 16, 16)), np.empty((nw, 16, 8)), np.empty((nw, 16, 8))
        for j in range(4):
            v = get(ins.srcs[j], "b32")
            row, col = _G + 8 * (j & 1), 2 * _Q + 8 * (j >> 1)
            A[:, row, col], A[:, row, col + 1] = _bf16_to_f64(v & 0xFFFF), _bf16_to_f64(v >> 16)
        for j in range(2):
            v = get(ins.srcs[4 + j], "b32")
            B[:, 2 * _Q + 8 * j, _G], B[:, 2 * _Q + 8 * j + 1, _G] = _bf16_to_f64(v & 0xFFFF), _bf16_to_f64(v >> 16)
        for j in range(4):
            C[:, _G + 8 * (j >> 1), 2 * _Q + (j & 1)] = get(ins.srcs[6 + j], "f32")
        D = (np.matmul(A, B) + C).astype(np.float32)
        for j, r in enumerate(ins.dst):
            blk.write(r, "f32", np.ascontiguousarray(D[:, _G + 8 * (j >> 1), 2 * _Q + (j & 1)]).reshape(-1), idx)


for num in (1, 2, 4):
    for trans in ("", ".trans"):
        OPCODES[f"ldmatrix.sync.aligned.m8n8.x{num}{trans}.shared.b16"] = LdMatrix(num, bool(trans))
OPCODES["mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"] = MmaBf16()


# ---- the .param space: kernel parameter addresses
#
# PTX ISA 5.1.6.1: "The address of a kernel parameter may be moved into a register using the mov
# instruction. The resulting address is in the .param state space". cvta.param.u64 (PTX 7.7, sm_70)
# turns it into a generic address. The emulator lays the parameters out from PARAM_BASE (.param
# space) at ptxas's offsets (each aligned to its .align or size), and puts their generic addresses at
# PARAM_GENERIC + the same offset. Only cp.async.bulk.tensor consumes such a generic address: its
# tensorMap operand must be the generic address of a tensor-map parameter (section 5, TensorMap).

def _cvta_param(a):
    a = np.atleast_1d(np.asarray(a, np.uint64))
    bad = (a < PARAM_BASE) | (a >= PARAM_BASE + (1 << 20))
    if bad.any():
        raise _Fault(MemcheckError, f"cvta.param of {int(a[np.argmax(bad)]):#x}, which is not a .param-space "
                                    f"address", None)
    return a - np.uint64(PARAM_BASE) + np.uint64(PARAM_GENERIC)


_alu("cvta.param.u64", "u64", "u64", _cvta_param)


# ---- mbarriers (PTX ISA 9.7.13.15)
#
# An mbarrier is an opaque 8-byte object in shared memory, 8-byte aligned. The emulator keeps its state
# beside shared memory (_MBarrier, one per block and address) and marks its 8 bytes, so a plain ld or st
# of them is a MemcheckError. Its state, as the ISA's "Contents of the mbarrier object" lists it:
#   the current phase (here: the number of phases completed so far; its parity is phase & 1), the
#   pending arrival count of the current phase, the expected arrival count of the next phase, and the
#   tx-count: bytes of asynchronous transactions the current phase still waits for.
# Operations:
#   mbarrier.init [a], count: phase 0, pending = expected = count (1 .. 2^20-1), tx-count 0. Any other
#     operation on an address that holds no initialized mbarrier is an error; so is init of a live one
#     (undefined in the ISA: mbarrier.inval it first).
#   expect-tx(n): tx-count += n (mbarrier.expect_tx; mbarrier.arrive.expect_tx does it *before* its
#     arrive-on, with count 1). complete-tx(n): tx-count -= n (cp.async.bulk.tensor, when its bytes
#     land). arrive-on(count): pending -= count. tx-count must stay within +-(2^20 - 1), and an arrival
#     the phase does not expect (pending below 0) is an error.
#   Phase completion: when pending and tx-count are both 0, atomically, the phase advances and pending
#     is reloaded with the expected count (arrive-on and complete-tx check this; expect-tx cannot
#     complete a phase).
#   mbarrier.test_wait/try_wait.parity p, [a], parity: the ISA tests "the completion of the phase
#     indicated by phaseParity, the integer parity of either the current phase or the immediately
#     preceding phase": p is true when that phase is the preceding one (the current phase's parity
#     differs from `parity`) and false when it is the current, incomplete one. A parity naming a phase
#     two or more back aliases; the ISA leaves that invalid and nobody can tell. try_wait may return
#     false early on a GPU (its time limit); the emulator's returns false only while a copy it waits for
#     is in flight (TMA, below). Parities other than 0 and 1 are an error. The state returned by
#     mbarrier.arrive (opaque in the ISA) is the phase number here.
# Ordering, checked: a thread other than the initializing one may use an mbarrier only after a bar.sync
# that follows the init; the async proxy (a cp.async.bulk.tensor's complete-tx) only after the
# initializing thread made the init visible to it with fence.mbarrier_init.release.cluster or
# fence.proxy.async (the CUDA programming guide's TMA example: "make initialized barrier visible in
# async proxy"). A successful wait with the default .acquire semantics records, per thread, that every
# phase before the current one has completed (a bar.sync passes that on to the rest of the block);
# section 5 uses it to check reads of the bytes a cp.async.bulk.tensor wrote. .relaxed waits record
# nothing: they order no memory.
# Scheduling: the min-pc scheduler always runs the lowest pc, so a spin loop on try_wait whose releasing
# event sits at a higher pc (a producer warp whose code follows its consumers' wait loop) spins until
# max_steps; that RunawayError names the wait and the mbarrier's counts. Kernels whose releases come
# earlier in program order (one thread issuing the copies, then everyone waiting) run.

MBAR_MAX = (1 << 20) - 1  # the ISA's bound on counts and |tx-count|


@dataclass
class _MBarrier:
    addr: int          # its shared address, for messages
    expected: int      # arrivals each phase expects
    pending: int       # arrivals the current phase still waits for
    tx: int            # tx-count: bytes of asynchronous transactions the current phase still waits for
    phase: int         # phases completed so far (the current phase's parity is phase & 1)
    init_gid: int      # the initializing thread (wave index), its block's bar.sync epoch then, its line
    init_epoch: int
    init_line: int
    fenced: bool = False  # the init made visible to the async proxy

    def complete_if_done(self):
        if self.pending == 0 and self.tx == 0:
            self.phase += 1
            self.pending = self.expected

    def counts(self) -> str:
        return (f"phase {self.phase} (parity {self.phase & 1}), {self.pending} of {self.expected} arrivals "
                f"pending, tx-count {self.tx}")


class MbarInit:
    control = False

    def decode(self, k, ins):
        _arity(k, ins, 2)
        ins.addr = _addr(k, ins, ins.operands[0], "shared")
        ins.srcs = [_value(k, ins, ins.operands[1], "u32")]

    def execute(self, blk, ins, idx, idx_all):
        g = blk.gid[idx]
        counts = np.broadcast_to(blk.read(ins.srcs[0], "u32", idx), g.shape)
        for i, (key, loc) in enumerate(zip(*blk.mbar_locate(blk.address(ins.addr, idx), idx, "mbarrier.init"))):
            key = int(key)
            if key in blk.mbarriers:
                raise _Fault(MemcheckError, f"mbarrier.init of a live mbarrier (initialized at line "
                                            f"{blk.mbarriers[key].init_line}): mbarrier.inval it first", int(g[i]))
            if not 1 <= int(counts[i]) <= MBAR_MAX:
                raise _Fault(MemcheckError, f"mbarrier.init count {int(counts[i])} outside 1 .. 2^20-1", int(g[i]))
            blk.mbarriers[key] = _MBarrier(key & 0xFFFFFFFF, int(counts[i]), int(counts[i]), 0, 0, int(g[i]),
                                           int(blk.epoch[blk.blk[g[i]]]), ins.line)
            blk.shared.mark_mbarrier(*loc, True)


class MbarInval:
    control = False

    def decode(self, k, ins):
        _arity(k, ins, 1)
        ins.addr = _addr(k, ins, ins.operands[0], "shared")

    def execute(self, blk, ins, idx, idx_all):
        keys, locs = blk.mbar_locate(blk.address(ins.addr, idx), idx, "mbarrier.inval")
        blk.mbar_states(keys, idx, "mbarrier.inval")
        for key, loc in zip(keys, locs):
            if blk.mbarriers.pop(int(key), None) is not None:
                blk.shared.mark_mbarrier(*loc, False)


class MbarArrive:
    """mbarrier.arrive{.expect_tx} state|_, [a]{, count|txCount} and mbarrier.expect_tx [a], txCount."""
    control = False

    def __init__(self, expect_tx: bool, arrive: bool = True, release: bool = True):
        self.expect_tx, self.arrive, self.release = expect_tx, arrive, release

    def decode(self, k, ins):
        ops = ins.operands
        if not self.arrive:
            _arity(k, ins, 2)
            ins.dst, ops = None, ["_"] + ops
        elif len(ops) not in ((3,) if self.expect_tx else (2, 3)):
            raise _syntax(k, ins, f"{ins.opcode} takes state, [addr]{', txCount' if self.expect_tx else '[, count]'}")
        ins.dst = None if ops[0] == "_" else _reg(k, ins, ops[0], "b64")
        ins.addr = _addr(k, ins, ops[1], "shared")
        ins.srcs = [_value(k, ins, ops[2], "u32") if len(ops) == 3 else None]

    def execute(self, blk, ins, idx, idx_all):
        g = blk.gid[idx]
        n = np.ones(g.shape, np.int64) if ins.srcs[0] is None else \
            np.broadcast_to(blk.read(ins.srcs[0], "u32", idx), g.shape).astype(np.int64)
        keys, _ = blk.mbar_locate(blk.address(ins.addr, idx), idx, ins.opcode.split(".b64")[0])
        states = blk.mbar_states(keys, idx, "mbarrier.arrive" if self.arrive else "mbarrier.expect_tx")
        old = np.zeros(g.shape, np.uint64)
        for i, st in enumerate(states):
            old[i] = st.phase
            if self.expect_tx:  # the expect-tx comes first, so this arrive cannot complete the phase early
                st.tx += int(n[i])
                if abs(st.tx) > MBAR_MAX:
                    raise _Fault(MemcheckError, f"expect-tx of {int(n[i])} takes the tx-count of the mbarrier at "
                                                f"{st.addr:#x} to {st.tx}, outside +-(2^20-1)", int(g[i]))
            if not self.arrive:
                continue
            count = 1 if self.expect_tx else int(n[i])
            if not 1 <= count <= MBAR_MAX:
                raise _Fault(MemcheckError, f"mbarrier.arrive count {count} outside 1 .. 2^20-1", int(g[i]))
            if count > st.pending:
                raise _Fault(MemcheckError, f"arrives {count} time(s) on the mbarrier at {st.addr:#x}, whose "
                                            f"phase expects only {st.pending} more ({st.counts()})", int(g[i]))
            if self.release:  # what the thread read before, a thread that sees this phase complete may overwrite
                blk.arrive_clock += 1
                blk.arrivals.setdefault(int(g[i]), []).append((blk.arrive_clock, int(keys[i]), st.phase))
            st.pending -= count
            st.complete_if_done()
        if ins.dst is not None:
            blk.write(ins.dst, "b64", old, idx)


class MbarWait:
    """mbarrier.test_wait.parity / try_wait.parity p, [a], parity{, suspendTimeHint}."""
    control = False

    def __init__(self, acquire: bool, hint: bool):
        self.acquire, self.hint = acquire, hint

    def decode(self, k, ins):
        if len(ins.operands) not in ((3, 4) if self.hint else (3,)):
            raise _syntax(k, ins, f"{ins.opcode} takes waitComplete, [addr], phaseParity"
                                  + ("{, suspendTimeHint}" if self.hint else ""))
        ins.dst = _reg(k, ins, ins.operands[0], "pred")
        ins.addr = _addr(k, ins, ins.operands[1], "shared")
        ins.srcs = [_value(k, ins, o, "u32") for o in ins.operands[2:]]

    def execute(self, blk, ins, idx, idx_all):
        g = blk.gid[idx]
        parity = np.broadcast_to(blk.read(ins.srcs[0], "u32", idx), g.shape)
        if (parity > 1).any():
            i = int(np.argmax(parity > 1))
            raise _Fault(MemcheckError, f"phaseParity {int(parity[i])}: only 0 and 1 are valid", int(g[i]))
        keys, _ = blk.mbar_locate(blk.address(ins.addr, idx), idx, ins.opcode.split(".b64")[0])
        states = blk.mbar_states(keys, idx, ins.opcode.split(".parity")[0])
        ready = np.array([(st.phase & 1) != int(p) for st, p in zip(states, parity)], bool)
        seen = {int(key): blk.mbarriers[int(key)].phase for key in np.unique(keys[ready])}  # before any lands below
        for key in np.unique(keys[~ready]):  # the copies these waits are for complete now (they saw them in flight)
            st = blk.mbarriers[int(key)]
            for tag, nbytes in blk.inflight_tx.pop(int(key), []):
                blk.tags[tag][1] = st.phase  # the phase its complete-tx counts in
                st.tx -= nbytes
                if abs(st.tx) > MBAR_MAX:
                    raise _Fault(MemcheckError, f"complete-tx of {nbytes} bytes (the cp.async.bulk.tensor of line "
                                                f"{blk.tags[tag][2]}) takes the tx-count of the mbarrier at "
                                                f"{st.addr:#x} to {st.tx}", None, block=int(key) >> 32)
                st.complete_if_done()
        if self.acquire:
            for key, phase in seen.items():
                blk.observe(key, g[ready & (keys == key)], phase)
        if not ready.all():
            i = int(np.argmin(ready))
            blk.failed_wait = (blk.steps, ins.line, states[i])
        blk.write(ins.dst, "pred", ready, idx)


class Fence:
    """fence.mbarrier_init.release.cluster: makes the thread's prior mbarrier.init visible to the cluster
    and the async proxy (the TMA's complete-tx). fence.proxy.async{.shared::cta,.shared::cluster}: a
    bidirectional fence between the generic and the async proxy for the thread's accesses, recorded for
    its mbarrier inits (as above) and its prior generic stores to shared memory, which a wgmma.mma_async
    may then read (PTX ISA, wgmma.fence: "An async proxy fence must be used to establish an ordering
    between prior writes to shared memory matrices and subsequent reads of the same matrices in a
    wgmma.mma_async instruction"). fence.proxy.async.global orders global memory only, which the
    emulator does not track across proxies (the TMA's global reads are checked as plain loads)."""
    control = False

    def __init__(self, mbarrier_init: bool, shared: bool):
        self.mbarrier_init, self.shared = mbarrier_init, shared

    def decode(self, k, ins):
        _arity(k, ins, 0)

    def execute(self, blk, ins, idx, idx_all):
        g = blk.gid[idx]
        if not self.shared:
            return
        mine = set(int(x) for x in g)
        for st in blk.mbarriers.values():
            if st.init_gid in mine:
                st.fenced = True
        if not self.mbarrier_init:
            blk.proxy_fences[g] += 1


OPCODES["mbarrier.init.shared.b64"] = OPCODES["mbarrier.init.shared::cta.b64"] = MbarInit()
OPCODES["mbarrier.inval.shared.b64"] = OPCODES["mbarrier.inval.shared::cta.b64"] = MbarInval()
for space in (".shared", ".shared::cta"):
    for sem in ("", ".release.cta", ".release.cluster", ".relaxed.cta", ".relaxed.cluster"):
        OPCODES[f"mbarrier.arrive{sem}{space}.b64"] = MbarArrive(False, release="relaxed" not in sem)
        OPCODES[f"mbarrier.arrive.expect_tx{sem}{space}.b64"] = MbarArrive(True, release="relaxed" not in sem)
    for sem in ("", ".relaxed.cta", ".relaxed.cluster"):
        OPCODES[f"mbarrier.expect_tx{sem}{space}.b64"] = MbarArrive(True, arrive=False)
    for sem in ("", ".acquire.cta", ".acquire.cluster", ".relaxed.cta", ".relaxed.cluster"):
        for kind in ("test_wait", "try_wait"):
            OPCODES[f"mbarrier.{kind}.parity{sem}{space}.b64"] = MbarWait("relaxed" not in sem, kind == "try_wait")
OPCODES["fence.mbarrier_init.release.cluster"] = Fence(True, True)
OPCODES["fence.proxy.async"] = OPCODES["fence.proxy.async.shared::cta"] = Fence(False, True)
OPCODES["fence.proxy.async.shared::cluster"] = Fence(False, True)
OPCODES["fence.proxy.async.global"] = Fence(False, False)


# ---- TMA: cp.async.bulk.tensor (PTX ISA 9.7.9.25, "asynchronous copy"; 5.5, "tensors")
#
# cp.async.bulk.tensor.Nd.shared::cluster.global{.tile}.mbarrier::complete_tx::bytes
#     [dstMem], [tensorMap, {c0, .., cN-1}], [mbar]
# copies the box of the tensor-map's tensor whose first element is at coordinates (c0 innermost, s32)
# to shared memory at dstMem, and performs complete-tx of the copy's bytes on mbar. As modelled:
#   tensorMap: the generic address of a tensor-map kernel parameter (ISA: "the generic address of the
#     opaque tensor-map object which resides in .param space or .const space or .global space"; only
#     .param is supported). Any other value is an error, and the .param-space address that a missing
#     cvta.param leaves is named as such.
#   the box, element by element in row-major order of the box (innermost dimension fastest), each
#     element read from global memory at base + sum(c_i * stride_i) (a memchecked load by the issuing
#     thread), or 0 where any coordinate falls outside 0 .. dim-1 (5.5.3.3, zero fill mode: the host's
#     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE).
#   shared memory: dstMem must be 128-byte aligned (the CUDA programming guide's rule for TMA), and
#     the box's bytes go to dstMem + their offset in the box, with the swizzle (5.5.7) applied to the
#     address: for a W-byte swizzle (32, 64, 128) the 16-byte chunk index, address bits 4 .. 3+b, is
#     XORed with bits 7 .. 6+b (b = log2(W/16)); the pattern repeats every 8 W bytes and is a function of
#     the absolute address, which is what the ISA's "swizzle base offset = (dstMem / 128) % 8" says for
#     a dstMem off the 8 W boundary. The emulator models swizzled boxes whose rows are exactly W bytes
#     (TensorMap checks that).
#   complete-tx of the whole box's bytes, zero-filled ones included (the box is always written whole).
# When: a GPU does the copy some time after the instruction. The emulator reads global memory and writes
# shared memory at issue, but performs the complete-tx late: when a wait on the mbarrier finds its phase
# incomplete (that wait returns false, as a GPU's may while the copy is in flight; the next one sees the
# phase complete, if the copy was all it waited for). So a wait that is not in a loop is caught, and
# what is checked is the order a GPU needs: every byte the copy writes is tagged with it, and an access
# to the byte (ld.shared, ldmatrix, st.shared, a wgmma operand) by a thread that has not seen the phase of
# its complete-tx complete (a successful acquire wait on the mbarrier, by itself or by a thread it has
# since passed a bar.sync with) is a RaceError; a plain store then clears the tag. The copy's own write
# must be ordered after the earlier accesses of other threads to its bytes: after their plain stores by a
# bar.sync (as any store), and after the last read of each byte (a load, or a wgmma operand as of the
# wgmma.wait_group that retired it) by a bar.sync or an mbarrier hand-off: the reader's next release
# arrive on an mbarrier, whose phase the copying thread has seen complete. Otherwise it is a RaceError
# (write-after-read: the copy may land while the reader still reads). Only the last reader of a byte is
# remembered, so this finds some such races, not all. A block that exits with a copy in flight (its
# mbarrier phase never completed) is an AsyncError. Tensor maps in global memory, multicast, im2col and
# the .shared::cta destination of PTX 8.6 are not supported.

class CpAsyncBulkTensor:
    control = False

    def __init__(self, dim: int):
        self.dim = dim

    def decode(self, k, ins):
        _arity(k, ins, 3)
        ins.addr = _addr(k, ins, ins.operands[0], "shared")
        m = re.fullmatch(r"\[\s*(%[\w$]+)\s*,\s*\{(.*)\}\s*\]", ins.operands[1].strip(), re.S)
        if not m:
            raise _syntax(k, ins, f"expected [tensorMap, {{coordinates}}], got {ins.operands[1]!r}")
        coords = [c.strip() for c in m.group(2).split(",")]
        if len(coords) != self.dim:
            raise _syntax(k, ins, f"{ins.opcode} takes {self.dim} coordinates, got {len(coords)}")
        ins.srcs = [_reg(k, ins, m.group(1), "b64"), [_value(k, ins, c, "s32") for c in coords],
                    _addr(k, ins, ins.operands[2], "shared")]

    def execute(self, blk, ins, idx, idx_all):
        tmap_reg, coord_ops, mbar_addr = ins.srcs
        g = blk.gid[idx]
        dst = blk.address(ins.addr, idx)
        tmaps = blk.regs[tmap_reg.name][idx]
        coords = np.stack([np.broadcast_to(blk.read(c, "s32", idx), g.shape) for c in coord_ops], axis=1)
        keys, _ = blk.mbar_locate(blk.address(mbar_addr, idx), idx, "cp.async.bulk.tensor's mbarrier")
        states = blk.mbar_states(keys, idx, "cp.async.bulk.tensor")
        for i in range(len(g)):  # one copy per thread, in thread order
            tm = blk.tensor_map(int(tmaps[i]), int(g[i]))
            if tm.rank != self.dim:
                raise _Fault(MemcheckError, f"a .{self.dim}d copy through a {tm.rank}-dimensional tensor map", int(g[i]))
            if int(dst[i]) % 128:
                raise _Fault(MemcheckError, f"shared destination {int(dst[i]):#x} is not 128-byte aligned", int(g[i]))
            st = states[i]
            if not st.fenced:
                raise _Fault(AsyncError, f"the mbarrier at {st.addr:#x} was initialized (line {st.init_line}) but "
                                         f"not made visible to the async proxy: its complete-tx needs a "
                                         f"fence.mbarrier_init.release.cluster (or fence.proxy.async) by the "
                                         f"initializing thread after mbarrier.init", int(g[i]))
            data = tm.read_box(blk, coords[i], int(g[i]))
            chunks = int(dst[i]) + 16 * np.arange(tm.box_bytes // 16, dtype=np.int64)
            if tm.swizzle:
                mask = tm.swizzle // 16 - 1
                chunks ^= ((chunks >> 7) & mask) << 4
            tag = blk.new_tag(int(keys[i]), ins.line)
            try:
                blk.shared.land_async(chunks.astype(np.uint64), data.reshape(-1, 16),
                                      blk.access(np.full(len(chunks), g[i]), False), tag)
            except _Fault as f:
                raise _Fault(f.cls, f"cp.async.bulk.tensor to {int(dst[i]):#x}: {f.msg}", f.thread) from None
            blk.inflight_tx.setdefault(int(keys[i]), []).append((tag, tm.box_bytes))  # its complete-tx, later


for _dim in range(1, 6):
    for _mode in ("", ".tile"):
        OPCODES[f"cp.async.bulk.tensor.{_dim}d.shared::cluster.global{_mode}.mbarrier::complete_tx::bytes"] = \
            CpAsyncBulkTensor(_dim)


# ---- warpgroup MMA: wgmma (PTX ISA 9.7.15)
#
# A warpgroup is 4 consecutive warps of a block, the first a multiple of 4: threads 128 w .. 128 w + 127.
# wgmma.fence, wgmma.mma_async, wgmma.commit_group and wgmma.wait_group are .sync.aligned: all 128
# threads execute them together, with the same guard (else DivergenceError).
#   wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16 (or .f16.f16) {d0 .. d(N/2-1)}, a-desc, b-desc,
#     scale-d, imm-scale-a, imm-scale-b, imm-trans-a, imm-trans-b: D (64 x N) = A (64 x 16) B (16 x N)
#     + (scale-d ? D : 0), N = 8 .. 256 in steps of 8; imm-scale-a/b = -1 negates A/B; imm-trans = 0
#     (K-major, "non-transposed") is the only layout modelled (1 is rejected at load time), and so is
#     A from shared memory (the register-A form is rejected). The descriptors must be the same in all
#     128 threads (ISA), and so must scale-d (the emulator's requirement).
#   The 64-bit matrix descriptor (9.7.15.5.1.2.2): start address >> 4 in bits 0-13, leading dimension
#     byte offset (LBO) >> 4 in 16-29, stride dimension byte offset (SBO) >> 4 in 32-45, matrix base
#     offset in 49-51, swizzle in 62-63 (0 none, 1 128B, 2 64B, 3 32B). Other bits are ignored. Only base
#     offset 0 is modelled (the swizzle pattern anchored at absolute address bits, like the TMA's).
#   The K-major layouts (9.7.15.5.1.2.1.3, canonical layouts, T = 8 elements of 16 bits = 16 bytes):
#     element (r, k) of the 64 x 16 A or of the N x 16 B (B's rows are its N columns) is at
#       no swizzle ((8,m),(T,2k)):((1T,SBO),(1,LBO)): start + 16 (r%8) + SBO (r/8) + 2 (k%8) + LBO (k/8)
#       W-byte swizzle ((8,m),(T,2k)):((W/2,SBO),(1,T)): start + W (r%8) + SBO (r/8) + 2 k, then
#         Swizzle<b,4,3> of that address: bits 4 .. 3+b ^= bits 7 .. 6+b, b = log2(W/16)
#     (LBO is unused for swizzled K-major layouts: the 16 columns sit inside one W-byte row).
#   D's registers (9.7.15.5.1.1.1, figure "WGMMA .m64nNk16 register fragment layout for D"): thread
#     t = 32 w + 4 g + q of the warpgroup holds d[4 j + v] = D[16 w + g + 8 (v / 2)][8 j + 2 q + v % 2].
#   Numerics: the products of bf16 (or f16) are exact in float64; the 16 of them and D are summed in
#     float64 and rounded to fp32 once per instruction. The tensor cores' internal rounding is not
#     documented, so a GPU may differ by about an fp32 ulp of the largest partial sum per instruction.
# Asynchrony, as modelled:
#   at mma_async the descriptors are decoded and A and B read from shared memory (bounds, alignment,
#     uninitialized bytes, races with plain stores, cp.async.bulk.tensor bytes whose mbarrier phase the
#     warpgroup has not seen complete, and plain stores not followed by a fence.proxy.async of their
#     writer: all errors). The accumulator registers are then locked: any other instruction that reads
#     or writes one of them before the wgmma.wait_group that retires the mma_async is an AsyncError (ISA:
#     undefined behaviour), except another mma_async of the same shape (the ISA orders those).
#   wgmma.commit_group closes the warpgroup's uncommitted mma_asyncs into a group; wgmma.wait_group N
#     retires the oldest groups until at most N are pending: each mma_async of them, in order, re-reads
#     its shared memory (a change since issue is a RaceError: the GPU may read it at any time in
#     between), computes D with the registers' current values, writes them and unlocks them.
#   wgmma.fence: each thread must have executed one before its first mma_async, and between any other
#     instruction's access to an accumulator register and the next mma_async using it (ISA, wgmma.fence);
#     missing ones are AsyncErrors. A block that exits with an unretired mma_async is an AsyncError too.

WGMMA_SHAPES = tuple(range(8, 257, 8))


@dataclass
class _Wgmma:
    line: int
    n: int
    dregs: list          # accumulator registers, in order
    scale_d: bool
    a: np.ndarray        # (64, 16) float64, imm-scale-a applied
    b: np.ndarray        # (n, 16) float64: b[j, k] = B[k][j], imm-scale-b applied
    reads: list          # [(allocation, byte index matrix, bytes at issue)] of its shared memory operands


@functools.lru_cache(maxsize=None)
def _wgmma_d_layout(n: int):
    """(rows, cols) of D for each (thread of the warpgroup, register): arrays of shape (128, n / 2)."""
    t = np.arange(128)[:, None]
    i = np.arange(n // 2)[None, :]
    w, g, q, j, v = t // 32, (t % 32) // 4, t % 4, i // 4, i % 4
    return 16 * w + g + 8 * (v // 2), 8 * j + 2 * q + v % 2


def _wgmma_addresses(desc: int, rows: int) -> np.ndarray:
    """Shared addresses of the 16-byte chunks (row r, columns 8 c .. 8 c + 7), as (rows, 2), of a K-major
    rows x 16 operand of 16-bit elements that the descriptor describes."""
    start, lbo, sbo = (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    mode = (desc >> 62) & 3
    r = np.arange(rows, dtype=np.int64)[:, None]
    c = np.arange(2, dtype=np.int64)[None, :]
    if mode == 0:
        return start + 16 * (r % 8) + sbo * (r // 8) + lbo * c
    width = {1: 128, 2: 64, 3: 32}[mode]
    addr = start + width * (r % 8) + sbo * (r // 8) + 16 * c
    return addr ^ (((addr >> 7) & (width // 16 - 1)) << 4)


class WgmmaMma:
    control = False

    def __init__(self, n: int, atype: str):
        self.n, self.atype = n, atype

    def decode(self, k, ins):
        _arity(k, ins, 8)
        if ins.operands[1].startswith("{"):
            raise _syntax(k, ins, "wgmma.mma_async with A in registers is not supported (only a-desc)")
        ins.dst = [_reg(k, ins, r, "f32") for r in _vector(k, ins, ins.operands[0], self.n // 2)]
        if len({r.name for r in ins.dst}) != len(ins.dst):
            raise _syntax(k, ins, "an accumulator register appears twice")
        scale_d = ins.operands[3]
        imms = []
        for o, ok in zip(ins.operands[4:], ((-1, 1), (-1, 1), (0, 1), (0, 1))):
            v = int(_imm(k, ins, o, "s32"))
            if v not in ok:
                raise _syntax(k, ins, f"immediate {o} must be one of {ok}")
            imms.append(v)
        if imms[2] or imms[3]:
            raise _syntax(k, ins, "imm-trans-a/b = 1 (M- or N-major shared memory layouts) is not modelled")
        ins.srcs = [_value(k, ins, ins.operands[1], "b64"), _value(k, ins, ins.operands[2], "b64"),
                    _reg(k, ins, scale_d, "pred") if scale_d.startswith("%") else Imm(_imm(k, ins, scale_d, "pred")),
                    imms[0], imms[1]]

    def execute(self, blk, ins, idx, idx_all):
        adesc_op, bdesc_op, scale_op, sa, sb = ins.srcs
        for wg, th in blk.warpgroups(ins, idx, idx_all):
            need = blk.wg_fences[th] == 0
            if need.any():
                raise _Fault(AsyncError, "wgmma.mma_async with no wgmma.fence before it in this thread (the ISA "
                                         "requires one before the first wgmma.mma_async)", int(th[np.argmax(need)]))
            for r in ins.dst:
                late = blk.wg_touch[r.name][th] == blk.wg_fences[th]
                if late.any():
                    t = int(np.argmax(late))
                    raise _Fault(AsyncError, f"{r.name} was accessed at line {int(blk.wg_touch_line[r.name][th[t]])} "
                                             f"after this thread's last wgmma.fence: the ISA requires a wgmma.fence "
                                             f"between that access and a wgmma.mma_async using the register",
                                 int(th[t]))
                other = [op for op in blk.wg_pending(wg) if r.name in {x.name for x in op.dregs} and op.n != self.n]
                if other:
                    raise _Fault(AsyncError, f"{r.name} is an accumulator of the pending m64n{other[0].n}k16 "
                                             f"wgmma.mma_async of line {other[0].line} (a different shape)", int(th[0]))
            descs = []
            for o in (adesc_op, bdesc_op):
                v = np.broadcast_to(blk.read(o, "b64", th), th.shape)
                if (v != v[0]).any():
                    raise _Fault(AsyncError, f"matrix descriptors differ within the warpgroup ({int(v[0]):#x} in thread "
                                             f"{blk.tid3(int(blk.tid[th[0]]))}, {int(v[np.argmax(v != v[0])]):#x} in "
                                             f"another): the ISA requires the same descriptor in all of its warps",
                                 int(th[np.argmax(v != v[0])]))
                if (int(v[0]) >> 49) & 7:
                    raise _Fault(AsyncError, f"descriptor {int(v[0]):#x} has a non-zero matrix base offset, which is "
                                             f"not modelled", int(th[0]))
                mode, start = (int(v[0]) >> 62) & 3, (int(v[0]) & 0x3FFF) << 4
                phase = (start >> 7) & (0, 7, 3, 1)[mode]
                if phase:  # base offset 0 says the swizzle pattern starts on its boundary (8 rows of the span)
                    span = (0, 128, 64, 32)[mode]
                    raise _Fault(AsyncError, f"descriptor {int(v[0]):#x}: the matrix starts at {start:#x}, row "
                                             f"{phase} of the {8 * span}-byte {span}B swizzle pattern, but its base "
                                             f"offset is 0, which the ISA reserves for patterns starting on a "
                                             f"{8 * span}-byte boundary (else base offset = (start >> 7) & 7, which "
                                             f"the emulator does not model)", int(th[0]))
                descs.append(int(v[0]))
            scale = np.broadcast_to(blk.read(scale_op, "pred", th), th.shape)
            if (scale != scale[0]).any():
                raise _Fault(AsyncError, "scale-d differs within the warpgroup", int(th[np.argmax(scale != scale[0])]))
            reads, mats = [], []
            for desc, rows, what in ((descs[0], 64, "A"), (descs[1], self.n, "B")):
                addrs = _wgmma_addresses(desc, rows).reshape(-1).astype(np.uint64)
                try:
                    raw, groups = blk.shared.read_async(addrs, 16, blk.access(np.full(len(addrs), th[0]), False), th,
                                                        "wgmma.mma_async")
                except _Fault as f:
                    raise _Fault(f.cls, f"matrix {what} (descriptor {desc:#x}): {f.msg}", f.thread) from None
                reads += [(a, bi, a.buf[bi].copy()) for a, bi in groups]
                h = raw.view(np.uint16).reshape(rows, 16).astype(np.uint32)
                if self.atype == "bf16":
                    vals = (h << np.uint32(16)).view(np.float32).astype(np.float64)
                else:
                    vals = h.astype(np.uint16).view(np.float16).astype(np.float64)
                mats.append(vals)
            op = _Wgmma(ins.line, self.n, list(ins.dst), bool(scale[0]), mats[0] * sa, mats[1] * sb, reads)
            blk.wg_open.setdefault(wg, []).append(op)
            for r in ins.dst:
                blk.wg_lock[r.name][th] += 1
                blk.wg_lock_line[r.name][th] = ins.line


class WgmmaFence:
    control = False

    def decode(self, k, ins):
        _arity(k, ins, 0)

    def execute(self, blk, ins, idx, idx_all):
        for wg, th in blk.warpgroups(ins, idx, idx_all):
            blk.wg_fences[th] += 1


class WgmmaCommit:
    control = False

    def decode(self, k, ins):
        _arity(k, ins, 0)

    def execute(self, blk, ins, idx, idx_all):
        for wg, th in blk.warpgroups(ins, idx, idx_all):
            blk.wg_groups.setdefault(wg, []).append(blk.wg_open.pop(wg, []))


class WgmmaWait:
    control = False

    def decode(self, k, ins):
        _arity(k, ins, 1)
        ins.srcs = [int(_imm(k, ins, ins.operands[0], "u32"))]

    def execute(self, blk, ins, idx, idx_all):
        for wg, th in blk.warpgroups(ins, idx, idx_all):
            groups = blk.wg_groups.get(wg, [])
            while len(groups) > ins.srcs[0]:
                for op in groups.pop(0):
                    blk.retire_wgmma(op, th)


def _mark_accumulator_accesses(k: Kernel):
    """Every register that a wgmma.mma_async uses as an accumulator; each other instruction that names one
    gets them in ins.acc_touch, for the scheduler's checks (section 4: _Wave.touch_accumulators)."""
    acc = {r.name for ins in k.code if isinstance(ins.op, WgmmaMma) for r in ins.dst}
    k.wgmma_regs = frozenset(acc)
    if not acc:
        return
    for ins in k.code:
        if not isinstance(ins.op, WgmmaMma):
            used = set(re.findall(r"%[\w$]+", " ".join(ins.operands))) | ({ins.guard.name} if ins.guard else set())
            ins.acc_touch = tuple(sorted(used & acc))


for _n in WGMMA_SHAPES:
    for _t in ("bf16", "f16"):
        OPCODES[f"wgmma.mma_async.sync.aligned.m64n{_n}k16.f32.{_t}.{_t}"] = WgmmaMma(_n, _t)
OPCODES["wgmma.fence.sync.aligned"] = WgmmaFence()
OPCODES["wgmma.commit_group.sync.aligned"] = WgmmaCommit()
OPCODES["wgmma.wait_group.sync.aligned"] = WgmmaWait()


# ---- ptxas's FMA contraction
#
# A mul.f32 or add/sub.f32 with no rounding modifier may be fused by ptxas (its default --fmad=true): a
# mul whose result is used once, by an add or sub in the same basic block, becomes one FFMA there
# (train_gpt.cu's AdamW: mul.f32 u*lr, then sub.f32 p - that, is FFMA -u*lr + p in the SASS). The
# emulator does the same fusions at load time, so it rounds where the GPU does: the add or sub turns
# into an fma.rn of the mul's operands (its own result is then unused). Explicit .rn forbids fusion.

class _Contracted:
    """add/sub.f32 d, x, y fused with the mul.f32 that made x or y: one fma.rn, with the signs folded in."""
    control = False

    def __init__(self, neg_product: bool, neg_addend: bool):
        self.neg_product, self.neg_addend = neg_product, neg_addend

    def decode(self, k, ins):
        pass

    def execute(self, blk, ins, idx, idx_all):
        a, b, c = (blk.read(o, "f32", idx) for o in ins.srcs)
        if self.neg_product:
            a = _sign_flip(a, 0x80000000)
        if self.neg_addend:
            c = _sign_flip(c, 0x80000000)
        blk.write(ins.dst, "f32", _fma_f32(a, b, c), idx)


def _contract(k: Kernel):
    """Find each bare mul.f32 whose value is read once, by a bare add/sub.f32 of its basic block, and turn
    that add/sub into a _Contracted fma (the mul stays, computing the value nothing else reads)."""
    regs = lambda text: re.findall(r"%[\w$]+", text)
    writes_first = lambda ins: ins.operands and not ins.operands[0].startswith("[") and \
        not isinstance(ins.op, (Bar, WarpSync, Branch, CpAsyncWait))
    written = [set(regs(ins.operands[0])) if writes_first(ins) else set() for ins in k.code]
    reads = [regs(" ".join(ins.operands[1:] if writes_first(ins) else ins.operands)) +
             ([ins.guard.name] if ins.guard else []) for ins in k.code]
    nreads = {}
    for r in reads:
        for name in r:
            nreads[name] = nreads.get(name, 0) + 1
    leaders = {0} | set(k.labels.values()) | {i + 1 for i, ins in enumerate(k.code) if ins.op.control}
    for i, mul in enumerate(k.code):
        if mul.opcode != "mul.f32" or mul.guard is not None:
            continue
        d, srcs = mul.dst.name, {o.name for o in mul.srcs if isinstance(o, Reg)}
        if d in srcs:
            continue
        uses, end, j = [], None, i + 1
        while j < len(k.code) and j not in leaders:  # the value's lifetime in the block: to d's next write
            uses += [j] * reads[j].count(d)
            if d in written[j]:
                end = j
                break
            j += 1
        if len(uses) != 1 or (end is None and nreads[d] != 1):
            continue  # read twice, or perhaps live after the block
        use = k.code[uses[0]]
        if use.opcode not in ("add.f32", "sub.f32") or any(written[m] & srcs for m in range(i + 1, uses[0])):
            continue
        x, y = use.srcs
        first = isinstance(x, Reg) and x.name == d
        use.op = _Contracted(neg_product=use.opcode == "sub.f32" and not first,
                             neg_addend=use.opcode == "sub.f32" and first)
        use.srcs = [mul.srcs[0], mul.srcs[1], y if first else x]


# =============================================================================
# 4. scheduler

class _Fault(Exception):
    """Raised inside an instruction; the scheduler turns it into cls(message with kernel, line, block, thread).
    thread is the thread's index in the wave (or None: then block, the block's index in the wave, if known)."""

    def __init__(self, cls, msg, thread, block=None):
        super().__init__(msg)
        self.cls, self.msg, self.thread, self.block = cls, msg, thread, block


def _dim3(d) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    d = tuple(int(x) for x in d) + (1,) * (3 - len(d))
    if len(d) != 3 or min(d) < 1:
        raise LaunchError(f"bad dimensions {d}")
    return d


WAVE_THREADS = 8192        # threads run together, at most (whole blocks; at least one block)
WAVE_REGISTER_BYTES = 96 << 20  # and at most this much register state
MAX_SHARED_BYTES = 227 << 10  # static + dynamic per block on an H100 (above 48 KiB: cudaFuncSetAttribute)


def launch(kernel: Kernel, grid, block, args, *, device: Device | None = None, max_steps: int = 1_000_000,
           racecheck: bool = True, shared_bytes: int = 0, max_shared_bytes: int = MAX_SHARED_BYTES,
           wave_blocks: int | None = None) -> int:
    """Run kernel<<<grid, block, shared_bytes>>>(args). Numpy arrays in args are device memory, read and
    written in place (None is NULL); ints and floats are the other parameters. shared_bytes sizes the
    kernel's .extern .shared array (dynamic shared memory). Static plus dynamic shared memory may not pass
    max_shared_bytes: 227 KiB, the H100's limit, which needs cudaFuncSetAttribute(kernel,
    cudaFuncAttributeMaxDynamicSharedMemorySize, ...); without that call the limit is 48 KiB (pass
    max_shared_bytes=48 << 10). racecheck=False skips the race, uninitialized-shared and .nc checks (bounds
    and alignment are always checked). Blocks run in waves of wave_blocks (default: as many as fit
    WAVE_THREADS threads and WAVE_REGISTER_BYTES of registers); results do not depend on it unless blocks
    race, which the racecheck reports. max_steps bounds the steps of each wave. Returns the number of steps
    (instructions issued, over all waves)."""
    grid3, block3 = _dim3(grid), _dim3(block)
    nthreads = int(np.prod(block3))
    if nthreads > 1024:
        raise LaunchError(f"{kernel.name}: {nthreads} threads per block, at most 1024")
    for d in (".maxntid", ".reqntid"):
        if d in kernel.directives:
            lim = _dim3(kernel.directives[d])
            if (d == ".reqntid" and block3 != lim) or nthreads > int(np.prod(lim)):
                raise LaunchError(f"{kernel.name}: block {block3} does not fit {d} {lim}")
    static = sum(size for name, (_, size) in kernel.shared.items() if name != kernel.dynamic_shared)
    if shared_bytes < 0 or static + shared_bytes > max_shared_bytes:
        raise LaunchError(f"{kernel.name}: {static} bytes of static and {shared_bytes} of dynamic shared memory, "
                          f"more than {max_shared_bytes}")
    if shared_bytes and not kernel.dynamic_shared:
        raise LaunchError(f"{kernel.name}: shared_bytes={shared_bytes}, but it declares no .extern .shared array")
    device = device or Device()
    params = device.bind(kernel, args)
    device.memory.begin(racecheck)
    blocks = [(bx, by, bz) for bz, by, bx in itertools.product(range(grid3[2]), range(grid3[1]), range(grid3[0]))]
    padded = -(-nthreads // 32) * 32
    if wave_blocks is None:
        reg_bytes = sum(max(bits(t), 8) // 8 for t in kernel.regs.values()) * padded
        wave_blocks = max(1, min(WAVE_THREADS // padded, WAVE_REGISTER_BYTES // max(reg_bytes, 1)))
    steps = 0
    with np.errstate(all="ignore"):
        for w in range(0, len(blocks), wave_blocks):
            wave = _Wave(kernel, device, params, blocks[w:w + wave_blocks], w, grid3, block3, racecheck,
                         shared_bytes)
            steps += wave.run(max_steps)
    return steps


class _Wave:
    """Blocks in flight together: their registers, pcs, shared memory, barrier epochs and cp.asyncs, one
    numpy element per thread. Thread g of the wave is thread g % Tp of the wave's block g // Tp, where Tp
    is the block size rounded up to whole warps (so a warp never straddles two blocks); the threads that
    pad the last warp do not exist and start out exited. Each block has its own copy of shared memory."""

    def __init__(self, k: Kernel, device, params, ctaids, first, grid3, block3, racecheck, shared_bytes):
        self.k, self.device, self.params, self.ctaids, self.block3 = k, device, params, ctaids, block3
        self.T = T = int(np.prod(block3))
        self.wpb = -(-T // 32)                       # warps per block
        self.Tp = Tp = 32 * self.wpb
        self.nb = nb = len(ctaids)
        self.N = N = nb * Tp
        self.nwarps = N // 32
        self.gid = np.arange(N)
        self.blk, self.tid = self.gid // Tp, self.gid % Tp  # block in the wave; thread in its block
        self.exists = self.tid < T
        lin = np.array([bx + grid3[0] * (by + grid3[1] * bz) for bx, by, bz in ctaids])
        self.lin = lin[self.blk]                      # linear block index in the launch
        self.uids = self.lin * T + self.tid          # thread ids unique in the launch, for the racecheck
        self.regs = {name: _new_register(t, N) for name, t in k.regs.items()}
        u32 = lambda v: np.asarray(v, np.int64).astype(np.uint32)
        tid = (self.tid % block3[0], self.tid // block3[0] % block3[1], self.tid // (block3[0] * block3[1]))
        cta = np.array(ctaids)[self.blk]
        self.special = {"%laneid": u32(self.tid & 31), "%warpid": u32(self.tid >> 5)}
        for i, d in enumerate("xyz"):
            self.special |= {f"%tid.{d}": u32(tid[i]), f"%ntid.{d}": u32(np.full(N, block3[i])),
                             f"%ctaid.{d}": u32(cta[:, i]), f"%nctaid.{d}": u32(np.full(N, grid3[i]))}
        self.shared = Memory("shared", racecheck, uninit_check=True)
        for name, (addr, size) in k.shared.items():  # garbage, not zeros: the GPU does not clear it
            if name == k.dynamic_shared:
                size = shared_bytes
            if size:
                self.shared.add(addr, np.full(size * nb, 0xFF, np.uint8), f"shared {name}", copies=nb)
        self.shared.begin(racecheck)
        self.pcs = np.where(self.exists, 0, EXITED).astype(np.int64)
        self.epoch = np.zeros(nb, np.int64)              # bar.syncs each block has passed
        self.wepoch = np.zeros(self.nwarps, np.int64)    # full bar.warp.syncs each warp has passed
        self.ncommit = np.zeros(N, np.int64)             # cp.async groups each thread has committed
        self.async_copies: list[_AsyncCopy] = []
        self.cur = self.steps = 0
        # mbarriers and TMA (section 3): state by (block in wave) << 32 | address; per mbarrier, the phases
        # each thread has seen complete; the tags of the bytes cp.async.bulk.tensor wrote: (mbarrier, phase
        # of its complete-tx, line); the last try_wait that failed (for a RunawayError's message)
        self.mbarriers: dict[int, _MBarrier] = {}
        self.observed: dict[int, np.ndarray] = {}
        self.tags: list[list] = []                       # [mbarrier key, phase of its complete-tx or None, line]
        self.inflight_tx: dict[int, list[tuple[int, int]]] = {}  # mbarrier -> copies (tag, bytes) not complete
        self.arrive_clock = 0                            # release arrives made so far, by all threads
        self.arrivals: dict[int, list[tuple[int, int, int]]] = {}  # thread -> its (clock, mbarrier, phase)
        self.failed_wait = None
        self.proxy_fences = np.zeros(N, np.int64)        # fence.proxy.async each thread has executed
        self.shared.wave = self
        # wgmma (section 3): wgmma.fences per thread; per warpgroup its uncommitted mma_asyncs and its
        # committed groups; per accumulator register, which threads have it locked by a pending mma_async
        # (and its line), and the wgmma.fence count at each thread's last other access to it (and the line)
        self.wpg = -(-self.wpb // 4)                     # warpgroups per block
        self.wgid = self.blk * self.wpg + self.tid // 128
        self.wg_fences = np.zeros(N, np.int64)
        self.wg_open: dict[int, list[_Wgmma]] = {}
        self.wg_groups: dict[int, list[list[_Wgmma]]] = {}
        self.wg_lock = {r: np.zeros(N, np.int32) for r in k.wgmma_regs}
        self.wg_lock_line = {r: np.zeros(N, np.int32) for r in k.wgmma_regs}
        self.wg_touch = {r: np.full(N, -1, np.int64) for r in k.wgmma_regs}
        self.wg_touch_line = {r: np.zeros(N, np.int32) for r in k.wgmma_regs}

    # -- operands

    def count(self, idx) -> int:
        return self.N if isinstance(idx, slice) else len(idx)

    def read(self, o, t: str, idx):
        if type(o) is Reg:
            v = self.regs[o.name][idx]
            return v if t == "pred" else v.view(TYPES[t])
        if type(o) is Imm:
            return o.value
        return self.special[o.name][idx].view(TYPES[t])

    def write(self, r: Reg, t: str, value, idx):
        v = np.asarray(value)
        if v.dtype != TYPES[t]:
            raise AssertionError(f"opcode table: a .{t} result came back as {v.dtype}")
        arr = self.regs[r.name]
        arr[idx] = v if t == "pred" else v.view(arr.dtype)

    def address(self, a: Addr, idx) -> np.ndarray:
        base = np.zeros(self.count(idx), np.uint64) if a.base is None else \
            self.regs[a.base.name][idx].astype(np.uint64)
        return base + np.uint64(a.offset & (2 ** 64 - 1))

    def memory(self, space: str) -> Memory:
        return self.shared if space == "shared" else self.device.memory

    def access(self, idx, nc: bool) -> _Access:
        g = self.gid[idx]
        b = self.blk[g]
        return _Access(g, self.tid[g], self.uids[g], self.lin[g], b, self.T, self.epoch[b], self.wepoch[g >> 5],
                       nc, self.tid3)

    # -- messages

    def tid3(self, t: int) -> str:
        bx, by, _ = self.block3
        return f"({t % bx},{t // bx % by},{t // (bx * by)})"

    def whereabouts(self, g: int) -> str:
        pc = int(self.pcs[g])
        if pc == EXITED:
            return "has exited"
        if pc == self.cur:
            return "is here but predicated off"
        return f"is at line {self.k.code[pc].line} (`{self.k.code[pc].text}`)"

    def context(self, ins: Instr, thread, block=None) -> str:
        if block is None:
            block = int(self.blk[thread if thread is not None else int(np.argmin(self.pcs))])
        s = f"{self.k.where(ins)}: block ({','.join(map(str, self.ctaids[block]))})"
        return s + (f" thread {self.tid3(int(self.tid[thread]))}" if thread is not None else "")

    # -- warps

    def check_warp_members(self, ins, idx, mask):
        """The executing lanes of each warp that takes part must be exactly its membermask."""
        g = self.gid[idx]
        warp = g >> 5
        wmask = np.zeros(self.nwarps, np.int64)
        wmask[warp] = mask
        if (wmask[warp] != mask).any():
            bad = int(np.argmax(wmask[warp] != mask))
            raise _Fault(DivergenceError, "lanes of one warp pass different membermasks", int(g[bad]))
        need = ((wmask[:, None] >> np.arange(32)) & 1).astype(bool)
        have = np.zeros(self.N, bool)
        have[g] = True
        have = have.reshape(-1, 32)
        bad = have.any(1)[:, None] & (need != have)
        if bad.any():
            w, lane = (int(x) for x in np.argwhere(bad)[0])
            tt = 32 * w + lane
            if have[w, lane]:
                raise _Fault(DivergenceError, f"executes it but is not in membermask {wmask[w]:#x}", tt)
            if not self.exists[tt]:
                why = f"does not exist (the block has {self.T} threads)"
            else:
                why = self.whereabouts(tt)
            raise _Fault(DivergenceError, f"membermask {wmask[w]:#x} names lane {lane} of warp {w % self.wpb}, "
                                          f"which {why}", int(32 * w + np.argmax(have[w])))

    # -- mbarriers and tensor maps (section 3)

    def mbar_locate(self, addrs, idx, verb):
        """Keys ((block in wave) << 32 | address) and (allocation, byte index) of 8-byte mbarrier objects; out of
        bounds or not 8-byte aligned is a MemcheckError."""
        acc = self.access(idx, False)
        keys, locs = np.zeros(len(addrs), np.int64), [None] * len(addrs)
        for a, rows, bi in self.shared._locate(addrs, 8, 8, acc, verb):
            keys[rows] = (acc.bank[rows].astype(np.int64) << 32) | addrs[rows].astype(np.int64)
            for r, b in zip(rows, bi[:, 0]):
                locs[r] = (a, int(b))
        return keys, locs

    def mbar_states(self, keys, idx, verb) -> list[_MBarrier]:
        """The mbarriers at these keys, one per executing thread: each must be initialized, and the thread must be
        the initializing one or have passed a bar.sync since the init."""
        g = self.gid[idx]
        out = []
        for i, key in enumerate(keys):
            st = self.mbarriers.get(int(key))
            if st is None:
                raise _Fault(MemcheckError, f"{verb} on {int(key) & 0xFFFFFFFF:#x}, where no mbarrier.init made an "
                                            f"mbarrier (or it was invalidated)", int(g[i]))
            if int(g[i]) != st.init_gid and self.epoch[self.blk[g[i]]] == st.init_epoch:
                raise _Fault(RaceError, f"{verb} on the mbarrier at {st.addr:#x} that thread "
                                        f"{self.tid3(int(self.tid[st.init_gid]))} initialized at line {st.init_line}, "
                                        f"with no bar.sync since", int(g[i]))
            out.append(st)
        return out

    def observe(self, key: int, gids, phase: int):
        """These threads have seen phases 0 .. phase-1 of the mbarrier complete (an acquire wait)."""
        seen = self.observed.setdefault(key, np.zeros(self.N, np.int64))
        seen[gids] = np.maximum(seen[gids], phase)

    def new_tag(self, key: int, line: int) -> int:
        self.tags.append([key, None, line])
        return len(self.tags) - 1

    def check_tags(self, tags: np.ndarray, readers, per_row: bool, verb: str, where):
        """Bytes a cp.async.bulk.tensor wrote (tags >= 0, one row per access) are accessed: the reader of each row
        (per_row: readers[r]) or every one of readers must have seen the phase of the copy's complete-tx
        complete. where(r, c) describes byte c of row r."""
        for tag in np.unique(tags[tags >= 0]):
            key, phase, line = self.tags[int(tag)]
            seen = self.observed.get(key, np.zeros(self.N, np.int64))
            rows = np.flatnonzero((tags == tag).any(1))
            who = readers[rows] if per_row else np.asarray(readers)
            bad = np.ones(len(who), bool) if phase is None else seen[who] <= phase
            if bad.any():
                r = int(rows[np.argmax(bad)] if per_row else rows[0])
                st = self.mbarriers.get(key)
                when = "while it is in flight (no wait has seen its mbarrier phase complete)" if phase is None else \
                    f"before this thread saw the mbarrier at {key & 0xFFFFFFFF:#x} complete phase {phase} " + \
                    (f"(it is in phase {st.phase})" if st else "(it was invalidated)")
                raise _Fault(RaceError, f"{verb} of shared memory that the cp.async.bulk.tensor of line {line} "
                                        f"writes, {when}: a successful mbarrier.try_wait by the thread, or by one "
                                        f"it has passed a bar.sync with since, orders the access after the copy: "
                                        f"{where(r, int(np.argmax(tags[r] == tag)))}", int(who[np.argmax(bad)]))

    def check_war(self, a, bi, writer: int, verb: str):
        """The bytes bi are about to be overwritten by thread writer's cp.async.bulk.tensor: their last reader (a
        thread, or a warpgroup for a wgmma operand), if not the writer, must be ordered before it: by a bar.sync
        since the read, or by a release arrive of a reading thread after the read, on an mbarrier whose phase
        (of that arrive) the writer has seen complete."""
        r = a.reader[bi]
        reader_gid = (bi // a.size) * self.Tp + np.maximum(r, 0) % self.T
        other = (r >= 0) & np.where(a.rwg[bi], self.wgid[reader_gid] != self.wgid[writer], r % self.T != self.tid[writer])
        if not other.any():
            return
        flat = np.flatnonzero(other.ravel())
        quad = np.stack([a.reader[bi].ravel()[flat], a.repoch[bi].ravel()[flat], a.rseq[bi].ravel()[flat],
                         a.rwg[bi].ravel()[flat]], 1)
        _, first = np.unique(quad, axis=0, return_index=True)
        for (uid, repoch, rseq, wg), byte in zip(quad[first].tolist(), bi.ravel()[flat[first]].tolist()):
            block = byte // a.size
            gid = block * self.Tp + uid % self.T
            if self.epoch[block] != repoch:
                continue  # a bar.sync since the read
            readers = np.flatnonzero(self.wgid == self.wgid[gid]) if wg else [gid]
            if self.released(readers, rseq, writer):
                continue  # the read was released through an mbarrier phase the writer has seen complete
            who = f"the wgmma.mma_asyncs of warpgroup {self.wgid[gid] % self.wpg}" if wg else \
                f"thread {self.tid3(uid % self.T)}"
            raise _Fault(RaceError, f"{verb} overwrites shared memory that {who} read, with no bar.sync since "
                                    f"and no mbarrier hand-off (a release arrive after the read, in a phase this "
                                    f"thread has seen complete): the copy may land before that read is done: "
                                    f"{self.shared._where(a, byte)}", writer)

    def released(self, threads, since: int, writer: int) -> bool:
        """Did one of these threads make a release arrive after clock `since`, in an mbarrier phase that thread
        writer has seen complete?"""
        for t in threads:
            for clock, key, phase in reversed(self.arrivals.get(int(t), [])):
                if clock <= since:
                    break
                if key in self.observed and self.observed[key][writer] > phase:
                    return True
        return False

    def unfenced_generic(self, a, bi) -> np.ndarray:
        """Which of these shared bytes were last written by a plain store that its thread has not followed with a
        fence.proxy.async (so the async proxy, a wgmma, may not see it)."""
        w = a.writer[bi]
        gen = w >= 0
        if not gen.any():
            return gen
        writer = (bi // a.size) * self.Tp + np.where(gen, w, 0) % self.T  # its wave index: block copy, thread
        return gen & (self.proxy_fences[writer] <= a.wproxy[bi])

    def tensor_map(self, addr: int, g: int) -> TensorMap:
        """The tensor map whose generic address (cvta.param of a tensor-map parameter) this is."""
        for name, off in self.k.param_addr.items():
            if addr in (off, off - PARAM_BASE + PARAM_GENERIC):
                v = self.params[name]
                if addr == off:
                    raise _Fault(MemcheckError, f"tensorMap operand {addr:#x} is the .param-space address of "
                                                f"{name}; cp.async.bulk.tensor wants its generic address "
                                                f"(cvta.param.u64)", g)
                if not isinstance(v, TensorMap):
                    raise _Fault(MemcheckError, f"tensorMap operand points at parameter {name}, which holds no "
                                                f"TensorMap", g)
                return v
        raise _Fault(MemcheckError, f"tensorMap operand {addr:#x} is not the generic address of a tensor-map "
                                    f"parameter (only .param tensor maps are supported)", g)

    # -- warpgroups and wgmma (section 3)

    def warpgroups(self, ins, idx, idx_all):
        """(warpgroup, its 128 threads) for each warpgroup that executes this .sync.aligned instruction: all of its
        threads must be here with the guard true (else DivergenceError)."""
        act = np.zeros(self.N, bool)
        act[idx] = True
        here = np.zeros(self.N, bool)
        here[idx_all] = True
        for wg in np.unique(self.wgid[act]):
            th = np.flatnonzero(self.wgid == wg)
            if len(th) != 128 or not self.exists[th].all():
                raise _Fault(DivergenceError, f"warpgroup {wg % self.wpg} of a block of {self.T} threads is not 4 "
                                              f"whole warps", int(th[0]))
            if not act[th].all():
                t = int(th[np.argmin(act[th])])
                why = self.whereabouts(t)
                raise _Fault(DivergenceError, f"thread {self.tid3(int(self.tid[t]))} of the warpgroup {why}: "
                                              f"{ins.opcode.split('.sync')[0]} is executed by all 128 threads of "
                                              f"a warpgroup together (.sync.aligned)", int(th[np.argmax(act[th])]))
            yield int(wg), th

    def wg_pending(self, wg: int) -> list:
        return self.wg_open.get(wg, []) + [op for grp in self.wg_groups.get(wg, []) for op in grp]

    def retire_wgmma(self, op: _Wgmma, th):
        """A wgmma.wait_group retires a wgmma.mma_async: its shared memory must be as it was at issue; D is computed,
        written to the registers of the warpgroup's threads th, and unlocked."""
        for a, bi, snap in op.reads:
            changed = a.buf[bi] != snap
            if changed.any():
                r, c = (int(x) for x in np.argwhere(changed)[0])
                raise _Fault(RaceError, f"the shared memory that the wgmma.mma_async of line {op.line} reads "
                                        f"changed before this wgmma.wait_group retired it: "
                                        f"{self.shared._where(a, bi[r, c])}", int(th[0]))
        for a, bi, snap in op.reads:  # the wgmma's reads are done now, for the TMA's write-after-read check
            if a.reader is not None:
                self.shared.note_read(a, bi, self.uids[th[0]], self.epoch[self.blk[th[0]]], True)
        rows, cols = _wgmma_d_layout(op.n)
        d = op.a @ op.b.T  # (64, n) in float64: exact products, one float64 sum
        if op.scale_d:
            cur = np.stack([self.regs[r.name][th].view(np.float32) for r in op.dregs], axis=1).astype(np.float64)
            acc = np.zeros((64, op.n))
            acc[rows, cols] = cur
            d = d + acc
        out = d.astype(np.float32)[rows, cols]  # rounded once to fp32, then scattered to the threads
        for i, r in enumerate(op.dregs):
            self.regs[r.name][th] = out[:, i].view(np.uint32)
            self.wg_lock[r.name][th] -= 1

    def touch_accumulators(self, ins, idx):
        """An instruction other than wgmma.mma_async names wgmma accumulator registers: none may be locked by a
        pending mma_async, and the access is recorded for the wgmma.fence check."""
        g = self.gid[idx]
        for r in ins.acc_touch:
            locked = self.wg_lock[r][g] > 0
            if locked.any():
                t = int(g[np.argmax(locked)])
                raise _Fault(AsyncError, f"{r} is an accumulator of the wgmma.mma_async of line "
                                         f"{int(self.wg_lock_line[r][t])}, which no wgmma.wait_group has retired "
                                         f"yet: accessing it before is undefined (PTX ISA, wgmma.wait_group)", t)
            self.wg_touch[r][g] = self.wg_fences[g]
            self.wg_touch_line[r][g] = ins.line

    def finish(self):
        """All threads have exited: nothing asynchronous may still be running."""
        for wg in sorted(set(self.wg_open) | set(self.wg_groups)):
            ops = self.wg_pending(wg)
            if ops:
                raise AsyncError(f"{self.k.file}: in {self.k.name}: block {self.ctaids[wg // self.wpg]}: warpgroup "
                                 f"{wg % self.wpg} exits with the wgmma.mma_async of line {ops[0].line} never retired "
                                 f"by a wgmma.wait_group (commit_group, then wait_group)")
        for key, copies in self.inflight_tx.items():
            if copies:
                raise AsyncError(f"{self.k.file}: in {self.k.name}: block {self.ctaids[key >> 32]} exits while the "
                                 f"cp.async.bulk.tensor of line {self.tags[copies[0][0]][2]} is in flight: no thread "
                                 f"waited for its mbarrier at {key & 0xFFFFFFFF:#x}")

    # -- the loop

    def run(self, max_steps: int) -> int:
        code, pcs, steps = self.k.code, self.pcs, 0
        while True:
            cur = int(pcs.min())
            if cur == EXITED:
                self.finish()
                return steps
            if cur >= len(code):
                t = int(np.argmin(pcs))
                raise RunawayError(f"{self.k.file}: in {self.k.name}: block {self.ctaids[self.blk[t]]} thread "
                                   f"{self.tid3(int(self.tid[t]))} ran past the last instruction (no ret)")
            steps += 1
            self.steps = steps
            ins = code[cur]
            if steps > max_steps:
                msg = f"{self.context(ins, None)}: more than max_steps={max_steps} steps (an endless loop?)"
                if self.failed_wait and self.failed_wait[0] > steps - 64:
                    _, line, st = self.failed_wait
                    msg += (f"; threads spin on the mbarrier wait of line {line}: the mbarrier at {st.addr:#x} "
                            f"never completes its phase ({st.counts()}). Missing arrivals, or an expect-tx that "
                            f"no copy fulfils? (The emulator runs the lowest pc first, so a release that comes "
                            f"later in the code than the wait loop, such as a producer warp's, never runs.)")
                raise RunawayError(msg)
            here = pcs == cur
            idx_all = idx = slice(None) if here.all() else np.flatnonzero(here)
            if ins.guard is not None:
                g = self.regs[ins.guard.name][idx_all]
                g = ~g if ins.guard_neg else g
                if not g.all():
                    idx = np.flatnonzero(g) if isinstance(idx_all, slice) else idx_all[g]
            self.cur = cur
            try:
                if ins.acc_touch and self.count(idx):
                    self.touch_accumulators(ins, idx)
                if ins.op.control:
                    ins.op.execute(self, ins, idx, idx_all)
                else:
                    if self.count(idx):
                        ins.op.execute(self, ins, idx, idx_all)
                    pcs[idx_all] = cur + 1
            except _Fault as f:
                raise f.cls(f"{self.context(ins, f.thread, f.block)}: {f.msg}") from None


# =============================================================================
# 5. memory

@dataclass
class _Access:
    """Who is accessing, one entry per accessing thread: wave index (for messages), thread id in its block,
    launch-wide id, linear block, the block's copy of shared memory (its index in the wave), the block's
    barrier epoch and the warp's bar.warp.sync epoch; then .nc or not, and thread id -> "(x,y,z)"."""
    gids: np.ndarray
    tids: np.ndarray
    uids: np.ndarray
    block: np.ndarray
    bank: np.ndarray
    nthreads: int
    epoch: np.ndarray
    wepoch: np.ndarray
    nc: bool
    fmt: object


class _Allocation:
    def __init__(self, base: int, buf: np.ndarray, name: str, writable: bool, copies: int):
        self.base, self.buf, self.name, self.writable, self.copies = base, buf, name, writable, copies
        self.size = buf.size // copies  # the bytes at base; buf holds one copy per block of a wave (shared)
        self.inflight = np.zeros(buf.size, np.uint8) if copies > 1 or name.startswith("shared") else None
        self.mbar = None  # shared memory: which bytes hold mbarrier objects (made on the first mbarrier.init)
        self.writer = self.wepoch = self.wwepoch = self.ncread = self.atag = self.wproxy = None
        self.reader = self.repoch = self.rseq = self.rwg = None

    def begin(self, track: bool):
        n = self.buf.size
        shared = self.inflight is not None
        self.writer = np.full(n, -1, np.int64) if track else None  # launch-wide thread id; -1 none, -2 a TMA
        self.wepoch = np.zeros(n, np.int64) if track else None     # the writer's block barrier epoch
        self.wwepoch = np.zeros(n, np.int64) if track else None    # the writer's warp's bar.warp.sync epoch
        self.ncread = np.zeros(n, bool) if track else None
        self.atag = np.full(n, -1, np.int32) if track and shared else None  # the TMA that wrote it (_Wave.tags)
        self.wproxy = np.zeros(n, np.int64) if track and shared else None   # writer's fence.proxy.asyncs then
        # shared memory: the last reader (launch-wide id, -1 none), its block's bar.sync epoch and the wave's
        # release-arrive clock then, and whether it was a warpgroup's wgmma (for the TMA's write-after-read check)
        self.reader = np.full(n, -1, np.int64) if track and shared else None
        self.repoch = np.zeros(n, np.int64) if track and shared else None
        self.rseq = np.zeros(n, np.int64) if track and shared else None
        self.rwg = np.zeros(n, bool) if track and shared else None


class Memory:
    """One address space (global, or the shared windows of a wave's blocks): allocations at fixed addresses,
    checked access."""

    def __init__(self, space: str, track: bool = True, uninit_check: bool = False):
        self.space, self.track, self.uninit_check = space, track, uninit_check
        self.allocs: list[_Allocation] = []
        self.wave = None  # shared memory: its _Wave, which knows the mbarrier phases threads have seen

    def add(self, base: int, buf: np.ndarray, name: str, writable: bool = True, copies: int = 1) -> int:
        self.allocs.append(_Allocation(base, buf, name, writable, copies))
        self.allocs.sort(key=lambda a: a.base)
        self._bases = np.array([a.base for a in self.allocs], np.uint64)
        self._sizes = np.array([a.size for a in self.allocs], np.uint64)
        return base

    def begin(self, track: bool):
        """A new launch (or wave, for shared memory): forget who wrote what."""
        self.track = track
        for a in self.allocs:
            a.begin(track)

    def describe(self, addr: int) -> str:
        k = bisect.bisect_right([a.base for a in self.allocs], addr) - 1
        if k < 0:
            near = f"below every {self.space} allocation" if self.allocs else f"no {self.space} memory at all"
            return f"address {addr:#x} is {near}"
        a = self.allocs[k]
        what = f"{a.name} ({a.size} bytes at {a.base:#x})"
        if addr - a.base < a.size:
            return f"address {addr:#x} is byte {addr - a.base} of {what}"
        return f"address {addr:#x} is {addr - a.base - a.size} bytes past the end of {what}"

    def _where(self, a: _Allocation, byte: int) -> str:
        """describe() of a byte index into a.buf (any block's copy)."""
        return self.describe(a.base + int(byte) % a.size)

    def _locate(self, addrs: np.ndarray, nbytes: int, align: int, acc: _Access, verb: str):
        """(allocation, rows, byte index matrix into its buf) groups; faults on out-of-bounds or misaligned
        addresses."""
        if not self.allocs:
            raise _Fault(MemcheckError, f"{verb} {self.describe(int(addrs[0]))}", int(acc.gids[0]))
        k = np.searchsorted(self._bases, addrs, side="right").astype(np.int64) - 1
        kk = np.maximum(k, 0)
        rel = addrs - self._bases[kk]
        ok = (k >= 0) & (self._sizes[kk] >= nbytes) & (rel <= self._sizes[kk] - np.uint64(nbytes))
        if not ok.all():
            i = int(np.argmin(ok))
            raise _Fault(MemcheckError, f"out-of-bounds {verb} of {nbytes} bytes: {self.describe(int(addrs[i]))}",
                         int(acc.gids[i]))
        mis = addrs % np.uint64(align) != 0
        if mis.any():
            i = int(np.argmax(mis))
            raise _Fault(MemcheckError, f"misaligned {verb} of {nbytes} bytes (needs {align}-byte alignment): "
                                        f"{self.describe(int(addrs[i]))}", int(acc.gids[i]))
        groups = []
        for a in np.unique(k):
            rows = np.flatnonzero(k == a)
            al = self.allocs[a]
            bi = rel[rows].astype(np.int64)[:, None] + np.arange(nbytes)
            if al.copies > 1:
                bi += (acc.bank[rows] * al.size)[:, None]
            groups.append((al, rows, bi))
        return groups

    def _race(self, a: _Allocation, rows, bi, acc: _Access, verb: str):
        """The last writer of any of these bytes is another thread with no barrier since: bar.sync in its block,
        or a full bar.warp.sync in its warp (or it is in another block)."""
        w = a.writer[bi]
        T = acc.nthreads
        same_block = w // T == acc.block[rows][:, None]
        same_warp = same_block & ((w % T) // 32 == (acc.tids[rows] // 32)[:, None])
        synced = (a.wepoch[bi] != acc.epoch[rows][:, None]) | \
            (same_warp & (a.wwepoch[bi] != acc.wepoch[rows][:, None]))
        other = (w >= 0) & (w != acc.uids[rows][:, None]) & (~same_block | ~synced)
        if other.any():
            r, c = (int(x) for x in np.argwhere(other)[0])
            wb, wt = divmod(int(w[r, c]), T)
            by = f"thread {acc.fmt(wt)}" + ("" if wb == acc.block[rows[r]] else f" of block #{wb} (linear)")
            raise _Fault(RaceError, f"{verb} races with a store by {by} to the same byte, with no bar.sync "
                                    f"between: {self._where(a, bi[r, c])}", int(acc.gids[rows[r]]))

    def _in_flight(self, a: _Allocation, rows, bi, acc: _Access, verb: str):
        if a.inflight is not None and a.inflight[bi].any():
            r = int(np.argmax(a.inflight[bi].any(1)))
            raise _Fault(MemcheckError, f"{verb} of shared memory that a cp.async is still writing (its thread has "
                                        f"not passed the cp.async.wait_group for it): "
                                        f"{self._where(a, bi[r][a.inflight[bi[r]] > 0][0])}",
                         int(acc.gids[rows[r]]))

    def _mbarrier_bytes(self, a: _Allocation, rows, bi, acc: _Access, verb: str):
        if a.mbar is not None and a.mbar[bi].any():
            r = int(np.argmax(a.mbar[bi].any(1)))
            raise _Fault(MemcheckError, f"{verb} of the bytes of an mbarrier object (only mbarrier instructions "
                                        f"may access it): {self._where(a, bi[r][a.mbar[bi[r]]][0])}",
                         int(acc.gids[rows[r]]))

    def _tma_bytes(self, a: _Allocation, rows, bi, acc: _Access, verb: str, readers=None):
        """Bytes a cp.async.bulk.tensor wrote: the threads (each row's, or all of readers) must have seen its
        mbarrier phase complete (_Wave.check_tags)."""
        if a.atag is not None and self.wave is not None:
            t = a.atag[bi]
            if (t >= 0).any():
                self.wave.check_tags(t, acc.gids[rows] if readers is None else readers, readers is None, verb,
                                     lambda r, c: self._where(a, bi[r, c]))

    def mark_mbarrier(self, a: _Allocation, first: int, on: bool):
        if a.mbar is None:
            a.mbar = np.zeros(a.buf.size, bool)
        a.mbar[first:first + 8] = on

    def load(self, addrs, nbytes: int, align: int, acc: _Access) -> np.ndarray:
        out = np.empty((len(addrs), nbytes), np.uint8)
        verb = "ld.global.nc" if acc.nc else "load"
        for a, rows, bi in self._locate(addrs, nbytes, align, acc, verb):
            self._in_flight(a, rows, bi, acc, verb)
            self._mbarrier_bytes(a, rows, bi, acc, verb)
            if self.track:
                self._tma_bytes(a, rows, bi, acc, verb)
                if self.uninit_check and (a.writer[bi] == -1).any():
                    r = int(np.argmax((a.writer[bi] == -1).any(1)))
                    raise _Fault(MemcheckError, f"load of shared memory this block never wrote (uninitialized): "
                                                f"{self._where(a, bi[r, 0])}", int(acc.gids[rows[r]]))
                if acc.nc and (a.writer[bi] >= 0).any():
                    r = int(np.argmax((a.writer[bi] >= 0).any(1)))
                    raise _Fault(MemcheckError, f"ld.global.nc of memory written during this launch (.nc needs "
                                                f"read-only data): {self._where(a, bi[r, 0])}",
                                 int(acc.gids[rows[r]]))
                self._race(a, rows, bi, acc, verb)
                if acc.nc:
                    a.ncread[bi] = True
                if a.reader is not None:
                    self.note_read(a, bi, acc.uids[rows][:, None], acc.epoch[rows][:, None], False)
            out[rows] = a.buf[bi]
        return out

    def note_read(self, a: _Allocation, bi, uid, epoch, warpgroup: bool):
        """Shared memory: remember the last reader of these bytes (for _Wave.check_war)."""
        a.reader[bi], a.repoch[bi], a.rwg[bi] = uid, epoch, warpgroup
        a.rseq[bi] = self.wave.arrive_clock if self.wave is not None else 0

    def store(self, addrs, data: np.ndarray, align: int, acc: _Access, landing: bool = False):
        """landing: a cp.async's bytes arrive (they were reserved, in flight, since it issued)."""
        for a, rows, bi in self._locate(addrs, data.shape[1], align, acc, "store"):
            if not a.writable:
                raise _Fault(MemcheckError, f"store to a read-only array: {self._where(a, bi[0, 0])}",
                             int(acc.gids[rows[0]]))
            if landing:
                a.inflight[bi] -= 1
            self._in_flight(a, rows, bi, acc, "store")
            self._mbarrier_bytes(a, rows, bi, acc, "store")
            if self.track:
                if a.ncread[bi].any():
                    r = int(np.argmax(a.ncread[bi].any(1)))
                    raise _Fault(MemcheckError, f"store to memory read with ld.global.nc in this launch: "
                                                f"{self._where(a, bi[r, 0])}", int(acc.gids[rows[r]]))
                self._same_instruction(a, rows, bi, acc)
                self._race(a, rows, bi, acc, "store")
                self._tma_bytes(a, rows, bi, acc, "store")
                a.writer[bi] = acc.uids[rows][:, None]
                a.wepoch[bi] = acc.epoch[rows][:, None]
                a.wwepoch[bi] = acc.wepoch[rows][:, None]
                if a.atag is not None:  # a plain store: the generic proxy's bytes now
                    a.atag[bi] = -1
                    a.wproxy[bi] = self.wave.proxy_fences[acc.gids[rows]][:, None] if self.wave else 0
            a.buf[bi] = data[rows]

    def land_async(self, addrs, data: np.ndarray, acc: _Access, tag: int):
        """A cp.async.bulk.tensor's bytes land (16-byte chunks at addrs): ordered after earlier plain stores by a
        bar.sync like any store, then tagged with the TMA (its mbarrier phase) instead of a writer."""
        for a, rows, bi in self._locate(addrs, data.shape[1], 16, acc, "store"):
            self._in_flight(a, rows, bi, acc, "store")
            self._mbarrier_bytes(a, rows, bi, acc, "store")
            if self.track:
                self._race(a, rows, bi, acc, "store")
                self.wave.check_war(a, bi, int(acc.gids[0]), "the copy")
                a.writer[bi] = -2
                a.atag[bi] = tag
                a.reader[bi] = -1
            a.buf[bi] = data[rows]

    def read_async(self, addrs, nbytes: int, acc: _Access, readers, verb: str):
        """The async proxy (a wgmma) reads shared memory for the threads readers: the checks of a load (acc: the
        first reader, for races), bytes of a TMA whose phase some reader has not seen complete, and bytes of a
        plain store that its thread has not followed with a fence.proxy.async. Returns the bytes and the
        (allocation, byte index) groups they came from."""
        out, groups = np.empty((len(addrs), nbytes), np.uint8), []
        for a, rows, bi in self._locate(addrs, nbytes, 16, acc, verb):
            self._in_flight(a, rows, bi, acc, verb)
            self._mbarrier_bytes(a, rows, bi, acc, verb)
            if self.track:
                if self.uninit_check and (a.writer[bi] == -1).any():
                    r = int(np.argmax((a.writer[bi] == -1).any(1)))
                    raise _Fault(MemcheckError, f"{verb} of shared memory this block never wrote (uninitialized): "
                                                f"{self._where(a, bi[r][a.writer[bi[r]] == -1][0])}",
                                 int(acc.gids[rows[r]]))
                self._race(a, rows, bi, acc, verb)
                self._tma_bytes(a, rows, bi, acc, verb, readers)
                if self.wave is not None:
                    unf = self.wave.unfenced_generic(a, bi)
                    if unf.any():
                        r = int(np.argmax(unf.any(1)))
                        raise _Fault(RaceError, f"{verb} (the async proxy) reads shared memory that a plain store "
                                                f"wrote with no fence.proxy.async by its thread after it: "
                                                f"{self._where(a, bi[r][unf[r]][0])}", int(acc.gids[rows[r]]))
            out[rows] = a.buf[bi]
            groups.append((a, bi))
        return out, groups

    def _same_instruction(self, a: _Allocation, rows, bi, acc: _Access):
        """Two threads storing to one byte in one instruction race; the later thread (in wave order) is
        reported, as if it stored second."""
        flat = bi.ravel()
        order = np.argsort(flat, kind="stable")
        dup = np.flatnonzero(np.diff(flat[order]) == 0)
        if dup.size == 0:
            return
        first, second = order[dup[0]] // bi.shape[1], order[dup[0] + 1] // bi.shape[1]
        byte = self._where(a, flat[order[dup[0]]])
        if acc.block[rows[first]] == acc.block[rows[second]]:
            raise _Fault(RaceError, f"two threads store to the same byte in one instruction: {byte}",
                         int(acc.gids[rows[second]]))
        wb, wt = divmod(int(acc.uids[rows[first]]), acc.nthreads)
        raise _Fault(RaceError, f"store races with a store by thread {acc.fmt(wt)} of block #{wb} (linear) to the "
                                f"same byte, with no bar.sync between: {byte}", int(acc.gids[rows[second]]))

    def reserve(self, addrs, nbytes: int, acc: _Access):
        """A cp.async issues: its destination bytes (aligned to their size) are in flight until it lands."""
        for a, rows, bi in self._locate(addrs, nbytes, nbytes, acc, "cp.async"):
            self._in_flight(a, rows, bi, acc, "cp.async")
            flat = bi.ravel()
            if np.unique(flat).size != flat.size:
                raise _Fault(RaceError, f"two cp.async of one instruction write the same byte: "
                                        f"{self._where(a, flat[0])}", int(acc.gids[rows[0]]))
            a.inflight[bi] += 1

    def atomic(self, addrs, vals, t: str, fn, acc: _Access) -> np.ndarray:
        """One read-modify-write per thread, in order; returns the old values."""
        size = bits(t) // 8
        old = np.empty(len(addrs), TYPES[t])
        for a, rows, bi in self._locate(addrs, size, size, acc, "atom"):
            if not a.writable:
                raise _Fault(MemcheckError, f"atom on a read-only array: {self._where(a, bi[0, 0])}",
                             int(acc.gids[rows[0]]))
            self._in_flight(a, rows, bi, acc, "atom")
            self._mbarrier_bytes(a, rows, bi, acc, "atom")
            if self.track:
                self._race(a, rows, bi, acc, "atom")
            for r, b in zip(rows, bi):
                cur = a.buf[b].view(TYPES[t])[0]
                old[r] = cur
                a.buf[b] = np.asarray(fn(cur, vals[r])).astype(TYPES[t]).reshape(1).view(np.uint8)
        return old


class TensorMap:
    """A tensor map as the host's cuTensorMapEncodeTiled (CUDA driver API) encodes it, for cp.async.bulk.tensor:
    "a 128-byte opaque object ... in .param space" (PTX ISA 5.5.8), passed by value to a kernel parameter
    declared `.param .align A .b8 name[128]` (A >= 64: the driver wants the map 64-byte aligned).

    array: the tensor, a C-contiguous numpy array that becomes device memory at launch (the element size is
    its dtype's: bf16 is uint16). dims: the size of each dimension, innermost first (globalDim; default the
    array's shape reversed). strides: the byte stride of each dimension but the innermost (globalStrides;
    default the array's). box: boxDim, innermost first. swizzle: 0, 32, 64 or 128 (CU_TENSOR_MAP_SWIZZLE_NONE,
    _32B, _64B, _128B). Modelled: interleave none, element strides 1, out-of-bounds elements filled with zeros
    (CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE). The constructor rejects (LaunchError) what cuTensorMapEncodeTiled
    would: rank outside 1..5; a dimension outside 1..2^32; a stride not a multiple of 16 or not below 2^40;
    a box size outside 1..256; box[0] * element size not a multiple of 16 bytes, or (with a swizzle) larger
    than the swizzle's span. The emulator also requires, with a swizzle, box[0] * element size equal to the
    span (narrower swizzled boxes are not modelled), and a tensor that fits in the array."""

    def __init__(self, array: np.ndarray, box, swizzle: int = 0, *, dims=None, strides=None):
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            raise LaunchError("TensorMap: the tensor must be a C-contiguous numpy array")
        es = array.dtype.itemsize
        dims = tuple(int(d) for d in (array.shape[::-1] if dims is None else dims))
        if strides is None:
            strides = array.strides[::-1][1:] if len(dims) == array.ndim else \
                tuple(es * int(np.prod(dims[:i + 1])) for i in range(len(dims) - 1))
        strides, box = tuple(int(x) for x in strides), tuple(int(b) for b in box)
        rank = len(dims)
        problems = []
        if not 1 <= rank <= 5 or len(box) != rank or len(strides) != rank - 1:
            problems.append(f"rank {rank} with {len(box)} box sizes and {len(strides)} strides")
        if any(not 1 <= d <= 1 << 32 for d in dims):
            problems.append(f"dims {dims} outside 1..2^32")
        if any(x % 16 or not 0 < x < 1 << 40 for x in strides):
            problems.append(f"strides {strides} must be multiples of 16 bytes below 2^40")
        if any(not 1 <= b <= 256 for b in box) or (box and box[0] * es % 16):
            problems.append(f"box {box}: sizes 1..256, and box[0] * {es} bytes a multiple of 16")
        if swizzle not in (0, 32, 64, 128):
            problems.append(f"swizzle {swizzle} (0, 32, 64 or 128)")
        elif swizzle and box and box[0] * es > swizzle:
            problems.append(f"box[0] * {es} = {box[0] * es} bytes is wider than the {swizzle}-byte swizzle")
        elif swizzle and box and box[0] * es != swizzle:
            problems.append(f"box[0] * {es} = {box[0] * es} bytes with a {swizzle}-byte swizzle: only rows of "
                            f"exactly the swizzle's span are modelled")
        if not problems and es * (1 + (dims[0] - 1)) + sum((d - 1) * x for d, x in zip(dims[1:], strides)) \
                > array.nbytes:
            problems.append(f"dims {dims} with strides {strides} reach past the array's {array.nbytes} bytes")
        if problems:
            raise LaunchError("TensorMap: " + "; ".join(problems))
        self.array, self.es, self.dims, self.strides, self.box, self.swizzle = array, es, dims, strides, box, swizzle
        self.rank = rank
        self.box_bytes = int(np.prod(box)) * es
        self.addr = None  # the array's device address, at launch

    def __repr__(self):
        return f"TensorMap(dims={self.dims}, strides={self.strides}, box={self.box}, swizzle={self.swizzle})"

    def read_box(self, blk, coords, g: int) -> np.ndarray:
        """The box at coords (innermost first) as bytes in box order, zeros outside the tensor; the global
        reads are memchecked loads of thread g."""
        es, box, coords = self.es, self.box, np.asarray(coords, np.int64)
        rows = int(np.prod(box[1:]))
        data = np.zeros((rows, box[0] * es), np.uint8)
        lo, hi = max(int(coords[0]), 0), min(int(coords[0]) + box[0], self.dims[0])
        if hi <= lo:
            return data.reshape(-1)
        # the outer coordinates of each row of the box (dimension 1 fastest), and whether all are in the tensor
        outer = np.indices(box[:0:-1]).reshape(self.rank - 1, -1)[::-1] if self.rank > 1 else np.zeros((0, 1), int)
        c = outer + coords[1:, None]
        ok = np.flatnonzero(((c >= 0) & (c < np.array(self.dims[1:], np.int64)[:, None])).all(0))
        if ok.size:
            base = self.addr + (c[:, ok] * np.array(self.strides, np.int64)[:, None]).sum(0) + lo * es
            raw = blk.device.memory.load(base.astype(np.uint64), (hi - lo) * es, 1,
                                         blk.access(np.full(ok.size, g), False))
            data[ok, (lo - int(coords[0])) * es:(hi - int(coords[0])) * es] = raw
        return data.reshape(-1)


class Device:
    """Fake global memory: hands out 256-byte aligned addresses, far apart, for numpy arrays. The kernel reads
    and writes the arrays themselves (views, no copies). The same array passed twice gets the same address."""

    BASE, ALIGN, GAP = 0x7F00_0000_0000, 256, 1 << 16

    def __init__(self):
        self.memory = Memory("global")
        self._next = self.BASE
        self._addr: dict[tuple[int, int], int] = {}

    def ptr(self, array: np.ndarray, name: str = "array") -> int:
        if not isinstance(array, np.ndarray) or not array.flags.c_contiguous:
            raise LaunchError(f"{name}: device memory must be a C-contiguous numpy array")
        key = (array.__array_interface__["data"][0], array.nbytes)
        if key not in self._addr:
            base = self._next
            self._next = -(-(base + array.nbytes + self.GAP) // self.ALIGN) * self.ALIGN
            desc = f"{name} ({array.dtype}{list(array.shape)})"
            self.memory.add(base, array.reshape(-1).view(np.uint8), desc, array.flags.writeable)
            self._addr[key] = base
        return self._addr[key]

    def bind(self, k: Kernel, args) -> dict:
        """Kernel arguments -> {parameter: numpy scalar of its type}."""
        args = list(args)
        if len(args) != len(k.params):
            raise LaunchError(f"{k.name} takes {len(k.params)} arguments "
                              f"({', '.join(f'.{t} {n}' for n, t in k.params)}), got {len(args)}")
        out = {}
        for (name, t), a in zip(k.params, args):
            w = bits(t)
            if name in k.param_arrays:  # .param .b8 name[N]: a TensorMap (N = 128), or N raw bytes
                n = k.param_arrays[name]
                if isinstance(a, TensorMap):
                    if n != 128 or k.param_align[name] < 64:
                        raise LaunchError(f"{k.name}: {name} is a {n}-byte parameter aligned to "
                                          f"{k.param_align[name]}; a CUtensorMap is 128 bytes, 64-byte aligned")
                    a.addr = self.ptr(a.array, name)
                    out[name] = a
                elif isinstance(a, (bytes, bytearray, np.ndarray)) and len(bytes(a)) == n:
                    out[name] = np.frombuffer(bytes(a), np.uint8).copy()
                else:
                    raise LaunchError(f"{k.name}: {name} is a {n}-byte array parameter: pass a TensorMap or {n} bytes")
                continue
            if isinstance(a, np.ndarray) or a is None:
                if t not in ("u64", "b64", "s64"):
                    raise LaunchError(f"{k.name}: {name} is .{t}, not a pointer")
                a = 0 if a is None else self.ptr(a, name)
            if t[0] == "f":
                if not isinstance(a, (int, float, np.integer, np.floating)):
                    raise LaunchError(f"{k.name}: {name} is .{t}, got {a!r}")
                out[name] = TYPES[t](a)
                continue
            if not isinstance(a, (int, np.integer)):
                raise LaunchError(f"{k.name}: {name} is .{t}, got {a!r}")
            a = int(a)
            lo, hi = (-(1 << (w - 1)), (1 << (w - 1)) - 1) if t[0] == "s" else (0, (1 << w) - 1)
            if not lo <= a <= hi:
                raise LaunchError(f"{k.name}: {name} = {a} does not fit .{t}")
            out[name] = np.array(a & ((1 << w) - 1), UNSIGNED[w]).view(TYPES[t])[()]
        return out
