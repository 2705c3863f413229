# cython: language_level=3, boundscheck=False, wraparound=False
"""Python binding of the stage API in gpt.h: build a stage, run a step's op
list, take the optimizer step, save and load, sample. Python decides what runs
when; every per-layer loop stays in C."""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint64_t

cnp.import_array()

cdef extern from "gpt.h":
    ctypedef struct GPTConfig:
        int max_seq_len
        int vocab_size
        int padded_vocab_size
        int num_layers
        int num_heads
        int channels
    ctypedef struct Stage:
        pass
    ctypedef struct DataLoader:
        pass
    ctypedef struct TrainState:
        int64_t step
        int64_t shard
        int64_t pos
    int NUM_PARAM_TENSORS
    const char *const PARAM_NAMES[]
    int OP_FWD, OP_BWD_INPUT, OP_BWD_WEIGHT, OP_SEND_ACT, OP_RECV_ACT, OP_SEND_GRAD, OP_RECV_GRAD
    int OP_ALLREDUCE, OP_REDUCE_SCATTER, OP_ALLGATHER, OP_FREE, OP_INTS
    int MEMORY_PARAMS, MEMORY_GRADS, MEMORY_OPTIMIZER, MEMORY_GATHERED, MEMORY_GRAD_BUFFERS, MEMORY_ACTIVATIONS
    enum: NUM_MEMORY
    int gpt_config_from_name(const char *name, GPTConfig *cfg)
    int gpt_read_config(const char *path, GPTConfig *cfg)
    size_t gpt_tensor_size(const GPTConfig *cfg, int t, int layers)
    Stage *stage_create(GPTConfig cfg, int lo, int hi, int B, int T, int activation_buffers)
    void stage_free(Stage *s)
    int stage_init(Stage *s, uint64_t seed)
    int stage_load(Stage *s, const char *path)
    float *stage_param(Stage *s, int t, size_t *n)
    float *stage_grad(Stage *s, int t, size_t *n)
    float *stage_wte_embed_grad(Stage *s, size_t *n)
    void stage_set_peers(Stage *s, int prev_fd, int next_fd, int tied_fd, double timeout_s)
    int stage_set_replicas(Stage *s, int prev_fd, int next_fd, int replica, int replicas, int zero)
    void stage_bytes_moved(const Stage *s, uint64_t *sent, uint64_t *received)
    int stage_set_layer_buffers(Stage *s, int gathered, int grads)
    int stage_unshard_params(Stage *s) nogil
    void stage_memory_bytes(const Stage *s, uint64_t *bytes)
    int stage_run(Stage *s, const int *ops, int nops, const int *inputs, const int *targets,
                  int training, float *loss_sum) nogil
    const double *stage_op_times(const Stage *s)
    void stage_grad_norm_parts(Stage *s, double *parts)
    double gpt_norm_from_parts(const double *parts, int L)
    int stage_sum_wte_grads(Stage *s) nogil
    void stage_sync_to_host(Stage *s)
    int gpt_device_count()
    void stage_sync_to_device(Stage *s)
    int gpt_nccl_unique_id(unsigned char *id)
    int stage_set_nccl(Stage *s, const unsigned char *id, int nranks, int rank)
    int stage_set_replica_nccl(Stage *s, const unsigned char *id, int replicas, int replica)
    enum: GPT_NCCL_ID_BYTES
    void stage_adamw(Stage *s, float lr, float weight_decay, float grad_scale, int step)
    float gpt_lr_at(int step, float max_lr, int warmup, int total_steps, float min_frac)
    int stage_sample(Stage *s, const int *prompt, int n_prompt, int n, float temperature,
                     int top_k, uint64_t seed, int *out) nogil
    DataLoader *dataloader_open(const char *pattern, int B, int T)
    void dataloader_free(DataLoader *loader)
    int dataloader_next(DataLoader *loader, int *inputs, int *targets)
    void dataloader_get_position(const DataLoader *loader, int64_t *shard, int64_t *pos)
    int dataloader_set_position(DataLoader *loader, int64_t shard, int64_t pos)
    int dataloader_check_vocab(DataLoader *loader, int vocab_size)
    int stage_write_checkpoint(Stage *s, const char *dir, const TrainState *ts)
    int stage_read_checkpoint(Stage *s, const char *dir, int64_t step, TrainState *ts)
    int checkpoint_commit(const char *dir, int64_t step)
    int64_t checkpoint_latest(const char *dir)
    int64_t checkpoint_latest_usable(const char *dir, const GPTConfig *cfg)
    int CKPT_FRESH, CKPT_RESUME, CKPT_OVERWRITE
    int checkpoint_dir_claim(const char *dir, int mode, const char *hint)
    int checkpoint_prune(const char *dir, int keep)
    const char *gpt_last_error()
    void gpt_set_threads(int n)
    int gpt_set_link_pace(double gbps, double latency_us)

FWD, BWD_INPUT, BWD_WEIGHT = OP_FWD, OP_BWD_INPUT, OP_BWD_WEIGHT
SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = OP_SEND_ACT, OP_RECV_ACT, OP_SEND_GRAD, OP_RECV_GRAD
ALLREDUCE, REDUCE_SCATTER, ALLGATHER, FREE = OP_ALLREDUCE, OP_REDUCE_SCATTER, OP_ALLGATHER, OP_FREE
PARAM_NAMES_LIST = [PARAM_NAMES[i].decode() for i in range(NUM_PARAM_TENSORS)]


class GPTError(RuntimeError):
    """A failure reported by the C trainer, with its one-line message."""


cdef int check(int rc) except -1:
    if rc != 0:
        raise GPTError(gpt_last_error().decode())
    return 0


def config_from_name(name: str) -> dict:
    cdef GPTConfig cfg
    check(gpt_config_from_name(name.encode(), &cfg))
    return cfg


def read_config(path: str) -> dict:
    cdef GPTConfig cfg
    check(gpt_read_config(path.encode(), &cfg))
    return cfg


def set_threads(n: int) -> None:
    gpt_set_threads(n)


def set_link_pace(gbps: float, latency_us: float = 0.0) -> None:
    """Every socket link of this process at gbps Gb/s plus latency_us per message (0, 0: unpaced)."""
    check(gpt_set_link_pace(gbps, latency_us))


def lr_at(step: int, max_lr: float, warmup: int, total_steps: int, min_frac: float = 0.1) -> float:
    return gpt_lr_at(step, max_lr, warmup, total_steps, min_frac)


def norm_from_parts(parts, num_layers: int) -> float:
    cdef cnp.ndarray[double, ndim=1] p = np.ascontiguousarray(parts, dtype=np.float64).ravel()
    if p.shape[0] != NUM_PARAM_TENSORS * num_layers:
        raise ValueError(f"grad-norm parts: expected {NUM_PARAM_TENSORS * num_layers}, got {p.shape[0]}")
    return gpt_norm_from_parts(&p[0], num_layers)


def device_count() -> int:
    """GPUs this trainer can use (0 for the CPU trainer)."""
    return gpt_device_count()


def nccl_unique_id() -> bytes:
    cdef unsigned char buf[GPT_NCCL_ID_BYTES]
    check(gpt_nccl_unique_id(buf))
    return bytes(buf[:GPT_NCCL_ID_BYTES])


def checkpoint_latest_step(directory: str) -> int:
    return checkpoint_latest(directory.encode())


def commit_checkpoint(directory: str, step: int) -> None:
    check(checkpoint_commit(directory.encode(), step))


def latest_usable_checkpoint(directory: str, config: dict) -> int:
    """The newest committed checkpoint whose files fit config (-1: none); the
    newer ones passed over are named on stderr."""
    cdef GPTConfig cfg = config
    return checkpoint_latest_usable(directory.encode(), &cfg)


CLAIM_MODES = {"fresh": CKPT_FRESH, "resume": CKPT_RESUME, "overwrite": CKPT_OVERWRITE}


def claim_checkpoint_dir(directory: str, mode: str, hint: str) -> int:
    """Creates and locks directory for this process (see gpt.h); returns the
    lock's file descriptor, which holds the lock while it stays open."""
    fd = checkpoint_dir_claim(directory.encode(), CLAIM_MODES[mode], hint.encode())
    check(0 if fd >= 0 else -1)
    return fd


def prune_checkpoints(directory: str, keep: int) -> None:
    check(checkpoint_prune(directory.encode(), keep))


cdef cnp.ndarray _view(float *p, size_t n, shape, owner):
    """A numpy array over C memory that keeps its owner alive."""
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    arr = cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_FLOAT32, p)
    cnp.set_array_base(arr, owner)
    return arr.reshape(shape)


cdef class Model:
    """One pipeline stage: layers [lo, hi) of the GPT-2 described by config."""
    cdef Stage *s
    cdef readonly dict config
    cdef readonly int lo, hi, B, T, activation_buffers, last_nops
    cdef double[:] parts

    def __cinit__(self, dict config, int lo, int hi, int B, int T, int activation_buffers=1):
        cdef GPTConfig cfg = config
        self.s = stage_create(cfg, lo, hi, B, T, activation_buffers)
        if self.s == NULL:
            raise GPTError(gpt_last_error().decode())
        self.config, self.lo, self.hi, self.B, self.T = dict(config), lo, hi, B, T
        self.activation_buffers = activation_buffers
        self.parts = np.zeros(NUM_PARAM_TENSORS * cfg.num_layers)

    def __dealloc__(self):
        stage_free(self.s)

    @property
    def first(self) -> bool:
        return self.lo == 0

    @property
    def last(self) -> bool:
        return self.hi == self.config["num_layers"]

    def init(self, seed: int) -> None:
        check(stage_init(self.s, seed))

    def load(self, path: str) -> None:
        check(stage_load(self.s, path.encode()))

    def _shape(self, int t):
        C, L = self.config["channels"], self.hi - self.lo
        name = PARAM_NAMES_LIST[t]
        if name == "wte": return (self.config["padded_vocab_size"], C)
        if name == "wpe": return (self.config["max_seq_len"], C)
        if name in ("lnfw", "lnfb"): return (C,)
        if name in ("qkvw", "attprojw", "fcw"): return (L, -1, C)
        if name == "fcprojw": return (L, C, 4 * C)
        return (L, -1)

    def params(self) -> dict:
        """The stage's tensors as numpy views of the host copy (read them
        before the next step; change them through set_params)."""
        cdef size_t n
        stage_sync_to_host(self.s)
        out = {}
        for t in range(NUM_PARAM_TENSORS):
            p = stage_param(self.s, t, &n)
            if n:
                out[PARAM_NAMES_LIST[t]] = _view(p, n, self._shape(t), self)
        return out

    def set_params(self, dict values) -> None:
        """Overwrites the named tensors (float arrays of the stage's shapes)."""
        views = self.params()
        for name, value in values.items():
            views[name][...] = np.asarray(value, dtype=np.float32).reshape(views[name].shape)
        stage_sync_to_device(self.s)

    def grads(self) -> dict:
        cdef size_t n
        stage_sync_to_host(self.s)
        out = {}
        for t in range(NUM_PARAM_TENSORS):
            p = stage_grad(self.s, t, &n)
            if n:
                out[PARAM_NAMES_LIST[t]] = _view(p, n, self._shape(t), self)
        return out

    def wte_embed_grad(self):
        cdef size_t n
        p = stage_wte_embed_grad(self.s, &n)
        return _view(p, n, self._shape(0), self) if n else None

    def set_peers(self, int prev_fd, int next_fd, int tied_fd, double timeout_s) -> None:
        """Sockets to the neighbours and, on the first and the last stage, to each other."""
        stage_set_peers(self.s, prev_fd, next_fd, tied_fd, timeout_s)

    def set_replicas(self, int prev_fd, int next_fd, int replica, int replicas, int zero) -> None:
        """The ring of this stage's data-parallel replicas and the zero stage."""
        check(stage_set_replicas(self.s, prev_fd, next_fd, replica, replicas, zero))

    def set_layer_buffers(self, int gathered, int grads) -> None:
        """--zero 3: the gathered-layer and layer-gradient buffers (the validator's peaks)."""
        check(stage_set_layer_buffers(self.s, gathered, grads))

    def unshard_params(self) -> None:
        """--zero 3, after the last step: gather the whole stage's parameters
        once (every replica together), for params() and sampling."""
        cdef int rc
        with nogil:
            rc = stage_unshard_params(self.s)
        check(rc)

    def memory_bytes(self) -> dict:
        """Bytes the stage has allocated, by what they hold."""
        cdef uint64_t b[NUM_MEMORY]
        stage_memory_bytes(self.s, b)
        kinds = {"params": MEMORY_PARAMS, "grads": MEMORY_GRADS, "optimizer": MEMORY_OPTIMIZER,
                 "gathered": MEMORY_GATHERED, "grad_buffers": MEMORY_GRAD_BUFFERS, "activations": MEMORY_ACTIVATIONS}
        return {k: int(b[i]) for k, i in kinds.items()}

    def bytes_moved(self) -> dict:
        """Payload bytes sent and received so far, by traffic kind."""
        cdef uint64_t sent[3]
        cdef uint64_t received[3]
        stage_bytes_moved(self.s, sent, received)
        kinds = ("pipeline", "tied", "data_parallel")
        return {k: (int(sent[i]), int(received[i])) for i, k in enumerate(kinds)}

    def set_nccl(self, bytes unique_id, int nranks, int rank) -> None:
        check(stage_set_nccl(self.s, unique_id, nranks, rank))

    def set_replica_nccl(self, bytes unique_id, int replicas, int replica) -> None:
        check(stage_set_replica_nccl(self.s, unique_id, replicas, replica))

    def run(self, ops, inputs=None, targets=None, training: bool = True) -> float:
        """Runs one step's op list ((n,3) ints: kind, micro-batch, part; an
        (n,2) list is (kind, micro-batch) with part -1, the whole stage, as
        pipeline.Op's default); inputs and targets are (m,B,T) tokens on the
        first and last stage. Returns the sum of the micro-batches' mean losses
        on the last stage (0 elsewhere)."""
        rows = np.asarray(ops, dtype=np.intc)
        if rows.ndim == 2 and rows.shape[1] == 2:
            rows = np.hstack([rows, np.full((rows.shape[0], 1), -1, np.intc)])
        cdef cnp.ndarray[int, ndim=2] o = np.ascontiguousarray(rows, dtype=np.intc).reshape(-1, OP_INTS)
        cdef cnp.ndarray[int, ndim=1] x, y
        cdef const int *px = NULL
        cdef const int *py = NULL
        cdef float loss = 0.0
        cdef int rc, n = o.shape[0], tr = training
        m = int(((o[:, 0] == OP_FWD) & (o[:, 2] <= 0)).sum())  # each micro-batch's forward starts once
        if inputs is not None:
            x = np.ascontiguousarray(inputs, dtype=np.intc).ravel()
            if x.shape[0] != m * self.B * self.T:
                raise ValueError(f"inputs: expected {m}x{self.B}x{self.T} tokens, got {x.shape[0]}")
            px = &x[0]
        if targets is not None:
            y = np.ascontiguousarray(targets, dtype=np.intc).ravel()
            if y.shape[0] != m * self.B * self.T:
                raise ValueError(f"targets: expected {m}x{self.B}x{self.T} tokens, got {y.shape[0]}")
            py = &y[0]
        with nogil:
            rc = stage_run(self.s, &o[0, 0] if n else NULL, n, px, py, tr, &loss)
        check(rc)
        self.last_nops = n
        return loss

    def op_times(self, int nops):
        """(nops, 2) start/end seconds of each op of the last run."""
        if not 0 <= nops <= self.last_nops:
            raise ValueError(f"op_times: the last run had {self.last_nops} ops, not {nops}")
        cdef const double *t = stage_op_times(self.s)
        return np.array([t[i] for i in range(2 * nops)]).reshape(nops, 2) if nops else np.zeros((0, 2))

    def sum_wte_grads(self) -> None:
        cdef int rc
        with nogil:
            rc = stage_sum_wte_grads(self.s)
        check(rc)

    def grad_norm_parts(self):
        stage_grad_norm_parts(self.s, &self.parts[0])
        return np.asarray(self.parts).copy()

    def adamw(self, float lr, float weight_decay, float grad_scale, int step) -> None:
        if step < 1:  # the bias corrections divide by 1 - beta^step
            raise ValueError(f"adamw: step {step}, expected >= 1")
        stage_adamw(self.s, lr, weight_decay, grad_scale, step)

    def write_checkpoint(self, directory: str, step: int, shard: int, pos: int) -> None:
        cdef TrainState ts
        ts.step, ts.shard, ts.pos = step, shard, pos
        check(stage_write_checkpoint(self.s, directory.encode(), &ts))

    def read_checkpoint(self, directory: str, step: int) -> tuple:
        """Loads the stage's slices; returns (step, shard, pos) of the data."""
        cdef TrainState ts
        check(stage_read_checkpoint(self.s, directory.encode(), step, &ts))
        return ts.step, ts.shard, ts.pos

    def sample(self, prompt, int n, float temperature=1.0, int top_k=40, uint64_t seed=1337):
        cdef cnp.ndarray[int, ndim=1] p = np.ascontiguousarray(prompt, dtype=np.intc)
        cdef cnp.ndarray[int, ndim=1] out = np.zeros(p.shape[0] + n, dtype=np.intc)
        cdef int rc, np_ = p.shape[0]
        if np_ == 0:
            raise ValueError("sample: the prompt needs at least one token")
        with nogil:
            rc = stage_sample(self.s, &p[0], np_, n, temperature, top_k, seed, &out[0])
        check(rc)
        return out


cdef class Loader:
    """llm.c token shards, read in order: next() gives (inputs, targets), (B,T) each."""
    cdef DataLoader *loader
    cdef readonly int B, T

    def __cinit__(self, pattern: str, int B, int T, int vocab_size=0):
        """With vocab_size, every token of every shard is checked against it."""
        self.loader = dataloader_open(pattern.encode(), B, T)
        if self.loader == NULL:
            raise GPTError(gpt_last_error().decode())
        self.B, self.T = B, T
        if vocab_size:
            check(dataloader_check_vocab(self.loader, vocab_size))

    def __dealloc__(self):
        dataloader_free(self.loader)

    def next(self):
        cdef cnp.ndarray[int, ndim=2] x = np.empty((self.B, self.T), dtype=np.intc)
        cdef cnp.ndarray[int, ndim=2] y = np.empty((self.B, self.T), dtype=np.intc)
        check(dataloader_next(self.loader, &x[0, 0], &y[0, 0]))
        return x, y

    @property
    def position(self) -> tuple:
        cdef int64_t shard, pos
        dataloader_get_position(self.loader, &shard, &pos)
        return shard, pos

    @position.setter
    def position(self, value) -> None:
        check(dataloader_set_position(self.loader, value[0], value[1]))
