"""
Train a GPT-2 on the CPU (or GPU), the llm.c way: python says what runs when,
C does the math.

    python train.py                      # tiny model on Shakespeare, a few minutes on 2 cores
    python train.py --model d12 --steps 1000 --checkpoint-dir runs/d12
    python train.py --help

Each optimizer step the stage runs an op list (FWD, BWD_INPUT, BWD_WEIGHT per
micro-batch) in C, then we clip the gradient by its global norm and take an
AdamW step. One line per step; validation loss at intervals; a sample at the end.
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from dev.data.prepare import decode, prepare, read_tokenizer

EOT = 50256
VAL_BATCHES = 10
WEIGHT_DECAY = 0.1
MAX_GRAD_NORM = 1.0
MIN_LR_FRAC = 0.1


class UsageError(Exception):
    """Bad flags or input: reported as one line and exit status 2."""


# -----------------------------------------------------------------------------
# flags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train GPT-2 from scratch (llm.c-style C trainer, numpy-free hot loop).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="preset: tiny (L4 C128, the CPU default), d6, d8, d12 (GPT-2 124M), d24, d36, d48")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start from an llm.c model file (version 3 fp32 or 5 bf16) instead of a fresh init")
    p.add_argument("--data", default="shakespeare",
                   help="shakespeare (offline, prepared on first use), tinyshakespeare (downloads), "
                        "or a glob of llm.c train shards")
    p.add_argument("--val-data", default=None, help="glob of llm.c val shards (with a --data glob)")
    p.add_argument("--data-dir", default="data", help="where prepared data lives")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--micro-batches", type=int, default=1,
                   help="split each step's batch into this many micro-batches (gradient accumulation)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=20, help="linear warmup steps, then cosine decay to lr/10")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (0: never)")
    p.add_argument("--sample-tokens", type=int, default=128, help="tokens to generate at the end (0: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens")
    p.add_argument("--checkpoint-dir", default=None, help="write checkpoints here (llm.c model file + state)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="checkpoint every N steps (0: only at the end, if --checkpoint-dir is set)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--seed", type=int, default=1337, help="init and sampling seed")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    return p.parse_args(argv)


@dataclass
class Plan:
    """What the flags add up to, checked before anything is built or written."""
    config: dict
    micro_batch: int        # sequences per micro-batch
    train_pattern: str
    val_pattern: str | None
    tokenizer: str | None


def make_plan(args: argparse.Namespace, gpt) -> Plan:
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
    for flag in ("steps", "warmup", "eval_every", "sample_tokens", "checkpoint_every", "threads"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must not be negative")
    if args.resume and not args.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir")
    if args.checkpoint_dir:
        check_writable(args.checkpoint_dir)
    if args.data in ("shakespeare", "tinyshakespeare"):
        files = prepare(args.data_dir, args.data, progress=True)
        return Plan(config, args.batch_size // args.micro_batches, files.train, files.val, files.tokenizer)
    tokenizer = os.path.join(args.data_dir, "gpt2_tokenizer.bin")
    return Plan(config, args.batch_size // args.micro_batches, args.data, args.val_data,
                tokenizer if os.path.exists(tokenizer) else None)


def check_writable(directory: str) -> None:
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".probe.{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--checkpoint-dir {directory}: not writable ({e.strerror})") from None


# -----------------------------------------------------------------------------
# training


def step_ops(gpt, micro: int) -> np.ndarray:
    """One stage's op list: forward, input backward, weight backward per micro-batch."""
    return np.array([(k, mb) for mb in range(micro) for k in (gpt.FWD, gpt.BWD_INPUT, gpt.BWD_WEIGHT)])


def next_batch(loader, micro: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*(loader.next() for _ in range(micro)))
    return np.stack(xs), np.stack(ys)


def validation_loss(gpt, model, pattern: str, B: int, T: int) -> float:
    val = gpt.Loader(pattern, B, T)
    x, y = next_batch(val, VAL_BATCHES)
    ops = np.array([(gpt.FWD, mb) for mb in range(VAL_BATCHES)])
    return model.run(ops, x, y, training=False) / VAL_BATCHES


def save_checkpoint(gpt, model, directory: str, step: int, loader) -> None:
    shard, pos = loader.position
    model.write_checkpoint(directory, step, shard, pos)
    gpt.commit_checkpoint(directory, step)


def train(args: argparse.Namespace, gpt) -> None:
    plan = make_plan(args, gpt)
    cfg, B, T, m = plan.config, plan.micro_batch, args.seq_len, args.micro_batches
    gpt.set_threads(args.threads)
    model = gpt.Model(cfg, 0, cfg["num_layers"], B, T, 1)
    loader = gpt.Loader(plan.train_pattern, B, T)
    start = 0
    if args.resume:
        last = gpt.checkpoint_latest_step(args.checkpoint_dir)
        if last < 0:
            raise UsageError(f"--resume: no finished checkpoint in {args.checkpoint_dir}")
        start, shard, pos = model.read_checkpoint(args.checkpoint_dir, last)
        loader.position = (shard, pos)
        print(f"resumed from {args.checkpoint_dir} at step {start}")
    elif args.init_from:
        model.load(args.init_from)
    else:
        model.init(args.seed)
    nparams = sum(p.size for p in model.params().values())
    print(f"model L={cfg['num_layers']} NH={cfg['num_heads']} C={cfg['channels']} ({nparams / 1e6:.1f}M params) | "
          f"batch {args.batch_size} x {T} tokens in {m} micro-batch(es) | {args.steps} steps")
    ops = step_ops(gpt, m)
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        x, y = next_batch(loader, m)
        loss = model.run(ops, x, y) / m
        model.sum_wte_grads()
        norm = gpt.norm_from_parts(model.grad_norm_parts(), cfg["num_layers"])
        lr = gpt.lr_at(step, args.lr, args.warmup, args.steps, MIN_LR_FRAC)
        model.adamw(lr, WEIGHT_DECAY, MAX_GRAD_NORM / norm if norm > MAX_GRAD_NORM else 1.0, step + 1)
        dt = time.perf_counter() - t0
        print(f"step {step + 1}/{args.steps} | loss {loss:.6f} | lr {lr:.2e} | norm {norm:.4f} | "
              f"{dt * 1e3:.0f} ms | {args.batch_size * T / dt:.0f} tok/s", flush=True)
        done = step + 1 == args.steps
        if plan.val_pattern and args.eval_every and ((step + 1) % args.eval_every == 0 or done):
            print(f"val loss {validation_loss(gpt, model, plan.val_pattern, B, T):.6f}", flush=True)
        if args.checkpoint_dir and ((args.checkpoint_every and (step + 1) % args.checkpoint_every == 0) or done):
            save_checkpoint(gpt, model, args.checkpoint_dir, step + 1, loader)
    if args.sample_tokens:
        out = model.sample(np.array([EOT]), args.sample_tokens, args.temperature, args.top_k, args.seed)
        text = decode(read_tokenizer(plan.tokenizer), out[1:]) if plan.tokenizer else " ".join(map(str, out[1:]))
        print("sample:\n" + text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import gpt
    try:
        train(args, gpt)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (gpt.GPTError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
