"""A small PTX emulator: runs the hand-written kernels of asm/*.ptx on the CPU.

CI has no GPU, so on its own it can only check that the PTX kernels assemble
(ptxas). This module runs the same .ptx text with numpy, so
tests/test_ptx_emu.py can compare every kernel with a float64 reference. It
also checks the memory accesses and the synchronisation as it goes, without a
GPU:

    k = load_kernel("asm/gelu.ptx", "ptx_gelu_forward")
    launch(k, grid=(2, 1, 1), block=(256, 1, 1), args=[out, inp, n])

numpy arrays in `args` become device pointers to those arrays, and the kernel
writes straight into them. Python ints and floats become the .param values
(.u64/.s32/.f32...). None is NULL.

The file has five sections, in reading order:

1. parse: the PTX subset that asm/*.ptx uses, turned into Kernel objects
   (parameters, register and shared declarations, labels, decoded
   instructions). An instruction, modifier, directive, register or label that
   it does not know is a PTXSyntaxError naming it and its line. Nothing is
   silently ignored.
2. registers: a register holds raw bits, one numpy array per register, one
   element per thread (uint16/32/64, bool for predicates). Each instruction
   reads them as its own type. Registers start out as a poison pattern (a NaN
   as f32, an unmapped address as an integer), because a GPU does not zero
   them either.
3. instructions: the opcode table, one entry per opcode spelling. Adding an
   opcode is usually one line: `_alu("min.f32", "f32", "f32 f32", np.fmin)`.
4. scheduler: one block at a time, vectorized over its threads, and each
   thread has its own pc. A step runs the instruction at the lowest pc among
   the live threads, for all the threads that are at it. A @p guard narrows
   the set further. This "min-pc" schedule reconverges structured control
   flow. It also makes shfl.sync and bar.sync meeting points: when one of
   them is the lowest pc, every thread it names must be there. A thread that
   is somewhere else took another path, which is a real bug on a GPU, so the
   emulator raises DivergenceError. Loops stop at max_steps (RunawayError).
5. memory: fake 64-bit device addresses for the arrays passed in, and a
   per-block shared window. Every access is bounds-checked against its
   allocation and alignment-checked (a memcheck): a .v4 of 4-byte elements
   needs 16 bytes, a .v2 8, a scalar its size. A read of shared bytes the
   block never wrote is an error. Two threads touching the same bytes with no
   bar.sync in between, or from two blocks (a racecheck), is an error. So is
   ld.global.nc of memory the launch writes.

Numerics. Registers keep the exact bits. add/sub/mul.rn.f32 are numpy
float32 operations, which are IEEE correctly rounded. fma.rn.f32 is exact:
the product in float64 (exact for float32 inputs), a TwoSum for the error of
the sum, and a correction where rounding float64 to float32 would otherwise
double-round. div/rcp/sqrt.rn are float64 then rounded once, which is correct
because 53 >= 2 * 24 + 2 bits. .ftz flushes subnormal inputs and results to
zero, keeping the sign. ex2/lg2/tanh.approx are computed exactly (float64,
rounded to float32). The GPU approximates them (relative error about 2^-22
for ex2/lg2, 2^-11 for tanh), so the emulator is more accurate than the
hardware there, and tests should compare with tolerances, not bits.
cvt.rn.bf16x2.f32 rounds to nearest even and puts its first operand in the
upper half.

Not modelled: timing, caches, occupancy, register counts (.maxnreg is
recorded, not enforced; .maxntid and .reqntid are checked at launch). Memory ordering is only modelled as far as
the race check goes: blocks run one after another, so kernels whose blocks
must talk to each other are out of scope, and within a block memory is
sequentially consistent. The racecheck tracks the last writer of each byte
but not its readers, so a write after another thread's read with no barrier
between them (write-after-read) is not caught. NaN payloads are kept where a
GPU would return its canonical NaN. The .approx instructions are exact.
Atomics, textures, generic addressing, local memory, .func calls, clusters
and asynchronous copies are not supported: the parser rejects them.
"""

from __future__ import annotations

import bisect
import difflib
import functools
import itertools
import re
from dataclasses import dataclass, field
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


@dataclass
class Kernel:
    name: str
    file: str
    params: list[tuple[str, str]]              # (name, PTX type), in order
    regs: dict[str, str]                       # register name -> PTX type
    shared: dict[str, tuple[int, int]]         # shared variable -> (address, bytes)
    code: list[Instr]
    labels: dict[str, int]
    directives: dict[str, tuple[int, ...]]     # .maxnreg, .maxntid, ... as written

    def where(self, ins: Instr) -> str:
        return f"{self.file}:{ins.line}: in {self.name}: `{ins.text}`"


def _strip_comments(text: str) -> str:
    """Comments become spaces, keeping every newline, so offsets and line numbers stay the same."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group())
    return re.sub(r"//[^\n]*", blank, re.sub(r"/\*.*?\*/", blank, text, flags=re.S))


def _split(text: str) -> list[tuple[int, str]]:
    """(offset, statement) pairs; '{' and '}' of blocks are statements of their own. A '{' after the
    start of an instruction opens a vector operand {%a, %b} and stays in the instruction."""
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
            if pending.strip() and ".entry" not in pending and ".func" not in pending:
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
        if s.startswith(".shared"):
            module_shared.append((line_of(off), s))
            i += 1
            continue
        m = re.fullmatch(r"(?:\.visible\s+)?\.entry\s+([\w$]+)\s*\((.*?)\)\s*(.*)", s, re.S)
        if not m:
            raise err(off, f"unsupported module-level statement: {s.split()[0]!r} (only .entry kernels, "
                           f".shared, {', '.join(LINE_DIRECTIVES)} are supported)")
        name, plist, tail = m.groups()
        params = []
        for p in filter(None, (x.strip() for x in plist.split(","))):
            pm = re.fullmatch(r"\.param\s+\.(\w+)\s+([\w$]+)", p)
            if not pm or pm.group(1) not in TYPES or pm.group(1) == "pred":
                raise err(off, f"unsupported kernel parameter {p!r} in {name}")
            params.append((pm.group(2), pm.group(1)))
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
        kernels[name] = _build_kernel(name, filename, params, directives, module_shared + body)
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


def _build_kernel(name, file, params, directives, body) -> Kernel:
    k = Kernel(name, file, params, {}, {}, [], {}, directives)
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
    for ins in k.code:
        ins.op = OPCODES.get(ins.opcode)
        if ins.op is None:
            near = difflib.get_close_matches(ins.opcode, OPCODES, n=4, cutoff=0.75)
            raise err(ins.line, f"unknown instruction {ins.opcode!r}" +
                      (f" (known near it: {', '.join(near)})" if near else "") +
                      " - add it to the opcode table in dev/ptx_emu.py")
        ins.op.decode(k, ins)
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
    if re.match(r"[-+]?(\d|\.\d)", text):
        return Imm(_imm(k, ins, text, t))
    raise _syntax(k, ins, f"bad operand {text!r}")


def _addr(k: Kernel, ins: Instr, text: str, space: str) -> Addr:
    """[%reg], [%reg+imm], [%reg-imm], [symbol], [symbol+imm], [imm]."""
    m = re.fullmatch(r"\[\s*([^\]]+?)\s*(?:([+-])\s*(\w+))?\s*\]", text)
    if not m:
        raise _syntax(k, ins, f"bad address {text!r}")
    base, sign, off = m.groups()
    offset = 0 if off is None else int(_imm(k, ins, f"{sign}{off}", "s64"))
    if space == "param":
        if base not in dict(k.params) or offset:
            raise _syntax(k, ins, f"ld.param wants [a parameter of {k.name}], got {text!r}")
        return Addr(None, 0, base)
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
_alu("tanh.approx.f32", "f32", "f32", lambda a: _to_f32(np.tanh(_f64(a))))

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

# conversions
_alu("cvt.u64.u32", "u64", "u32", lambda a: np.asarray(a, np.uint64))
_alu("cvt.s64.s32", "s64", "s32", lambda a: np.asarray(a, np.int64))
_alu("cvt.u32.u64", "u32", "u64", lambda a: np.asarray(a).astype(np.uint32))
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
        if self.space == "param" and bits(dict(k.params)[ins.addr.param]) != bits(self.t):
            raise _syntax(k, ins, f"parameter {ins.addr.param} is .{dict(k.params)[ins.addr.param]}, "
                                  f"not {bits(self.t)} bits")

    def execute(self, blk, ins, idx, idx_all):
        if self.space == "param":
            vals = [np.asarray(blk.params[ins.addr.param]).view(TYPES[self.t])]
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


# ---- warp shuffles, barriers, control flow

class Shfl:
    """shfl.sync.MODE.b32 d, a, b, c, membermask: d = a of lane j (PTX ISA's pseudocode): bfly j = lane ^ b,
    up j = lane - b, down j = lane + b, idx j = b; c = segment mask << 8 | clamp; out of range: own value.
    Every lane in membermask must execute this instruction together, and only those lanes."""
    control = False

    def __init__(self, mode: str):
        self.mode = mode

    def decode(self, k, ins):
        _arity(k, ins, 5)
        if "|" in ins.operands[0]:
            raise _syntax(k, ins, "shfl's predicate destination (d|p) is not supported")
        ins.dst = _reg(k, ins, ins.operands[0], "b32")
        ins.srcs = [_value(k, ins, o, "b32") for o in ins.operands[1:]]

    def execute(self, blk, ins, idx, idx_all):
        t = blk.tids[idx]
        lane = (t & 31).astype(np.int64)
        b, c, mask = (np.broadcast_to(blk.read(o, "u32", idx), t.shape).astype(np.int64) for o in ins.srcs[1:])
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
        src = t - lane + np.where(ok, j, lane)
        if not ((mask >> (src & 31)) & 1).all():
            bad = int(np.argmin((mask >> (src & 31)) & 1))
            raise _Fault(DivergenceError, f"reads lane {src[bad] & 31}, which is not in membermask", int(t[bad]))
        a = blk.read(ins.srcs[0], "b32", slice(None))
        blk.write(ins.dst, "b32", np.broadcast_to(a, (blk.T,))[src], idx)


class Bar:
    """bar.sync id: every thread of the block that has not exited must arrive here."""
    control = False

    def decode(self, k, ins):
        if len(ins.operands) != 1:
            raise _syntax(k, ins, "only bar.sync with a barrier id and no thread count is supported")
        ins.srcs = [_value(k, ins, ins.operands[0], "u32")]

    def execute(self, blk, ins, idx, idx_all):
        here = np.zeros(blk.T, bool)
        here[idx] = True
        missing = (blk.pcs != EXITED) & ~here
        if missing.any():
            t = int(np.argmax(missing))
            raise _Fault(DivergenceError, f"thread {blk.tid3(t)} {blk.whereabouts(t)}, not at this barrier", None)
        blk.epoch += 1


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
            taken = np.zeros(blk.nwarps * 32, bool)
            taken[blk.tids[idx]] = True
            here = np.zeros(blk.nwarps * 32, bool)
            here[blk.tids[idx_all]] = True
            split = (taken.reshape(-1, 32).any(1)) & (here & ~taken).reshape(-1, 32).any(1)
            if split.any():
                raise _Fault(DivergenceError, f"bra.uni diverges in warp {int(np.argmax(split))}", None)
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
OPCODES["bar.sync"] = OPCODES["barrier.sync"] = OPCODES["barrier.sync.aligned"] = Bar()
OPCODES["bra"], OPCODES["bra.uni"] = Branch(False), Branch(True)
OPCODES["ret"] = OPCODES["exit"] = Exit()


# =============================================================================
# 4. scheduler

class _Fault(Exception):
    """Raised inside an instruction; the scheduler turns it into cls(message with kernel, line, block, thread)."""

    def __init__(self, cls, msg, thread):
        super().__init__(msg)
        self.cls, self.msg, self.thread = cls, msg, thread


def _dim3(d) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    d = tuple(int(x) for x in d) + (1,) * (3 - len(d))
    if len(d) != 3 or min(d) < 1:
        raise LaunchError(f"bad dimensions {d}")
    return d


def launch(kernel: Kernel, grid, block, args, *, device: Device | None = None, max_steps: int = 1_000_000,
           racecheck: bool = True) -> int:
    """Run kernel<<<grid, block>>>(args), one block after another. Numpy arrays in args are device memory,
    read and written in place (None is NULL); ints and floats are the other parameters. racecheck=False
    skips the race, uninitialized-shared and .nc checks (bounds and alignment are always checked).
    Returns the number of steps (instructions issued, over all blocks)."""
    grid3, block3 = _dim3(grid), _dim3(block)
    nthreads = int(np.prod(block3))
    if nthreads > 1024:
        raise LaunchError(f"{kernel.name}: {nthreads} threads per block, at most 1024")
    for d in (".maxntid", ".reqntid"):
        if d in kernel.directives:
            lim = _dim3(kernel.directives[d])
            if (d == ".reqntid" and block3 != lim) or nthreads > int(np.prod(lim)):
                raise LaunchError(f"{kernel.name}: block {block3} does not fit {d} {lim}")
    device = device or Device()
    params = device.bind(kernel, args)
    device.memory.begin(racecheck)
    steps = 0
    with np.errstate(all="ignore"):
        for bz, by, bx in itertools.product(range(grid3[2]), range(grid3[1]), range(grid3[0])):
            blk = _Block(kernel, device, params, (bx, by, bz), grid3, block3, racecheck)
            steps += blk.run(max_steps)
    return steps


class _Block:
    """One thread block in flight: its registers, pcs, shared memory and barrier epoch."""

    def __init__(self, k: Kernel, device, params, ctaid, grid3, block3, racecheck):
        self.k, self.device, self.params, self.ctaid, self.block3 = k, device, params, ctaid, block3
        self.T = T = int(np.prod(block3))
        self.nwarps = -(-T // 32)
        self.tids = np.arange(T)
        self.lin = ctaid[0] + grid3[0] * (ctaid[1] + grid3[1] * ctaid[2])  # linear block index
        self.uids = self.lin * T + self.tids  # thread ids unique in the launch, for the racecheck
        self.regs = {name: _new_register(t, T) for name, t in k.regs.items()}
        u32 = lambda v: np.full(T, v, np.uint32)
        tid = (self.tids % block3[0], self.tids // block3[0] % block3[1], self.tids // (block3[0] * block3[1]))
        self.special = {"%laneid": (self.tids & 31).astype(np.uint32), "%warpid": (self.tids >> 5).astype(np.uint32)}
        for i, d in enumerate("xyz"):
            self.special |= {f"%tid.{d}": tid[i].astype(np.uint32), f"%ntid.{d}": u32(block3[i]),
                             f"%ctaid.{d}": u32(ctaid[i]), f"%nctaid.{d}": u32(grid3[i])}
        self.shared = Memory("shared", racecheck, uninit_check=True)
        for name, (addr, size) in k.shared.items():  # garbage, not zeros: the GPU does not clear it
            self.shared.add(addr, np.full(size, 0xFF, np.uint8), f"shared {name}")
        self.shared.begin(racecheck)
        self.pcs = np.zeros(T, np.int64)
        self.epoch = 0  # bar.syncs passed
        self.cur = 0

    # -- operands

    def count(self, idx) -> int:
        return self.T if isinstance(idx, slice) else len(idx)

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
        return _Access(self.tids[idx], self.uids[idx], self.lin, self.T, self.epoch, nc, self.tid3)

    # -- messages

    def tid3(self, t: int) -> str:
        bx, by, _ = self.block3
        return f"({t % bx},{t // bx % by},{t // (bx * by)})"

    def whereabouts(self, t: int) -> str:
        pc = int(self.pcs[t])
        if pc == EXITED:
            return "has exited"
        if pc == self.cur:
            return "is here but predicated off"
        return f"is at line {self.k.code[pc].line} (`{self.k.code[pc].text}`)"

    def context(self, ins: Instr, thread) -> str:
        s = f"{self.k.where(ins)}: block ({self.ctaid[0]},{self.ctaid[1]},{self.ctaid[2]})"
        return s + (f" thread {self.tid3(thread)}" if thread is not None else "")

    # -- warps

    def check_warp_members(self, ins, idx, mask):
        """The executing lanes of each warp that takes part must be exactly its membermask."""
        t = self.tids[idx]
        warp = t >> 5
        wmask = np.zeros(self.nwarps, np.int64)
        wmask[warp] = mask
        if (wmask[warp] != mask).any():
            bad = int(np.argmax(wmask[warp] != mask))
            raise _Fault(DivergenceError, "lanes of one warp pass different membermasks", int(t[bad]))
        need = ((wmask[:, None] >> np.arange(32)) & 1).astype(bool)
        have = np.zeros(self.nwarps * 32, bool)
        have[t] = True
        have = have.reshape(-1, 32)
        bad = have.any(1)[:, None] & (need != have)
        if bad.any():
            w, lane = (int(x) for x in np.argwhere(bad)[0])
            tt = 32 * w + lane
            if have[w, lane]:
                raise _Fault(DivergenceError, f"executes it but is not in membermask {wmask[w]:#x}", tt)
            if tt >= self.T:
                why = f"does not exist (the block has {self.T} threads)"
            else:
                why = self.whereabouts(tt)
            raise _Fault(DivergenceError, f"membermask {wmask[w]:#x} names lane {lane} of warp {w}, which {why}",
                         int(32 * w + np.argmax(have[w])))

    # -- the loop

    def run(self, max_steps: int) -> int:
        code, pcs, steps = self.k.code, self.pcs, 0
        while True:
            cur = int(pcs.min())
            if cur == EXITED:
                return steps
            if cur >= len(code):
                t = int(np.argmin(pcs))
                raise RunawayError(f"{self.k.file}: in {self.k.name}: block {self.ctaid} thread {self.tid3(t)} "
                                   f"ran past the last instruction (no ret)")
            steps += 1
            ins = code[cur]
            if steps > max_steps:
                raise RunawayError(f"{self.context(ins, None)}: more than max_steps={max_steps} steps "
                                   f"(an endless loop?)")
            here = pcs == cur
            idx_all = idx = slice(None) if here.all() else np.flatnonzero(here)
            if ins.guard is not None:
                g = self.regs[ins.guard.name][idx_all]
                g = ~g if ins.guard_neg else g
                if not g.all():
                    idx = np.flatnonzero(g) if isinstance(idx_all, slice) else idx_all[g]
            self.cur = cur
            try:
                if ins.op.control:
                    ins.op.execute(self, ins, idx, idx_all)
                else:
                    if self.count(idx):
                        ins.op.execute(self, ins, idx, idx_all)
                    pcs[idx_all] = cur + 1
            except _Fault as f:
                raise f.cls(f"{self.context(ins, f.thread)}: {f.msg}") from None


# =============================================================================
# 5. memory

@dataclass
class _Access:
    """Who is accessing: the threads (block-local ids, launch-wide ids), block, barrier epoch, .nc or not."""
    tids: np.ndarray
    uids: np.ndarray
    block: int
    nthreads: int
    epoch: int
    nc: bool
    fmt: object  # thread id -> "(x,y,z)"


class _Allocation:
    def __init__(self, base: int, buf: np.ndarray, name: str, writable: bool):
        self.base, self.buf, self.name, self.writable = base, buf, name, writable
        self.size = buf.size
        self.writer = self.wepoch = self.ncread = None

    def begin(self, track: bool):
        self.writer = np.full(self.size, -1, np.int64) if track else None  # launch-wide thread id, -1: none
        self.wepoch = np.zeros(self.size, np.int64) if track else None     # the writer's barrier epoch
        self.ncread = np.zeros(self.size, bool) if track else None


class Memory:
    """One address space (global, or a block's shared window): allocations at fixed addresses, checked access."""

    def __init__(self, space: str, track: bool = True, uninit_check: bool = False):
        self.space, self.track, self.uninit_check = space, track, uninit_check
        self.allocs: list[_Allocation] = []

    def add(self, base: int, buf: np.ndarray, name: str, writable: bool = True) -> int:
        self.allocs.append(_Allocation(base, buf, name, writable))
        self.allocs.sort(key=lambda a: a.base)
        self._bases = np.array([a.base for a in self.allocs], np.uint64)
        self._sizes = np.array([a.size for a in self.allocs], np.uint64)
        return base

    def begin(self, track: bool):
        """A new launch (or block, for shared memory): forget who wrote what."""
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

    def _locate(self, addrs: np.ndarray, nbytes: int, align: int, acc: _Access, verb: str):
        """(allocation, rows, byte index matrix) groups; faults on out-of-bounds or misaligned addresses."""
        if not self.allocs:
            raise _Fault(MemcheckError, f"{verb} {self.describe(int(addrs[0]))}", int(acc.tids[0]))
        k = np.searchsorted(self._bases, addrs, side="right").astype(np.int64) - 1
        kk = np.maximum(k, 0)
        rel = addrs - self._bases[kk]
        ok = (k >= 0) & (self._sizes[kk] >= nbytes) & (rel <= self._sizes[kk] - np.uint64(nbytes))
        if not ok.all():
            i = int(np.argmin(ok))
            raise _Fault(MemcheckError, f"out-of-bounds {verb} of {nbytes} bytes: {self.describe(int(addrs[i]))}",
                         int(acc.tids[i]))
        mis = addrs % np.uint64(align) != 0
        if mis.any():
            i = int(np.argmax(mis))
            raise _Fault(MemcheckError, f"misaligned {verb} of {nbytes} bytes (needs {align}-byte alignment): "
                                        f"{self.describe(int(addrs[i]))}", int(acc.tids[i]))
        groups = []
        for a in np.unique(k):
            rows = np.flatnonzero(k == a)
            bi = rel[rows].astype(np.int64)[:, None] + np.arange(nbytes)
            groups.append((self.allocs[a], rows, bi))
        return groups

    def _race(self, a: _Allocation, rows, bi, acc: _Access, verb: str):
        """The last writer of any of these bytes is another thread with no barrier since (or another block)."""
        w = a.writer[bi]
        mine = acc.uids[rows][:, None]
        other = (w >= 0) & (w != mine) & ((w // acc.nthreads != acc.block) | (a.wepoch[bi] == acc.epoch))
        if other.any():
            r, c = (int(x) for x in np.argwhere(other)[0])
            wb, wt = divmod(int(w[r, c]), acc.nthreads)
            by = f"thread {acc.fmt(wt)}" + ("" if wb == acc.block else f" of block #{wb} (linear)")
            raise _Fault(RaceError, f"{verb} races with a store by {by} to the same byte, with no bar.sync "
                                    f"between: {self.describe(a.base + int(bi[r, c]))}", int(acc.tids[rows[r]]))

    def load(self, addrs, nbytes: int, align: int, acc: _Access) -> np.ndarray:
        out = np.empty((len(addrs), nbytes), np.uint8)
        verb = "ld.global.nc" if acc.nc else "load"
        for a, rows, bi in self._locate(addrs, nbytes, align, acc, verb):
            if self.track:
                if self.uninit_check and (a.writer[bi] < 0).any():
                    r = int(np.argmax((a.writer[bi] < 0).any(1)))
                    raise _Fault(MemcheckError, f"load of shared memory this block never wrote (uninitialized): "
                                                f"{self.describe(a.base + int(bi[r, 0]))}", int(acc.tids[rows[r]]))
                if acc.nc and (a.writer[bi] >= 0).any():
                    r = int(np.argmax((a.writer[bi] >= 0).any(1)))
                    raise _Fault(MemcheckError, f"ld.global.nc of memory written during this launch (.nc needs "
                                                f"read-only data): {self.describe(a.base + int(bi[r, 0]))}",
                                 int(acc.tids[rows[r]]))
                self._race(a, rows, bi, acc, verb)
                if acc.nc:
                    a.ncread[bi] = True
            out[rows] = a.buf[bi]
        return out

    def store(self, addrs, data: np.ndarray, align: int, acc: _Access):
        for a, rows, bi in self._locate(addrs, data.shape[1], align, acc, "store"):
            if not a.writable:
                raise _Fault(MemcheckError, f"store to a read-only array: {self.describe(a.base + int(bi[0, 0]))}",
                             int(acc.tids[rows[0]]))
            if self.track:
                if a.ncread[bi].any():
                    r = int(np.argmax(a.ncread[bi].any(1)))
                    raise _Fault(MemcheckError, f"store to memory read with ld.global.nc in this launch: "
                                                f"{self.describe(a.base + int(bi[r, 0]))}", int(acc.tids[rows[r]]))
                flat = bi.ravel()
                if np.unique(flat).size != flat.size:
                    dup = np.sort(flat)[np.flatnonzero(np.diff(np.sort(flat)) == 0)[0]]
                    r = int(np.argmax((bi == dup).any(1)))
                    raise _Fault(RaceError, f"two threads store to the same byte in one instruction: "
                                            f"{self.describe(a.base + int(dup))}", int(acc.tids[rows[r]]))
                self._race(a, rows, bi, acc, "store")
                a.writer[bi] = acc.uids[rows][:, None]
                a.wepoch[bi] = acc.epoch
            a.buf[bi] = data[rows]


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
