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
launch parameter: the size of the kernel's .extern .shared array.

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
sequentially consistent. The racecheck tracks the last writer of each byte
but not its readers, so a write after another thread's read with no barrier
between them (write-after-read) is not caught; atomics do not count as
writers. A bar.warp.sync with a partial membermask orders nothing for the
racecheck (it can only report too much). NaN payloads are kept where a GPU
would return its canonical NaN. Textures, generic addressing, local memory,
.func calls, clusters, bulk and tensor copies (TMA), wgmma and mbarriers are
not supported: the parser rejects them.
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
    dynamic_shared: str | None = None          # the .extern .shared array, sized at launch (shared_bytes)

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
    """[%reg], [%reg+imm], [%reg-imm], [%reg+-imm] (nvcc writes that), [symbol], [symbol+imm], [imm]."""
    m = re.fullmatch(r"\[\s*([^\]]+?)\s*(?:([+-])\s*([+-]?\w+))?\s*\]", text)
    if not m:
        raise _syntax(k, ins, f"bad address {text!r}")
    base, sign, off = m.groups()
    offset = 0 if off is None else int(_imm(k, ins, off, "s64")) * (-1 if sign == "-" else 1)
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
        self.cur = 0

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

    # -- the loop

    def run(self, max_steps: int) -> int:
        code, pcs, steps = self.k.code, self.pcs, 0
        while True:
            cur = int(pcs.min())
            if cur == EXITED:
                return steps
            if cur >= len(code):
                t = int(np.argmin(pcs))
                raise RunawayError(f"{self.k.file}: in {self.k.name}: block {self.ctaids[self.blk[t]]} thread "
                                   f"{self.tid3(int(self.tid[t]))} ran past the last instruction (no ret)")
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
        self.writer = self.wepoch = self.wwepoch = self.ncread = None

    def begin(self, track: bool):
        n = self.buf.size
        self.writer = np.full(n, -1, np.int64) if track else None  # launch-wide thread id, -1: none
        self.wepoch = np.zeros(n, np.int64) if track else None     # the writer's block barrier epoch
        self.wwepoch = np.zeros(n, np.int64) if track else None    # the writer's warp's bar.warp.sync epoch
        self.ncread = np.zeros(n, bool) if track else None


class Memory:
    """One address space (global, or the shared windows of a wave's blocks): allocations at fixed addresses,
    checked access."""

    def __init__(self, space: str, track: bool = True, uninit_check: bool = False):
        self.space, self.track, self.uninit_check = space, track, uninit_check
        self.allocs: list[_Allocation] = []

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

    def load(self, addrs, nbytes: int, align: int, acc: _Access) -> np.ndarray:
        out = np.empty((len(addrs), nbytes), np.uint8)
        verb = "ld.global.nc" if acc.nc else "load"
        for a, rows, bi in self._locate(addrs, nbytes, align, acc, verb):
            self._in_flight(a, rows, bi, acc, verb)
            if self.track:
                if self.uninit_check and (a.writer[bi] < 0).any():
                    r = int(np.argmax((a.writer[bi] < 0).any(1)))
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
            out[rows] = a.buf[bi]
        return out

    def store(self, addrs, data: np.ndarray, align: int, acc: _Access, landing: bool = False):
        """landing: a cp.async's bytes arrive (they were reserved, in flight, since it issued)."""
        for a, rows, bi in self._locate(addrs, data.shape[1], align, acc, "store"):
            if not a.writable:
                raise _Fault(MemcheckError, f"store to a read-only array: {self._where(a, bi[0, 0])}",
                             int(acc.gids[rows[0]]))
            if landing:
                a.inflight[bi] -= 1
            self._in_flight(a, rows, bi, acc, "store")
            if self.track:
                if a.ncread[bi].any():
                    r = int(np.argmax(a.ncread[bi].any(1)))
                    raise _Fault(MemcheckError, f"store to memory read with ld.global.nc in this launch: "
                                                f"{self._where(a, bi[r, 0])}", int(acc.gids[rows[r]]))
                self._same_instruction(a, rows, bi, acc)
                self._race(a, rows, bi, acc, "store")
                a.writer[bi] = acc.uids[rows][:, None]
                a.wepoch[bi] = acc.epoch[rows][:, None]
                a.wwepoch[bi] = acc.wepoch[rows][:, None]
            a.buf[bi] = data[rows]

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
            if self.track:
                self._race(a, rows, bi, acc, "atom")
            for r, b in zip(rows, bi):
                cur = a.buf[b].view(TYPES[t])[0]
                old[r] = cur
                a.buf[b] = np.asarray(fn(cur, vals[r])).astype(TYPES[t]).reshape(1).view(np.uint8)
        return old


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
