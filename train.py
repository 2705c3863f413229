"""
Train a GPT-2 on the CPU (or GPU), the llm.c way: python says what runs when,
C does the math.

    python train.py                      # tiny model on Shakespeare, a few minutes on 2 cores
    python train.py --stages 2 --schedule zb-h1 --micro-batches 8 --trace trace.json
    python train.py --model d12 --steps 1000 --checkpoint-dir runs/d12
    python train.py --help

The model is cut into --stages pipeline stages, one process (rank) each. Per
optimizer step every rank runs its op list from pipeline.py (forwards,
backwards and the sends/receives between stages) in C, the ranks agree on the
global grad norm, and each takes its AdamW step. Any stage count computes
bitwise the same as one stage. Rank 0 prints one line per step, validation
loss at intervals, and a sample at the end.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

import pipeline
from dev.data.prepare import decode, gpt2_encoding, prepare, read_tokenizer

EOT = 50256
VAL_BATCHES = 10
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0
MIN_LR_FRAC = 0.1
WHOLE_TENSORS = ("wte", "wpe", "lnfw", "lnfb")  # the rest are per layer


class UsageError(Exception):
    """Bad flags or input: reported as one line and exit status 2."""


class TrainingError(Exception):
    """The run cannot go on (a non-finite loss): one line and exit status 1."""


# -----------------------------------------------------------------------------
# flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train GPT-2 from scratch (llm.c-style C trainer, numpy-free hot loop).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cuda when a GPU is visible and the CUDA trainer is built, else cpu")
    p.add_argument("--model", default=None,
                   help="preset: tiny (L4 C128), d6, d8, d12 (GPT-2 124M), d24, d36, d48 "
                        "(default: tiny on the CPU, d12 on the GPU)")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start from an llm.c model file (version 3 fp32 or 5 bf16) instead of a fresh init")
    p.add_argument("--data", default="shakespeare",
                   help="shakespeare (offline, prepared on first use), tinyshakespeare (downloads), "
                        "or a glob of llm.c train shards")
    p.add_argument("--val-data", default=None, help="glob of llm.c val shards (with a --data glob)")
    p.add_argument("--data-dir", default="data", help="where prepared data lives")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (16 CPU, 32 GPU)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (128 CPU, 1024 GPU)")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="split each step's batch into this many micro-batches (gradient accumulation)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (2e-3 CPU, 6e-4 GPU)")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps, then cosine decay to lr/10")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (0: never)")
    p.add_argument("--sample-tokens", type=int, default=128, help="tokens to generate at the end (0: none)")
    p.add_argument("--prompt", default="", help="text the sample continues (default: a fresh document)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here (llm.c model file + state)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="checkpoint every N steps (0: only at the end, if --checkpoint-dir is set)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a --checkpoint-dir that holds checkpoints, deleting them")
    p.add_argument("--keep-checkpoints", type=int, default=0, metavar="K",
                   help="keep only the newest K checkpoints (0: all)")
    p.add_argument("--seed", type=int, default=1337, help="init and sampling seed")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per rank (0: the cores shared out)")
    p.add_argument("--stages", type=int, default=None,
                   help="pipeline stages, one process each (default: 1 on the CPU, one per GPU; "
                        "under an outside launcher: WORLD_SIZE)")
    p.add_argument("--transport", choices=["auto", "socket", "nccl"], default="auto",
                   help="between GPU stages: NCCL when every rank has a GPU of its own, else sockets")
    p.add_argument("--schedule", choices=sorted(pipeline.SCHEDULES), default="1f1b", help="pipeline schedule")
    p.add_argument("--trace", default=None, metavar="FILE.json",
                   help="write every rank's measured timeline as a Chrome trace (Perfetto, chrome://tracing)")
    p.add_argument("--link-gbps", type=float, default=None, metavar="G",
                   help="pace every socket link to G Gb/s, so one machine behaves like ranks on slower links")
    p.add_argument("--link-latency-us", type=float, default=None, metavar="U",
                   help="and add U microseconds per message (the pacing model is in common.h)")
    p.add_argument("--peer-timeout", type=float, default=120.0,
                   help="seconds without progress from a peer before a rank gives up")
    p.add_argument("--bind", default="127.0.0.1",
                   help="address the ranks listen on (0.0.0.0 for a job across machines)")
    p.add_argument("--advertise", default=os.environ.get("GPT_ADVERTISE_ADDR"), metavar="ADDR",
                   help="address the other ranks reach this one at (default: GPT_ADVERTISE_ADDR, else --bind, "
                        "else with --bind 0.0.0.0 this host's address on the route to MASTER_ADDR)")
    return p.parse_args(argv)


# what each numeric flag may be: far past any sensible run, small enough that
# nothing overflows or runs for ever (checkpoint names hold 8 digits of steps)
MAX_STEPS = 99_999_999
MAX_SAMPLE_TOKENS = 100_000
MAX_MICRO_BATCHES = 1024
MAX_STAGES = 64
THREADS_PER_CORE = 4


def check_flags(args: argparse.Namespace) -> None:
    """Every numeric flag in range, before anything is read, built or written."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ints = {"steps": (0, MAX_STEPS), "warmup": (0, MAX_STEPS), "eval_every": (0, MAX_STEPS),
            "checkpoint_every": (0, MAX_STEPS), "keep_checkpoints": (0, MAX_STEPS),
            "sample_tokens": (0, MAX_SAMPLE_TOKENS), "threads": (0, THREADS_PER_CORE * cores),
            "micro_batches": (1, MAX_MICRO_BATCHES), "stages": (1, MAX_STAGES), "seed": (0, 2**64 - 1),
            "top_k": (1, 2**31 - 1), "batch_size": (1, 2**31 - 1), "seq_len": (1, 2**31 - 1)}
    for flag, (lo, hi) in ints.items():
        if not lo <= getattr(args, flag) <= hi:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be between {lo} and {hi}")
    floats = {"lr": (0.0, 10.0, False), "temperature": (0.0, 100.0, True), "peer_timeout": (0.0, 86400.0, False),
              "link_gbps": (0.0, 1e6, False), "link_latency_us": (0.0, 1e6, False)}
    for flag, (lo, hi, lo_ok) in floats.items():
        x = getattr(args, flag)
        if x is None:  # a flag whose default is off
            continue
        if not (math.isfinite(x) and (lo <= x if lo_ok else lo < x) and x <= hi):
            opening = "[" if lo_ok else "("
            raise UsageError(f"--{flag.replace('_', '-')} {x}: must be a number in {opening}{lo:g}, {hi:g}]")


# what a run on each kind of device starts from, flag by flag
DEVICE_DEFAULTS = {
    "cpu": dict(model="tiny", batch_size=16, seq_len=128, lr=2e-3),
    "cuda": dict(model="d12", batch_size=32, seq_len=1024, lr=6e-4),
}


def load_trainer(args: argparse.Namespace):
    """The trainer module for --device (gpt: CPU, gpt_cuda: GPU), with the
    device's defaults filled into the flags left unset."""
    try:
        import gpt_cuda
        gpus = gpt_cuda.device_count()
    except ImportError:
        gpt_cuda, gpus = None, 0
    if args.device == "cuda" and gpt_cuda is None:
        raise UsageError("--device cuda: the CUDA trainer is not built (make builds it where nvcc is)")
    if args.device == "cuda" and gpus == 0:
        raise UsageError("--device cuda: no GPU is visible")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and gpus > 0) else "cpu"
    for flag, value in DEVICE_DEFAULTS[device].items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.stages is None:
        args.stages = max(gpus, 1) if device == "cuda" else 1
    args.device = device
    if device == "cpu":
        import gpt
        return gpt
    return gpt_cuda


@dataclass
class Plan:
    """What the flags add up to, checked before anything is built or written."""
    config: dict
    micro_batch: int        # sequences per micro-batch
    train_pattern: str
    val_pattern: str | None
    tokenizer: list[bytes] | None  # what each token id decodes to, for the sample
    train_loader: object           # gpt.Loader, every shard checked against the vocabulary
    val_loader: object | None
    prompt: list[int]              # the sample's start: EOT, then --prompt
    lock: int | None               # holds --checkpoint-dir while open (see claim_checkpoint_dir)


def make_plan(args: argparse.Namespace, gpt, claim: bool) -> Plan:
    """Everything the run will need, checked before step 1; with claim, the
    checkpoint directory locked for this process (rank 0 and the launcher)."""
    check_flags(args)
    try:
        config = gpt.read_config(args.init_from) if args.init_from else gpt.config_from_name(args.model)
    except gpt.GPTError as e:
        raise UsageError(f"--init-from: {e}" if args.init_from else f"--model: {e}") from None
    if args.seq_len < 1 or args.seq_len > config["max_seq_len"]:
        raise UsageError(f"--seq-len {args.seq_len}: must be between 1 and the model's context "
                         f"({config['max_seq_len']})")
    if args.batch_size < 1 or args.micro_batches < 1 or args.batch_size % args.micro_batches:
        raise UsageError(f"--batch-size {args.batch_size} does not divide into "
                         f"--micro-batches {args.micro_batches}")
    check_link_pace(args, gpt)
    try:
        pipeline.partition(config, args.stages, args.seq_len)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for flag in ("resume", "overwrite", "keep_checkpoints"):
        if getattr(args, flag) and not args.checkpoint_dir:
            raise UsageError(f"--{flag.replace('_', '-')} needs --checkpoint-dir")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the checkpoints that --overwrite deletes: pick one")
    if args.trace:
        check_trace_path(args)
    lock = claim_checkpoint_dir(args, gpt) if claim and args.checkpoint_dir else None
    B, T, V = args.batch_size // args.micro_batches, args.seq_len, config["vocab_size"]
    if args.data in ("shakespeare", "tinyshakespeare"):
        try:
            files = prepare(args.data_dir, args.data, progress=True)
        except RuntimeError as e:
            hint = " use --data shakespeare, which needs no network" if str(e).endswith("offline?") else ""
            raise UsageError(f"--data {args.data}: {e}{hint}") from None
        train_pattern, val_pattern, tokenizer = files.train, files.val, files.tokenizer
    else:
        train_pattern, val_pattern = args.data, args.val_data
        tokenizer = os.path.join(args.data_dir, "gpt2_tokenizer.bin")
        tokenizer = tokenizer if os.path.exists(tokenizer) else None
    try:
        train_loader = gpt.Loader(train_pattern, B, T, V)
        val_loader = gpt.Loader(val_pattern, B, T, V) if val_pattern and args.eval_every else None
    except gpt.GPTError as e:
        raise UsageError(str(e)) from None
    token_bytes, prompt = None, [EOT]
    if args.sample_tokens:
        if tokenizer:
            token_bytes = read_tokenizer(tokenizer)
            if len(token_bytes) < V:
                raise UsageError(f"{tokenizer}: {len(token_bytes)} tokens, fewer than the model's vocabulary of {V}")
        # <|endoftext|> in the prompt is the separator the model was trained on
        prompt += gpt2_encoding().encode(args.prompt, allowed_special={"<|endoftext|>"}) if args.prompt else []
        if max(prompt) >= V:
            raise UsageError(f"--prompt: token {max(prompt)} is outside the model's vocabulary of {V} "
                             f"(the sample starts with end-of-text, {EOT}; use --sample-tokens 0)")
    return Plan(config, B, train_pattern, val_pattern, token_bytes, train_loader, val_loader, prompt, lock)


def check_link_pace(args: argparse.Namespace, gpt) -> None:
    if (args.link_gbps or args.link_latency_us) and use_nccl(args, gpt, args.stages):
        raise UsageError("--link-gbps/--link-latency-us pace the socket transport, and these GPU ranks talk "
                         "over NCCL: add --transport socket to pace them")


def check_trace_path(args: argparse.Namespace) -> None:
    if args.stages < 2:
        raise UsageError("--trace: the timeline is of a pipeline; it needs --stages 2 or more")
    probe = f"{args.trace}.{os.getpid()}.tmp"  # the launcher and every rank check it, at once
    try:
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--trace {args.trace}: cannot write ({e.strerror})") from None


def claim_checkpoint_dir(args: argparse.Namespace, gpt) -> int:
    """Locks --checkpoint-dir for this process's life (the descriptor returned
    holds the lock), refusing a fresh run into another run's checkpoints."""
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "fresh"
    try:
        return gpt.claim_checkpoint_dir(args.checkpoint_dir, mode, "continue it with --resume or start over "
                                        "with --overwrite (which deletes them)")
    except gpt.GPTError as e:
        raise UsageError(f"--checkpoint-dir: {e}") from None


# -----------------------------------------------------------------------------
# training


def as_ops(ops: list) -> np.ndarray:
    return np.array([(op.kind, op.mb) for op in ops], dtype=np.intc).reshape(-1, 2)


def next_batch(loader, micro: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(loader.next() for _ in range(micro)))
    return np.stack(xs), np.stack(ys)


@dataclass
class Stage:
    """This rank's part of the model and the op lists it runs."""
    model: object
    ctx: pipeline.Rank
    train_ops: np.ndarray
    val_ops: np.ndarray

    def run(self, ops: np.ndarray, x: np.ndarray, y: np.ndarray, training: bool) -> float:
        """Runs the op list; returns the sum of the micro-batch losses: when
        training on the last rank only (the step's allreduce spreads it), when
        evaluating on every rank."""
        loss = self.model.run(ops, x if self.ctx.first else None, y if self.ctx.last else None, training)
        if training:
            return loss
        return float(self.ctx.allreduce(np.array([loss if self.ctx.last else 0.0]))[0])


def build_stage(args: argparse.Namespace, gpt, ctx: pipeline.Rank, config: dict, B: int) -> Stage:
    S, m = ctx.world, args.micro_batches
    lo, hi = pipeline.partition(config, S, args.seq_len)[ctx.rank]
    train_ops = pipeline.schedule(args.schedule, S, m)
    val_ops = pipeline.forward_only(S, VAL_BATCHES)
    # the validator's peak is exactly what the executor allocates
    slots = max(pipeline.validate(train_ops, m).peak_held[ctx.rank],
                pipeline.validate(val_ops, VAL_BATCHES, training=False).peak_held[ctx.rank])
    if args.device == "cuda":  # one GPU per rank while there are enough, else they share
        local = int(os.environ.get("LOCAL_RANK", ctx.rank))
        os.environ.setdefault("GPT_DEVICE", str(local % gpt.device_count()))
    model = gpt.Model(config, lo, hi, B, args.seq_len, slots)
    model.set_peers(*ctx.fds(), args.peer_timeout)
    if use_nccl(args, gpt, S):
        uid = ctx.broadcast(gpt.nccl_unique_id() if ctx.rank == 0 else b"")
        model.set_nccl(uid, S, ctx.rank)
    return Stage(model, ctx, as_ops(train_ops[ctx.rank]), as_ops(val_ops[ctx.rank]))


def use_nccl(args: argparse.Namespace, gpt, stages: int) -> bool:
    """NCCL between GPU stages when every rank has a GPU of its own (NCCL
    refuses two ranks on one GPU); sockets otherwise."""
    if args.device != "cuda" or stages == 1 or args.transport == "socket":
        return False
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", stages))
    own_gpu = local_ranks <= gpt.device_count()
    if args.transport == "nccl" and not own_gpu:
        raise UsageError(f"--transport nccl: {local_ranks} ranks on this machine but "
                         f"{gpt.device_count()} GPU(s), and NCCL needs one GPU per rank")
    return own_gpu


def gather_params(stage: Stage) -> dict | None:
    """The whole model's parameters on rank 0 (None elsewhere), to sample from."""
    params = stage.model.params()
    if stage.ctx.world == 1:
        return params
    head = json.dumps([[k, list(v.shape)] for k, v in params.items()]).encode()
    blob = len(head).to_bytes(4, "little") + head + b"".join(v.tobytes() for v in params.values())
    blobs = stage.ctx.gather_blobs(blob)
    if blobs is None:
        return None
    parts: dict[str, list[np.ndarray]] = {}
    for b in blobs:  # in rank order: per-layer tensors concatenate along the layer axis
        n = int.from_bytes(b[:4], "little")
        at = 4 + n
        for name, shape in json.loads(b[4:at]):
            size = int(np.prod(shape)) * 4
            parts.setdefault(name, []).append(np.frombuffer(b[at:at + size], np.float32).reshape(shape))
            at += size
    # per-layer tensors are split by layer across stages; the others live whole
    # on one stage (wte on two, identical)
    return {k: v[0] if k in WHOLE_TENSORS else np.concatenate(v) for k, v in parts.items()}


def train(args: argparse.Namespace, gpt, ctx: pipeline.Rank) -> None:
    plan = make_plan(args, gpt, claim=ctx.rank == 0)
    cfg, B, T, m, L = plan.config, plan.micro_batch, args.seq_len, args.micro_batches, plan.config["num_layers"]
    gpt.set_threads(args.threads or max(1, (os.cpu_count() or 1) // ctx.world))
    gpt.set_link_pace(args.link_gbps or 0.0, args.link_latency_us or 0.0)
    stage = build_stage(args, gpt, ctx, cfg, B)
    model, say = stage.model, (print if ctx.rank == 0 else (lambda *a, **k: None))
    loader = plan.train_loader
    start = 0
    if args.resume:
        # rank 0 decides which checkpoint (the newest whose files are whole); the others follow
        mine = gpt.latest_usable_checkpoint(args.checkpoint_dir, cfg) if ctx.rank == 0 else 0
        last = int(ctx.allreduce(np.array([mine]))[0])
        if last < 0:
            raise UsageError(f"--resume: no finished checkpoint in {args.checkpoint_dir} that this run can use")
        start, shard, pos = model.read_checkpoint(args.checkpoint_dir, last)
        loader.position = (shard, pos)
        say(f"resumed from {args.checkpoint_dir} at step {start}")
    elif args.init_from:
        model.load(args.init_from)
    else:
        model.init(args.seed)
    say(f"model L={L} NH={cfg['num_heads']} C={cfg['channels']} | batch {args.batch_size} x {T} tokens "
        f"in {m} micro-batch(es) | {args.steps} steps | {ctx.world} stage(s), {args.schedule} | {args.device}")
    if ctx.world > 1:
        say(pipeline.describe_partition(cfg, pipeline.partition(cfg, ctx.world, T), T))
    timeline = []  # per step: (op start/end times) for the trace and the bubble
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        x, y = next_batch(loader, m)
        loss_sum = stage.run(stage.train_ops, x, y, training=True)
        model.sum_wte_grads()
        # each (tensor, layer) part lives on one rank: summing them is exact,
        # and the norm adds them in one canonical order, as one stage would
        total = ctx.allreduce(np.append(model.grad_norm_parts(), loss_sum if ctx.last else 0.0))
        norm, loss = gpt.norm_from_parts(total[:-1], L), total[-1] / m
        if not (math.isfinite(loss) and math.isfinite(norm)):  # every rank sees the same sums
            raise TrainingError(f"step {step + 1}: loss {loss:g}, grad norm {norm:g}: not finite; stopped "
                                f"before its update and checkpoint")
        lr = gpt.lr_at(step, args.lr, args.warmup, args.steps, MIN_LR_FRAC)
        model.adamw(lr, WEIGHT_DECAY, MAX_GRAD_NORM / norm if norm > MAX_GRAD_NORM else 1.0, step + 1)
        dt = time.perf_counter() - t0
        timeline.append(model.op_times(len(stage.train_ops)))
        say(f"step {step + 1}/{args.steps} | loss {loss:.6f} | lr {lr:.2e} | norm {norm:.4f} | "
            f"{dt * 1e3:.0f} ms | {args.batch_size * T / dt:.0f} tok/s", flush=True)
        done = step + 1 == args.steps
        if plan.val_loader and ((step + 1) % args.eval_every == 0 or done):
            val = plan.val_loader
            val.position = (0, 0)
            x, y = next_batch(val, VAL_BATCHES)
            say(f"val loss {stage.run(stage.val_ops, x, y, training=False) / VAL_BATCHES:.6f}", flush=True)
        if args.checkpoint_dir and ((args.checkpoint_every and (step + 1) % args.checkpoint_every == 0) or done):
            shard, pos = loader.position
            model.write_checkpoint(args.checkpoint_dir, step + 1, shard, pos)
            ctx.barrier()  # every rank's slices are in the files before they are published
            if ctx.rank == 0:
                gpt.commit_checkpoint(args.checkpoint_dir, step + 1)
                if args.keep_checkpoints:
                    gpt.prune_checkpoints(args.checkpoint_dir, args.keep_checkpoints)
            ctx.barrier()
    if ctx.world > 1 and timeline:
        report_pipeline(args, stage, timeline, say)
    if args.sample_tokens:
        params = gather_params(stage)
        if params is not None:
            whole = model if ctx.world == 1 else gpt.Model(cfg, 0, L, 1, T, 1)
            if ctx.world > 1:
                whole.set_params(params)
            out = whole.sample(np.array(plan.prompt), args.sample_tokens, args.temperature, args.top_k, args.seed)
            ids = out[1:]
            text = decode(plan.tokenizer, ids) if plan.tokenizer else " ".join(map(str, ids))
            print("sample:\n" + text)


# -----------------------------------------------------------------------------
# where the time went: the measured timeline against the simulator's


def report_pipeline(args: argparse.Namespace, stage: Stage, timeline: list, say) -> None:
    ops = stage.train_ops
    mine = json.dumps([t.tolist() for t in timeline]).encode()
    blobs = stage.ctx.gather_blobs(mine)
    if blobs is None:
        return
    S = stage.ctx.world
    ranks_ops = pipeline.schedule(args.schedule, S, args.micro_batches)
    times = [json.loads(b) for b in blobs]  # [rank][step][op] = [start, end]
    steps = range(1 if len(timeline) > 1 else 0, len(timeline))  # the first step warms up
    pairs = pipeline.pair_messages(ranks_ops)
    bubbles, costs, transfers = [], [[[], [], []] for _ in range(S)], []
    for k in steps:
        # the step as the simulator sees it: from when the last rank starts it (before that, a rank that
        # finished its optimizer early is waiting for the others, which is not the pipeline's bubble)
        t0, t1 = max(t[k][0][0] for t in times), max(t[k][-1][1] for t in times)
        busy = 0.0
        for r in range(S):
            for i, (op, (a, b)) in enumerate(zip(ranks_ops[r], times[r][k])):
                if op.kind in pipeline.COMPUTE:
                    busy += max(0.0, min(b, t1) - max(a, t0))
                    costs[r][op.kind].append(b - a)
                else:  # a transfer starts once both sides have posted it; before that it is waiting
                    q, j = pairs[r, i]
                    transfers.append(b - max(a, times[q][k][j][0]))
        bubbles.append(1.0 - busy / (S * (t1 - t0)))
    mean = [[float(np.mean(c)) if c else 0.0 for c in per] for per in costs]
    comm = float(np.median(transfers)) if transfers else 0.0

    def bubble(comm: float) -> float:
        return pipeline.simulate(ranks_ops, pipeline.Costs(f=[c[0] for c in mean], b=[c[1] for c in mean],
                                                           w=[c[2] for c in mean], comm=comm)).bubble_fraction

    say(f"bubble: measured {np.mean(bubbles):.1%}, simulator {bubble(comm):.1%} for the measured op costs and "
        f"transfer time ({comm * 1e3:.1f} ms, the median), {bubble(0.0):.1%} with free transfers")
    if args.trace:
        t0 = min(t[0][0][0] for t in times)
        events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"{args.schedule} x{S}"}}]
        for r in range(S):
            events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
            for k, step_times in enumerate(times[r]):
                for op, (a, b) in zip(ranks_ops[r], step_times):
                    events.append({"name": pipeline.label(op), "cat": pipeline.NAMES[op.kind], "ph": "X",
                                   "pid": 0, "tid": r, "ts": (a - t0) * 1e6, "dur": (b - a) * 1e6,
                                   "args": {"step": k + 1, "micro_batch": op.mb}})
        tmp = f"{args.trace}.tmp"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
        os.replace(tmp, args.trace)
        say(f"trace: {args.trace}")


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP end the run as Ctrl-C does: one line, and a
    launcher stops its ranks. (Ranks of our launcher die with it instead.)"""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def main(argv: list[str] | None = None) -> int:
    pipeline.follow_launcher()
    if not pipeline.launched_rank():
        interrupt_on_signals()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    ctx, errors = None, (UsageError,)
    try:
        gpt = load_trainer(args)
        errors = (gpt.GPTError, ValueError, OSError, TrainingError)
        env = pipeline.env_from(os.environ)
        if env is None and args.stages > 1:
            plan = make_plan(args, gpt, claim=True)  # bad flags and data fail here, once, before any rank starts
            if plan.lock is not None:
                os.close(plan.lock)  # rank 0 claims the directory for the run
            del plan  # and the ranks read the data
            return pipeline.launch(argv, args.stages, os.path.abspath(__file__))
        if env is not None:
            args.stages = env.world
            ctx = pipeline.connect_ranks(env, args.bind, args.peer_timeout, args.advertise)
        else:
            ctx = pipeline.Rank(timeout=args.peer_timeout)
        train(args, gpt, ctx)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if ctx:
            ctx.close()
    return 0

if __name__ == "__main__":
    sys.exit(main())
