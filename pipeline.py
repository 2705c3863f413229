"""
Pipeline-parallel schedules for training GPT-2 on S ranks.

The model is cut into S stages, one per rank, and each batch into m micro-batches.
A schedule fixes, for every rank, the exact order of its forwards, its backwards,
and the sends/receives that carry activations down the pipeline and gradients back
up. With D data-parallel replicas the ranks form a grid (rank = replica * S +
stage), and the collectives between a stage's replicas are ops in the same lists.
The C executor runs these op lists verbatim, so this file is about making them
right (validate, validate_grid), fast (simulate) and visible (render):

    python3 pipeline.py show --schedule zb-h1 --stages 4 --micro 8
"""

import argparse
import ctypes
import hashlib
import hmac
import itertools
import json
import os
import queue
import secrets
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

if __name__ == "__main__":  # before the requirements, which make may have put in .venv
    from dev.project_venv import reexec_in_project_venv
    reexec_in_project_venv()

import numpy as np

# -----------------------------------------------------------------------------
# ops: the instruction set shared with the C executor (the codes are fixed)

FWD, BWD_INPUT, BWD_WEIGHT, SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = range(7)
# data-parallel collectives over the replicas of one stage, and --zero 3's
# FREE of a gathered bucket; they have no micro-batch (mb -1) and name a
# bucket in part: the stage's layer l, or l = its layer count for its whole
# tensors
ALLREDUCE, REDUCE_SCATTER, ALLGATHER, FREE = range(7, 11)
NAMES = ("FWD", "BWD_INPUT", "BWD_WEIGHT", "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD",
         "ALLREDUCE", "REDUCE_SCATTER", "ALLGATHER", "FREE")
LABELS = ("F", "B", "W", ">a", "<a", ">g", "<g", "AR", "RS", "AG", "FR")
COMPUTE = (FWD, BWD_INPUT, BWD_WEIGHT)
MESSAGES = (SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD)
COLLECTIVES = (ALLREDUCE, REDUCE_SCATTER, ALLGATHER)
BUCKET_OPS = COLLECTIVES + (FREE,)


class Op(NamedTuple):
    kind: int
    mb: int  # the micro-batch; -1 for a collective or FREE
    # compute: -1 the whole stage, or its layer `part` alone (--zero 3);
    # a collective or FREE: the bucket; a message: -1
    part: int = -1

    def __str__(self) -> str:
        if self.kind in BUCKET_OPS:
            return f"{NAMES[self.kind]} bucket {self.part}"
        return f"{NAMES[self.kind]} mb {self.mb}" + (f" layer {self.part}" if self.part >= 0 else "")


def label(op: Op) -> str:
    """Short name for grids: F3 B3 W3 for compute (F3.1 for layer 1 alone),
    >a3 <a3 >g3 <g3 for messages, AG2 RS2 FR2 for a bucket's ops."""
    if op.kind in BUCKET_OPS:
        return f"{LABELS[op.kind]}{op.part}"
    return f"{LABELS[op.kind]}{op.mb}" + (f".{op.part}" if op.part >= 0 else "")


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
    # one backward, so its compute holds at most S-r micro-batches at once. The
    # validator reports S-r+1 on ranks r > 0, and that is what the executor
    # allocates: the send of one micro-batch's gradient and the receive of the next
    # one's activation are one group (both in flight together, so neither blocks the
    # other), and for that moment both buffers are live. Rank 0 receives nothing,
    # so its peak is S. The backward is one step: the gradient for rank r-1 leaves
    # only after the weight gradient.
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
    # (1F1B's peak, on its rank 0) keeps the peak of the schedule at 1F1B's. The
    # cap is reached on every rank, not only rank 0: each rank defers Ws until it
    # holds S micro-batches, where 1F1B's rank r > 0 holds S-r+1.
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
    peak_held: list[int]  # per rank: activation buffers the executor must allocate
    timeline: "Timeline"  # the schedule played with unit costs: the order ops run in
    # per rank, --zero 3: layer buckets whose whole parameters (gathered) and
    # whole gradients are held at once, the buffers the executor allocates
    peak_gathered: list[int] = field(default_factory=list)
    peak_grads: list[int] = field(default_factory=list)
    # (rank, position) of each message -> its partner's; of each collective -> its group's others' (a list)
    pairs: dict = field(default_factory=dict)


def _program_grid(ranks: list[list[Op]], marks: set[tuple[int, int]]) -> str:
    """Ranks as rows, op positions (program order) as columns, marked ops in brackets."""
    def cell(r: int, i: int, op: Op) -> str:
        text = label(op) if 0 <= op.kind < len(LABELS) else f"?{op.kind}"
        return f"[{text}]" if (r, i) in marks else f" {text} "
    cells = [[cell(r, i, op) for i, op in enumerate(ops)] for r, ops in enumerate(ranks)]
    width = max((len(c) for row in cells for c in row), default=1)
    digits = len(str(len(ranks) - 1))
    positions = range(max(map(len, ranks), default=0))
    lines = ["pos".ljust(5 + digits) + " |" + "".join(str(i).center(width) for i in positions)]
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


def pair_messages(ranks: list[list[Op]]) -> dict[tuple[int, int], tuple[int, int]]:
    """Map (rank, position) of every send and receive to (rank, position) of its partner."""
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
    """Split a rank's list into compute ops and collectives (one each) and
    groups (maximal runs of sends and receives)."""
    segments, i = [], 0
    while i < len(ops):
        j = i + 1
        if ops[i].kind in MESSAGES:
            while j < len(ops) and ops[j].kind in MESSAGES:
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


def _peak_held(ops: list[Op]) -> int:
    # A micro-batch is held from its first op on this rank until its last (its
    # W, or the SEND_GRAD after it), which is when the executor frees its
    # activation buffer. Ops of one group are in flight together, so lifetimes
    # are measured in segments, not positions: [SEND_GRAD i, RECV_ACT i+1]
    # needs two activation buffers at once.
    segments = _segments(ops)
    first, last = {}, {}
    for k, segment in enumerate(segments):
        for i in segment:
            if ops[i].kind in BUCKET_OPS:
                continue
            first.setdefault(ops[i].mb, k)
            last[ops[i].mb] = k
    held = [0] * (len(segments) + 1)  # +1 where a lifetime starts, -1 after it ends
    for mb in first:
        held[first[mb]] += 1
        held[last[mb] + 1] -= 1
    return max(itertools.accumulate(held[:-1]), default=0)


def validate(ranks: list[list[Op]], micro: int, training: bool = True) -> ValidationResult:
    """Check a schedule completely; raise ScheduleError naming the first problem."""
    S = len(ranks)
    allowed = COMPUTE + MESSAGES if training else (FWD, SEND_ACT, RECV_ACT)
    for r, ops in enumerate(ranks):
        for i, op in enumerate(ops):
            if not 0 <= op.kind < len(NAMES):
                raise _error(ranks, f"rank {r}: position {i} has unknown op kind {op.kind}", [(r, i)])
            if op.kind not in allowed:
                raise _error(ranks, f"rank {r}: {op} in a forward-only schedule", [(r, i)])
            if not 0 <= op.mb < micro:
                raise _error(ranks, f"rank {r}: {op} is out of range for {micro} micro-batches",
                             [(r, i)])
    pairs = pair_messages(ranks)

    for r, ops in enumerate(ranks):
        position = {}
        for i, op in enumerate(ops):
            if op in position:
                raise _error(ranks, f"rank {r}: {op} appears twice", [(r, position[op]), (r, i)])
            position[op] = i
        needed = [k for k in allowed if (r > 0 or k not in (RECV_ACT, SEND_GRAD))
                  and (r < S - 1 or k not in (SEND_ACT, RECV_GRAD))]
        for mb in range(micro):
            for kind in needed:
                if Op(kind, mb) not in position:
                    raise _error(ranks, f"rank {r}: {Op(kind, mb)} is missing")
        for i, op in enumerate(ops):
            for before in _prerequisites(op.kind, r, S):
                if position[Op(before, op.mb)] > i:
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

    spans, stuck = _run(ranks, pairs, Costs())
    if stuck:
        raise _deadlock(ranks, pairs, stuck)
    return ValidationResult([_peak_held(ops) for ops in ranks], _timeline(spans), pairs=pairs)

# -----------------------------------------------------------------------------
# the grid: D data-parallel replicas of an S-stage pipeline
#
# Rank r is stage r % S of replica r // S (r = replica * S + stage). A
# replica's stages are adjacent ranks, so the pipeline's links, which carry
# traffic at every micro-batch, join neighbouring ranks: on nodes of k GPUs
# with k a multiple of S, a pipeline stays inside a node and only the
# data-parallel ring (once per step) crosses between nodes. A 1-replica grid
# numbers its ranks exactly as a plain pipeline does.


def grid_rank(stage: int, replica: int, stages: int) -> int:
    return replica * stages + stage


def data_parallel_ops(buckets: int, zero: int) -> tuple[list[Op], list[Op]]:
    """A stage's collectives under --zero 0 and 1: those that follow its
    backward (gradients) and those that follow the optimizer step
    (parameters). Bucket b < buckets - 1 is the stage's layer b, the last
    bucket its whole tensors, which holds wte: its gradient is complete only
    once the tied swap is done, so it goes last."""
    if zero == 0:
        return [Op(ALLREDUCE, -1, b) for b in range(buckets)], []
    return [Op(REDUCE_SCATTER, -1, b) for b in range(buckets)], [Op(ALLGATHER, -1, b) for b in range(buckets)]


def fsdp_ops(ops: list[Op], layers: int) -> list[Op]:
    """--zero 3 (FSDP): a stage's op list with every whole-stage compute op
    run a layer at a time (FWD up from layer 0, BWD_INPUT and BWD_WEIGHT down
    from the last; the embedding goes with layer 0, the head and the loss with
    the last), and each layer's parameters gathered for just that op: a FREE
    after each FWD and BWD_INPUT of the layer, its ALLGATHER one layer early
    (before the compute of the layer before it), so the executor's comm
    thread gathers layer l+1 while layer l computes, and two layers are
    gathered at once. A layer is gathered twice per micro-batch. BWD_WEIGHT
    needs no parameters (only activations and gradients). A layer's gradient
    is reduce-scattered after its last BWD_WEIGHT of the step. The whole-tensor bucket (wte, wpe,
    lnf) is gathered once at the start and held to the end: the embedding
    needs wte at the start of every micro-batch's forward and the head at its
    end and at the start of its backward, so freeing it in between would
    gather it 2m times instead of once; its reduce-scatter goes last, after
    the tied swap has completed d(wte)."""
    whole = layers
    weights = sum(op.kind == BWD_WEIGHT for op in ops)
    out, seen = [Op(ALLGATHER, -1, whole)], 0
    for op in ops:
        if op.kind in (FWD, BWD_INPUT) and op.part == -1:
            order = list(range(layers) if op.kind == FWD else range(layers - 1, -1, -1))
            out.append(Op(ALLGATHER, -1, order[0]))
            for k, layer in enumerate(order):
                out += [Op(ALLGATHER, -1, order[k + 1])] if k + 1 < layers else []  # the prefetch
                out += [Op(op.kind, op.mb, layer), Op(FREE, -1, layer)]
        elif op.kind == BWD_WEIGHT and op.part == -1:
            seen += 1
            for layer in range(layers - 1, -1, -1):
                out.append(Op(BWD_WEIGHT, op.mb, layer))
                if seen == weights:  # backwards run in micro-batch order: this is the layer's last
                    out.append(Op(REDUCE_SCATTER, -1, layer))
        else:
            out.append(op)
    return out + ([Op(REDUCE_SCATTER, -1, whole)] if weights else []) + [Op(FREE, -1, whole)]


def grid_schedule(name: str, stages: int, replicas: int, micro: int, buckets: list[int],
                  zero: int) -> tuple[list[list[Op]], list[list[Op]]]:
    """The op lists of every rank of the grid (index: grid_rank) for a
    training step, and for after the optimizer step."""
    pipe = schedule(name, stages, micro)
    if zero == 3:
        return [fsdp_ops(pipe[s], buckets[s] - 1) for d in range(replicas) for s in range(stages)], \
               [[] for _ in range(stages * replicas)]
    dp = [data_parallel_ops(buckets[s], zero) if replicas > 1 else ([], []) for s in range(stages)]
    train = [pipe[s] + dp[s][0] for d in range(replicas) for s in range(stages)]
    after = [list(dp[s][1]) for d in range(replicas) for s in range(stages)]
    return train, after


def grid_forward_only(stages: int, replicas: int, micro: int, buckets: list[int], zero: int) -> list[list[Op]]:
    """The op lists of an evaluation pass over the grid (every replica the
    same batches); --zero 3 gathers its layers as in training."""
    pipe = forward_only(stages, micro)
    return [fsdp_ops(pipe[s], buckets[s] - 1) if zero == 3 else pipe[s] for d in range(replicas) for s in range(stages)]


def _whole_stage_view(ranks: list[list[Op]], r: int, layers: int) -> list[Op]:
    """Rank r's list without its bucket ops, each run of per-layer compute ops
    as the whole-stage op it stands for, for validate(): a micro-batch's
    per-layer FWD, BWD_INPUT or BWD_WEIGHT ops run all the stage's layers in
    order (FWD up, the backwards down), with only bucket ops between them."""
    ops = [op for op in ranks[r] if op.kind not in BUCKET_OPS]
    out, i = [], 0
    while i < len(ops):
        op = ops[i]
        if op.kind in COMPUTE and op.part >= 0:
            order = range(layers) if op.kind == FWD else range(layers - 1, -1, -1)
            if ops[i:i + layers] != [Op(op.kind, op.mb, layer) for layer in order]:
                raise _error(ranks, f"rank {r}: {op}: a micro-batch's per-layer {NAMES[op.kind]} ops must run all "
                                    f"{layers} layers {'up' if op.kind == FWD else 'down'} in a row, with only "
                                    f"gathers, frees and reduce-scatters between them",
                             [(r, ranks[r].index(op))])
            out.append(Op(op.kind, op.mb))
            i += layers
        else:
            if op.part != -1:
                raise _error(ranks, f"rank {r}: {op} has part {op.part}; a message's is -1", [(r, ranks[r].index(op))])
            out.append(op)
            i += 1
    return out


def _fsdp_buffers(ranks: list[list[Op]], r: int, layers: int, training: bool) -> tuple[int, int]:
    """--zero 3: rank r's gathers, frees and reduce-scatters played in order.
    Compute runs only on gathered layers (and the gathered whole tensors), a
    FREE only of a held bucket, a bucket is not gathered twice at once, a
    layer's BWD_WEIGHT comes before its REDUCE_SCATTER, every bucket is
    reduce-scattered once per step and nothing is held at the end. Returns
    the peaks of gathered layers and of layers' whole gradients held at once.
    A layer's reduce-scatter runs on the comm thread while the compute goes
    on, so its gradient buffer counts as held through the next compute op
    too: with one micro-batch, two, so that the weight backward of layer l-1
    overlaps the reduce-scatter of layer l instead of waiting for its buffer."""
    whole = layers
    held, grads, reduced, draining = set(), set(), set(), set()
    peak_gathered = peak_grads = 0
    for i, op in enumerate(ranks[r]):
        def fail(message: str) -> ScheduleError:
            return _error(ranks, f"rank {r}: {op}: {message}", [(r, i)])
        if op.kind == ALLGATHER:
            if op.part in held:
                raise fail("the bucket is already gathered")
            held.add(op.part)
        elif op.kind == FREE:
            if op.part not in held:
                raise fail("FREE of a bucket that is not held")
            held.remove(op.part)
        elif op.kind == ALLREDUCE:
            raise fail("--zero 3 reduce-scatters the gradients")
        elif op.kind == REDUCE_SCATTER:
            if op.part in reduced:
                raise fail("the bucket is reduce-scattered twice")
            if op.part != whole and op.part not in grads:
                raise fail("no BWD_WEIGHT of the layer came before it")
            reduced.add(op.part)
            grads.discard(op.part)
            if op.part != whole:
                draining.add(op.part)
        elif op.kind in COMPUTE:
            mine = range(layers) if op.part == -1 else [op.part]
            if op.kind == BWD_WEIGHT:
                if reduced.intersection(mine):
                    raise fail(f"after the REDUCE_SCATTER of bucket {min(reduced.intersection(mine))}")
                grads.update(mine)
            else:
                missing = [b for b in [*mine, whole] if b not in held]
                if missing:
                    raise fail(f"bucket {missing[0]} is not gathered (compute runs only on gathered layers)")
        peak_gathered = max(peak_gathered, len(held - {whole}))
        peak_grads = max(peak_grads, len(grads | draining))
        if op.kind in COMPUTE:
            draining.clear()
    if held:
        raise _error(ranks, f"rank {r}: bucket {min(held)} is still gathered at the end of the list (FREE it)")
    if training and len(reduced) != layers + 1:
        missing = min(set(range(layers + 1)) - reduced)
        raise _error(ranks, f"rank {r}: bucket {missing} is never reduce-scattered")
    return peak_gathered, peak_grads


def validate_grid(ranks: list[list[Op]], stages: int, micro: int, training: bool = True,
                  buckets: list[int] | None = None, zero: int = 0, costs: "Costs | None" = None) -> ValidationResult:
    """validate() for every replica's pipeline, and the collectives like the
    sends: every rank of a stage's ring lists the same collectives in the same
    order (a ring step needs all of them), buckets exist, and the whole grid
    runs without deadlock. Under --zero 3 (buckets needed) the per-layer ops
    and each rank's gathered buckets too (_fsdp_buffers). Peaks are per grid
    rank; the timeline is the grid's under costs (unit costs if None): the
    simulator for a grid, whose collectives only this pairs."""
    S = stages
    if S < 1 or len(ranks) % S:
        raise ScheduleError(f"{len(ranks)} op lists do not make replicas of {S} stages")
    if zero == 3 and buckets is None:
        raise ScheduleError("validating --zero 3 op lists needs the stages' bucket counts")
    D = len(ranks) // S
    allowed = COLLECTIVES if training and zero != 3 else (REDUCE_SCATTER, ALLGATHER) if training else (ALLGATHER,)
    pairs, peaks = {}, [0] * len(ranks)
    gathered, grads = [0] * len(ranks), [0] * len(ranks)
    for d in range(D):
        mine = [ranks[grid_rank(s, d, S)] for s in range(S)]
        if zero == 3:
            whole = [_whole_stage_view(ranks, grid_rank(s, d, S), buckets[s] - 1) for s in range(S)]
        else:
            whole = [[op for op in ops if op.kind not in BUCKET_OPS] for ops in mine]
        peak = validate(whole, micro, training).peak_held
        for (r, i), (q, j) in pair_messages(mine).items():
            pairs[grid_rank(r, d, S), i] = (grid_rank(q, d, S), j)
        for s in range(S):
            r = grid_rank(s, d, S)
            peaks[r] = peak[s]
            if zero == 3:
                gathered[r], grads[r] = _fsdp_buffers(ranks, r, buckets[s] - 1, training)
    for s in range(S):
        group = [grid_rank(s, d, S) for d in range(D)]
        found = [[(i, op) for i, op in enumerate(ranks[r]) if op.kind in BUCKET_OPS] for r in group]
        for r, ops in zip(group, found):
            for i, op in ops:
                if op.mb != -1:
                    raise _error(ranks, f"rank {r}: {NAMES[op.kind]} with mb {op.mb}; a bucket's ops have mb -1",
                                 [(r, i)])
                if op.kind == FREE and zero != 3:
                    raise _error(ranks, f"rank {r}: {op}: only --zero 3 gathers buckets to free", [(r, i)])
                if op.kind == FREE:
                    continue
                if D == 1:
                    raise _error(ranks, f"rank {r}: {op} but the stage has no other replica", [(r, i)])
                if op.kind not in allowed:
                    raise _error(ranks, f"rank {r}: {op} where only {', '.join(NAMES[k] for k in allowed)} "
                                        f"may run", [(r, i)])
                if buckets is not None and not 0 <= op.part < buckets[s]:
                    raise _error(ranks, f"rank {r}: {op}, but stage {s} has {buckets[s]} buckets", [(r, i)])
        found = [[(i, op) for i, op in ops if op.kind != FREE] for ops in found]
        for k in range(max(map(len, found), default=0)):
            mine = [ops[k] if k < len(ops) else None for ops in found]
            if any(m is None or m[1] != mine[0][1] for m in mine):
                r = next(q for q, m in zip(group, mine) if m is None or m[1] != mine[0][1])
                theirs = "nothing" if mine[group.index(r)] is None else str(mine[group.index(r)][1])
                raise _error(ranks, f"rank {r}: collective {k} of stage {s} is {theirs}, but rank {group[0]}'s is "
                                    f"{mine[0][1] if mine[0] else 'nothing'}; a stage's replicas must run the same "
                                    f"collectives in the same order",
                             [(q, m[0]) for q, m in zip(group, mine) if m])
            for q, (i, _) in zip(group, mine):
                pairs[q, i] = [(p, j) for p, (j, _) in zip(group, mine) if p != q]
    spans, stuck = _run(ranks, pairs, costs or Costs())
    if stuck:
        raise _deadlock(ranks, pairs, stuck)
    return ValidationResult(peaks, _timeline(spans), gathered, grads, pairs)

# -----------------------------------------------------------------------------
# simulator: play the op lists against a cost model


@dataclass(frozen=True)
class Costs:
    f: float | list[float] = 1.0  # a whole stage's FWD, per rank or the same everywhere
    b: float | list[float] = 1.0  # BWD_INPUT
    w: float | list[float] = 1.0  # BWD_WEIGHT
    comm: float = 0.0  # one transfer between neighbours
    collective: float | list[list[float]] = 0.0  # one collective of a bucket: everywhere, or [rank][bucket]
    # --zero 3's per-layer ops: per rank, each layer's share of its stage's
    # compute (layer_shares: the embedding goes with layer 0, the head with
    # the last); None: equal shares
    shares: list[list[float]] | None = None

    def compute(self, op: Op, r: int, layers: int) -> float:
        """What a compute op costs on rank r, a stage of `layers` layers."""
        if op.kind == FREE:  # gives a buffer back: no work
            return 0.0
        cost = (self.f, self.b, self.w)[op.kind]
        cost = cost[r] if isinstance(cost, list) else cost
        if op.part < 0:
            return cost
        return cost * (self.shares[r][op.part] if self.shares is not None else 1.0 / layers)

    def of_collective(self, op: Op, r: int) -> float:
        return self.collective[r][op.part] if isinstance(self.collective, list) else self.collective


class OpSpan(NamedTuple):
    """When one op of a rank's list ran."""
    op: Op
    start: float
    end: float


@dataclass
class Timeline:
    rows: list[list[OpSpan]]  # per rank, every op (messages included) in program order
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
    #
    # --zero 3's lists (those with a FREE) run their collectives as the
    # executor does, on a comm thread of the rank's own: posting one costs the
    # rank nothing; the comm thread runs them in list order, each once it is
    # free and every replica's comm thread has reached it; a FWD or
    # BWD_INPUT of a layer waits for the layer's gather (the whole tensors'
    # gather is first in the queue, so it is done by then), and the list
    # ends when its last collective has.
    S = len(ranks)
    segments = [_segments(ops) for ops in ranks]
    segment_of = [{i: k for k, seg in enumerate(segs) for i in seg} for segs in segments]
    layers = [1 + max((op.part for op in ops if op.kind in COMPUTE), default=0) for ops in ranks]
    threaded = [any(op.kind == FREE for op in ops) for ops in ranks]
    gather_of = [{} for _ in ranks]  # (rank) op index -> the index of the gather its layer waits for
    for r, ops in enumerate(ranks):
        last = {}
        for i, op in enumerate(ops):
            if op.kind == ALLGATHER:
                last[op.part] = i
            elif threaded[r] and op.kind in (FWD, BWD_INPUT) and op.part in last:
                gather_of[r][i] = last[op.part]
    posted = {}  # (rank, segment) -> when that rank reached that group
    queued = [[] for _ in ranks]  # per threaded rank, the collectives posted and not yet run, in order
    comm_free = [0.0] * S  # when each rank's comm thread is next free
    at, clock = [0] * S, [0.0] * S
    spans = [[None] * len(ops) for ops in ranks]

    def run_queued(r: int) -> bool:  # the comm threads run every collective all of whose replicas have reached it
        ran = False
        while queued[r]:
            i = queued[r][0]
            group = [(r, i), *partners(pairs, r, i)]
            if any(not queued[q] or queued[q][0] != j for q, j in group):
                break
            ready = {q: max(posted[q, segment_of[q][j]], comm_free[q]) for q, j in group}
            end = max(ready.values()) + costs.of_collective(ranks[r][i], r)
            for q, j in group:
                spans[q][j] = OpSpan(ranks[q][j], ready[q], end)
                comm_free[q] = end
                queued[q].pop(0)
            ran = True
        return ran

    moved = True
    while moved:
        moved = False
        for r in range(S):
            moved |= run_queued(r)
            while at[r] < len(segments[r]):
                seg = segments[r][at[r]]
                first = ranks[r][seg[0]]
                if first.kind in COMPUTE or first.kind == FREE:
                    start = clock[r]
                    if seg[0] in gather_of[r]:
                        gathered = spans[r][gather_of[r][seg[0]]]
                        if gathered is None:
                            break
                        start = max(start, gathered.end)
                    spans[r][seg[0]] = OpSpan(first, start, start + costs.compute(first, r, layers[r]))
                elif threaded[r] and first.kind in COLLECTIVES:
                    posted[r, at[r]] = clock[r]
                    queued[r].append(seg[0])
                    at[r] += 1
                    moved = True
                    run_queued(r)
                    continue
                else:
                    # a send or receive has one partner; a collective has the
                    # rest of its group, and completes when all have posted it
                    t = posted.setdefault((r, at[r]), clock[r])
                    peers = [[posted.get((q, segment_of[q][j])) for q, j in partners(pairs, r, i)] for i in seg]
                    if any(None in p for p in peers):
                        break
                    for i, tp in zip(seg, peers):
                        cost = costs.of_collective(ranks[r][i], r) if ranks[r][i].kind in COLLECTIVES else costs.comm
                        spans[r][i] = OpSpan(ranks[r][i], t, max([t, *tp]) + cost)
                clock[r] = max(spans[r][i].end for i in seg)
                at[r] += 1
                moved = True
    stuck = {r: segments[r][at[r]] if at[r] < len(segments[r]) else range(queued[r][0], queued[r][0] + 1)
             for r in range(S) if at[r] < len(segments[r]) or queued[r]}
    return spans, stuck


def partners(pairs: dict, r: int, i: int) -> list[tuple[int, int]]:
    """(rank, position) of every other side of rank r's op at position i: a message's partner, a collective's group."""
    partner = pairs[r, i]
    return partner if isinstance(partner, list) else [partner]


def _deadlock(ranks: list[list[Op]], pairs: dict, stuck: dict[int, range]) -> ScheduleError:
    waits, marks = [], []
    for r, seg in stuck.items():
        for i in seg:
            for q, j in partners(pairs, r, i):
                if q in stuck and j >= stuck[q].stop:  # the partner has not reached that group yet
                    waits.append(f"rank {r} waits at position {i} ({ranks[r][i]}) for rank {q} "
                                 f"to reach position {j} ({ranks[q][j]})")
                    marks.append((r, i))
    return _error(ranks, "deadlock: no rank can move. " + "; ".join(waits) + ". A rank's sends and "
                         "receives of the same moment must be adjacent so they post as one group.",
                  marks)


def _timeline(spans: list[list[OpSpan]]) -> Timeline:
    # the last op to end may be a collective of a comm thread, not the list's last
    return Timeline(spans, max((s.end for row in spans for s in row), default=0.0))


def simulate(ranks: list[list[Op]], costs: Costs = Costs()) -> Timeline:
    """When every op starts and ends under a cost model (assumes a valid schedule)."""
    pairs = pair_messages(ranks)
    spans, stuck = _run(ranks, pairs, costs)
    if stuck:
        raise _deadlock(ranks, pairs, stuck)
    return _timeline(spans)

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
# partition: contiguous layers per stage, balanced by cost


def stage_costs(config: dict, seq_len: int) -> tuple[float, float, float]:
    """Forward FLOPs per token of the embedding, one layer, and the LM head
    (final layernorm + logits): the head of a small model weighs as much as
    many layers, so counting it matters."""
    C, Vp = config["channels"], config["padded_vocab_size"]
    layer = 24 * C * C + 2 * seq_len * C  # four matmuls, causal attention on average
    return float(C), float(layer), float(2 * C * Vp)


def range_cost(parts: tuple[float, float, float], num_layers: int, lo: int, hi: int) -> float:
    """The cost of a stage that owns layers [lo, hi), from the costs of the
    (embedding, one layer, LM head): the first stage adds the embedding, the
    last the head. The one place a stage's cost is summed: the partition,
    its description and plan.py's op costs all call it."""
    embed, layer, head = parts
    return embed * (lo == 0) + layer * (hi - lo) + head * (hi == num_layers)


def layer_shares(config: dict, bounds: list[tuple[int, int]], seq_len: int) -> list[list[float]]:
    """Per stage, each of its layers' share of the stage's compute, for the
    simulator's --zero 3 per-layer ops: the embedding goes with layer 0 and
    the head with the last, as fsdp_ops runs them."""
    parts, L = stage_costs(config, seq_len), config["num_layers"]
    return [[range_cost(parts, L, l, l + 1) / range_cost(parts, L, lo, hi) for l in range(lo, hi)]
            for lo, hi in bounds]


def partition(config: dict, stages: int, seq_len: int) -> list[tuple[int, int]]:
    """Layer ranges [lo, hi) per stage, each at least one layer, minimising the
    most expensive stage (dynamic programming over the cut points)."""
    L = config["num_layers"]
    if not 1 <= stages <= L:
        raise ValueError(f"--stages {stages}: must be between 1 and the model's {L} layers")
    parts = stage_costs(config, seq_len)
    # best[s][i]: the least possible max cost of layers [0, i) cut into s stages
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(stages + 1)]
    cut = [[0] * (L + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for i in range(s, L + 1):
            for j in range(s - 1, i):
                c = max(best[s - 1][j], range_cost(parts, L, j, i))
                if c < best[s][i]:
                    best[s][i], cut[s][i] = c, j
    bounds, i = [], L
    for s in range(stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return bounds[::-1]


def describe_partition(config: dict, bounds: list[tuple[int, int]], seq_len: int) -> str:
    parts, L, ranks = stage_costs(config, seq_len), config["num_layers"], []
    total = range_cost(parts, L, 0, L)
    for r, (lo, hi) in enumerate(bounds):
        extra = (" + embedding" if lo == 0 else "") + (" + lm head" if hi == L else "")
        ranks.append(f"rank {r}: layers [{lo},{hi}){extra} ({range_cost(parts, L, lo, hi) / total:.0%})")
    return "partition: " + " | ".join(ranks)


# -----------------------------------------------------------------------------
# wire: plain, length-checked messages (never pickle)
#
# A message is a 16-byte header (magic, kind, payload length) and the payload:
# JSON for small structured data, raw little-endian arrays for numbers.

WIRE_MAGIC = 0x47505452
HELLO, TABLE, LINK, ARRAY, BLOB, CHALLENGE, LINKED = range(1, 8)
KIND_NAMES = {HELLO: "HELLO", TABLE: "TABLE", LINK: "LINK", ARRAY: "ARRAY", BLOB: "BLOB", CHALLENGE: "CHALLENGE",
              LINKED: "LINKED"}
MAX_SMALL = 1 << 16  # JSON messages
MAX_DEPTH = 4        # of their nesting: a TABLE is an object of a list of lists


class ProtocolError(ValueError):
    """A peer sent something other than what the protocol expects."""


def send_msg(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(struct.pack("<IIQ", WIRE_MAGIC, kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k
    return bytes(buf)


def recv_msg(sock: socket.socket, kind: int, max_len: int = MAX_SMALL) -> bytes:
    magic, got, n = struct.unpack("<IIQ", _recv_exact(sock, 16))
    if magic != WIRE_MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:08x} (not one of our ranks?)")
    if got != kind:
        raise ProtocolError(f"expected a {KIND_NAMES[kind]} message, got kind {got}")
    if n > max_len:
        raise ProtocolError(f"{KIND_NAMES[kind]} message of {n} bytes, more than {max_len}")
    return _recv_exact(sock, n)


def send_json(sock: socket.socket, kind: int, obj) -> None:
    send_msg(sock, kind, json.dumps(obj).encode())


def _nesting(raw: bytes) -> int:
    """How deep the brackets of a JSON text nest, outside its strings:
    checked before parsing, which recurses once per level."""
    depth = deepest = 0
    in_string = escaped = False
    for c in raw:
        if in_string:
            escaped, in_string = (False, True) if escaped else (c == 0x5C, c != 0x22)  # backslash, quote
        elif c == 0x22:
            in_string = True
        elif c in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in b"]}":
            depth -= 1
    return deepest


def parse_json_object(raw: bytes, keys: dict, what: str) -> dict:
    """A JSON object with exactly the given keys of the given types, or a ProtocolError naming what."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"malformed {what} ({e})") from None
    if not isinstance(obj, dict) or set(obj) != set(keys) or \
            not all(isinstance(obj[k], t) for k, t in keys.items()):
        raise ProtocolError(f"malformed {what}")
    return obj


def recv_json(sock: socket.socket, kind: int, keys: dict, max_len: int = MAX_SMALL) -> dict:
    """A JSON message with exactly the given keys of the given types."""
    raw = recv_msg(sock, kind, max_len)
    if _nesting(raw) > MAX_DEPTH:
        raise ProtocolError(f"malformed {KIND_NAMES[kind]} message (nested deeper than {MAX_DEPTH})")
    return parse_json_object(raw, keys, f"{KIND_NAMES[kind]} message")


# -----------------------------------------------------------------------------
# rendezvous and links
#
# Rank 0 listens on MASTER_ADDR:MASTER_PORT. Every other rank says HELLO there
# (rank, world size, and the address of its own link listener); rank 0
# answers each with the TABLE of all listeners. Then, within each replica,
# stage s connects to stage s+1 (activations forward, gradients back) and the
# last stage to the first (the tied embedding's gradient); with D > 1
# replicas, each rank connects to the same stage of the next replica (the
# data-parallel ring). Each link opens with a LINK message that its acceptor
# answers with LINKED. The control sockets to rank 0 stay open for the small
# collectives of each step (grad-norm parts, the loss, barriers).
#
# Every connection proves that both ends hold the job's secret, GPT_JOB_TOKEN,
# without sending it: the acceptor opens with a CHALLENGE (a fresh nonce), the
# connector's message carries an HMAC-SHA256 of that nonce and the message,
# and the acceptor's answer an HMAC of the connector's own nonce. Each
# connection is vetted in a thread of its own with a short deadline, so a
# silent, slow or hostile one delays no real rank.

HANDSHAKE_S = 10.0  # a real peer answers a challenge at once
MAX_PENDING = 64    # connections being vetted at once; more are dropped


@dataclass
class Env:
    """Where this process sits in the job."""
    rank: int
    world: int
    master_addr: str
    master_port: int
    token: str


MIN_TOKEN = 16
TOKEN_HINT = ("export GPT_JOB_TOKEN=$(python3 -c 'import secrets; print(secrets.token_hex(16))') "
              "and pass the same value to every rank")


def env_from(environ: dict) -> Env | None:
    """The job from RANK/WORLD_SIZE (or SLURM's) and MASTER_ADDR/MASTER_PORT;
    None when this process is not part of a launched job."""
    rank = environ.get("RANK", environ.get("SLURM_PROCID"))
    world = environ.get("WORLD_SIZE", environ.get("SLURM_NTASKS"))
    if rank is None or world is None:
        return None
    try:
        env = Env(int(rank), int(world), environ.get("MASTER_ADDR", "127.0.0.1"),
                  int(environ.get("MASTER_PORT", "29500")), environ.get("GPT_JOB_TOKEN", ""))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and MASTER_PORT must be integers") from None
    if not 1 <= env.world <= 4096:
        raise ValueError(f"WORLD_SIZE {env.world}: must be between 1 and 4096")
    if not 0 <= env.rank < env.world:
        raise ValueError(f"RANK {env.rank} is outside WORLD_SIZE {env.world}")
    if not 1 <= env.master_port <= 65535:
        raise ValueError(f"MASTER_PORT {env.master_port}: must be between 1 and 65535")
    if len(env.token) < MIN_TOKEN:  # anything derivable from the job's address would let outsiders in
        raise ValueError(f"GPT_JOB_TOKEN is {'too short' if env.token else 'not set'}: a job across launchers "
                         f"needs a shared secret of at least {MIN_TOKEN} characters; {TOKEN_HINT}")
    return env


def advertised_address(bind: str, master_addr: str, advertise: str | None) -> str:
    """The address the other ranks reach this one at: --advertise (or
    GPT_ADVERTISE_ADDR) when given, else the bind address, and for 0.0.0.0
    the address of this host's interface on the route to MASTER_ADDR, which
    every rank reaches, so it is on their network."""
    if advertise:
        return advertise
    if bind != "0.0.0.0":
        return bind
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((master_addr, 9))  # a UDP connect sends nothing: it only picks the route
        return s.getsockname()[0]


class Rank:
    """This rank's sockets and the collectives of a step. A 1-stage run is a
    Rank with world 1 and no sockets at all."""

    def __init__(self, rank: int = 0, world: int = 1, timeout: float = 120.0, stages: int | None = None):
        self.rank, self.world, self.timeout = rank, world, timeout
        self.stages = stages or world
        self.stage, self.replica, self.replicas = rank % self.stages, rank // self.stages, world // self.stages
        self.control: list[socket.socket | None] = []  # rank 0: one per rank; others: [to rank 0]
        self.prev = self.next = self.tied = None
        self.replica_prev = self.replica_next = None  # the data-parallel ring

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def fds(self) -> tuple[int, int, int]:
        return tuple(s.fileno() if s else -1 for s in (self.prev, self.next, self.tied))

    def replica_fds(self) -> tuple[int, int]:
        return tuple(s.fileno() if s else -1 for s in (self.replica_prev, self.replica_next))

    def _recv(self, peer: int, kind: int, max_len: int, what: str) -> bytes:
        """A message from rank `peer` (over the control socket to it, or to
        rank 0), at most max_len bytes: each caller derives that bound from
        what it expects, so nothing a peer sends is read unbounded."""
        sock = self.control[peer if self.rank == 0 else 0]
        try:
            return recv_msg(sock, kind, max_len)
        except ProtocolError as e:
            raise ProtocolError(f"rank {self.rank}: {what} from rank {peer}: {e}") from None

    def allreduce(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks, added in rank order on rank 0, so every
        rank gets bitwise the same result. A step's values (grad-norm parts,
        the loss) are zero on all but one rank per replica, and adding zeros
        is exact: the sum is of one value per replica, in replica order,
        whatever the stage count."""
        values = np.ascontiguousarray(values, dtype=np.float64)
        if self.world == 1:
            return values.copy()
        if self.rank != 0:  # the sum has as many values as this rank's part
            send_msg(self.control[0], ARRAY, values.tobytes())
            return np.frombuffer(self._recv(0, ARRAY, values.nbytes, "the sum"), np.float64).copy()
        total = values.copy()
        for r in range(1, self.world):
            got = np.frombuffer(self._recv(r, ARRAY, values.nbytes, "a part of a sum"), np.float64)
            if got.shape != total.shape:
                raise ProtocolError(f"rank {r} sent {got.size} values, expected {total.size}")
            total = total + got
        for r in range(1, self.world):
            send_msg(self.control[r], ARRAY, total.tobytes())
        return total

    def barrier(self) -> None:
        self.allreduce(np.zeros(1))

    def broadcast(self, blob: bytes, max_len: int) -> bytes:
        """Rank 0's bytes, on every rank; the others refuse more than max_len."""
        if self.world == 1:
            return blob
        if self.rank != 0:
            return self._recv(0, BLOB, max_len, "a broadcast")
        for r in range(1, self.world):
            send_msg(self.control[r], BLOB, blob)
        return blob

    def gather_blobs(self, blob: bytes, max_len: int) -> list[bytes] | None:
        """Every rank's bytes, on rank 0 (None elsewhere), each at most max_len."""
        if self.rank != 0:
            send_msg(self.control[0], BLOB, blob)
            return None
        return [blob] + [self._recv(r, BLOB, max_len, "a gathered blob") for r in range(1, self.world)]

    def close(self) -> None:
        for s in [*self.control, self.prev, self.next, self.tied, self.replica_prev, self.replica_next]:
            if s:
                s.close()


def _listen(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(64)
    return s


def _connect(addr: tuple[str, int], deadline: float) -> socket.socket:
    """Connects, retrying while the peer is not listening yet."""
    while True:
        try:
            s = socket.create_connection(addr, timeout=max(0.1, deadline - time.monotonic()))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError as e:
            if time.monotonic() > deadline:
                raise TimeoutError(f"cannot reach {addr[0]}:{addr[1]} ({e.strerror or e})") from None
            time.sleep(0.05)


def _mac(key: bytes, kind: int, nonce: str, fields: dict) -> str:
    body = json.dumps({k: v for k, v in fields.items() if k != "mac"}, sort_keys=True)
    return hmac.new(key, f"{kind}|{nonce}|{body}".encode(), hashlib.sha256).hexdigest()


NONCE = {"nonce": str}
PROOF = {"nonce": str, "mac": str}


def _admit(sock: socket.socket, key: bytes, kind: int, keys: dict) -> dict:
    """The acceptor's half: challenge, then a kind message with keys whose
    proof must match. Its answer goes back through _answer."""
    nonce = secrets.token_hex(16)
    send_json(sock, CHALLENGE, {"nonce": nonce})
    msg = recv_json(sock, kind, {**keys, **PROOF})
    if not hmac.compare_digest(msg["mac"], _mac(key, kind, nonce, msg)):
        raise ProtocolError("wrong job token (its proof does not match)")
    return msg


def _answer(sock: socket.socket, key: bytes, kind: int, fields: dict, peer_nonce: str) -> None:
    send_json(sock, kind, {**fields, "mac": _mac(key, kind, peer_nonce, fields)})


def _join(sock: socket.socket, key: bytes, kind: int, fields: dict, reply_kind: int, reply_keys: dict,
          reply_max: int = MAX_SMALL) -> dict:
    """The connector's half: answers the challenge with fields, then checks
    the acceptor's reply (at most reply_max bytes), which only a holder of
    the token can prove."""
    challenge = recv_json(sock, CHALLENGE, NONCE)["nonce"]
    nonce = secrets.token_hex(16)
    msg = {**fields, "nonce": nonce}
    send_json(sock, kind, {**msg, "mac": _mac(key, kind, challenge, msg)})
    reply = recv_json(sock, reply_kind, {**reply_keys, "mac": str}, reply_max)
    if not hmac.compare_digest(reply["mac"], _mac(key, reply_kind, nonce, reply)):
        raise ProtocolError(f"the peer's {KIND_NAMES[reply_kind]} does not prove the job token")
    return reply


class _Acceptor:
    """Accepts on a listener in the background, vetting each connection in a
    thread of its own (check(sock) -> result, or raises); collect() waits for
    the first `want` that pass. Peers that fail are logged and dropped."""

    def __init__(self, listener: socket.socket, deadline: float, check, want: int, what: str):
        self.listener, self.deadline, self.check, self.want, self.what = listener, deadline, check, want, what
        self.passed: queue.Queue = queue.Queue()
        self.pending: set[socket.socket] = set()
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopped.is_set():
            try:
                sock, peer = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                if len(self.pending) >= MAX_PENDING:
                    sock.close()
                    continue
                self.pending.add(sock)
            threading.Thread(target=self._vet, args=(sock, peer), daemon=True).start()

    def _vet(self, sock: socket.socket, peer) -> None:
        sock.settimeout(max(0.1, min(HANDSHAKE_S, self.deadline - time.monotonic())))
        try:
            result = self.check(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (ProtocolError, ConnectionError, OSError, struct.error) as e:
            if not self.stopped.is_set():
                print(f"warning: rejected a connection from {peer[0]}:{peer[1]} waiting for {self.what}: {e}",
                      file=sys.stderr)
            sock.close()
            result = None
        with self.lock:
            self.pending.discard(sock)
        if result is not None:
            self.passed.put((sock, result))

    def collect(self) -> list:
        got = []
        while len(got) < self.want:
            try:
                got.append(self.passed.get(timeout=max(0.0, self.deadline - time.monotonic())))
            except queue.Empty:
                raise TimeoutError(f"timed out waiting for {self.what}") from None
        return got

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        with self.lock:
            for sock in self.pending:
                sock.close()


def table_bytes_bound(world: int) -> int:
    """The most bytes rank 0's TABLE of `world` listeners can take: an entry
    is ["host", port], a host at most 255 characters (rank 0 refuses longer),
    each at most 6 bytes in JSON (\\uXXXX), a port 5 digits; 1 KiB for the
    nonce, the proof and the keys."""
    return 1024 + world * (6 * 255 + 16)


def connect_ranks(env: Env, bind: str = "127.0.0.1", timeout: float = 120.0, advertise: str | None = None,
                  stages: int | None = None) -> Rank:
    """Rendezvous through rank 0, then the neighbour, tied and data-parallel
    links of a grid of world / stages replicas (one replica by default)."""
    me = Rank(env.rank, env.world, timeout, stages)
    deadline = time.monotonic() + timeout
    key = env.token.encode()
    S, r = env.world, env.rank
    links = _listen(bind, 0)
    mine = [advertised_address(bind, env.master_addr, advertise), links.getsockname()[1]]
    acceptors = []

    # this rank's links in the grid, (attribute, role, peer): the ones it
    # opens (forward, the tied one from the last stage, the ring's to the next
    # replica) and the ones it accepts
    stages, replicas, stage, replica = me.stages, me.replicas, me.stage, me.replica

    def here(stage: int, replica: int) -> int:
        return grid_rank(stage, replica, stages)
    outgoing = [("next", "pipe", here(stage + 1, replica))] if stage + 1 < stages else []
    incoming = [("prev", "pipe", here(stage - 1, replica))] if stage > 0 else []
    if stages > 1 and stage == stages - 1:
        outgoing.append(("tied", "tied", here(0, replica)))
    if stages > 1 and stage == 0:
        incoming.append(("tied", "tied", here(stages - 1, replica)))
    if replicas > 1:
        outgoing.append(("replica_next", "ring", here(stage, (replica + 1) % replicas)))
        incoming.append(("replica_prev", "ring", here(stage, (replica - 1) % replicas)))
    expected, expected_lock = list(incoming), threading.Lock()

    def expect_link(sock):  # any link still expected, in whatever order they arrive
        h = _admit(sock, key, LINK, {"rank": int, "role": str})
        with expected_lock:
            k = next((k for k, (_, role, peer) in enumerate(expected) if (peer, role) == (h["rank"], h["role"])),
                     None)
            if k is None:
                raise ProtocolError(f"unexpected {h['role']} link from rank {h['rank']}")
            attr = expected.pop(k)[0]
        _answer(sock, key, LINKED, {"rank": r}, h["nonce"])
        return attr

    def open_link(addr, role: str, peer: int) -> socket.socket:
        sock = _connect(tuple(addr), deadline)
        _join(sock, key, LINK, {"rank": r, "role": role}, LINKED, {"rank": int})
        return sock

    try:
        # the links are accepted in the background from the start, so no rank
        # waits on one that is itself still connecting
        if incoming:
            waiting = ", ".join(f"rank {peer}'s {role} link" for _, role, peer in incoming)
            acceptors.append(_Acceptor(links, deadline, expect_link, len(incoming), waiting))
        if r == 0:
            table = [mine] + [None] * (S - 1)
            me.control = [None] * S
            claimed, lock = set(), threading.Lock()
            hello_keys = {"rank": int, "world": int, "host": str, "port": int}

            def hello(sock):
                h = _admit(sock, key, HELLO, hello_keys)
                if h["world"] != S or not 0 < h["rank"] < S or not 0 < h["port"] < 65536 or len(h["host"]) > 255:
                    raise ProtocolError(f"unexpected rank {h['rank']} of {h['world']} at {h['host'][:64]}:{h['port']}")
                with lock:
                    if h["rank"] in claimed:
                        raise ProtocolError(f"rank {h['rank']} joined twice")
                    claimed.add(h["rank"])
                return h

            with _listen(bind if bind != "127.0.0.1" else env.master_addr, env.master_port) as rdv:
                joining = _Acceptor(rdv, deadline, hello, S - 1, "the other ranks to join")
                try:
                    joined = joining.collect()
                finally:
                    joining.close()
            for sock, h in joined:
                table[h["rank"]] = [h["host"], h["port"]]
                me.control[h["rank"]] = sock
            for sock, h in joined:
                _answer(sock, key, TABLE, {"table": table}, h["nonce"])
        else:
            ctl = _connect((env.master_addr, env.master_port), deadline)
            me.control = [ctl]
            try:
                reply = _join(ctl, key, HELLO, {"rank": r, "world": S, "host": mine[0], "port": mine[1]},
                              TABLE, {"table": list}, table_bytes_bound(S))
            except ProtocolError as e:
                raise ProtocolError(f"rank {r}: joining rank 0: {e}") from None
            table = reply["table"]
            if len(table) != S or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and
                                          isinstance(e[1], int) and 0 < e[1] < 65536 for e in table):
                raise ProtocolError("rank 0 sent a malformed TABLE")

        for attr, role, peer in outgoing:
            setattr(me, attr, open_link(table[peer], role, peer))
        for acceptor in acceptors:
            for sock, attr in acceptor.collect():
                setattr(me, attr, sock)
    except BaseException:
        me.close()
        raise
    finally:
        for acceptor in acceptors:
            acceptor.close()
        links.close()
    for s in me.control:
        if s:
            s.settimeout(timeout)
    return me


# -----------------------------------------------------------------------------
# launch: one process per stage on this machine, and a watchdog over them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _root_cause(failures: dict[int, str]) -> tuple[int, str]:
    """The first failure that is not a consequence of another rank's: a rank
    whose neighbour died reports a closed link or a timeout."""
    secondary = ("closed the link", "closed the connection", "no progress", "timed out", "Connection reset",
                 "stopped by the launcher")
    for r, cause in sorted(failures.items()):
        if not any(s in cause for s in secondary):
            return r, cause
    return min(failures.items())


def launched_rank() -> bool:
    """Whether this process is a rank that launch started."""
    return "GPT_LAUNCHER_PID" in os.environ


def follow_launcher() -> None:
    """In a rank of launch: have the kernel kill this process when the
    launcher ends, however it ends (SIGKILL included), and end now if it
    already has (it died before the request)."""
    if not launched_rank() or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(os.environ["GPT_LAUNCHER_PID"]):
        os._exit(1)


def launch(argv: list[str], world: int, script: str, grace: float = 3.0, env: dict | None = None) -> int:
    """Runs `python script argv` as ranks 0..world-1 on this machine (with env
    added to their environment) and watches them: when one fails, the others
    are stopped within seconds and the failing rank is named. Returns the exit
    status for the launcher. The ranks share a secret made here, and die with
    the launcher."""
    token = secrets.token_hex(32)
    base = dict(os.environ, **(env or {}), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(_free_port()), GPT_JOB_TOKEN=token, GPT_LAUNCHER_PID=str(os.getpid()))
    procs, errors = [], {}

    def relay(r: int, stream) -> None:
        # a rank's "error:" line is its cause, reported once by the launcher
        for line in stream:
            if line.startswith("error: "):
                errors[r] = line[len("error: "):].strip()
            else:
                sys.stderr.write(line)
        stream.close()

    for r in range(world):
        # its own session, so Ctrl-C reaches the launcher, which stops the ranks
        p = subprocess.Popen([sys.executable, script, *argv], env=dict(base, RANK=str(r)),
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        procs.append(p)
        threading.Thread(target=relay, args=(r, p.stderr), daemon=True).start()

    def stop_all() -> None:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while time.monotonic() < end and any(p.poll() is None for p in procs):
            time.sleep(0.02)
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c == 0 for c in codes):
                return 0
            if any(c not in (None, 0) for c in codes):
                break
            time.sleep(0.02)
    except KeyboardInterrupt:
        stop_all()
        print(f"error: interrupted; stopped all {world} ranks", file=sys.stderr)
        return 130
    time.sleep(0.2)  # let the first failures land before stopping the rest
    failed = {r: p.returncode for r, p in enumerate(procs) if p.poll() not in (None, 0)}
    stop_all()
    time.sleep(0.1)  # the relays finish reading what the ranks wrote last
    causes = {}
    for r, code in failed.items():
        if r in errors:
            causes[r] = errors[r]
        elif code < 0:
            causes[r] = f"killed by signal {signal.Signals(-code).name}"
        else:
            causes[r] = f"exited with status {code}"
    r, cause = _root_cause(causes)
    print(f"error: rank {r}: {cause}", file=sys.stderr)
    return 1


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
    import plan  # the model of a step at scale, built on this file's schedules and simulator
    p = commands.add_parser("plan", help="model one training step on a cluster, for every layout")
    plan.add_arguments(p)
    p.set_defaults(run=plan.run)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
