// gpt.h: the stage API shared by train_gpt.c (CPU) and train_gpt.cu (CUDA),
// and bound to Python by gpt.pyx.
//
// A Stage owns layers [lo, hi) of a GPT-2, plus the token/position embedding
// when lo == 0 and the final layernorm + LM head when hi == L. One process
// runs one stage; a 1-stage run owns the whole model. Every function that can
// fail returns 0 on success and -1 on error, with a one-line message in
// gpt_last_error().
#ifndef GPT_H
#define GPT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// ----------------------------------------------------------------------------
// model shape and the llm.c file layout

typedef struct {
    int max_seq_len;        // maxT, 1024 for GPT-2
    int vocab_size;         // V, 50257
    int padded_vocab_size;  // Vp, 50304: rows past V are zero and never in the softmax
    int num_layers;         // L
    int num_heads;          // NH
    int channels;           // C
} GPTConfig;

// The 16 parameter tensors in llm.c's order. The 12 per-layer ones hold all
// layers back to back, so a stage's share of each is one contiguous slice.
enum {
    P_WTE, P_WPE, P_LN1W, P_LN1B, P_QKVW, P_QKVB, P_ATTPROJW, P_ATTPROJB,
    P_LN2W, P_LN2B, P_FCW, P_FCB, P_FCPROJW, P_FCPROJB, P_LNFW, P_LNFB,
    NUM_PARAM_TENSORS
};
extern const char *const PARAM_NAMES[NUM_PARAM_TENSORS];

#define MODEL_MAGIC 20240326
#define SHARD_MAGIC 20240520
#define TOKENIZER_MAGIC 20240328
#define STATE_MAGIC 20261127   // our optimizer-state file, laid out in common.h's checkpoint files
#define HEADER_INTS 256

// A named preset: "tiny", "d6", "d8", "d12" (GPT-2 124M), "d24", "d36" or "d48".
int gpt_config_from_name(const char *name, GPTConfig *cfg);
// The config stored in an llm.c model file's header.
int gpt_read_config(const char *path, GPTConfig *cfg);
// Elements of tensor t for the whole model (layers = L) or one layer.
size_t gpt_tensor_size(const GPTConfig *cfg, int t, int layers);

// ----------------------------------------------------------------------------
// the op list a rank runs for one step (the same codes as pipeline.py)

// An op is three ints (kind, mb, part). Compute ops name a micro-batch and
// part -1 for the whole stage or part l for its layer l alone (--zero 3 runs
// a layer at a time: the embedding goes with layer 0, the final layernorm,
// head and loss with the last layer); sends and receives a micro-batch and
// part -1. The data-parallel collectives and FREE take mb -1 and a bucket in
// part (bucket l < nl: the stage's layer l; bucket nl: its whole tensors);
// the collectives run over the ring of the stage's replicas: ALLREDUCE and
// REDUCE_SCATTER on the gradients (the one holding wte first completes
// d(wte), as stage_sum_wte_grads does), ALLGATHER on the parameters. Under
// --zero 3 ALLGATHER fills a buffer with the bucket's whole parameters, FREE
// gives it back, and REDUCE_SCATTER keeps this replica's chunk of the summed
// gradient and gives the bucket's gradient buffer back.
#define OP_INTS 3
enum { OP_FWD, OP_BWD_INPUT, OP_BWD_WEIGHT, OP_SEND_ACT, OP_RECV_ACT,
       OP_SEND_GRAD, OP_RECV_GRAD, OP_ALLREDUCE, OP_REDUCE_SCATTER, OP_ALLGATHER, OP_FREE, NUM_OPS };

// ----------------------------------------------------------------------------
// stage

// Every stage function takes its Stage as `s`, as a Python method takes `self`.
typedef struct Stage Stage;

// B,T: micro-batch shape; activation_buffers: micro-batches whose activations
// are held at once (the validator's peak for this rank's schedule).
Stage *stage_create(GPTConfig cfg, int lo, int hi, int B, int T, int activation_buffers);
void stage_free(Stage *s);
// Parameters drawn from seed; each (tensor, layer) has its own stream, so any
// partition into stages draws the same weights. 0, or -1 when memory or the
// device fails.
int stage_init(Stage *s, uint64_t seed);
// Loads this stage's slices from an llm.c model file (version 3 or 5).
int stage_load(Stage *s, const char *path);

// Views of the stage's tensors: n elements (0 if the stage lacks the tensor).
float *stage_param(Stage *s, int t, size_t *n);
float *stage_grad(Stage *s, int t, size_t *n);
// The embedding's share of d(wte), kept apart from the LM head's until the
// optimizer step sums them in one canonical order (first stage only).
float *stage_wte_embed_grad(Stage *s, size_t *n);

// Sockets to the previous and next stage, and between the first and the last
// stage for the tied embedding (-1 where there is none). A peer that makes no
// progress for timeout_s fails the op.
void stage_set_peers(Stage *s, int prev_fd, int next_fd, int tied_fd, double timeout_s);
// The ring of this stage's D data-parallel replicas (sockets to replicas d-1
// and d+1 mod D; -1 when D = 1) and the zero stage: 0 keeps everything whole,
// 1 and above make replica d own chunk d of every (tensor, layer) segment for
// AdamW and checkpoints, and keep AdamW's m and v for those chunks only (so
// call it once, before the optimizer state is read or trained: it starts
// afresh). 3 keeps only chunk d of the parameters and gradients too (the
// chunks of the parameters the stage holds now). Every D > 1 sums its
// grad-norm part over chunk d.
int stage_set_replicas(Stage *s, int prev_fd, int next_fd, int replica, int replicas, int zero);
// --zero 3: the buffers for gathered layer parameters and for layers' whole
// gradients, the validator's peaks for this rank's op lists (the whole-tensor
// bucket has one of each of its own). An op list that needs more fails.
int stage_set_layer_buffers(Stage *s, int gathered, int grads);
// --zero 3, after the last step: every replica all-gathers the whole stage's
// parameters once and keeps them (sampling reads them); the stage then works
// as under zero 0 for forward-only lists. Before it, stage_param has n = 0.
int stage_unshard_params(Stage *s);
// Host bytes (device bytes on CUDA) the stage has allocated, by what they hold.
enum { MEMORY_PARAMS, MEMORY_GRADS, MEMORY_OPTIMIZER, MEMORY_GATHERED, MEMORY_GRAD_BUFFERS, MEMORY_ACTIVATIONS,
       NUM_MEMORY };
void stage_memory_bytes(const Stage *s, uint64_t bytes[NUM_MEMORY]);
// Payload bytes sent and received since the stage was made: [0] pipeline
// activations and gradients, [1] the tied d(wte) swap, [2] data-parallel.
void stage_bytes_moved(const Stage *s, uint64_t sent[3], uint64_t received[3]);

// Runs one step's op list (nops ops of OP_INTS ints each). inputs/targets are
// (m, B, T) token ids for the first/last stage (NULL elsewhere). training = 0
// runs forward ops (and ALLGATHER) only and keeps nothing. Gradients are
// zeroed first when training on micro-batches (m > 0). Returns the sum of the micro-batch mean losses in *loss_sum
// (last stage), accumulated in micro-batch order.
int stage_run(Stage *s, const int *ops, int nops, const int *inputs,
              const int *targets, int training, float *loss_sum);
// Start and end of each op of the last stage_run, in seconds of the monotonic
// clock (CLOCK_MONOTONIC, shared by the processes of one machine): 2*nops doubles.
const double *stage_op_times(const Stage *s);

// Grad-norm parts: the sum of squares of each (tensor, layer) in this stage,
// written into parts[t*L + l] (non-layer tensors at l = 0), zero elsewhere.
// wte counts once, on the first stage (after stage_sum_wte_grads).
void stage_grad_norm_parts(Stage *s, double *parts);
// sqrt of the sum of all 16*L parts in canonical order.
double gpt_norm_from_parts(const double *parts, int L);
// d(wte) = LM-head part + embedding part, summed in that order on the first
// and the last stage alike (which first swap their parts), so the two copies
// of wte stay identical. A no-op on middle stages.
int stage_sum_wte_grads(Stage *s);
// AdamW (betas 0.9/0.95, eps 1e-8, decay on matrices) with grads scaled by
// grad_scale; step counts from 1.
void stage_adamw(Stage *s, float lr, float weight_decay, float grad_scale, int step);
// Linear warmup then cosine decay to min_frac * max_lr (step counts from 0).
float gpt_lr_at(int step, float max_lr, int warmup, int total_steps, float min_frac);

// ----------------------------------------------------------------------------
// sampling (a whole-model stage only)

// Extends prompt[0..np) by n tokens into out[0..np+n). temperature 0 is greedy.
int stage_sample(Stage *s, const int *prompt, int np, int n, float temperature,
                 int top_k, uint64_t seed, int *out);

// ----------------------------------------------------------------------------
// data: llm.c token shards, read in order, deterministically

typedef struct DataLoader DataLoader;
DataLoader *dataloader_open(const char *pattern, int B, int T);
void dataloader_free(DataLoader *loader);
// Fills inputs/targets (B,T) and advances; wraps to the first shard at the end.
int dataloader_next(DataLoader *loader, int *inputs, int *targets);
void dataloader_get_position(const DataLoader *loader, int64_t *shard, int64_t *pos);
int dataloader_set_position(DataLoader *loader, int64_t shard, int64_t pos);
// Checks every token of every shard against the model's vocabulary (a token
// >= V would read outside wte); the error names the file, offset and value.
int dataloader_check_vocab(DataLoader *loader, int vocab_size);

// ----------------------------------------------------------------------------
// checkpoints: an llm.c model file plus our optimizer state, each stage
// writing its own slices at their offsets, so S stages make one file

typedef struct {
    int64_t step;           // optimizer steps taken
    int64_t shard, pos;     // train loader position
} TrainState;

// Writes this stage's parameters into dir/model_STEP.bin.tmp (llm.c v3) and
// its AdamW moments into dir/state_STEP.bin.tmp, each at the slices' offsets
// of the whole-model layout, so every stage can write into the same files.
int stage_write_checkpoint(Stage *s, const char *dir, const TrainState *ts);
// Reads them back from the committed dir/{model,state}_STEP.bin.
int stage_read_checkpoint(Stage *s, const char *dir, int64_t step, TrainState *ts);
// Publishes dir/{model,state}_STEP.bin from their .tmp names (fsync, rename),
// then writes the DONE_STEP marker that resume looks for.
int checkpoint_commit(const char *dir, int64_t step);
// The step of the newest committed checkpoint in dir, or -1 if none.
int64_t checkpoint_latest(const char *dir);
// The newest committed checkpoint whose files are present and whose headers
// and sizes fit cfg, or -1; each newer one passed over is named on stderr.
int64_t checkpoint_latest_usable(const char *dir, const GPTConfig *cfg);
// Makes dir this process's for its life: creates it, locks it (flock on the
// directory, released by the kernel however the process ends), removes the
// temporaries a dead run left, and then, by mode: CKPT_FRESH refuses a
// directory holding checkpoints (the message ends with hint, the flags that
// say otherwise), CKPT_OVERWRITE deletes them, CKPT_RESUME keeps them.
// Returns the lock's descriptor (keep it open), or -1.
enum { CKPT_FRESH, CKPT_RESUME, CKPT_OVERWRITE };
int checkpoint_dir_claim(const char *dir, int mode, const char *hint);
// Deletes all but the newest keep committed checkpoints (DONE marker first).
int checkpoint_prune(const char *dir, int keep);

// ----------------------------------------------------------------------------
// device memory and NCCL (the CUDA build; on the CPU the syncs do nothing and
// NCCL fails with a message)

// GPUs visible to this trainer (0 on the CPU build).
int gpt_device_count(void);
// stage_param/stage_grad point at host copies on CUDA: stage_sync_to_host
// refreshes them, stage_sync_to_device uploads edited parameters.
void stage_sync_to_host(Stage *s);
void stage_sync_to_device(Stage *s);
// NCCL for ranks on separate GPUs; the id travels through the rendezvous.
#define GPT_NCCL_ID_BYTES 128
int gpt_nccl_unique_id(unsigned char id[GPT_NCCL_ID_BYTES]);
int stage_set_nccl(Stage *s, const unsigned char id[GPT_NCCL_ID_BYTES], int nranks, int rank);
// A communicator over the stage's data-parallel replicas (one id per stage),
// for their collectives.
int stage_set_replica_nccl(Stage *s, const unsigned char id[GPT_NCCL_ID_BYTES], int replicas, int replica);

// ----------------------------------------------------------------------------
// errors and threads: a call that fails (returns nonzero, or marks its stage
// broken) leaves a one-line message for gpt_last_error, per thread, kept until
// the next failure; gpt_set_threads sets the OpenMP threads of this process

const char *gpt_last_error(void);
void gpt_set_threads(int n);
// Paces every socket link of this process to gbps Gb/s plus latency_us per
// message (0, 0: unpaced), so one machine behaves like ranks on slower links.
// The model is written next to the code, in common.h's transport.
int gpt_set_link_pace(double gbps, double latency_us);

#ifdef __cplusplus
}
#endif

#endif
