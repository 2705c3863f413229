"""
Pipeline-parallel schedules for training GPT-2 on S ranks.

The model is cut into S stages, one per rank, and each batch into m micro-batches.
A schedule fixes, for every rank, the exact order of its forwards, its backwards,
and the sends/receives that carry activations down the pipeline and gradients back
up. The C executor runs these op lists verbatim, so this file is about making them
right (validate), fast (simulate) and visible (render):

    python pipeline.py show --schedule zb-h1 --stages 4 --micro 8
"""

import argparse
from dataclasses import dataclass
from typing import NamedTuple

# -----------------------------------------------------------------------------
# ops: the instruction set shared with the C executor (the codes are fixed)

FWD, BWD_INPUT, BWD_WEIGHT, SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = range(7)
NAMES = ("FWD", "BWD_INPUT", "BWD_WEIGHT", "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD")
LABELS = ("F", "B", "W", ">a", "<a", ">g", "<g")
COMPUTE = (FWD, BWD_INPUT, BWD_WEIGHT)


class Op(NamedTuple):
    kind: int
    mb: int

    def __str__(self) -> str:
        return f"{NAMES[self.kind]} mb {self.mb}"


def label(op: Op) -> str:
    """Short name for grids: F3 B3 W3 for compute, >a3 <a3 >g3 <g3 for messages."""
    return f"{LABELS[op.kind]}{op.mb}"


class ScheduleError(ValueError):
    pass

# -----------------------------------------------------------------------------
# schedules: one op list per rank
# A schedule is written as each rank's compute order, in steps: ops a rank runs
# back to back without talking to anyone. The messages are then placed for it.

Step = tuple[Op, ...]


def _gpipe(S: int, m: int, r: int) -> list[Step]:
    # all forwards, then all backwards: simple, but every rank holds all m micro-batches
    return [(Op(FWD, mb),) for mb in range(m)] + \
           [(Op(BWD_INPUT, mb), Op(BWD_WEIGHT, mb)) for mb in range(m)]


def _one_f_one_b(S: int, m: int, r: int) -> list[Step]:
    # Rank r runs just enough forwards to keep the ranks below it busy until the
    # first gradient comes back (S-r-1 of them), then alternates one forward with
    # one backward, so it never holds more than S-r micro-batches. The backward is
    # one step: the gradient for rank r-1 leaves only after the weight gradient.
    warmup = min(S - r - 1, m)
    steps = [(Op(FWD, mb),) for mb in range(warmup)]
    for i in range(m - warmup):
        steps += [(Op(FWD, warmup + i),), (Op(BWD_INPUT, i), Op(BWD_WEIGHT, i))]
    steps += [(Op(BWD_INPUT, mb), Op(BWD_WEIGHT, mb)) for mb in range(m - warmup, m)]
    return steps


def _zb_h1(S: int, m: int, r: int) -> list[Step]:
    # 1F1B's order of F and B, but B is only the input gradient: it goes upstream
    # at once and the weight gradient W waits. Only B sits on the path between
    # ranks, so gradients race back up the pipeline, and the deferred Ws fill the
    # idle time that 1F1B has at the end. A micro-batch is held until its W, so
    # deferring W costs memory: capping every rank at S held micro-batches
    # (1F1B's peak, reached on rank 0) keeps the peak of the schedule at 1F1B's.
    warmup = min(S - r - 1, m)
    steps = []
    nf = nb = nw = 0  # forwards, input backwards, weight backwards so far
    for _ in range(warmup):
        steps.append((Op(FWD, nf),))
        nf += 1
    while nf < m:
        if nf - nw == S:  # at the cap: free a micro-batch before taking another
            steps.append((Op(BWD_WEIGHT, nw),))
            nw += 1
        steps += [(Op(FWD, nf),), (Op(BWD_INPUT, nb),)]
        nf += 1
        nb += 1
    while nb < m:
        if nw < nb:  # a W fills the wait for the next gradient
            steps.append((Op(BWD_WEIGHT, nw),))
            nw += 1
        steps.append((Op(BWD_INPUT, nb),))
        nb += 1
    steps += [(Op(BWD_WEIGHT, mb),) for mb in range(nw, m)]
    return steps


def _place_messages(steps: list[list[Step]]) -> list[list[Op]]:
    # A rendezvous send blocks until the receiver posts, so a message posted too
    # early stalls its sender and one posted too late stalls its receiver; it is
    # free only if both sides post it at the same moment. So play the compute
    # order on an ideal clock (every op one unit, data moves instantly) and put
    # each message at the moment its consumer starts, on both ranks. Messages a
    # rank meets at the same moment end up adjacent, i.e. one group. When every
    # rank reaches every group no later than the ideal clock says, the real run
    # keeps to that clock: no deadlock, and no bubble beyond the schedule's own
    # (validate checks the first and simulate measures the second for any list).
    S = len(steps)

    def source(r: int, op: Op) -> tuple[int, Op] | None:  # what op needs from a neighbour
        if op.kind == FWD and r > 0:
            return r - 1, Op(FWD, op.mb)
        if op.kind == BWD_INPUT and r < S - 1:
            return r + 1, Op(BWD_INPUT, op.mb)
        return None

    start, done = {}, {}  # (rank, step index) -> start; (rank, op) -> end of its step
    at, free = [0] * S, [0] * S
    moved = True
    while moved:
        moved = False
        for r in range(S):
            while at[r] < len(steps[r]):
                src = source(r, steps[r][at[r]][0])
                if src is not None and src not in done:
                    break
                start[r, at[r]] = max(free[r], done[src] if src else 0)
                free[r] = start[r, at[r]] + len(steps[r][at[r]])
                done.update({(r, op): free[r] for op in steps[r][at[r]]})
                at[r] += 1
                moved = True
    assert all(at[r] == len(steps[r]) for r in range(S)), "compute order waits on itself"

    # messages sort before the step that starts at the same moment, and by (kind, mb)
    # among themselves, which puts each link's messages in the same order on both ends
    timed = [[] for _ in range(S)]
    for r in range(S):
        for k, step in enumerate(steps[r]):
            t = start[r, k]
            timed[r].append((t, 1, step))
            src = source(r, step[0])
            if src is not None:
                send, recv = (SEND_ACT, RECV_ACT) if step[0].kind == FWD else (SEND_GRAD, RECV_GRAD)
                timed[r].append((t, 0, (Op(recv, step[0].mb),)))
                timed[src[0]].append((t, 0, (Op(send, step[0].mb),)))
    return [[op for _, _, ops in sorted(events) for op in ops] for events in timed]


SCHEDULES = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "zb-h1": _zb_h1}


def schedule(name: str, stages: int, micro: int) -> list[list[Op]]:
    """The op lists of a training step: one list per rank."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}, pick one of {', '.join(SCHEDULES)}")
    if stages < 1 or micro < 1:
        raise ValueError(f"need at least 1 stage and 1 micro-batch, got {stages} and {micro}")
    return _place_messages([SCHEDULES[name](stages, micro, r) for r in range(stages)])


def forward_only(stages: int, micro: int) -> list[list[Op]]:
    """The op lists of an evaluation pass: forwards and activation sends only."""
    return _place_messages([[(Op(FWD, mb),) for mb in range(micro)] for _ in range(stages)])

# -----------------------------------------------------------------------------
# validator: prove an op list is complete, ordered and deadlock-free


@dataclass
class ValidationResult:
    peak_held: list[int]  # per rank: activation slots the executor must allocate
    timeline: "Timeline"  # the schedule played with unit costs: the order ops run in


def _program_grid(ranks: list[list[Op]], marks: set[tuple[int, int]]) -> str:
    """Ranks as rows, op slots (program order) as columns, marked ops in brackets."""
    def cell(r: int, i: int, op: Op) -> str:
        text = label(op) if 0 <= op.kind < len(LABELS) else f"?{op.kind}"
        return f"[{text}]" if (r, i) in marks else f" {text} "
    cells = [[cell(r, i, op) for i, op in enumerate(ops)] for r, ops in enumerate(ranks)]
    width = max((len(c) for row in cells for c in row), default=1)
    digits = len(str(len(ranks) - 1))
    slots = range(max(map(len, ranks), default=0))
    lines = ["slot".ljust(5 + digits) + " |" + "".join(str(i).center(width) for i in slots)]
    for r, row in enumerate(cells):
        lines.append(f"rank {r:<{digits}} |" + "".join(c.center(width) for c in row))
    return "\n".join(lines)


def _error(ranks: list[list[Op]], message: str, marks=()) -> ScheduleError:
    return ScheduleError(message + "\n" + _program_grid(ranks, set(marks)))


def _pair_link(ranks: list[list[Op]], pairs: dict, src: int, dst: int, send: int, recv: int):
    # a link delivers in order, so the k-th send on it meets the k-th receive
    sends = [i for i, op in enumerate(ranks[src]) if op.kind == send]
    recvs = [j for j, op in enumerate(ranks[dst]) if op.kind == recv]
    sent = [ranks[src][i].mb for i in sends]
    received = [ranks[dst][j].mb for j in recvs]
    for k in range(max(len(sends), len(recvs))):
        s = sent[k] if k < len(sends) else None
        v = received[k] if k < len(recvs) else None
        if s is not None and s == v:
            pairs[src, sends[k]] = (dst, recvs[k])
            pairs[dst, recvs[k]] = (src, sends[k])
        elif s is not None and s not in received[k:]:
            raise _error(ranks, f"rank {src}: {Op(send, s)} has no matching {NAMES[recv]} "
                                f"on rank {dst}", [(src, sends[k])])
        elif v is not None and v not in sent[k:]:
            raise _error(ranks, f"rank {dst}: {Op(recv, v)} has no matching {NAMES[send]} "
                                f"on rank {src}", [(dst, recvs[k])])
        else:
            raise _error(ranks, f"rank {src} -> rank {dst}: message {k} is {Op(send, s)} but "
                                f"rank {dst} receives {Op(recv, v)} there; a link delivers in "
                                f"order, so both ends must list its messages in the same order",
                         [(src, sends[k]), (dst, recvs[k])])


def _pair_messages(ranks: list[list[Op]]) -> dict[tuple[int, int], tuple[int, int]]:
    """Map (rank, slot) of every send and receive to (rank, slot) of its partner."""
    S = len(ranks)
    for r, ops in enumerate(ranks):
        for i, op in enumerate(ops):
            if (op.kind in (RECV_ACT, SEND_GRAD) and r == 0) or \
               (op.kind in (SEND_ACT, RECV_GRAD) and r == S - 1):
                peer = r - 1 if op.kind in (RECV_ACT, SEND_GRAD) else r + 1
                raise _error(ranks, f"rank {r}: {op} talks to rank {peer}, which does not exist",
                             [(r, i)])
    pairs = {}
    for r in range(S - 1):
        _pair_link(ranks, pairs, r, r + 1, SEND_ACT, RECV_ACT)
        _pair_link(ranks, pairs, r + 1, r, SEND_GRAD, RECV_GRAD)
    return pairs


def _segments(ops: list[Op]) -> list[range]:
    """Split a rank's list into compute ops (one each) and groups (maximal runs of comm ops)."""
    segments, i = [], 0
    while i < len(ops):
        j = i + 1
        if ops[i].kind not in COMPUTE:
            while j < len(ops) and ops[j].kind not in COMPUTE:
                j += 1
        segments.append(range(i, j))
        i = j
    return segments


def _prerequisites(kind: int, r: int, S: int) -> tuple[int, ...]:
    """What must come earlier on the same rank for the same micro-batch."""
    if kind == FWD:
        return (RECV_ACT,) if r > 0 else ()
    if kind == BWD_INPUT:
        return (FWD, RECV_GRAD) if r < S - 1 else (FWD,)
    return {SEND_ACT: (FWD,), BWD_WEIGHT: (BWD_INPUT,), SEND_GRAD: (BWD_INPUT,)}.get(kind, ())


def _peak_held(ops: list[Op], training: bool) -> int:
    # A micro-batch is held from its first op until its W frees the activations
    # (forward-only: until its last op). Ops of one group are in flight together,
    # so lifetimes are measured in segments, not slots: on a forward-only middle
    # rank [SEND_ACT i, RECV_ACT i+1] needs two buffers at once.
    segments = _segments(ops)
    first, last = {}, {}
    for k, segment in enumerate(segments):
        for i in segment:
            first.setdefault(ops[i].mb, k)
            if not training or ops[i].kind == BWD_WEIGHT:
                last[ops[i].mb] = k
    return max((sum(first[mb] <= k <= last[mb] for mb in first) for k in range(len(segments))),
               default=0)


def validate(ranks: list[list[Op]], micro: int, training: bool = True) -> ValidationResult:
    """Check a schedule completely; raise ScheduleError naming the first problem."""
    S = len(ranks)
    allowed = tuple(range(len(NAMES))) if training else (FWD, SEND_ACT, RECV_ACT)
    for r, ops in enumerate(ranks):
        for i, op in enumerate(ops):
            if not 0 <= op.kind < len(NAMES):
                raise _error(ranks, f"rank {r}: slot {i} has unknown op kind {op.kind}", [(r, i)])
            if op.kind not in allowed:
                raise _error(ranks, f"rank {r}: {op} in a forward-only schedule", [(r, i)])
            if not 0 <= op.mb < micro:
                raise _error(ranks, f"rank {r}: {op} is out of range for {micro} micro-batches",
                             [(r, i)])
    pairs = _pair_messages(ranks)

    for r, ops in enumerate(ranks):
        slot = {}
        for i, op in enumerate(ops):
            if op in slot:
                raise _error(ranks, f"rank {r}: {op} appears twice", [(r, slot[op]), (r, i)])
            slot[op] = i
        needed = [k for k in allowed if (r > 0 or k not in (RECV_ACT, SEND_GRAD))
                  and (r < S - 1 or k not in (SEND_ACT, RECV_GRAD))]
        for mb in range(micro):
            for kind in needed:
                if Op(kind, mb) not in slot:
                    raise _error(ranks, f"rank {r}: {Op(kind, mb)} is missing")
        for i, op in enumerate(ops):
            for before in _prerequisites(op.kind, r, S):
                if slot[Op(before, op.mb)] > i:
                    raise _error(ranks, f"rank {r}: {op} before {Op(before, op.mb)}", [(r, i)])
        # gradients are summed over micro-batches; a fixed order keeps the sum bitwise reproducible
        for kind in (BWD_INPUT, BWD_WEIGHT):
            previous = None
            for i, op in enumerate(ops):
                if op.kind != kind:
                    continue
                if previous is not None and op.mb < previous.mb:
                    raise _error(ranks, f"rank {r}: {op} after {previous}: backwards must run in "
                                        f"micro-batch order", [(r, i)])
                previous = op

    slots, stuck = _run(ranks, pairs, Costs())
    if stuck:
        raise _deadlock(ranks, pairs, stuck)
    return ValidationResult([_peak_held(ops, training) for ops in ranks], _timeline(slots))

# -----------------------------------------------------------------------------
# simulator: play the op lists against a cost model


@dataclass(frozen=True)
class Costs:
    f: float | list[float] = 1.0  # FWD, per rank or the same everywhere
    b: float | list[float] = 1.0  # BWD_INPUT
    w: float | list[float] = 1.0  # BWD_WEIGHT
    comm: float = 0.0  # one transfer between neighbours

    def compute(self, op: Op, r: int) -> float:
        cost = (self.f, self.b, self.w)[op.kind]
        return cost[r] if isinstance(cost, list) else cost


class Slot(NamedTuple):
    op: Op
    start: float
    end: float


@dataclass
class Timeline:
    rows: list[list[Slot]]  # per rank, every op (messages included) in program order
    step_time: float

    @property
    def busy(self) -> float:
        return sum(s.end - s.start for row in self.rows for s in row if s.op.kind in COMPUTE)

    @property
    def idle(self) -> float:
        return len(self.rows) * self.step_time - self.busy

    @property
    def bubble_fraction(self) -> float:
        return self.idle / (len(self.rows) * self.step_time) if self.step_time else 0.0


def _run(ranks: list[list[Op]], pairs: dict, costs: "Costs"):
    # Event-free dataflow: sweep the ranks, letting each advance as far as it can.
    # A compute op runs as soon as its rank is free. A group is posted when its
    # rank reaches it; each message in it completes once the partner's group is
    # posted too (rendezvous), and the rank moves on when all of them have.
    # Times depend only on post times, never on sweep order, so this is exact.
    S = len(ranks)
    segments = [_segments(ops) for ops in ranks]
    segment_of = [{i: k for k, seg in enumerate(segs) for i in seg} for segs in segments]
    posted = {}  # (rank, segment) -> when that rank reached that group
    at, clock = [0] * S, [0.0] * S
    slots = [[None] * len(ops) for ops in ranks]
    moved = True
    while moved:
        moved = False
        for r in range(S):
            while at[r] < len(segments[r]):
                seg = segments[r][at[r]]
                first = ranks[r][seg[0]]
                if first.kind in COMPUTE:
                    slots[r][seg[0]] = Slot(first, clock[r], clock[r] + costs.compute(first, r))
                else:
                    t = posted.setdefault((r, at[r]), clock[r])
                    partners = (pairs[r, i] for i in seg)
                    peers = [posted.get((q, segment_of[q][j])) for q, j in partners]
                    if None in peers:
                        break
                    for i, tp in zip(seg, peers):
                        slots[r][i] = Slot(ranks[r][i], t, max(t, tp) + costs.comm)
                clock[r] = max(slots[r][i].end for i in seg)
                at[r] += 1
                moved = True
    stuck = {r: segments[r][at[r]] for r in range(S) if at[r] < len(segments[r])}
    return slots, stuck


def _deadlock(ranks: list[list[Op]], pairs: dict, stuck: dict[int, range]) -> ScheduleError:
    waits, marks = [], []
    for r, seg in stuck.items():
        for i in seg:
            q, j = pairs[r, i]
            if q in stuck and j >= stuck[q].stop:  # the partner has not reached that group yet
                waits.append(f"rank {r} waits at slot {i} ({ranks[r][i]}) for rank {q} "
                             f"to reach slot {j} ({ranks[q][j]})")
                marks.append((r, i))
    return _error(ranks, "deadlock: no rank can move. " + "; ".join(waits) + ". A rank's sends and "
                         "receives of the same moment must be adjacent so they post as one group.",
                  marks)


def _timeline(slots: list[list[Slot]]) -> Timeline:
    return Timeline(slots, max((row[-1].end for row in slots if row), default=0.0))


def simulate(ranks: list[list[Op]], costs: Costs = Costs()) -> Timeline:
    """When every op starts and ends under a cost model (assumes a valid schedule)."""
    pairs = _pair_messages(ranks)
    slots, stuck = _run(ranks, pairs, costs)
    if stuck:
        raise _deadlock(ranks, pairs, stuck)
    return _timeline(slots)

# -----------------------------------------------------------------------------
# rendering: the picture from the papers, in a terminal


def render(timeline_or_ranks: "Timeline | list[list[Op]]", width: int = 120) -> str:
    """Ranks as rows, time as columns; each op spans its duration, idle time is '.'."""
    t = timeline_or_ranks
    if not isinstance(t, Timeline):
        t = simulate(t)
    rows = [[s for s in row if s.op.kind in COMPUTE] for row in t.rows]
    S = len(rows)
    # a unit of time is as wide as the longest label plus a gap, narrowed to fit width
    cell = 1 + max((len(label(s.op)) for row in rows for s in row), default=1)
    scale = max(1, min(cell, int(width / t.step_time))) if t.step_time else 1
    lines = []
    for r, row in enumerate(rows):
        line = ["."] * round(t.step_time * scale)
        for s in row:
            a, b = round(s.start * scale), round(s.end * scale)
            line[a:b] = label(s.op).ljust(b - a)[: b - a]
        lines.append(f"rank {r:<{len(str(S - 1))}} |{''.join(line)}|")
    lines.append(f"step time {t.step_time:g}, bubble {t.bubble_fraction:.1%} "
                 f"(idle {t.idle:g} of {S * t.step_time:g} rank-time units)")
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# command line


def show(args: argparse.Namespace) -> None:
    ranks = schedule(args.schedule, args.stages, args.micro)
    result = validate(ranks, args.micro)
    costs = Costs(args.f, args.b, args.w, args.comm)
    print(f"{args.schedule}: {args.stages} stages, {args.micro} micro-batches, "
          f"f={args.f:g} b={args.b:g} w={args.w:g} comm={args.comm:g}")
    print(render(simulate(ranks, costs), width=args.width))
    print(f"peak held micro-batches per rank: {result.peak_held}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pipeline-parallel GPT-2 training")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("show", help="draw a schedule and its bubble")
    p.add_argument("--schedule", choices=list(SCHEDULES), default="1f1b")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--f", type=float, default=1.0, help="time of a forward")
    p.add_argument("--b", type=float, default=1.0, help="time of an input-gradient backward")
    p.add_argument("--w", type=float, default=1.0, help="time of a weight-gradient backward")
    p.add_argument("--comm", type=float, default=0.0, help="time of one transfer")
    p.add_argument("--width", type=int, default=120, help="target width of the drawing")
    p.set_defaults(run=show)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
