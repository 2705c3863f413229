"""
Train a GPT-2 on the CPU (or GPU), the llm.c way: python says what runs when,
C does the math.

    python3 train.py                      # tiny model on Shakespeare, a few minutes on 2 cores
    python3 train.py --stages 2 --schedule zb-h1 --micro-batches 8 --trace trace.json
    python3 train.py --model d12 --steps 1000 --checkpoint-dir runs/d12
    python3 train.py --help

The model is cut into --stages pipeline stages, one process (rank) each, and
--dp runs that many data-parallel replicas of the pipeline (stages x dp ranks).
The plan (partition, op lists, activation buffers) is made once, by the launcher,
and handed to the ranks. Per optimizer step every rank runs its op list from
pipeline.py (forwards, backwards, the sends/receives between stages and the
collectives between replicas) in C, the ranks agree on the global grad norm,
and each takes its AdamW step. Any stage count computes bitwise the same as
one stage; for a fixed --dp, so do any schedule and --zero stage. Rank 0
prints one line per step, validation loss at intervals, and a sample at the end.
"""

import argparse
import json
import math
import os
import resource
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass

if __name__ == "__main__":  # before the requirements, which make may have put in .venv
    from dev.project_venv import reexec_in_project_venv
    reexec_in_project_venv()

import numpy as np

import pipeline
from plan import stage_params
from dev.data.prepare import decode, gpt2_encoding, prepare, read_tokenizer

EOT = 50256
VAL_BATCHES = 10
NCCL_ID_BYTES = 128  # gpt.h's GPT_NCCL_ID_BYTES: the size of NCCL's ncclUniqueId
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


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where it is true and not said already: a
    flag whose default is None (filled in per device, or off) or a switch's
    False says its default in its own words, or has none to say."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train GPT-2 from scratch (llm.c-style C trainer, numpy-free hot loop).",
        formatter_class=DefaultsHelp)
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
    p.add_argument("--dp", type=int, default=1,
                   help="data-parallel replicas of the pipeline, each reading its slice of every batch")
    p.add_argument("--zero", type=int, choices=[0, 1, 3], default=0,
                   help="with --dp: 0 all-reduces gradients; 1 shards AdamW over the replicas "
                        "(gradients reduce-scattered, parameters all-gathered); 3 (FSDP) "
                        "shards parameters, gradients and AdamW, gathering each layer for its compute")
    p.add_argument("--transport", choices=["auto", "socket", "nccl"], default="auto",
                   help="between GPU stages: NCCL when every rank has a GPU of its own, else sockets")
    p.add_argument("--schedule", choices=sorted(pipeline.SCHEDULES), default="1f1b", help="pipeline schedule")
    p.add_argument("--trace", default=None, metavar="FILE.json",
                   help="write every rank's measured op times as a Chrome trace (Perfetto, chrome://tracing): "
                        "a process per replica, a thread per stage (and under --zero 3 one for its collectives); "
                        "needs --stages 2 or more, or --dp 2 or more")
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
            "micro_batches": (1, MAX_MICRO_BATCHES), "stages": (1, MAX_STAGES), "dp": (1, MAX_STAGES), "seed": (0, 2**64 - 1),
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
    """What the flags add up to, checked before anything is built or written,
    and made once: by the launcher, which hands it to every rank."""
    config: dict
    micro_batch: int        # sequences per micro-batch
    train_pattern: str
    val_pattern: str | None
    tokenizer: list[bytes] | None  # what each token id decodes to, for the sample
    train_loader: object           # gpt.Loader, every shard checked against the vocabulary
    val_loader: object | None
    prompt: list[int]              # the sample's start: EOT, then --prompt
    lock: int | None               # holds --checkpoint-dir while open (see claim_checkpoint_dir)


def check_grid_flags(args: argparse.Namespace) -> None:
    """--dp and --zero against each other, before the trainer loads."""
    if args.zero and args.dp == 1:
        raise UsageError(f"--zero {args.zero} shards over data-parallel replicas: it needs --dp 2 or more")


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
    S, D, m = args.stages, args.dp, args.micro_batches
    if args.batch_size < 1 or m < 1 or args.batch_size % (m * D):
        raise UsageError(f"--batch-size {args.batch_size} does not divide into "
                         + (f"--dp {D} replicas x " if D > 1 else "") + f"--micro-batches {m}")
    check_link_pace(args, gpt)
    try:
        bounds = pipeline.partition(config, S, args.seq_len)
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
    B, T, V = args.batch_size // (m * D), args.seq_len, config["vocab_size"]
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


@dataclass
class GridPlan:
    """The ranks' shares of the work, made once (by the launcher, or by rank 0
    under an outside launcher) and handed to every rank: rank r is stage
    r % S of replica r // S."""
    stages: int             # S
    replicas: int           # D
    zero: int
    bounds: list            # per stage: [lo, hi) of its layers
    # per rank: the op lists ([kind, mb, part] triples) of a training step, of
    # what follows the optimizer step, of a validation pass; its activation
    # buffers, and (--zero 3) its buffers of gathered layers and layer gradients
    train_ops: list
    after_ops: list
    val_ops: list
    activation_buffers: list
    gathered: list
    grad_buffers: list


def make_grid_plan(args: argparse.Namespace, config: dict) -> GridPlan:
    """The partition, every rank's op lists, checked; the validator's peaks
    are what the executors allocate."""
    S, D, m = args.stages, args.dp, args.micro_batches
    try:
        bounds = pipeline.partition(config, S, args.seq_len)
    except ValueError as e:
        raise UsageError(str(e)) from None
    buckets = [hi - lo + 1 for lo, hi in bounds]
    train_ops, after_ops = pipeline.grid_schedule(args.schedule, S, D, m, buckets, args.zero)
    val_ops = pipeline.grid_forward_only(S, D, VAL_BATCHES, buckets, args.zero)
    train = pipeline.validate_grid(train_ops, S, m, buckets=buckets, zero=args.zero)
    val = pipeline.validate_grid(val_ops, S, VAL_BATCHES, training=False, buckets=buckets, zero=args.zero)
    pipeline.validate_grid(after_ops, S, 0, training=False, buckets=buckets, zero=args.zero)

    def peaks(field: str) -> list:
        return [max(a, b) for a, b in zip(getattr(train, field), getattr(val, field))]
    return GridPlan(S, D, args.zero, [list(b) for b in bounds], as_triples(train_ops), as_triples(after_ops),
                    as_triples(val_ops), peaks("peak_held"), peaks("peak_gathered"), peaks("peak_grads"))


def grid_plan_of(args: argparse.Namespace, ctx: pipeline.Rank, config: dict) -> GridPlan:
    """This job's grid plan: made here for a single rank, else our launcher's
    (GPT_PLAN) or, under an outside launcher, rank 0's through the rendezvous."""
    if ctx.world == 1:
        return make_grid_plan(args, config)
    bound = plan_bytes_bound(args, config, ctx.world)
    blob = os.environ.get("GPT_PLAN", "").encode()
    if len(blob) > bound:  # bounded like the rendezvous' copy: a plan is parsed, not trusted
        raise ValueError(f"GPT_PLAN: {len(blob)} bytes, more than a plan for these flags can take ({bound})")
    if not blob:
        blob = ctx.broadcast(json.dumps(asdict(make_grid_plan(args, config))).encode() if ctx.rank == 0 else b"",
                             bound)
    return grid_plan_from_json(blob, ctx.world)


def plan_bytes_bound(args: argparse.Namespace, config: dict, world: int) -> int:
    """The most bytes a grid plan's JSON can take, from what every rank
    knows (the flags, the model, the partition): a stage of n layers lists at
    most (m + VAL_BATCHES) x (c + 4) ops in its three lists, c = 3 compute
    ops per micro-batch, or 7n under --zero 3 (its three a layer at a time,
    an ALLGATHER and a FREE for two of them), 4 messages, and 3(n + 2) bucket
    ops more; an op is "[kind, mb, part], " with mb at most 4 digits and part
    at most L's; the rest of a rank's fields fit 64 bytes."""
    L = config["num_layers"]
    bounds = pipeline.partition(config, args.stages, args.seq_len)
    ops = [(args.micro_batches + VAL_BATCHES) * ((7 * (hi - lo) if args.zero == 3 else 3) + 4) + 3 * (hi - lo + 2)
           for lo, hi in bounds]
    return 1024 + (world // args.stages) * sum(64 + n * (16 + len(str(L))) for n in ops)


def as_triples(lists: list) -> list:
    """Op lists as plain [kind, mb, part] triples, for JSON."""
    return [[list(op) for op in ops] for ops in lists]


def is_pair(x) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(isinstance(v, int) and v >= 0 for v in x)


def is_op(x) -> bool:
    """A [kind, mb, part] triple of a known kind (the executor checks the rest
    against its stage)."""
    return isinstance(x, list) and len(x) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in x) \
        and 0 <= x[0] < len(pipeline.NAMES) and x[1] >= -1 and x[2] >= -1


GRID_PLAN_FIELDS = {"stages": int, "replicas": int, "zero": int, "bounds": list, "train_ops": list,
                    "after_ops": list, "val_ops": list, "activation_buffers": list, "gathered": list,
                    "grad_buffers": list}


def grid_plan_from_json(blob: bytes, world: int) -> GridPlan:
    """The launcher's plan, checked field by field: it is parsed, not trusted."""
    d = pipeline.parse_json_object(blob, GRID_PLAN_FIELDS, "plan from the launcher")
    S, D = d["stages"], d["replicas"]
    if S < 1 or D < 1 or S * D != world or len(d["bounds"]) != S or not all(map(is_pair, d["bounds"])) or \
            any(len(d[k]) != world for k in ("train_ops", "after_ops", "val_ops", "activation_buffers", "gathered",
                                              "grad_buffers")) or \
            not all(isinstance(n, int) and n >= 1 for n in d["activation_buffers"]) or \
            not all(isinstance(n, int) and n >= 0 for k in ("gathered", "grad_buffers") for n in d[k]) or \
            not all(isinstance(ops, list) and all(map(is_op, ops))
                    for k in ("train_ops", "after_ops", "val_ops") for ops in d[k]):
        raise ValueError(f"the launcher's plan does not describe {world} ranks")
    return GridPlan(**d)


def check_link_pace(args: argparse.Namespace, gpt) -> None:
    if (args.link_gbps or args.link_latency_us) and use_nccl(args, gpt, args.stages * args.dp):
        raise UsageError("--link-gbps/--link-latency-us pace the socket transport, and these GPU ranks talk "
                         "over NCCL: add --transport socket to pace them")


def check_trace_path(args: argparse.Namespace) -> None:
    if args.stages * args.dp < 2:
        raise UsageError("--trace: the timeline is of the ranks; it needs --stages 2 or more, or --dp 2 or more")
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
    return np.array(ops, dtype=np.intc).reshape(-1, 3)


def next_batch(loader, micro: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(loader.next() for _ in range(micro)))
    return np.stack(xs), np.stack(ys)


@dataclass
class Stage:
    """This rank's part of the model and the op lists it runs."""
    model: object
    ctx: pipeline.Rank
    train_ops: np.ndarray
    after_ops: np.ndarray  # after the optimizer step (--zero 1: the parameters' all-gather)
    val_ops: np.ndarray

    def run(self, ops: np.ndarray, x: np.ndarray, y: np.ndarray, training: bool) -> float:
        """Runs the op list; returns the sum of the micro-batch losses: when
        training on the last rank only (the step's allreduce spreads it), when
        evaluating on every rank."""
        loss = self.model.run(ops, x if self.ctx.first else None, y if self.ctx.last else None, training)
        if training:
            return loss
        # every replica evaluates the same batches; replica 0 speaks for them
        mine = loss if self.ctx.last and self.ctx.replica == 0 else 0.0
        return float(self.ctx.allreduce(np.array([mine]))[0])


def build_stage(args: argparse.Namespace, gpt, ctx: pipeline.Rank, plan: Plan, grid: GridPlan) -> Stage:
    r = ctx.rank
    lo, hi = grid.bounds[ctx.stage]
    if args.device == "cuda":  # one GPU per rank while there are enough, else they share
        local = int(os.environ.get("LOCAL_RANK", r))
        os.environ.setdefault("GPT_DEVICE", str(local % gpt.device_count()))
    model = gpt.Model(plan.config, lo, hi, plan.micro_batch, args.seq_len, grid.activation_buffers[r])
    model.set_peers(*ctx.fds(), args.peer_timeout)
    if grid.zero == 3 and not args.resume:  # the whole stage's parameters once, before sharding keeps this rank's chunks
        start_parameters(args, model)
    model.set_replicas(*ctx.replica_fds(), ctx.replica, ctx.replicas, grid.zero)
    if grid.zero == 3:
        model.set_layer_buffers(grid.gathered[r], grid.grad_buffers[r])
    if use_nccl(args, gpt, ctx.world):
        # one id for the pipelines' sends, then one per stage for its replicas' collectives
        count = 1 + (ctx.stages if ctx.replicas > 1 else 0)
        ids = ctx.broadcast(b"".join(gpt.nccl_unique_id() for _ in range(count)) if r == 0 else b"",
                            count * NCCL_ID_BYTES)
        if len(ids) != count * NCCL_ID_BYTES:
            raise pipeline.ProtocolError(f"rank {r}: rank 0 sent {len(ids)} bytes of NCCL ids, expected "
                                         f"{count} x {NCCL_ID_BYTES}")
        size = len(ids) // count
        model.set_nccl(ids[:size], ctx.world, r)
        if ctx.replicas > 1:
            model.set_replica_nccl(ids[size * (1 + ctx.stage):size * (2 + ctx.stage)], ctx.replicas, ctx.replica)
    return Stage(model, ctx, as_ops(grid.train_ops[r]), as_ops(grid.after_ops[r]), as_ops(grid.val_ops[r]))


def start_parameters(args: argparse.Namespace, model) -> None:
    """A fresh run's parameters: --init-from's file, else drawn from --seed."""
    if args.init_from:
        model.load(args.init_from)
    else:
        model.init(args.seed)


def use_nccl(args: argparse.Namespace, gpt, ranks: int) -> bool:
    """NCCL between GPU ranks (stages and replicas) when every rank has a GPU
    of its own (NCCL refuses two ranks on one GPU); sockets otherwise."""
    if args.device != "cuda" or ranks == 1 or args.transport == "socket":
        return False
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", ranks))
    own_gpu = local_ranks <= gpt.device_count()
    if args.transport == "nccl" and not own_gpu:
        raise UsageError(f"--transport nccl: {local_ranks} ranks on this machine but "
                         f"{gpt.device_count()} GPU(s), and NCCL needs one GPU per rank")
    return own_gpu


def gather_params(stage: Stage, config: dict, bounds: list) -> dict | None:
    """The whole model's parameters on rank 0 (None elsewhere), to sample from."""
    params = stage.model.params()
    if stage.ctx.world == 1:
        return params
    head = json.dumps([[k, list(v.shape)] for k, v in params.items()]).encode()
    blob = len(head).to_bytes(4, "little") + head + b"".join(v.tobytes() for v in params.values())
    # replica 0's stages hold the whole model (every replica has it after a step)
    # the bound: the largest stage's fp32 parameters and a JSON header of its tensors' names and shapes
    most = max(stage_params(dict(config, tied=True), lo, hi) for lo, hi in bounds)
    blobs = stage.ctx.gather_blobs(blob if stage.ctx.replica == 0 else b"", 4 * most + pipeline.MAX_SMALL)
    if blobs is None:
        return None
    parts: dict[str, list[np.ndarray]] = {}
    for b in blobs[:stage.ctx.stages]:  # in rank order: per-layer tensors concatenate along the layer axis
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
    grid = grid_plan_of(args, ctx, plan.config)
    cfg, B, T, m, L = plan.config, plan.micro_batch, args.seq_len, args.micro_batches, plan.config["num_layers"]
    S, D = grid.stages, grid.replicas
    gpt.set_threads(args.threads or max(1, (os.cpu_count() or 1) // ctx.world))
    gpt.set_link_pace(args.link_gbps or 0.0, args.link_latency_us or 0.0)
    stage = build_stage(args, gpt, ctx, plan, grid)
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
    elif grid.zero != 3:  # zero 3 started them before it sharded
        start_parameters(args, model)
    replicas = f" x {D} replicas (zero {grid.zero})" if D > 1 else ""
    say(f"model L={L} NH={cfg['num_heads']} C={cfg['channels']} | batch {args.batch_size} x {T} tokens "
        f"in {m} micro-batch(es){' per replica' if D > 1 else ''} | {args.steps} steps | "
        f"{S} stage(s), {args.schedule}{replicas} | {args.device}")
    if S > 1:
        say(pipeline.describe_partition(cfg, [tuple(b) for b in grid.bounds], T))
    timeline = []  # per step: (op start/end times) for the trace and the bubble
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        # the global batch is the same D*m micro-batches whatever D; replica d takes the d-th m of them
        x, y = next_batch(loader, m * D)
        mine = slice(ctx.replica * m, (ctx.replica + 1) * m)
        loss_sum = stage.run(stage.train_ops, x[mine], y[mine], training=True)
        timeline.append(model.op_times(len(stage.train_ops)))
        model.sum_wte_grads()
        # a (tensor, layer) part is the sum of squares of one stage's gradient,
        # over replica d's chunk on replica d: the sum over ranks adds
        # (exactly) zeros and the D chunks in replica order; the norm adds the
        # parts in one canonical order, as one stage would
        total = ctx.allreduce(np.append(model.grad_norm_parts(), loss_sum if ctx.last else 0.0))
        norm, loss = gpt.norm_from_parts(total[:-1], L), total[-1] / (m * D)
        if not (math.isfinite(loss) and math.isfinite(norm)):  # every rank sees the same sums
            raise TrainingError(f"step {step + 1}: loss {loss:g}, grad norm {norm:g}: not finite; stopped "
                                f"before its update and checkpoint")
        lr = gpt.lr_at(step, args.lr, args.warmup, args.steps, MIN_LR_FRAC)
        model.adamw(lr, WEIGHT_DECAY, MAX_GRAD_NORM / norm if norm > MAX_GRAD_NORM else 1.0, step + 1)
        if len(stage.after_ops):
            stage.run(stage.after_ops, None, None, training=False)
        dt = time.perf_counter() - t0
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
        report_timeline(args, stage, grid, cfg, timeline, say)
    if ctx.world > 1:
        report_traffic(stage, args.steps - start, say)
    if args.sample_tokens:
        if grid.zero == 3:  # the whole parameters, gathered once on every rank, as --zero 1 keeps them
            model.unshard_params()
        params = gather_params(stage, cfg, grid.bounds)
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


def monotonic_clock_id() -> str:
    """Names this machine's CLOCK_MONOTONIC: processes with the same id read the same clock. Linux's
    boot id changes with every boot, as the clock does; elsewhere the host name stands in for it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def report_timeline(args: argparse.Namespace, stage: Stage, grid: GridPlan, config: dict, timeline: list,
                    say) -> None:
    """The bubble every rank of the grid measured (the grid's, and each
    replica's share of it) next to the simulator's for the measured op
    costs, and with --trace every rank's op times as a Chrome trace: a
    process per replica, a thread per stage. With one stage the bubble is
    the time the compute waits for the collectives."""
    mine = json.dumps({"clock": monotonic_clock_id(), "times": [t.tolist() for t in timeline]}).encode()
    # the bound: every rank ran the same steps of at most this many ops, and an op's "[start, end], " is
    # at most 64 characters (a float's repr is at most 24); the clock id is a boot id or a host name
    most = max(map(len, grid.train_ops))
    blobs = stage.ctx.gather_blobs(mine, 512 + len(timeline) * most * 64)
    if blobs is None:
        return
    S, D, world = grid.stages, grid.replicas, grid.stages * grid.replicas
    reports = [json.loads(b) for b in blobs]
    if len({rep["clock"] for rep in reports}) > 1:
        # op times are CLOCK_MONOTONIC seconds (gpt.h), which count from each machine's boot: comparing
        # them across machines would make up a bubble, so across machines nothing is reported
        say("bubble and trace: not reported: the ranks run on different machines, whose monotonic clocks "
            "cannot be compared")
        return
    ranks_ops = [[pipeline.Op(*op) for op in ops] for ops in grid.train_ops]
    buckets = [hi - lo + 1 for lo, hi in grid.bounds]
    pairs = pipeline.validate_grid(ranks_ops, S, args.micro_batches, buckets=buckets, zero=grid.zero).pairs
    times = [rep["times"] for rep in reports]  # [rank][step][op] = [start, end]
    steps = range(1 if len(timeline) > 1 else 0, len(timeline))  # the first step warms up
    # per rank and compute kind, an op's mean time, per layer under --zero 3 (part -1: the whole stage)
    costs = [{} for _ in range(world)]
    bubbles, transfers = [], []
    collectives = [[[] for _ in range(n)] for n in (buckets[r % S] for r in range(world))]  # [rank][bucket]
    for k in steps:
        # the step as the simulator sees it: from when the last rank starts it (before that, a rank that
        # finished its optimizer early is waiting for the others, which is not the pipeline's bubble)
        t0 = max(t[k][0][0] for t in times)
        t1 = max(end for t in times for _, end in t[k])
        busy = [0.0] * D
        for r in range(world):
            for i, (op, (a, b)) in enumerate(zip(ranks_ops[r], times[r][k])):
                if op.kind in pipeline.COMPUTE:
                    busy[r // S] += max(0.0, min(b, t1) - max(a, t0))
                    costs[r].setdefault((op.kind, op.part), []).append(b - a)
                elif op.kind == pipeline.FREE:
                    continue
                else:  # a transfer starts once every side has posted it (--zero 3: its comm thread has
                    # reached it); before that it is waiting
                    waited = max([a] + [times[q][k][j][0] for q, j in pipeline.partners(pairs, r, i)])
                    (collectives[r][op.part] if op.kind in pipeline.COLLECTIVES else transfers).append(b - waited)
        bubbles.append([1.0 - busy[d] / (S * (t1 - t0)) for d in range(D)])
    comm = float(np.median(transfers)) if transfers else 0.0
    # a bucket's collective, per rank: the mean of its measured times
    collective = [[float(np.mean(c)) if c else 0.0 for c in per] for per in collectives]

    def stage_cost(r: int, kind: int) -> float:  # a whole stage's: the sum of its layers' under --zero 3
        return sum(float(np.mean(c)) for (kd, _), c in costs[r].items() if kd == kind)
    shares = pipeline.layer_shares(config, [tuple(b) for b in grid.bounds], args.seq_len)

    def bubble(comm: float, collective: list | float) -> float:
        model = pipeline.Costs(f=[stage_cost(r, pipeline.FWD) for r in range(world)],
                               b=[stage_cost(r, pipeline.BWD_INPUT) for r in range(world)],
                               w=[stage_cost(r, pipeline.BWD_WEIGHT) for r in range(world)], comm=comm,
                               collective=collective, shares=[shares[r % S] for r in range(world)])
        return pipeline.validate_grid(ranks_ops, S, args.micro_batches, buckets=buckets, zero=grid.zero,
                                      costs=model).timeline.bubble_fraction

    per_replica = np.mean(bubbles, axis=0)
    replicas = f" (replicas: {', '.join(f'{b:.1%}' for b in per_replica)})" if D > 1 else ""
    timed = [f"transfer time ({comm * 1e3:.1f} ms, the median)"] if S > 1 else []
    if D > 1:
        where = ", on the comm thread" if grid.zero == 3 else ""
        timed.append(f"collective times (mean {np.mean([c for per in collective for c in per]) * 1e3:.1f} ms{where})")
    what = "bubble" if S > 1 else "bubble (the compute waiting on the collectives)"
    say(f"{what}: measured {np.mean(per_replica):.1%}{replicas}, simulator {bubble(comm, collective):.1%} for the "
        f"measured op costs and {' and '.join(timed)}, {bubble(0.0, 0.0):.1%} with free transfers")
    if args.trace:
        write_trace(args.trace, args.schedule, grid, ranks_ops, times)
        say(f"trace: {args.trace}")


def write_trace(path: str, schedule: str, grid: GridPlan, ranks_ops: list, times: list) -> None:
    """Every rank's op times as a Chrome trace: process d is replica d,
    thread s its stage s (rank d*S + s), and under --zero 3 thread S + s
    that stage's comm thread, which runs its collectives; time from the
    first op's start."""
    S = grid.stages
    t0 = min(t[0][0][0] for t in times)
    events = []
    for r, (ops, rank_times) in enumerate(zip(ranks_ops, times)):
        stage, replica = r % S, r // S
        if stage == 0:
            layout = f"{schedule} x{S}" if S > 1 else "1 stage"
            events.append({"name": "process_name", "ph": "M", "pid": replica,
                           "args": {"name": f"replica {replica}: {layout}, zero {grid.zero}"}})
        events.append({"name": "thread_name", "ph": "M", "pid": replica, "tid": stage,
                       "args": {"name": f"stage {stage} (rank {r})"}})
        if grid.zero == 3:
            events.append({"name": "thread_name", "ph": "M", "pid": replica, "tid": S + stage,
                           "args": {"name": f"stage {stage} comm thread (rank {r})"}})
        for k, step_times in enumerate(rank_times):
            for op, (a, b) in zip(ops, step_times):
                tid = S + stage if grid.zero == 3 and op.kind in pipeline.COLLECTIVES else stage
                events.append({"name": pipeline.label(op), "cat": pipeline.NAMES[op.kind], "ph": "X",
                               "pid": replica, "tid": tid, "ts": (a - t0) * 1e6, "dur": (b - a) * 1e6,
                               "args": {"step": k + 1, "micro_batch": op.mb, "rank": r}})
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)
    os.replace(tmp, path)


def report_traffic(stage: Stage, steps: int, say) -> None:
    """Per rank: the payload bytes it moved per step, by kind, what the stage
    allocated (stage_memory_bytes) and its peak resident memory. Formulas, in
    values (4 bytes each in fp32): the pipeline moves 2*b*T*C per stage
    boundary per micro-batch (an activation down, its gradient up), the tied
    swap Vp*C each way, an all-reduce 2(D-1)/D*P (P the stage's parameters),
    --zero 1's reduce-scatter plus all-gather as much, --zero 3 sum over
    buckets b of (gathers of b + 1)(D-1)/D*P_b (3(D-1)/D*P for layers gathered
    twice, forward and backward, in a one-micro-batch step)."""
    moved = stage.model.bytes_moved()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    memory = stage.model.memory_bytes()
    blobs = stage.ctx.gather_blobs(json.dumps({"moved": moved, "peak_mib": peak_mib, "memory": memory}).encode(),
                                   pipeline.MAX_SMALL)  # a few named counts
    if blobs is None or steps < 1:
        return
    S = stage.ctx.stages
    for r, blob in enumerate(blobs):
        got = json.loads(blob)
        per_step = {k: [v // steps for v in sent_received] for k, sent_received in got["moved"].items()}
        say(f"traffic per step: rank {r} (stage {r % S}, replica {r // S}): "
            + " | ".join(f"{k.replace('_', '-')} sent {v[0]} B received {v[1]} B" for k, v in per_step.items())
            + f" | peak RSS {got['peak_mib']:.0f} MiB | allocated "
            + " ".join(f"{k.replace('_', '-')} {v / 2**20:.1f}" for k, v in got["memory"].items()) + " MiB")


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
    stages_given = args.stages is not None
    ctx, errors = None, (UsageError,)
    try:
        check_grid_flags(args)
        gpt = load_trainer(args)
        errors = (gpt.GPTError, ValueError, OSError, TrainingError)
        env = pipeline.env_from(os.environ)
        if env is None and args.stages * args.dp > 1:
            # bad flags and data fail here, once, before any rank starts, and the grid's plan is made
            plan = make_plan(args, gpt, claim=True)
            grid = make_grid_plan(args, plan.config)
            if plan.lock is not None:
                os.close(plan.lock)  # rank 0 claims the directory for the run
            del plan  # and the ranks read the data
            return pipeline.launch(argv, args.stages * args.dp, os.path.abspath(__file__),
                                   env={"GPT_PLAN": json.dumps(asdict(grid))})
        if env is not None:
            if not stages_given:
                args.stages = max(1, env.world // max(1, args.dp))
            if args.stages * args.dp != env.world:
                raise UsageError(f"WORLD_SIZE {env.world} is not --stages {args.stages} x --dp {args.dp} ranks")
            ctx = pipeline.connect_ranks(env, args.bind, args.peer_timeout, args.advertise, args.stages)
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
