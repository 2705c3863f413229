"""
A model of one training step at any scale. For every way to lay a job out on
the GPUs (data parallel, FSDP, a pipeline with each schedule, and a pipeline
of data-parallel or FSDP groups) it gives the step time split into compute,
exposed communication and bubble, the memory per GPU and whether it fits,
tokens/s per GPU, and the best layout:

    python3 pipeline.py plan --model gpt3-175b --gpus 1024 --gpu a100 --batch 1536 --seq-len 2048 --tp 8

The step is the executor's, played on a model of the machine:
- compute: one cost formula per layer (pipeline.stage_costs, forward FLOPs
  per token of the embedding, a layer and the LM head, summed over a stage
  by pipeline.range_cost), at the GPU's bf16
  peak times the fraction a matmul-bound kernel achieves; each backward half
  (input, weight) costs as much as the forward (the 6 x params x tokens rule);
- the pipeline: pipeline.schedule's op lists, played by pipeline.simulate
  (sends block both ends, as in the executor), with pipeline.validate's peak
  of held micro-batches as the activation memory;
- collectives: the alpha-beta ring model below; data parallelism's
  all-reduce per bucket after the backward, FSDP's gathers and
  reduce-scatters where pipeline.fsdp_ops puts them (fsdp_comm), hidden
  behind compute or not (Cluster.overlap: a GPU's collectives have their own
  stream; the executor runs --zero 3's on a comm thread and the rest in the
  op list: EXECUTOR_OVERLAP);
- then, as in train.py, the tied embedding's gradients swap between the
  first and the last stage, every rank agrees on the grad norm (a barrier),
  and AdamW runs on what each rank owns.
Tensor parallelism is not in this trainer: --tp is modelled, not
implemented (see flop_costs and tp_comm), so that published layouts that use
it can be compared.
"""

import argparse
import math
import sys
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import NamedTuple

import pipeline


class PlanError(ValueError):
    """Bad input to the plan: one line naming the constraint."""

# -----------------------------------------------------------------------------
# models: the trainer's presets, GPT-3's shapes, and two published giants


# Brown et al. 2020 (arXiv 2005.14165), Table 2.1: layers, d_model, heads; context 2048.
# The table prints d_model 5140 for 13B, which its 40 heads of 128 do not divide: 5120.
GPT3 = {"gpt3-125m": (12, 768, 12), "gpt3-350m": (24, 1024, 16), "gpt3-760m": (24, 1536, 16),
        "gpt3-1.3b": (24, 2048, 24), "gpt3-2.7b": (32, 2560, 32), "gpt3-6.7b": (32, 4096, 32),
        "gpt3-13b": (40, 5120, 40), "gpt3-175b": (96, 12288, 96)}
# Megatron-Turing NLG 530B (as in arXiv 2104.04473, Table 1) and Llama 3 405B
# (arXiv 2407.21783): layers, d_model, heads, vocabulary, tied embeddings, context.
# Llama's SwiGLU FFN (53248) and 8 KV heads are approximated by GPT-2's layer:
# its matmuls are 23.75 C^2 FLOPs per token against GPT-2's 24 C^2, its
# parameters 11.9 C^2 against 12 C^2, so both within 1.1%.
OTHERS = {"mt-nlg-530b": (105, 20480, 128, 50257, True, 2048),
          "llama3-405b": (126, 16384, 128, 128256, False, 8192)}


def model_config(name: str) -> dict:
    """The shape of a named model, in gpt.config_from_name's keys plus `tied`."""
    def shape(L, C, NH, V=50257, tied=True, T=2048):
        return dict(max_seq_len=T, vocab_size=V, padded_vocab_size=-(-V // 128) * 128,
                    num_layers=L, num_heads=NH, channels=C, tied=tied)
    if name in GPT3:
        return shape(*GPT3[name])
    if name in OTHERS:
        return shape(*OTHERS[name])
    try:
        import gpt
        return dict(gpt.config_from_name(name), tied=True)
    except ImportError:
        raise PlanError(f"--model {name}: the trainer's presets need the built binding (make)") from None
    except gpt.GPTError:
        raise PlanError(f"--model {name}: expected a preset (tiny, d6, d8, d12, d24, d36, d48) or one of "
                        f"{', '.join([*GPT3, *OTHERS])}") from None


def layer_params(cfg: dict) -> int:
    C = cfg["channels"]
    return 12 * C * C + 13 * C  # qkv 3C^2+3C, proj C^2+C, fc 4C^2+4C, fcproj 4C^2+C, two layernorms 4C


def end_params(cfg: dict, lo: int, hi: int) -> tuple[int, int]:
    """Parameters of the embeddings a stage owns (the first) and of its head
    (the last: the final layernorm and the LM head, a copy of wte when tied)."""
    C, Vp, L = cfg["channels"], cfg["padded_vocab_size"], cfg["num_layers"]
    embed = Vp * C + cfg["max_seq_len"] * C if lo == 0 else 0
    head = 2 * C + (Vp * C if (lo > 0 or not cfg["tied"]) else 0) if hi == L else 0
    return embed, head


def stage_params(cfg: dict, lo: int, hi: int) -> int:
    return (hi - lo) * layer_params(cfg) + sum(end_params(cfg, lo, hi))


def stage_buckets(cfg: dict, lo: int, hi: int) -> tuple[list[int], int]:
    """Parameters of each bucket of a stage's data-parallel collectives
    (pipeline.data_parallel_ops, fsdp_ops): each layer alone, and the stage's
    whole tensors (the embedding on the first stage, the final layernorm and
    the head on the last), which --zero 3 gathers once and holds for the step."""
    return [layer_params(cfg)] * (hi - lo), sum(end_params(cfg, lo, hi))


def model_params(cfg: dict) -> int:
    return stage_params(cfg, 0, cfg["num_layers"])

# -----------------------------------------------------------------------------
# the machine


class Link(NamedTuple):
    bandwidth: float  # bytes/s, each direction
    latency: float    # seconds per message (alpha)


@dataclass(frozen=True)
class Precision:
    """Bytes per value of what the trainer keeps. The CUDA trainer: bf16
    activations and matmul weights, fp32 master weights, gradients and AdamW
    moments (train_gpt.cu's header); the CPU trainer: fp32 throughout."""
    activation: int = 2
    weights: int = 2 + 4     # the bf16 copy the matmuls read + the fp32 master
    gradient: int = 4
    optimizer: int = 4 + 4   # AdamW m and v
    gathered: int = 2        # what FSDP gathers: the matmuls' copy


GPU_BYTES = Precision()
CPU_BYTES = Precision(activation=4, weights=4, gradient=4, optimizer=8, gathered=4)


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpus_per_node: int
    intra: Link             # inside a node (NVLink), per GPU
    inter: Link             # between nodes (InfiniBand / RoCE), per GPU
    flops: float            # peak dense bf16 FLOP/s per GPU
    achieved: float         # the fraction of it the matmuls reach
    memory: float           # bytes per GPU
    hbm: float              # bytes/s per GPU, for the optimizer step
    overlap: str = "all"    # which collectives overlap compute: one of OVERLAPS
    precision: Precision = GPU_BYTES
    # the share of a collective's time that its copies take from the compute
    # it overlaps: 0 where a NIC or NVLink moves the bytes; on the CPU executor,
    # whose socket copies run on the cores that compute, up to 1 (fsdp_comm)
    comm_cpu: float = 0.0


# Datasheet figures: dense bf16 peak, memory, HBM bandwidth, NVLink per direction.
# Between nodes one NIC per GPU: 200 Gb/s HDR on an A100 (Selene), 400 Gb/s on
# an H100. Latencies are typical NCCL per-message costs, assumed, not measured.
GPUS = {"a100": dict(flops=312e12, memory_gib=80, hbm_gbs=2039, nvlink_gbps=2400, nic_gbps=200),
        "h100": dict(flops=989e12, memory_gib=80, hbm_gbs=3350, nvlink_gbps=3600, nic_gbps=400)}


def link(gbps: float, latency_us: float) -> Link:
    return Link(gbps * 1e9 / 8, latency_us * 1e-6)

# -----------------------------------------------------------------------------
# collectives: the alpha-beta ring model
#
# A message of n bytes over a link of bandwidth B and latency alpha takes
# alpha + n/B. A ring of g ranks passes g-1 chunks of n/g bytes for a
# reduce-scatter or an all-gather, and 2(g-1) for an all-reduce (a
# reduce-scatter, then an all-gather), every rank sending and receiving at
# once, so with n the whole buffer:
#     reduce-scatter, all-gather: (g-1)/g * n/B + (g-1) alpha
#     all-reduce:                2(g-1)/g * n/B + 2(g-1) alpha
# A ring is as fast as its slowest link: a group inside one node runs at
# NVLink speed, one that spans nodes at the NIC's (every GPU has its own).


def p2p(nbytes: float, via: Link) -> float:
    return via.latency + nbytes / via.bandwidth


def all_reduce(nbytes: float, g: int, via: Link) -> float:
    return 0.0 if g == 1 else 2 * (g - 1) / g * nbytes / via.bandwidth + 2 * (g - 1) * via.latency


def all_gather(nbytes: float, g: int, via: Link) -> float:
    return 0.0 if g == 1 else (g - 1) / g * nbytes / via.bandwidth + (g - 1) * via.latency


reduce_scatter = all_gather


def group_link(cluster: Cluster, size: int, stride: int) -> Link:
    """The link a group of `size` ranks, `stride` apart in rank order, runs at."""
    return cluster.intra if size * stride <= cluster.gpus_per_node else cluster.inter

# -----------------------------------------------------------------------------
# layouts


@dataclass(frozen=True)
class Batch:
    sequences: int  # global batch, per optimizer step
    micro: int      # sequences per micro-batch
    seq_len: int


@dataclass(frozen=True)
class Layout:
    stages: int           # S: pipeline stages
    dp: int               # D: replicas of the pipeline
    zero: int             # 0: gradients all-reduced; 3: FSDP, everything sharded over the D replicas
    schedule: str = "1f1b"
    tp: int = 1           # tensor parallel (modelled, not implemented)
    dp_inner: bool = True  # rank order: tp, then dp, then pp (else tp, pp, dp)

    @property
    def name(self) -> str:
        dp = "FSDP" if self.zero == 3 else "DP"
        name = dp if self.stages == 1 else "PP" if self.dp == 1 else f"PP x {dp}"
        return name + (f" x TP{self.tp}" if self.tp > 1 else "")

    def strides(self) -> tuple[int, int]:
        """Rank distance between neighbours of a data-parallel group and of a pipeline."""
        if self.dp_inner:
            return self.tp, self.tp * self.dp
        return self.tp * self.stages, self.tp

# -----------------------------------------------------------------------------
# costs of one micro-batch


@dataclass(frozen=True)
class OpCosts:
    """Seconds per sequence for the (embedding, one layer, LM head) in each
    of FWD, BWD_INPUT, BWD_WEIGHT, and the optimizer's seconds per parameter.
    From FLOPs for a cluster (flop_costs), or measured (the bench)."""
    f: tuple[float, float, float]
    b: tuple[float, float, float]
    w: tuple[float, float, float]
    optimizer: float

    def stage(self, cfg: dict, lo: int, hi: int, micro: int) -> tuple[float, float, float]:
        """Seconds of a micro-batch of `micro` sequences on layers [lo, hi)."""
        L = cfg["num_layers"]
        return tuple(micro * pipeline.range_cost(parts, L, lo, hi) for parts in (self.f, self.b, self.w))


# AdamW reads master, m, v, gradient and writes master, m, v and the bf16 copy
ADAMW_BYTES = 4 * 4 + 3 * 4 + 2


def flop_costs(cfg: dict, batch: Batch, cluster: Cluster, tp: int = 1) -> OpCosts:
    """Costs from pipeline.stage_costs' FLOPs per token at the achieved rate;
    tensor parallelism splits each layer's and the head's matmuls tp ways."""
    rate = cluster.flops * cluster.achieved * tp
    f = tuple(c * batch.seq_len / rate for c in pipeline.stage_costs(cfg, batch.seq_len))
    return OpCosts(f, f, f, ADAMW_BYTES / cluster.hbm)


def tp_comm(cfg: dict, batch: Batch, cluster: Cluster, tp: int) -> float:
    """Megatron-style tensor parallelism, modelled: per layer and micro-batch
    two all-reduces of the (b,T,C) activations in the forward and two in the
    backward, inside a node, not overlapped. Seconds per layer per pass."""
    nbytes = batch.micro * batch.seq_len * cfg["channels"] * cluster.precision.activation
    return 2 * all_reduce(nbytes, tp, cluster.intra)


def activations_bytes(cfg: dict, lo: int, hi: int, batch: Batch, precision: Precision, tp: int = 1) -> float:
    """One micro-batch's activation buffer on a stage, as train_gpt.cu's
    activations_pieces lays it out: per layer 16C values kept for the backward
    (ln1, qkv, atty, res2, ln2, fch, fch_gelu, res3) and 11C of their
    gradients, plus fp32 layernorm statistics and the attention's logsumexp;
    the stage's input and d(output); on the first stage the input tokens and
    the embedding backward's three index arrays (at most one int a token
    each); on the last the final layernorm, its gradient and statistics, the
    logits, the losses and the targets. Tensor parallelism divides it by tp
    (modelled)."""
    C, NH, Vp, L = cfg["channels"], cfg["num_heads"], cfg["padded_vocab_size"], cfg["num_layers"]
    BT, a = batch.micro * batch.seq_len, precision.activation
    per_layer = BT * (27 * C * a + (4 + NH) * 4)
    n = (hi - lo) * per_layer + BT * 2 * C * a + BT * (4 * 4 * (lo == 0))
    if hi == L:
        n += BT * (2 * C * a + 2 * 4 + Vp * a + 4 + 4)
    return n / tp

# -----------------------------------------------------------------------------
# one layout's step


@dataclass
class Memory:
    """Bytes per GPU on its fullest rank."""
    weights: float
    gradients: float
    optimizer: float
    activations: float
    gathered: float = 0.0  # FSDP: the whole bucket and the layers gathered at once, with their full gradients

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.gathered


@dataclass
class StepPlan:
    layout: Layout
    micro_batches: int  # per replica per step
    micro: int          # sequences in each
    compute: float      # the busiest rank's forwards, backwards and optimizer
    comm: float         # what communication adds to the step
    bubble: float       # idle time that remains when communication is free
    memory: Memory
    fits: bool
    tokens_per_gpu: float
    flops_per_gpu: float  # model FLOPs/s per GPU (3 x forward)

    @property
    def step(self) -> float:
        return self.compute + self.comm + self.bubble


@lru_cache(maxsize=256)
def _schedule(name: str, S: int, m: int):
    ops = pipeline.schedule(name, S, m)
    return ops, pipeline.validate(ops, m).peak_held


@lru_cache(maxsize=256)
def _partition(cfg: tuple, S: int, T: int) -> list[tuple[int, int]]:
    return pipeline.partition(dict(cfg), S, T)


@lru_cache(maxsize=4096)
def _rank_ends(name: str, S: int, m: int, f: tuple, b: tuple, w: tuple, comm: float) -> tuple[float, ...]:
    """When each rank's last op ends (layouts that differ only off the pipeline share a simulation)."""
    timeline = pipeline.simulate(_schedule(name, S, m)[0], pipeline.Costs(list(f), list(b), list(w), comm))
    return tuple(row[-1].end if row else 0.0 for row in timeline.rows)


class FsdpComm(NamedTuple):
    """FSDP's exposed communication on a rank, in seconds: added to each
    micro-batch's forward and input backward, and once per step (the weight
    backward needs no parameters)."""
    f: float
    b: float
    step: float


def beside_compute(t: float, compute: float, comm_cpu: float) -> float:
    """What a transfer of t seconds run beside compute of `compute` seconds
    adds to the step: what sticks out, and the share of the core its copies
    take from the compute (Cluster.comm_cpu)."""
    return max(0.0, t - compute) + comm_cpu * min(t, compute)


def fsdp_comm(layers: list[tuple[float, float, float, float]], whole: float, link: Link, D: int,
              precision: Precision, overlap: bool, comm_cpu: float = 0.0) -> FsdpComm:
    """The executor's --zero 3 step (pipeline.fsdp_ops), layers = (params, f,
    b, w) of each of the stage's layers in forward order, whole = the whole
    tensors' bucket: per micro-batch every layer is gathered before its
    forward and again before its input backward (BWD_WEIGHT needs only
    activations and gradients); once per step the whole bucket is gathered
    (at the start, held to the end) and every bucket reduce-scattered (a
    layer's after its last weight backward, the whole one last), since the
    full gradients accumulate over the step's micro-batches.

    overlap says how the executor runs them. False: every
    collective blocks its rank, so all of it is exposed (the CPU executor
    before its comm thread). True, a prefetch (EXECUTOR_OVERLAP): the gather of
    the next layer runs during the compute of this one (up in the forward,
    down in the input backward), and a layer's reduce-scatter during the weight
    backward of the layer below it; the first gather of each pass, the last
    reduce-scatter and the whole bucket have nothing to hide behind. A
    transfer of t seconds hidden behind compute of c still costs the compute
    comm_cpu * min(t, c): the share of it that its copies take of the core."""
    gather = [all_gather(p * precision.gathered, D, link) for p, *_ in layers]
    scatter = [reduce_scatter(p * precision.gradient, D, link) for p, *_ in layers]
    once = all_gather(whole * precision.gathered, D, link) + reduce_scatter(whole * precision.gradient, D, link)
    if not overlap:
        return FsdpComm(sum(gather), sum(gather), once + sum(scatter))
    n = len(layers)
    fwd = gather[0] + sum(beside_compute(gather[i + 1], layers[i][1], comm_cpu) for i in range(n - 1))
    bwd = gather[-1] + sum(beside_compute(gather[i - 1], layers[i][2], comm_cpu) for i in range(1, n))
    scattered = scatter[0] + sum(beside_compute(scatter[i], layers[i - 1][3], comm_cpu) for i in range(1, n))
    return FsdpComm(fwd, bwd, once + scattered)


# Which collectives run beside the compute (Cluster.overlap). "all": each has
# a stream of its own, as NCCL's on a GPU cluster, so data parallelism's
# all-reduce hides behind the last weight backward and FSDP prefetches.
# "fsdp": the executor (common.h, both trainers), which runs --zero 3's on a
# comm thread per rank, in op-list order, with each layer's gather placed one layer
# early (pipeline.fsdp_ops), so the compute waits only for its own layer's
# gather; its --zero 0 all-reduces run in the op list, after the whole-stage
# backward that makes every bucket's gradient at once, so they hide behind
# nothing. "none": every collective blocks its rank. The bench
# (dev/bench/bench_crossover.py) models this machine with EXECUTOR_OVERLAP.
OVERLAPS = ("all", "fsdp", "none")
EXECUTOR_OVERLAP = "fsdp"


def fsdp_buffers(layers: int, micro_batches: int, overlap: bool) -> tuple[int, int]:
    """Layers whose whole parameters and whole gradients a --zero 3 rank holds
    at once beside the whole bucket (the validator's peak_gathered and
    peak_grads): one gathered layer, two with a prefetch; a layer's full
    gradient lives from its first weight backward to its reduce-scatter after
    the last, so with more than one micro-batch every layer's at once, and
    with one, two when the reduce-scatter of a layer overlaps the weight
    backward of the next."""
    one = min(layers, 2 if overlap else 1)
    return one, layers if micro_batches > 1 else one


def evaluate(cfg: dict, cluster: Cluster, batch: Batch, layout: Layout, costs: OpCosts) -> StepPlan:
    """The step of one layout: played once as it is and once with free
    communication, so that comm = what communication adds, and bubble = what
    is idle even then."""
    S, D, tp, L = layout.stages, layout.dp, layout.tp, cfg["num_layers"]
    m = check_layout(cfg, cluster, batch, layout)
    peak = _schedule(layout.schedule, S, m)[1]
    bounds = _partition(tuple(cfg.items()), S, batch.seq_len)
    dp_stride, pp_stride = layout.strides()
    dp_link, pp_link = group_link(cluster, D, dp_stride), group_link(cluster, S, pp_stride)
    bytes_ = cluster.precision
    owned = [stage_params(cfg, lo, hi) / tp for lo, hi in bounds]  # parameters per rank
    shard = [p / D if layout.zero == 3 else p for p in owned]       # what its optimizer updates

    def finish(free: bool) -> tuple[float, list[float]]:
        f, b, w, once = [], [], [], []  # per rank: each micro-batch's op times, and what it adds once per step
        for lo, hi in bounds:
            fr, br, wr = costs.stage(cfg, lo, hi, batch.micro)
            extra = 0.0
            if not free and tp > 1:
                t = (hi - lo) * tp_comm(cfg, batch, cluster, tp)
                fr, br = fr + t, br + t
            if not free and layout.zero == 3 and D > 1:
                layer_sizes, whole = stage_buckets(cfg, lo, hi)
                layers = [(p / tp, *costs.stage(cfg, l, l + 1, batch.micro))
                          for l, p in zip(range(lo, hi), layer_sizes)]
                exposed = fsdp_comm(layers, whole / tp, dp_link, D, bytes_, cluster.overlap != "none",
                                    cluster.comm_cpu)
                fr, br, extra = fr + exposed.f, br + exposed.b, exposed.step
            if not free and layout.zero == 0 and D > 1:  # an all-reduce per bucket (layer, whole), after the backward
                layer_sizes, whole = stage_buckets(cfg, lo, hi)
                t = sum(all_reduce(p / tp * bytes_.gradient, D, dp_link) for p in [*layer_sizes, whole])
                # hidden by the last weight backward
                extra = beside_compute(t, wr, cluster.comm_cpu) if cluster.overlap == "all" else t
            f.append(fr), b.append(br), w.append(wr), once.append(extra)
        act = batch.micro * batch.seq_len * cfg["channels"] * bytes_.activation / tp
        ends = []
        comm = 0.0 if free else p2p(act, pp_link)
        for r, end in enumerate(_rank_ends(layout.schedule, S, m, tuple(f), tuple(b), tuple(w), comm)):
            if not free and S > 1 and cfg["tied"] and r in (0, S - 1):  # the tied d(wte) swap
                end += p2p(cfg["padded_vocab_size"] * cfg["channels"] * bytes_.gradient / tp, pp_link)
            ends.append(end + once[r])
        busy = [m * sum(costs.stage(cfg, lo, hi, batch.micro)) for lo, hi in bounds]
        return max(ends) + max(s * costs.optimizer for s in shard), busy

    step, _ = finish(free=False)
    step_free, busy = finish(free=True)
    compute = max(bz + s * costs.optimizer for bz, s in zip(busy, shard))

    def memory(r: int) -> Memory:
        lo, hi = bounds[r]
        part = 1 / D if layout.zero == 3 else 1
        gathered = 0.0
        if layout.zero == 3 and D > 1:  # the whole bucket and the layers gathered, their whole gradients
            layer_sizes, whole = stage_buckets(cfg, lo, hi)
            params, grads = fsdp_buffers(hi - lo, m, cluster.overlap != "none")
            gathered = ((whole + params * layer_sizes[0]) * bytes_.gathered
                        + (whole + grads * layer_sizes[0]) * bytes_.gradient) / tp
        return Memory(owned[r] * bytes_.weights * part, owned[r] * bytes_.gradient * part,
                      owned[r] * bytes_.optimizer * part,
                      peak[r] * activations_bytes(cfg, lo, hi, batch, bytes_, tp), gathered)
    worst = max((memory(r) for r in range(S)), key=lambda mem: mem.total)
    tokens = batch.sequences * batch.seq_len
    model_flops = 3 * tokens * pipeline.range_cost(pipeline.stage_costs(cfg, batch.seq_len), L, 0, L)
    return StepPlan(layout, m, batch.micro, compute, step - step_free, step_free - compute, worst,
                    worst.total <= cluster.memory, tokens / step / cluster.gpus, model_flops / step / cluster.gpus)


def check_layout(cfg: dict, cluster: Cluster, batch: Batch, layout: Layout) -> int:
    """Micro-batches per replica, or a PlanError naming the broken constraint."""
    S, D, tp, L = layout.stages, layout.dp, layout.tp, cfg["num_layers"]
    if S * D * tp != cluster.gpus:
        raise PlanError(f"{S} stages x {D} replicas x TP {tp} = {S * D * tp} GPUs, but --gpus is {cluster.gpus}")
    if not 1 <= S <= L:
        raise PlanError(f"{S} stages: a stage needs at least one of the model's {L} layers")
    if cluster.gpus_per_node % tp:
        raise PlanError(f"--tp {tp}: must divide --gpus-per-node {cluster.gpus_per_node} (TP stays inside a node)")
    if batch.sequences % (D * batch.micro):
        raise PlanError(f"--batch {batch.sequences}: does not divide into {D} replicas x micro-batches of "
                        f"{batch.micro}")
    if cluster.overlap not in OVERLAPS:
        raise PlanError(f"overlap {cluster.overlap!r}: expected one of {', '.join(OVERLAPS)}")
    if layout.zero not in (0, 3) or layout.schedule not in pipeline.SCHEDULES:
        raise PlanError(f"zero {layout.zero}, schedule {layout.schedule}: expected zero 0 or 3 and one of "
                        f"{', '.join(pipeline.SCHEDULES)}")
    return batch.sequences // (D * batch.micro)

# -----------------------------------------------------------------------------
# every layout, and the best


def layouts(cfg: dict, cluster: Cluster, batch: Batch, tp: int = 1, stages: int | None = None) -> list[list[Layout]]:
    """The candidates of each row: DP, FSDP, PP with each schedule, PP x DP,
    PP x FSDP (every stage count that divides the GPUs, both rank orders, and
    1F1B or ZB-H1: GPipe's step is 1F1B's, with more memory held)."""
    n = cluster.gpus // tp
    counts = [s for s in range(2, min(n, cfg["num_layers"]) + 1) if n % s == 0]
    if stages is not None:
        counts = [stages]
    rows = [[Layout(1, n, 0, tp=tp)], [Layout(1, n, 3, tp=tp)]]
    rows += [[Layout(n, 1, 0, s, tp)] for s in pipeline.SCHEDULES]
    for zero in (0, 3):
        rows.append([Layout(S, n // S, zero, s, tp, inner) for S in counts if S < n
                     for s in ("1f1b", "zb-h1") for inner in (True, False)])
    return rows


@dataclass
class Row:
    candidates: list[Layout]
    best: StepPlan | None = None
    why_not: str = ""  # when no candidate is possible


def plan(cfg: dict, cluster: Cluster, batch: Batch, tp: int = 1, stages: int | None = None,
         costs: OpCosts | None = None) -> list[Row]:
    """One row per layout with its best candidate (the fastest that fits, else the smallest)."""
    if stages is not None:
        if cluster.gpus % (stages * tp):
            raise PlanError(f"--stages {stages}: does not divide the {cluster.gpus} GPUs (with TP {tp})")
        if not 1 <= stages <= cfg["num_layers"]:
            raise PlanError(f"--stages {stages}: must be between 1 and the model's {cfg['num_layers']} layers")
    if cluster.gpus % tp:
        raise PlanError(f"--tp {tp}: does not divide the {cluster.gpus} GPUs")
    costs = costs or flop_costs(cfg, batch, cluster, tp)
    rows = []
    for candidates in layouts(cfg, cluster, batch, tp, stages):
        row = Row(candidates)
        results = []
        for layout in candidates:
            for micro in micro_batches(batch, layout):
                try:
                    results.append(evaluate(cfg, cluster, replace(batch, micro=micro), layout, costs))
                except PlanError as e:
                    row.why_not = row.why_not or str(e)
        if results:
            row.best = min(results, key=lambda p: (not p.fits, p.step if p.fits else p.memory.total))
        elif not candidates:
            row.why_not = "no stage count between 2 and the layers divides the GPUs into a pipeline and replicas"
        rows.append(row)
    if not any(r.best and r.best.fits for r in rows):
        smallest = min((r.best for r in rows if r.best), key=lambda p: p.memory.total, default=None)
        if smallest is None:
            raise PlanError(f"no layout is possible: {rows[0].why_not}")
        raise PlanError(f"fits nowhere: the smallest layout ({describe(smallest.layout)}) needs "
                        f"{smallest.memory.total / 2**30:.1f} GiB per GPU, more than --memory-gib "
                        f"{cluster.memory / 2**30:g}")
    return rows


def micro_batches(batch: Batch, layout: Layout) -> list[int]:
    """The micro-batch sizes to try: --micro when given; else 1 for a
    pipeline (the more micro-batches, the smaller its bubble), and for DP and
    FSDP every size that divides a replica's batch (FSDP gathers every layer
    twice per micro-batch, so fewer are faster, if their activations fit)."""
    if batch.micro:
        return [batch.micro]
    if layout.stages > 1 or batch.sequences % layout.dp:
        return [1]
    per_replica = batch.sequences // layout.dp
    return [b for b in range(1, per_replica + 1) if per_replica % b == 0]


def describe(layout: Layout) -> str:
    sched = f" {layout.schedule}" if layout.stages > 1 else ""
    return f"{layout.name}: S {layout.stages} x D {layout.dp}{sched}"


def table(rows: list[Row]) -> str:
    gib = 2 ** 30
    head = (f"{'layout':<16}{'S':>5}{'D':>6}{' sched':<7}{'m x b':>8}{'step s':>9}{'compute':>9}{'comm':>8}"
            f"{'bubble':>8}  {'GiB/GPU: w+g+opt+act(+gath)':<29}{'fits':>5}{'tok/s/GPU':>11}{'TFLOP/s':>9}")
    lines = [head]
    best = min((r.best for r in rows if r.best and r.best.fits), key=lambda p: p.step)
    for r in rows:
        p = r.best
        if p is None:
            lines.append(f"{r.candidates[0].name if r.candidates else '?':<16}  not possible: {r.why_not}")
            continue
        y, mem = p.layout, p.memory
        parts = f"{mem.weights / gib:.1f}+{mem.gradients / gib:.1f}+{mem.optimizer / gib:.1f}+{mem.activations / gib:.1f}"
        if mem.gathered:
            parts += f"(+{mem.gathered / gib:.1f})"
        parts = f"{mem.total / gib:6.1f} = {parts}"
        sched, split = (y.schedule if y.stages > 1 else "-"), f"{p.micro_batches}x{p.micro}"
        lines.append(f"{y.name:<16}{y.stages:>5}{y.dp:>6} {sched:<6}{split:>8}{p.step:>9.3f}"
                     f"{p.compute:>9.3f}{p.comm:>8.3f}{max(p.bubble, 0.0):>8.3f}  {parts:<29}{'yes' if p.fits else 'no':>5}"
                     f"{p.tokens_per_gpu:>11.0f}{p.flops_per_gpu / 1e12:>9.1f}" + ("  <- best" if p is best else ""))
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# command line (python3 pipeline.py plan ...)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="d12", help=f"a trainer preset or one of {', '.join([*GPT3, *OTHERS])}")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="datasheet defaults for the flags below")
    p.add_argument("--flops", type=float, default=None, help="peak bf16 FLOP/s per GPU")
    p.add_argument("--achieved", type=float, default=0.6, help="the fraction of the peak the matmuls reach")
    p.add_argument("--memory-gib", type=float, default=None, help="memory per GPU")
    p.add_argument("--intra-gbps", type=float, default=None, help="inside a node, per GPU (NVLink)")
    p.add_argument("--intra-latency-us", type=float, default=3.0)
    p.add_argument("--inter-gbps", type=float, default=None, help="between nodes, per GPU (its NIC)")
    p.add_argument("--inter-latency-us", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=512, help="global batch, sequences per step")
    p.add_argument("--micro", type=int, default=0,
                   help="sequences per micro-batch (0: 1 for pipelines, the fastest that fits for DP and FSDP)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel ways (modelled, not in this trainer)")
    p.add_argument("--stages", type=int, default=None, help="only this stage count for the PP x rows")


def cluster_from(args: argparse.Namespace) -> Cluster:
    g = GPUS[args.gpu]
    pick = lambda v, d: d if v is None else v  # noqa: E731
    values = {"--gpus": args.gpus, "--gpus-per-node": args.gpus_per_node, "--batch": args.batch,
              "--micro": args.micro, "--tp": args.tp, "--achieved": args.achieved,
              "--flops": pick(args.flops, g["flops"]), "--memory-gib": pick(args.memory_gib, g["memory_gib"]),
              "--intra-gbps": pick(args.intra_gbps, g["nvlink_gbps"]),
              "--inter-gbps": pick(args.inter_gbps, g["nic_gbps"]),
              "--intra-latency-us": args.intra_latency_us, "--inter-latency-us": args.inter_latency_us}
    for flag, v in values.items():
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0) or \
                (v == 0 and "latency" not in flag and flag != "--micro"):
            raise PlanError(f"{flag} {v}: expected a finite number above 0")
    if args.achieved > 1:
        raise PlanError(f"--achieved {args.achieved}: a fraction of the peak, at most 1")
    if args.gpus % args.gpus_per_node and args.gpus > args.gpus_per_node:
        raise PlanError(f"--gpus {args.gpus}: not a whole number of nodes of {args.gpus_per_node}")
    return Cluster(args.gpus, min(args.gpus_per_node, args.gpus),
                   link(values["--intra-gbps"], args.intra_latency_us),
                   link(values["--inter-gbps"], args.inter_latency_us),
                   values["--flops"], args.achieved, values["--memory-gib"] * 2**30, g["hbm_gbs"] * 1e9)


def run(args: argparse.Namespace) -> None:
    try:
        cfg = model_config(args.model)
        cluster = cluster_from(args)
        T = args.seq_len or cfg["max_seq_len"]
        if not 1 <= T <= cfg["max_seq_len"]:
            raise PlanError(f"--seq-len {T}: must be between 1 and the model's context ({cfg['max_seq_len']})")
        batch = Batch(args.batch, args.micro, T)
        rows = plan(cfg, cluster, batch, args.tp, args.stages)
    except PlanError as e:
        sys.exit(f"error: {e}")
    P = model_params(cfg)
    print(f"{args.model}: {cfg['num_layers']} layers, d_model {cfg['channels']}, {P / 1e9:.2f}B parameters | "
          f"{cluster.gpus} x {args.gpu} ({cluster.flops / 1e12:g} TFLOP/s x {cluster.achieved:g}, "
          f"{cluster.memory / 2**30:g} GiB), {cluster.gpus_per_node} per node, "
          f"{cluster.intra.bandwidth * 8e-9:g} Gb/s inside, {cluster.inter.bandwidth * 8e-9:g} Gb/s between | "
          f"batch {batch.sequences} x {T} tokens, micro-batch {batch.micro or 'auto'}"
          + (f" | TP {args.tp} modelled" if args.tp > 1 else ""))
    print(f"state per parameter: {GPU_BYTES.weights} B weights (bf16 copy + fp32 master) + "
          f"{GPU_BYTES.gradient} B gradient + {GPU_BYTES.optimizer} B AdamW m, v; FSDP shards all of it")
    print(table(rows))
