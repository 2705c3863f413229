// common.h: the host half that train_gpt.c and train_gpt.cu share, included
// once by each (as llm.c's llmc/ headers are). It is what the trainers
// use and never the other way round: it calls nothing a trainer defines, and
// where it drives one (the executor, the standalone loop) the trainer hands
// over its functions as a table. Everything here runs on the CPU and works on
// host memory; valid C11 and C++ so nvcc can compile it too.
//
// Sections, in the order data flows:
//   errors, threads, the clock, file I/O
//   model shape and layout          GPTConfig presets, Layout: what a stage holds
//   init                            the seeded GPT-2 init, the same for any split
//   data                            llm.c token shards (DataLoader)
//   checkpoint files                llm.c model files, our optimizer state, the directory
//   socket transport, link pacing,  Links and Transfer: messages between stages
//     groups of messages
//   data-parallel collectives       the ring over a stage's replicas
//   what every Stage begins with    StageBase, and the stage API calls on it alone
//   the executor                    its bookkeeping (OpRun), --zero 3's comm thread (Fsdp),
//                                   and run_op_list (StageHooks)
//   optimizer scalars               the learning-rate schedule, the grad norm
//   sampling                        top-k with temperature
//   the standalone trainers         flags, and train_main, the loop both mains call
#ifndef COMMON_H
#define COMMON_H

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "gpt.h"

#define PI 3.14159265358979323846

// ----------------------------------------------------------------------------
// errors (one line, kept until the next failure), threads, the clock, file I/O

#ifdef __cplusplus
#define THREAD_LOCAL thread_local
#else
#define THREAD_LOCAL _Thread_local
#endif
static THREAD_LOCAL char g_error[1024];

const char *gpt_last_error(void) { return g_error; }

static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return -1;
}

// calloc that names what failed and its size, so an out-of-memory message
// says which allocation did not fit (n * size is checked for overflow)
static void *calloc_or_fail(size_t n, size_t size, const char *what) {
    void *p = n && size > SIZE_MAX / n ? NULL : calloc(n ? n : 1, size);
    if (!p)
        fail("out of memory allocating %s (%zu x %zu bytes = %.1f MiB)", what, n, size, (double)n * size / (1 << 20));
    return p;
}

void gpt_set_threads(int n) {
#ifdef _OPENMP
    if (n > 0) omp_set_num_threads(n);
#else
    (void)n;
#endif
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// pread/pwrite of exactly n bytes at off, or a message naming the file
static int read_exact(int fd, void *buf, size_t n, off_t off, const char *path) {
    char *p = (char *)buf;
    while (n) {
        ssize_t r = pread(fd, p, n, off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return fail("%s: read failed (%s)", path, r < 0 ? strerror(errno) : "unexpected end of file");
        p += r; n -= r; off += r;
    }
    return 0;
}

static int write_exact(int fd, const void *buf, size_t n, off_t off, const char *path) {
    const char *p = (const char *)buf;
    while (n) {
        ssize_t r = pwrite(fd, p, n, off);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return fail("%s: write failed (%s)", path, strerror(errno));
        p += r; n -= r; off += r;
    }
    return 0;
}

static int64_t file_size(int fd) {
    struct stat st;
    return fstat(fd, &st) ? -1 : (int64_t)st.st_size;
}

// ----------------------------------------------------------------------------
// model shape and layout: the presets, their bounds, what a stage holds

const char *const PARAM_NAMES[NUM_PARAM_TENSORS] = {
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"};

static int is_layer_tensor(int t) { return t != P_WTE && t != P_WPE && t != P_LNFW && t != P_LNFB; }
// the tensors that get weight decay
static int is_matrix(int t) {
    return t == P_WTE || t == P_WPE || t == P_QKVW || t == P_ATTPROJW || t == P_FCW || t == P_FCPROJW;
}

size_t gpt_tensor_size(const GPTConfig *cfg, int t, int layers) {
    size_t C = cfg->channels, L = layers;
    switch (t) {
    case P_WTE: return (size_t)cfg->padded_vocab_size * C;
    case P_WPE: return (size_t)cfg->max_seq_len * C;
    case P_QKVW: return L * 3 * C * C;
    case P_QKVB: return L * 3 * C;
    case P_ATTPROJW: return L * C * C;
    case P_FCW: case P_FCPROJW: return L * 4 * C * C;
    case P_FCB: return L * 4 * C;
    case P_LNFW: case P_LNFB: return C;
    default: return L * C;  // ln1w ln1b attprojb ln2w ln2b fcprojb
    }
}

static GPTConfig make_config(int maxT, int V, int Vp, int L, int NH, int C) {
    GPTConfig cfg;
    cfg.max_seq_len = maxT; cfg.vocab_size = V; cfg.padded_vocab_size = Vp;
    cfg.num_layers = L; cfg.num_heads = NH; cfg.channels = C;
    return cfg;
}

int gpt_config_from_name(const char *name, GPTConfig *cfg) {
    static const struct { const char *name; int L, NH, C; } presets[] = {
        {"tiny", 4, 4, 128},                       // a few minutes on 2 CPU cores
        {"d6", 6, 6, 384}, {"d8", 8, 8, 512},      // in between
        {"d12", 12, 12, 768},                      // GPT-2 124M
        {"d24", 24, 16, 1024}, {"d36", 36, 20, 1280}, {"d48", 48, 25, 1600},
    };
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++)
        if (strcmp(name, presets[i].name) == 0) {
            *cfg = make_config(1024, 50257, 50304, presets[i].L, presets[i].NH, presets[i].C);
            return 0;
        }
    return fail("unknown model '%s' (expected tiny, d6, d8, d12, d24, d36 or d48)", name);
}

// The largest shapes a header or a config may ask for: far past any GPT-2,
// and small enough that no size computed from them overflows (the whole
// model stays below 2^46 elements).
#define MAX_LAYERS 1024
#define MAX_CHANNELS 65536
#define MAX_SEQ_LEN (1 << 20)
#define MAX_VOCAB (1 << 24)

// Every field of a model shape in range; what names where it came from.
static int check_config(const GPTConfig *cfg, const char *what) {
    if (cfg->max_seq_len < 1 || cfg->max_seq_len > MAX_SEQ_LEN || cfg->vocab_size < 1 || cfg->vocab_size > MAX_VOCAB ||
        cfg->padded_vocab_size < cfg->vocab_size || cfg->padded_vocab_size > MAX_VOCAB || cfg->num_layers < 1 ||
        cfg->num_layers > MAX_LAYERS || cfg->channels < 1 || cfg->channels > MAX_CHANNELS || cfg->num_heads < 1 ||
        cfg->channels % cfg->num_heads)
        return fail("%s: implausible model shape (maxT=%d V=%d Vp=%d L=%d NH=%d C=%d; expected 1 <= maxT <= %d, "
                    "1 <= V <= Vp <= %d, 1 <= L <= %d, 1 <= C <= %d, C a multiple of NH)",
                    what, cfg->max_seq_len, cfg->vocab_size, cfg->padded_vocab_size, cfg->num_layers, cfg->num_heads,
                    cfg->channels, MAX_SEQ_LEN, MAX_VOCAB, MAX_LAYERS, MAX_CHANNELS);
    return 0;
}

// Whether a model file's shape is the run's.
static int same_config(const GPTConfig *file_cfg, const GPTConfig *run_cfg) {
    return file_cfg->max_seq_len == run_cfg->max_seq_len && file_cfg->vocab_size == run_cfg->vocab_size &&
           file_cfg->padded_vocab_size == run_cfg->padded_vocab_size &&
           file_cfg->num_layers == run_cfg->num_layers && file_cfg->num_heads == run_cfg->num_heads &&
           file_cfg->channels == run_cfg->channels;
}

static size_t model_size(const GPTConfig *cfg) {
    size_t n = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) n += gpt_tensor_size(cfg, t, cfg->num_layers);
    return n;
}

// What a stage holding layers [lo, hi) keeps of each tensor, packed in
// llm.c's order: the per-layer tensors' slices, wte on the first and the
// last stage (the tied LM head), wpe on the first, lnf on the last.
typedef struct {
    GPTConfig cfg;
    int lo, hi, nl, first, last;
    size_t sizes[NUM_PARAM_TENSORS], offsets[NUM_PARAM_TENSORS], num_params;
} Layout;

static Layout layout_make(GPTConfig cfg, int lo, int hi) {
    Layout layout;
    memset(&layout, 0, sizeof layout);
    layout.cfg = cfg;
    layout.lo = lo; layout.hi = hi; layout.nl = hi - lo;
    layout.first = lo == 0; layout.last = hi == cfg.num_layers;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t n;
        if (is_layer_tensor(t)) n = gpt_tensor_size(&cfg, t, layout.nl);
        else if (t == P_WTE) n = (layout.first || layout.last) ? gpt_tensor_size(&cfg, t, 0) : 0;
        else if (t == P_WPE) n = layout.first ? gpt_tensor_size(&cfg, t, 0) : 0;
        else n = layout.last ? gpt_tensor_size(&cfg, t, 0) : 0;
        layout.sizes[t] = n;
        layout.offsets[t] = layout.num_params;
        layout.num_params += n;
    }
    return layout;
}

// What stage_create checks before it allocates anything.
static int check_stage_args(GPTConfig cfg, int lo, int hi, int B, int T, int activation_buffers) {
    if (check_config(&cfg, "model config")) return -1;
    if (lo < 0 || hi > cfg.num_layers || lo >= hi)
        return fail("bad layer range [%d, %d) for a %d-layer model", lo, hi, cfg.num_layers);
    if (B < 1 || T < 1 || T > cfg.max_seq_len)
        return fail("sequence length %d must be in [1, %d] (the model's context) and batch %d >= 1",
                    T, cfg.max_seq_len, B);
    if (activation_buffers < 1) return fail("a stage needs at least one activation buffer");
    // the kernels index rows with int, and the activations' sizes must not
    // overflow (estimated in double, which cannot wrap)
    double rows = (double)B * T, floats = rows * (hi - lo + 1) * (24.0 * cfg.channels + (double)cfg.num_heads * T) +
                  rows * cfg.padded_vocab_size;
    if (rows > INT_MAX / 4 || floats * activation_buffers > 0x1p56)
        return fail("batch %d x sequence %d: the activations (about %.3g bytes) are past what one stage can hold",
                    B, T, 4.0 * floats * activation_buffers);
    return 0;
}

// Element offset of the stage's share of tensor t in the whole-model layout
// (the order of llm.c's files).
static size_t model_offset(const Layout *layout, int t) {
    size_t off = 0;
    for (int i = 0; i < t; i++) off += gpt_tensor_size(&layout->cfg, i, layout->cfg.num_layers);
    return off + (is_layer_tensor(t) ? layout->lo * gpt_tensor_size(&layout->cfg, t, 1) : 0);
}

// wte lives on the first and the last stage; the first one speaks for it
// (in checkpoints and in the grad norm)
static int owns_tensor(const Layout *layout, int t) { return layout->sizes[t] && (t != P_WTE || layout->first); }

// Chunk j of D of an n-element (tensor, layer) segment: [lo, hi), ceil(n/D)
// elements each (the last ones shorter, maybe empty). Replica j of D
// data-parallel replicas owns chunk j: see the collectives below.
static void chunk_range(size_t n, int j, int D, size_t *lo, size_t *hi) {
    size_t size = (n + D - 1) / D;
    *lo = (size_t)j * size < n ? (size_t)j * size : n;
    *hi = *lo + size < n ? *lo + size : n;
}

// Elements of one (tensor, layer) segment of tensor t, and how many segments
// the stage has of it (its layers, or 1 for a whole tensor).
static size_t segment_elems(const Layout *layout, int t) {
    return is_layer_tensor(t) ? gpt_tensor_size(&layout->cfg, t, 1) : layout->sizes[t];
}
static int segment_count(const Layout *layout, int t) {
    return !layout->sizes[t] ? 0 : is_layer_tensor(t) ? layout->nl : 1;
}

// A shard: chunk `part` of `parts` of every (tensor, layer) segment the stage
// has, packed segment by segment in layout order (tensor, then layer). It is
// what one of `parts` replicas keeps of AdamW's m and v under --zero 1 and 3;
// with parts = 1 it is the stage layout itself. Returns its elements.
static size_t shard_elems(const Layout *layout, int part, int parts) {
    size_t n = 0, lo, hi;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        chunk_range(segment_elems(layout, t), part, parts, &lo, &hi);
        n += (hi - lo) * segment_count(layout, t);
    }
    return n;
}

// Where a shard (chunk `part` of `parts` of every segment, as shard_elems
// packs it) keeps each (tensor, layer) chunk: chunk_n[t] elements at
// shard_at[t] + l * chunk_n[t]. Returns the shard's elements.
static size_t shard_offsets(const Layout *layout, int part, int parts, size_t shard_at[NUM_PARAM_TENSORS],
                            size_t chunk_n[NUM_PARAM_TENSORS]) {
    size_t at = 0, lo, hi;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        chunk_range(segment_elems(layout, t), part, parts, &lo, &hi);
        shard_at[t] = at;
        chunk_n[t] = hi - lo;
        at += (hi - lo) * segment_count(layout, t);
    }
    return at;
}

// --zero 3's bucket buffers: where tensor t starts in its bucket's buffer (a
// layer's 12 tensors, or the whole tensors the stage has), each segment
// padded to a multiple of align elements (the GPU keeps its 512-byte
// alignment); the elements of a layer's buffer and of the whole tensors'.
static void bucket_offsets(const Layout *layout, size_t align, size_t in_bucket[NUM_PARAM_TENSORS],
                           size_t *layer_elems, size_t *whole_elems) {
    *layer_elems = *whole_elems = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t *in = is_layer_tensor(t) ? layer_elems : whole_elems;
        in_bucket[t] = *in;
        *in += layout->sizes[t] ? (segment_elems(layout, t) + align - 1) / align * align : 0;
    }
}

// ----------------------------------------------------------------------------
// init: every (tensor, layer) draws from a stream of its own, so any partition
// into stages, and the CPU and the GPU, start from the same weights

// splitmix64: a tiny, good generator whose state may be any 64-bit value
static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double uniform01(uint64_t *state) { return ((splitmix64(state) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

static void fill_normal(float *p, size_t n, float std, uint64_t seed) {
    uint64_t st = seed;
    for (size_t i = 0; i < n; i += 2) {  // Box-Muller, two values per draw
        double r = sqrt(-2.0 * log(uniform01(&st))), th = 2.0 * PI * uniform01(&st);
        p[i] = (float)(std * r * cos(th));
        if (i + 1 < n) p[i + 1] = (float)(std * r * sin(th));
    }
}

// GPT-2's init of the stage's parameters (host memory, stage layout):
// normal(0, 0.02), residual projections scaled by 1/sqrt(2L), layernorm
// weights 1, biases 0, padded vocabulary rows 0.
static void init_params(const Layout *layout, float *params, uint64_t seed) {
    const GPTConfig *cfg = &layout->cfg;
    float resid_std = 0.02f / sqrtf(2.0f * cfg->num_layers);
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int t = 0; t < NUM_PARAM_TENSORS; t++)
        for (int l = 0; l < layout->nl; l++) {
            if (!layout->sizes[t] || (!is_layer_tensor(t) && l > 0)) continue;
            size_t n = is_layer_tensor(t) ? gpt_tensor_size(cfg, t, 1) : layout->sizes[t];
            float *p = params + layout->offsets[t] + (is_layer_tensor(t) ? l * n : 0);
            int global_layer = is_layer_tensor(t) ? layout->lo + l : 0;
            uint64_t st = seed * 0x100000001B3ull + (uint64_t)t * 4096 + global_layer;
            uint64_t stream = splitmix64(&st);
            if (t == P_WTE) {
                memset(p, 0, n * sizeof(float));
                fill_normal(p, (size_t)cfg->vocab_size * cfg->channels, 0.02f, stream);
            } else if (t == P_ATTPROJW || t == P_FCPROJW) {
                fill_normal(p, n, resid_std, stream);
            } else if (is_matrix(t)) {
                fill_normal(p, n, 0.02f, stream);
            } else {
                float val = (t == P_LN1W || t == P_LN2W || t == P_LNFW) ? 1.0f : 0.0f;
                for (size_t i = 0; i < n; i++) p[i] = val;
            }
        }
}

// ----------------------------------------------------------------------------
// data: llm.c token shards, read in order

struct DataLoader {
    int B, T;
    glob_t shards;
    size_t shard;           // index into shards.gl_pathv
    int64_t pos;            // next token to read in the loaded shard
    uint16_t *tokens;       // the loaded shard
    int64_t ntok;
};

// Checks the header and size of a shard; loads its tokens when out != NULL.
static int shard_read(const char *path, int64_t need, uint16_t **out, int64_t *ntok) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail("%s: cannot open token shard (%s)", path, strerror(errno));
    int32_t h[HEADER_INTS];
    int rc = -1;
    int64_t size, expect;
    if (read_exact(fd, h, sizeof h, 0, path)) goto done;
    if (h[0] != SHARD_MAGIC) { fail("%s: not a token shard (magic %d, expected %d)", path, h[0], SHARD_MAGIC); goto done; }
    if (h[1] != 1) { fail("%s: token shard version %d, expected 1", path, h[1]); goto done; }
    size = file_size(fd);
    expect = (int64_t)sizeof h + 2 * (int64_t)h[2];
    if (h[2] < 0 || size != expect) {
        fail("%s: token shard is %lld bytes, its header promises %lld (truncated?)", path,
             (long long)size, (long long)expect);
        goto done;
    }
    if (h[2] < need) { fail("%s: %d tokens, fewer than one batch needs (%lld)", path, h[2], (long long)need); goto done; }
    *ntok = h[2];
    if (out) {
        free(*out);
        *out = (uint16_t *)malloc(2 * (size_t)h[2]);
        if (!*out) { fail("%s: out of memory", path); goto done; }
        if (read_exact(fd, *out, 2 * (size_t)h[2], sizeof h, path)) goto done;
    }
    rc = 0;
done:
    close(fd);
    return rc;
}

DataLoader *dataloader_open(const char *pattern, int B, int T) {
    DataLoader *loader = (DataLoader *)calloc_or_fail(1, sizeof(DataLoader), "the data loader");
    if (!loader) return NULL;
    loader->B = B; loader->T = T;
    if (glob(pattern, 0, NULL, &loader->shards) != 0 || loader->shards.gl_pathc == 0) {
        fail("no token shards match '%s' (prepare the data first: python3 -m dev.data.prepare)", pattern);
        globfree(&loader->shards);
        free(loader);
        return NULL;
    }
    // check every shard now, so a bad one fails at start, not hours in
    for (size_t i = 0; i < loader->shards.gl_pathc; i++) {
        int64_t n;
        if (shard_read(loader->shards.gl_pathv[i], (int64_t)B * T + 1, NULL, &n)) {
            dataloader_free(loader);
            return NULL;
        }
    }
    if (dataloader_set_position(loader, 0, 0)) { dataloader_free(loader); return NULL; }
    return loader;
}

void dataloader_free(DataLoader *loader) {
    if (!loader) return;
    globfree(&loader->shards);
    free(loader->tokens);
    free(loader);
}

int dataloader_set_position(DataLoader *loader, int64_t shard, int64_t pos) {
    if (shard < 0 || (size_t)shard >= loader->shards.gl_pathc)
        return fail("data position: shard %lld of %zu", (long long)shard, loader->shards.gl_pathc);
    if (!loader->tokens || (size_t)shard != loader->shard)
        if (shard_read(loader->shards.gl_pathv[shard], (int64_t)loader->B * loader->T + 1, &loader->tokens,
                       &loader->ntok))
            return -1;
    if (pos < 0 || pos > loader->ntok)
        return fail("data position: token %lld of %lld", (long long)pos, (long long)loader->ntok);
    loader->shard = shard;
    loader->pos = pos;
    return 0;
}

int dataloader_check_vocab(DataLoader *loader, int vocab_size) {
    uint16_t *tokens = NULL;
    int64_t n = 0;
    int rc = 0;
    for (size_t i = 0; i < loader->shards.gl_pathc && rc == 0; i++) {
        const char *path = loader->shards.gl_pathv[i];
        if (shard_read(path, 0, &tokens, &n)) { rc = -1; break; }
        uint16_t top = 0;  // a max reduction, which the compiler vectorises
        for (int64_t k = 0; k < n; k++) top = tokens[k] > top ? tokens[k] : top;
        if (top < vocab_size) continue;
        for (int64_t k = 0; k < n; k++)
            if (tokens[k] >= vocab_size) {
                rc = fail("%s: token %d at offset %lld is outside the model's vocabulary of %d", path, tokens[k],
                          (long long)k, vocab_size);
                break;
            }
    }
    free(tokens);
    return rc;
}

// The token ids a stage is handed, checked before they index wte or the
// softmax (what names them: "input" or "target").
static int check_tokens(const int *tokens, size_t n, int vocab_size, const char *what) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) bad |= tokens[i] < 0 || tokens[i] >= vocab_size;
    if (!bad) return 0;
    for (size_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= vocab_size)
            return fail("%s token %d at index %zu is outside the vocabulary of %d", what, tokens[i], i, vocab_size);
    return 0;
}

void dataloader_get_position(const DataLoader *loader, int64_t *shard, int64_t *pos) {
    *shard = loader->shard;
    *pos = loader->pos;
}

int dataloader_next(DataLoader *loader, int *inputs, int *targets) {
    int64_t BT = (int64_t)loader->B * loader->T;
    if (loader->pos + BT + 1 > loader->ntok)
        if (dataloader_set_position(loader, (loader->shard + 1) % loader->shards.gl_pathc, 0)) return -1;
    const uint16_t *p = loader->tokens + loader->pos;
    for (int64_t i = 0; i < BT; i++) { inputs[i] = p[i]; targets[i] = p[i + 1]; }
    loader->pos += BT;
    return 0;
}

// ----------------------------------------------------------------------------
// checkpoint files
//
// Model files are llm.c's: a 256-int header, then the 16 tensors of the whole
// model in order, fp32 (version 3) or bf16 (version 5, read only). The
// optimizer state is ours, laid out the same way:
//   header int32[256]: [0] STATE_MAGIC, [1] version 1, [2] L, [3] C, [4] Vp,
//                      [5] maxT, int64 at ints [8] step, [10] shard, [12] pos
//   then AdamW m for every parameter in model order, then v likewise.
// Each stage writes its slices at their whole-model offsets, so a checkpoint
// made by S stages is one file that any other stage count can read. Files are
// written under .tmp names and published by checkpoint_commit.

static int check_model_header(const int32_t *h, const char *path, GPTConfig *cfg) {
    if (h[0] != MODEL_MAGIC) return fail("%s: not an llm.c model file (magic %d, expected %d)", path, h[0], MODEL_MAGIC);
    if (h[1] != 3 && h[1] != 5) return fail("%s: model version %d, expected 3 (fp32) or 5 (bf16)", path, h[1]);
    *cfg = make_config(h[2], h[3], h[7], h[4], h[5], h[6]);
    return check_config(cfg, path);
}

// The first non-finite value of n floats (or negative one, for AdamW's v),
// as "what element i is x", or 0 when there is none.
static int check_finite(const float *p, size_t n, int nonnegative, const char *path, const char *what) {
    int bad = 0;
    for (size_t i = 0; i < n; i++) bad |= !isfinite(p[i]) || (nonnegative && p[i] < 0.0f);
    if (!bad) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(p[i]) || (nonnegative && p[i] < 0.0f))
            return fail("%s: %s element %zu is %g (expected a finite%s number)", path, what, i, (double)p[i],
                        nonnegative ? ", non-negative" : "");
    return 0;
}

static int model_file_check(int fd, const char *path, const GPTConfig *cfg, size_t *elem);

int gpt_read_config(const char *path, GPTConfig *cfg) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail("%s: cannot open model file (%s)", path, strerror(errno));
    int32_t h[HEADER_INTS];
    size_t elem;  // the size too, so a truncated file fails before anything is built
    int rc = read_exact(fd, h, sizeof h, 0, path) || check_model_header(h, path, cfg) ||
             model_file_check(fd, path, cfg, &elem) ? -1 : 0;
    close(fd);
    return rc;
}

// The header and size of an open model file against the run's shape cfg;
// sets *elem to the bytes per parameter.
static int model_file_check(int fd, const char *path, const GPTConfig *cfg, size_t *elem) {
    int32_t h[HEADER_INTS];
    GPTConfig file_cfg;
    if (read_exact(fd, h, sizeof h, 0, path) || check_model_header(h, path, &file_cfg)) return -1;
    if (!same_config(&file_cfg, cfg))
        return fail("%s: model is L=%d NH=%d C=%d maxT=%d V=%d, this run wants L=%d NH=%d C=%d maxT=%d V=%d", path,
                    file_cfg.num_layers, file_cfg.num_heads, file_cfg.channels, file_cfg.max_seq_len,
                    file_cfg.vocab_size, cfg->num_layers, cfg->num_heads, cfg->channels, cfg->max_seq_len,
                    cfg->vocab_size);
    *elem = h[1] == 3 ? 4 : 2;
    int64_t expect = (int64_t)sizeof h + (int64_t)(*elem * model_size(&file_cfg)), size = file_size(fd);
    if (size != expect)
        return fail("%s: model file is %lld bytes, expected %lld (truncated?)", path, (long long)size,
                    (long long)expect);
    return 0;
}

// Reads the stage's slices of an llm.c model file into params (stage layout).
static int model_file_read(const Layout *layout, const char *path, float *params) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail("%s: cannot open model file (%s)", path, strerror(errno));
    int rc = -1;
    size_t elem;
    const size_t hbytes = HEADER_INTS * 4;
    if (model_file_check(fd, path, &layout->cfg, &elem)) goto done;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        if (!layout->sizes[t]) continue;
        float *p = params + layout->offsets[t];
        off_t off = hbytes + elem * model_offset(layout, t);
        if (elem == 4) {
            if (read_exact(fd, p, 4 * layout->sizes[t], off, path)) goto done;
        } else {  // bf16 is the top half of an fp32
            uint16_t *tmp = (uint16_t *)malloc(2 * layout->sizes[t]);
            if (!tmp || read_exact(fd, tmp, 2 * layout->sizes[t], off, path)) { free(tmp); goto done; }
            for (size_t i = 0; i < layout->sizes[t]; i++) {
                uint32_t bits = (uint32_t)tmp[i] << 16;
                memcpy(&p[i], &bits, 4);
            }
            free(tmp);
        }
        if (check_finite(p, layout->sizes[t], 0, path, PARAM_NAMES[t])) goto done;
    }
    rc = 0;
done:
    close(fd);
    return rc;
}

// checkpoint names carry the step in 8 digits, which keeps them in order
#define MAX_CHECKPOINT_STEP 99999999

static void checkpoint_path(char *out, size_t n, const char *dir, const char *what, int64_t step, const char *suffix) {
    snprintf(out, n, "%s/%s_%08lld%s", dir, what, (long long)step, suffix);
}

// Writes the stage's parameters (host memory, stage layout; or the shard, like
// m and v, when params_in_shard: --zero 3) and AdamW moments (a shard: see
// shard_elems) into dir/{model,state}_STEP.bin.tmp: chunk `part` of `parts` of
// every (tensor, layer) segment, so data-parallel replicas that own one chunk
// each write one whole file between them (parts = 1: everything).
static int checkpoint_files_write(const Layout *layout, const char *dir, const TrainState *ts, const float *params,
                                  int params_in_shard, const float *m, const float *v, int part, int parts) {
    char mpath[4096], spath[4096];
    checkpoint_path(mpath, sizeof mpath, dir, "model", ts->step, ".bin.tmp");
    checkpoint_path(spath, sizeof spath, dir, "state", ts->step, ".bin.tmp");
    const GPTConfig *cfg = &layout->cfg;
    size_t P = model_size(cfg), shard = shard_elems(layout, part, parts);
    if (ts->step < 1 || ts->step > MAX_CHECKPOINT_STEP || ts->shard < 0 || ts->pos < 0)
        return fail("%s: checkpoint of step %lld at data shard %lld token %lld: out of range", dir,
                    (long long)ts->step, (long long)ts->shard, (long long)ts->pos);
    // a checkpoint with NaN in it is never written, so never resumed from
    for (int t = 0; t < NUM_PARAM_TENSORS && !params_in_shard; t++)
        if (check_finite(params + layout->offsets[t], layout->sizes[t], 0, mpath, PARAM_NAMES[t])) return -1;
    if ((params_in_shard && check_finite(params, shard, 0, mpath, "parameter")) || check_finite(m, shard, 0, spath, "AdamW m") || check_finite(v, shard, 1, spath, "AdamW v")) return -1;
    int mfd = open(mpath, O_WRONLY | O_CREAT, 0644);
    if (mfd < 0) return fail("%s: cannot write checkpoint (%s)", mpath, strerror(errno));
    int sfd = open(spath, O_WRONLY | O_CREAT, 0644);
    if (sfd < 0) { close(mfd); unlink(mpath); return fail("%s: cannot write checkpoint (%s)", spath, strerror(errno)); }
    int rc = -1;
    size_t at_shard = 0;  // where (t, l)'s chunk sits in m and v
    if (ftruncate(mfd, HEADER_INTS * 4 + 4 * P) || ftruncate(sfd, HEADER_INTS * 4 + 8 * P)) {
        fail("%s: cannot size checkpoint (%s)", dir, strerror(errno));
        goto done;
    }
    if (layout->first && part == 0) {
        int32_t mh[HEADER_INTS] = {MODEL_MAGIC, 3, cfg->max_seq_len, cfg->vocab_size, cfg->num_layers,
                                   cfg->num_heads, cfg->channels, cfg->padded_vocab_size};
        int32_t sh[HEADER_INTS] = {STATE_MAGIC, 1, cfg->num_layers, cfg->channels, cfg->padded_vocab_size,
                                   cfg->max_seq_len};
        memcpy(&sh[8], &ts->step, 8);
        memcpy(&sh[10], &ts->shard, 8);
        memcpy(&sh[12], &ts->pos, 8);
        if (write_exact(mfd, mh, sizeof mh, 0, mpath) || write_exact(sfd, sh, sizeof sh, 0, spath)) goto done;
    }
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t seg = segment_elems(layout, t), lo, hi;
        chunk_range(seg, part, parts, &lo, &hi);
        for (int l = 0; l < segment_count(layout, t); l++, at_shard += hi - lo) {
            if (!owns_tensor(layout, t)) continue;  // the last stage's copy of wte: the first one writes it
            size_t off = model_offset(layout, t) + l * seg + lo, n = hi - lo;
            size_t at = params_in_shard ? at_shard : layout->offsets[t] + l * seg + lo;
            if (write_exact(mfd, params + at, 4 * n, HEADER_INTS * 4 + 4 * off, mpath) ||
                write_exact(sfd, m + at_shard, 4 * n, HEADER_INTS * 4 + 4 * off, spath) ||
                write_exact(sfd, v + at_shard, 4 * n, HEADER_INTS * 4 + 4 * (P + off), spath))
                goto done;
        }
    }
    rc = 0;
done:
    close(mfd);
    close(sfd);
    if (rc) {  // a full disk must not keep the half-written files
        unlink(mpath);
        unlink(spath);
    }
    return rc;
}

// The header and size of an open optimizer-state file against the run's
// shape cfg and the step of its DONE marker; fills ts.
static int state_file_check(int fd, const char *path, const GPTConfig *cfg, int64_t step, TrainState *ts) {
    int32_t h[HEADER_INTS];
    size_t P = model_size(cfg);
    if (read_exact(fd, h, sizeof h, 0, path)) return -1;
    if (h[0] != STATE_MAGIC || h[1] != 1)
        return fail("%s: not an optimizer state file (magic %d version %d, expected %d version 1)", path, h[0], h[1],
                    STATE_MAGIC);
    if (h[2] != cfg->num_layers || h[3] != cfg->channels || h[4] != cfg->padded_vocab_size || h[5] != cfg->max_seq_len)
        return fail("%s: optimizer state is for another model shape", path);
    if (file_size(fd) != (int64_t)(sizeof h + 8 * P))
        return fail("%s: optimizer state is %lld bytes, expected %lld (truncated?)", path, (long long)file_size(fd),
                    (long long)(sizeof h + 8 * P));
    memcpy(&ts->step, &h[8], 8);
    memcpy(&ts->shard, &h[10], 8);
    memcpy(&ts->pos, &h[12], 8);
    if (ts->step != step)
        return fail("%s: optimizer state is of step %lld, its DONE marker says %lld", path, (long long)ts->step,
                    (long long)step);
    if (ts->shard < 0 || ts->pos < 0)
        return fail("%s: data position shard %lld token %lld is negative", path, (long long)ts->shard,
                    (long long)ts->pos);
    return 0;
}

// Reads them back from the committed dir/{model,state}_STEP.bin: the stage's
// parameters (all of them, or with params_in_shard its chunks, like m and v),
// and chunk `part` of `parts` of its AdamW moments (the shard this rank
// keeps, whatever split wrote the files).
static int checkpoint_files_read(const Layout *layout, const char *dir, int64_t step, TrainState *ts, float *params,
                                 int params_in_shard, float *m, float *v, int part, int parts) {
    char mpath[4096], spath[4096];
    checkpoint_path(mpath, sizeof mpath, dir, "model", step, ".bin");
    checkpoint_path(spath, sizeof spath, dir, "state", step, ".bin");
    if (!params_in_shard && model_file_read(layout, mpath, params)) return -1;
    int mfd = params_in_shard ? open(mpath, O_RDONLY) : -1;
    if (params_in_shard && mfd < 0) return fail("%s: cannot open model file (%s)", mpath, strerror(errno));
    int fd = open(spath, O_RDONLY);
    if (fd < 0) {
        if (mfd >= 0) close(mfd);
        return fail("%s: cannot open optimizer state (%s)", spath, strerror(errno));
    }
    int rc = -1;
    size_t P = model_size(&layout->cfg), at_shard = 0, elem = 4;
    const size_t hbytes = HEADER_INTS * 4;
    if (state_file_check(fd, spath, &layout->cfg, step, ts) ||
        (mfd >= 0 && model_file_check(mfd, mpath, &layout->cfg, &elem)))
        goto done;
    if (elem != 4) { fail("%s: a checkpoint's model file is fp32 (version 3)", mpath); goto done; }
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t seg = segment_elems(layout, t), lo, hi;
        chunk_range(seg, part, parts, &lo, &hi);
        for (int l = 0; l < segment_count(layout, t); l++, at_shard += hi - lo) {
            size_t off = model_offset(layout, t) + l * seg + lo, n = hi - lo;
            if (read_exact(fd, m + at_shard, 4 * n, hbytes + 4 * off, spath) ||
                read_exact(fd, v + at_shard, 4 * n, hbytes + 4 * (P + off), spath) ||
                (mfd >= 0 && read_exact(mfd, params + at_shard, 4 * n, hbytes + 4 * off, mpath)))
                goto done;
        }
    }
    if (check_finite(m, at_shard, 0, spath, "AdamW m") || check_finite(v, at_shard, 1, spath, "AdamW v") ||
        (mfd >= 0 && check_finite(params, at_shard, 0, mpath, "parameter")))
        goto done;
    rc = 0;
done:
    close(fd);
    if (mfd >= 0) close(mfd);
    return rc;
}

static int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail("%s: cannot open (%s)", path, strerror(errno));
    int rc = fsync(fd) ? fail("%s: fsync failed (%s)", path, strerror(errno)) : 0;
    close(fd);
    return rc;
}

int checkpoint_commit(const char *dir, int64_t step) {
    const char *what[2] = {"model", "state"};
    for (int i = 0; i < 2; i++) {
        char tmp[4096], final_path[4096];
        checkpoint_path(tmp, sizeof tmp, dir, what[i], step, ".bin.tmp");
        checkpoint_path(final_path, sizeof final_path, dir, what[i], step, ".bin");
        if (fsync_path(tmp)) return -1;
        if (rename(tmp, final_path)) return fail("%s: cannot rename to %s (%s)", tmp, final_path, strerror(errno));
    }
    char done[4096];
    checkpoint_path(done, sizeof done, dir, "DONE", step, "");
    int fd = open(done, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return fail("%s: cannot write (%s)", done, strerror(errno));
    close(fd);
    return fsync_path(dir);
}

int64_t checkpoint_latest(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int64_t best = -1;
    struct dirent *e;
    while ((e = readdir(d))) {
        long long step;
        char rest;
        if (sscanf(e->d_name, "DONE_%lld%c", &step, &rest) == 1 && step > best) best = step;
    }
    closedir(d);
    return best;
}

// The steps of dir's DONE markers, newest first, into *steps (freed by the
// caller); returns how many, or -1.
static int done_steps(const char *dir, int64_t **steps) {
    DIR *d = opendir(dir);
    *steps = NULL;
    if (!d) return fail("%s: cannot list (%s)", dir, strerror(errno));
    int n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        long long step;
        char rest;
        if (sscanf(e->d_name, "DONE_%lld%c", &step, &rest) != 1 || step < 1 || step > MAX_CHECKPOINT_STEP) continue;
        if (n == cap) {
            int64_t *grown = (int64_t *)realloc(*steps, (cap = 2 * cap + 16) * sizeof(int64_t));
            if (!grown) { closedir(d); free(*steps); *steps = NULL; return fail("out of memory listing %s", dir); }
            *steps = grown;
        }
        int i = n++;  // insertion keeps them newest first
        while (i > 0 && (*steps)[i - 1] < step) { (*steps)[i] = (*steps)[i - 1]; i--; }
        (*steps)[i] = step;
    }
    closedir(d);
    return n;
}

int64_t checkpoint_latest_usable(const char *dir, const GPTConfig *cfg) {
    int64_t *steps, found = -1;
    int n = done_steps(dir, &steps);
    for (int i = 0; i < n && found < 0; i++) {
        char mpath[4096], spath[4096];
        checkpoint_path(mpath, sizeof mpath, dir, "model", steps[i], ".bin");
        checkpoint_path(spath, sizeof spath, dir, "state", steps[i], ".bin");
        int mfd = open(mpath, O_RDONLY), sfd = open(spath, O_RDONLY);
        size_t elem;
        TrainState ts;
        if (mfd < 0) fail("%s: cannot open model file (%s)", mpath, strerror(errno));
        else if (sfd < 0) fail("%s: cannot open optimizer state (%s)", spath, strerror(errno));
        if (mfd >= 0 && sfd >= 0 && model_file_check(mfd, mpath, cfg, &elem) == 0 &&
            state_file_check(sfd, spath, cfg, steps[i], &ts) == 0)
            found = steps[i];
        else
            fprintf(stderr, "warning: checkpoint of step %lld is unusable (%s); trying an older one\n",
                    (long long)steps[i], g_error);
        if (mfd >= 0) close(mfd);
        if (sfd >= 0) close(sfd);
    }
    free(steps);
    return found;
}

int checkpoint_prune(const char *dir, int keep) {
    int64_t *steps;
    int n = done_steps(dir, &steps), rc = n < 0 ? -1 : 0;
    // the marker goes first: a checkpoint half deleted is never one resume picks
    const char *what[3] = {"DONE", "model", "state"}, *suffix[3] = {"", ".bin", ".bin"};
    for (int i = keep; i < n && rc == 0; i++)
        for (int k = 0; k < 3; k++) {
            char path[4096];
            checkpoint_path(path, sizeof path, dir, what[k], steps[i], suffix[k]);
            if (unlink(path) && errno != ENOENT) rc = fail("%s: cannot delete (%s)", path, strerror(errno));
        }
    free(steps);
    return rc;
}

// What a checkpoint directory may hold of ours: 0 not ours, 1 a published
// file or marker, 2 a temporary.
static int checkpoint_file_kind(const char *name) {
    long long step;
    int end = 0;
    if (sscanf(name, "DONE_%lld%n", &step, &end) == 1 && name[end] == 0) return 1;
    for (int k = 0; k < 2; k++) {
        end = 0;
        sscanf(name, k ? "state_%lld%n" : "model_%lld%n", &step, &end);
        if (end && strcmp(name + end, ".bin") == 0) return 1;
        if (end && strcmp(name + end, ".bin.tmp") == 0) return 2;
    }
    return 0;
}

static int mkdir_parents(const char *dir) {
    char path[4096];
    if (snprintf(path, sizeof path, "%s", dir) >= (int)sizeof path) return fail("%s: path too long", dir);
    for (char *p = path + 1; ; p++) {
        char c = *p;
        if (c != '/' && c != 0) continue;
        *p = 0;
        if (mkdir(path, 0755) && errno != EEXIST)
            return fail("%s: not writable: cannot create %s (%s)", dir, path, strerror(errno));
        *p = c;
        if (!c) return 0;
    }
}

int checkpoint_dir_claim(const char *dir, int mode, const char *hint) {
    if (mkdir_parents(dir)) return -1;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return fail("%s: not writable (%s)", dir, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB)) {
        int busy = errno == EWOULDBLOCK;
        close(fd);
        return busy ? fail("%s: in use by another run (it holds the directory's lock)", dir)
                    : fail("%s: cannot lock (%s)", dir, strerror(errno));
    }
    char probe[4096];
    snprintf(probe, sizeof probe, "%s/.probe.%d", dir, (int)getpid());
    int pfd = open(probe, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (pfd < 0) { fail("%s: not writable (%s)", dir, strerror(errno)); close(fd); return -1; }
    close(pfd);
    unlink(probe);
    // with the lock held, temporaries can only be a dead run's: remove them,
    // and see what is published
    DIR *d = opendir(dir);
    if (!d) { fail("%s: cannot list (%s)", dir, strerror(errno)); close(fd); return -1; }
    int published = 0, rc = 0;
    struct dirent *e;
    while ((e = readdir(d)) && rc == 0) {
        int kind = checkpoint_file_kind(e->d_name);
        if (kind == 0 || (kind == 1 && mode != CKPT_OVERWRITE)) { published += kind; continue; }
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (unlink(path) && errno != ENOENT) rc = fail("%s: cannot delete (%s)", path, strerror(errno));
    }
    closedir(d);
    if (rc == 0 && mode == CKPT_FRESH && published)
        rc = fail("%s: holds %d checkpoint file(s) of an earlier run; %s", dir, published, hint);
    if (rc) { close(fd); return -1; }
    return fd;
}

// ----------------------------------------------------------------------------
// socket transport between neighbouring stages
//
// Every message carries a small header naming what it is, so a schedule
// mismatch is reported instead of silently mixing up micro-batches. A run of
// consecutive SEND/RECV ops is one group: all of them progress together
// (poll), so two neighbours sending to each other at the same moment never
// wait on each other. Messages on one link keep their order.

static const char *const OP_NAMES[NUM_OPS] = {
    "FWD", "BWD_INPUT", "BWD_WEIGHT", "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD",
    "ALLREDUCE", "REDUCE_SCATTER", "ALLGATHER", "FREE"};

#define LINK_MAGIC 0x47505432
#define MAX_GROUP 16

// What the transport has moved since the stage was made, payload bytes only
// (each message's 16-byte header is not counted), by traffic kind.
enum { TRAFFIC_PIPELINE, TRAFFIC_TIED, TRAFFIC_DATA_PARALLEL, NUM_TRAFFIC };

typedef struct {
    int prev_fd, next_fd;   // -1 where there is no neighbour
    int tied_fd;            // first <-> last stage, for d(wte); -1 if S = 1
    // the data-parallel ring: this stage's replicas, replica d sending to d+1
    // and receiving from d-1 (mod D); -1 when D = 1
    int replica_prev_fd, replica_next_fd;
    int replica, replicas;  // d of D
    double timeout_s;       // no progress for this long fails the group
    int lo, hi;             // the stage's layers, for messages
    uint64_t bytes_sent[NUM_TRAFFIC], bytes_received[NUM_TRAFFIC];
} Links;

static Links links_make(int lo, int hi) {
    Links links;
    memset(&links, 0, sizeof links);
    links.prev_fd = links.next_fd = links.tied_fd = links.replica_prev_fd = links.replica_next_fd = -1;
    links.replica = 0;
    links.replicas = 1;
    links.timeout_s = 60.0;
    links.lo = lo;
    links.hi = hi;
    return links;
}

typedef struct {
    int fd, sending;
    int32_t header[4];      // WIRE_* kind, mb, bytes, magic
    char *payload;
    size_t nbytes, done;    // header + payload bytes
    double *wire;           // a paced send: its link's clock (see link pacing); NULL until it starts
} Transfer;

#ifndef MSG_NOSIGNAL  // a libc without it (older macOS): the Python process that owns these sockets ignores SIGPIPE
#define MSG_NOSIGNAL 0
#endif

// Moves what the socket takes now, at most `most` bytes; returns bytes
// moved, or (size_t)-1 when the peer is gone.
static size_t transfer_step(Transfer *transfer, size_t most) {
    size_t hb = sizeof transfer->header, off = transfer->done;
    char *p = off < hb ? (char *)transfer->header + off : transfer->payload + (off - hb);
    size_t n = off < hb ? hb - off : transfer->nbytes - off;
    if (n > most) n = most;
    ssize_t r = transfer->sending ? send(transfer->fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL)
                                  : recv(transfer->fd, p, n, MSG_DONTWAIT);
    if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : (size_t)-1;
    if (r == 0 && !transfer->sending) return (size_t)-1;
    transfer->done += r;
    return r;
}

#define WIRE_ACT 1
#define WIRE_GRAD 2
#define WIRE_WTE 3
#define WIRE_REDUCE 4   // a ring step of a reduce-scatter: partial sums of one chunk
#define WIRE_GATHER 5   // a ring step of an all-gather: finished values of one chunk

static void transfer_make(Transfer *transfer, int fd, int sending, int32_t kind, int32_t mb, void *buf, size_t nbytes) {
    transfer->fd = fd;
    transfer->sending = sending;
    transfer->header[0] = kind;
    transfer->header[1] = mb;
    transfer->header[2] = (int32_t)nbytes;
    transfer->header[3] = LINK_MAGIC;
    transfer->payload = (char *)buf;
    transfer->nbytes = sizeof transfer->header + nbytes;
    transfer->done = 0;
    transfer->wire = NULL;
}

static const char *wire_name(int32_t kind) {
    return kind == WIRE_ACT ? "activation" : kind == WIRE_GRAD ? "gradient" : kind == WIRE_WTE ? "d(wte)"
         : kind == WIRE_REDUCE ? "reduce-scatter chunk of bucket" : "all-gather chunk of bucket";
}

static const char *link_name(const Links *links, int fd) {
    return fd == links->next_fd ? "next stage" : fd == links->prev_fd ? "previous stage"
         : fd == links->tied_fd ? "tied stage" : fd == links->replica_next_fd ? "next replica" : "previous replica";
}

// ----------------------------------------------------------------------------
// link pacing (train.py --link-gbps G --link-latency-us U): one machine
// behaves like ranks on slower links
//
// The model is the alpha-beta one that plan.py uses for every message: a
// message of n bytes takes U + 8n/G to arrive. Each link (a socket, in the
// direction this end sends) has a clock: when its wire has finished
// serialising what it was handed. A message starts at max(clock, now) + U;
// then a chunk of c bytes goes to the socket only once the wire would have
// serialised it, at clock + 8c/G, and the clock moves on by what the socket
// took. So the receiver sees the last byte U + 8n/G after the start, and
// messages queued back to back on a link share its bandwidth. Only sends are
// paced: each end paces what it sends, so both directions of a link are
// paced, independently (full duplex). Time spent waiting for the pacer is not
// a silent peer, so it never counts towards the peer timeout; a peer that
// stops reading still stalls the socket, and that does. The pace is one per
// process (every rank's links alike, as the flag is per job); the clocks are
// per thread, as one thread drives a rank's transport (and a test may run
// two stages on two threads of one process). The rendezvous and the step's
// small collectives over the control sockets (pipeline.py) are not paced.

#define PACE_CHUNK 65536    // bytes per paced send: 5 ms at 0.1 Gb/s, 52 us at 10 Gb/s
#define PACED_LINKS 32

static double g_link_bps, g_link_latency_s;  // bits per second (0: unpaced), seconds per message
static THREAD_LOCAL struct { int fd; double clock; } g_wires[PACED_LINKS];

int gpt_set_link_pace(double gbps, double latency_us) {
    if (!(gbps >= 0 && gbps <= 1e6) || !(latency_us >= 0 && latency_us <= 1e7))
        return fail("link pace %g Gb/s, %g us: expected 0 (unpaced) to 1e6 Gb/s and 0 to 1e7 us", gbps, latency_us);
    g_link_bps = gbps * 1e9;
    g_link_latency_s = latency_us * 1e-6;
    return 0;
}

static int link_paced(void) { return g_link_bps > 0 || g_link_latency_s > 0; }

// The clock of fd's wire: its own, or one at rest (a clock in the past is
// as good as new; fds are reused after a close). NULL when all are busy.
static double *wire_clock(int fd, double now) {
    int rest = -1;
    for (int i = 0; i < PACED_LINKS; i++) {
        if (g_wires[i].fd == fd + 1) return &g_wires[i].clock;  // fd + 1, so a zeroed entry is nobody's
        if (rest < 0 && g_wires[i].clock <= now) rest = i;
    }
    if (rest < 0) return NULL;
    g_wires[rest].fd = fd + 1;
    return &g_wires[rest].clock;
}

// ----------------------------------------------------------------------------
// groups of messages: each moves at once with the others, paced where link
// pacing is on, and checked against what the schedule expects

// Moves n transfers to completion together, checking each received header
// against the one expected. A paced send waits for its wire (link pacing)
// while the others move.
static int transfers_run(const Links *links, Transfer *transfers, int n) {
    double last_progress = now_seconds();
    for (;;) {
        struct pollfd pf[MAX_GROUP];
        int idx[MAX_GROUP], np = 0, pending = 0;
        double now = now_seconds(), pace_wait = INFINITY;  // until the first paced send may go on
        for (int i = 0; i < n; i++) {
            if (transfers[i].done == transfers[i].nbytes) continue;
            pending++;
            // only the oldest unfinished transfer per link and direction may move
            int older = 0;
            for (int j = 0; j < i; j++)
                older |= transfers[j].fd == transfers[i].fd && transfers[j].sending == transfers[i].sending &&
                         transfers[j].done < transfers[j].nbytes;
            if (older) continue;
            if (transfers[i].sending && link_paced()) {
                if (!transfers[i].wire) {  // the message starts: its latency, after what the wire still carries
                    if (!(transfers[i].wire = wire_clock(transfers[i].fd, now)))
                        return fail("stage [%d,%d): more than %d paced links", links->lo, links->hi, PACED_LINKS);
                    *transfers[i].wire = fmax(*transfers[i].wire, now) + g_link_latency_s;
                }
                size_t left = transfers[i].nbytes - transfers[i].done, chunk = left < PACE_CHUNK ? left : PACE_CHUNK;
                double ready = *transfers[i].wire + (g_link_bps > 0 ? 8.0 * chunk / g_link_bps : 0.0);
                if (ready > now) {
                    pace_wait = fmin(pace_wait, ready - now);
                    continue;
                }
            }
            pf[np].fd = transfers[i].fd;
            pf[np].events = transfers[i].sending ? POLLOUT : POLLIN;
            pf[np].revents = 0;
            idx[np++] = i;
        }
        if (!pending) return 0;
        if (pace_wait < INFINITY) last_progress = now;  // waiting for our own wire, not for a peer
        // poll counts in ms: a shorter wait for the pacer polls without blocking, then sleeps it
        int r = np ? poll(pf, np, pace_wait < 1.0 ? (int)(pace_wait * 1e3) : 1000) : 0;
        if (r < 0 && errno != EINTR) return fail("poll failed: %s", strerror(errno));
        if (r <= 0 && (np == 0 || pace_wait < 1e-3)) {
            struct timespec ts = {0, (long)(fmin(pace_wait, 0.5) * 1e9)};
            nanosleep(&ts, NULL);
        }
        for (int q = 0; q < np && r > 0; q++) {
            Transfer *transfer = &transfers[idx[q]];
            if (!pf[q].revents) continue;
            int32_t want[3] = {transfer->header[0], transfer->header[1], transfer->header[2]};
            const char *side = link_name(links, transfer->fd);
            size_t moved = transfer_step(transfer, transfer->wire ? PACE_CHUNK : SIZE_MAX);
            if (moved == (size_t)-1)
                return fail("stage [%d,%d): the %s closed the link during %s of %s mb %d", links->lo, links->hi,
                            side, transfer->sending ? "a send" : "a receive", wire_name(want[0]), want[1]);
            if (moved) last_progress = now_seconds();
            if (transfer->wire && g_link_bps > 0) *transfer->wire += 8.0 * moved / g_link_bps;
            if (!transfer->sending && moved && transfer->done == sizeof transfer->header &&
                (transfer->header[3] != LINK_MAGIC || transfer->header[0] != want[0] ||
                 transfer->header[1] != want[1] || transfer->header[2] != want[2]))
                return fail("stage [%d,%d): expected %s mb %d from the %s, got %s mb %d", links->lo, links->hi,
                            wire_name(want[0]), want[1], side, wire_name(transfer->header[0]), transfer->header[1]);
        }
        if (now_seconds() - last_progress > links->timeout_s)
            return fail("stage [%d,%d): no progress from a neighbour for %.0f s", links->lo, links->hi,
                        links->timeout_s);
    }
}

// Counts a finished message's payload as one kind of traffic (NCCL's too).
static void links_count(Links *links, int traffic, int sending, uint64_t payload) {
    if (sending) links->bytes_sent[traffic] += payload;
    else links->bytes_received[traffic] += payload;
}

// Moves a group to completion and counts its payload bytes as one kind of traffic.
static int transfers_run_counted(Links *links, Transfer *transfers, int n, int traffic) {
    if (transfers_run(links, transfers, n)) return -1;
    for (int i = 0; i < n; i++)
        links_count(links, traffic, transfers[i].sending, transfers[i].nbytes - sizeof transfers[i].header);
    return 0;
}

// Runs n communication ops (kind, mb, part) of a schedule, bufs[i] the host buffer
// of op i, nbytes each. Per stage boundary and micro-batch the pipeline moves
// one activation down (SEND_ACT) and its gradient back up (SEND_GRAD): b*T*C
// values each way, 2*b*T*C in all, 8*b*T*C bytes in fp32 (4*b*T*C in bf16).
static int comm_group(Links *links, const int *ops, int n, void *const *bufs, size_t nbytes) {
    Transfer transfers[MAX_GROUP];
    if (n > MAX_GROUP) return fail("a group of %d sends/receives is more than %d", n, MAX_GROUP);
    for (int i = 0; i < n; i++) {
        int kind = ops[OP_INTS * i], mb = ops[OP_INTS * i + 1];
        int to_next = kind == OP_SEND_ACT || kind == OP_RECV_GRAD;
        int fd = to_next ? links->next_fd : links->prev_fd;
        if (fd < 0)
            return fail("stage [%d,%d): %s mb %d but there is no %s stage", links->lo, links->hi, OP_NAMES[kind], mb,
                        to_next ? "next" : "previous");
        int wire = (kind == OP_SEND_ACT || kind == OP_RECV_ACT) ? WIRE_ACT : WIRE_GRAD;
        transfer_make(&transfers[i], fd, kind == OP_SEND_ACT || kind == OP_SEND_GRAD, wire, mb, bufs[i], nbytes);
    }
    return transfers_run_counted(links, transfers, n, TRAFFIC_PIPELINE);
}

// The first and the last stage swap their shares of d(wte) over the tied
// link: Vp*C values each way per step, 4*Vp*C bytes.
static int tied_swap(Links *links, const void *send_buf, void *recv_buf, size_t nbytes) {
    if (links->tied_fd < 0)
        return fail("stage [%d,%d): no link to the other end of the tied embedding", links->lo, links->hi);
    Transfer transfers[2];
    transfer_make(&transfers[0], links->tied_fd, 1, WIRE_WTE, 0, (void *)send_buf, nbytes);
    transfer_make(&transfers[1], links->tied_fd, 0, WIRE_WTE, 0, recv_buf, nbytes);
    return transfers_run_counted(links, transfers, 2, TRAFFIC_TIED);
}

// ----------------------------------------------------------------------------
// data-parallel collectives: a ring over the D replicas of one stage
//
// A stage's parameters (and gradients) come in buckets: bucket l < nl holds
// the 12 tensors of the stage's layer l, bucket nl the whole tensors the stage
// has (wte, wpe, lnfw, lnfb). Every (tensor, layer) segment of n elements is
// cut into D chunks of ceil(n/D) (the last ones shorter, maybe empty), and
// replica d owns chunk d of every segment: its shard under --zero 1 and 3,
// and its part of the grad norm for any zero stage. The chunks depend on the
// segment alone, never on how layers are split into stages or buckets, which
// is what makes the sums below the same for any S.


// The (tensor, stage-local layer) segments of a bucket; returns how many (at most 12).
static int bucket_segments(const Layout *layout, int bucket, int *tensors, int *layers) {
    int n = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        if (!layout->sizes[t] || is_layer_tensor(t) != (bucket < layout->nl)) continue;
        tensors[n] = t;
        layers[n++] = bucket < layout->nl ? bucket : 0;
    }
    return n;
}

typedef struct { float *p; size_t n; } Segment;  // memory of one (tensor, layer) segment (the host's, or the GPU's)

// --zero 3: the copies that move replica `part` of `parts`'s chunk of each of
// a bucket's n segments into the shard (to_shard), or from it into the
// segments; the shard keeps chunks where shard_offsets placed them.
typedef struct { float *dst; const float *src; size_t count; } ChunkCopy;
static void bucket_chunk_copies(const Segment *segs, const int *tensors, int n, int bucket, int part, int parts,
                                float *shard, const size_t *shard_at, const size_t *chunk_n, int to_shard,
                                ChunkCopy *copies) {
    for (int i = 0; i < n; i++) {
        int t = tensors[i];
        size_t lo, hi;
        chunk_range(segs[i].n, part, parts, &lo, &hi);
        float *chunk = shard + shard_at[t] + (is_layer_tensor(t) ? bucket : 0) * chunk_n[t];
        copies[i].dst = to_shard ? chunk : segs[i].p + lo;
        copies[i].src = to_shard ? segs[i].p + lo : chunk;
        copies[i].count = hi - lo;
    }
}

// Chunk j of every segment, back to back in buf (or from buf: add = 1 sums
// buf + segment into the segment, add = 0 copies buf into it). Returns the
// number of values.
static size_t chunks_pack(float *buf, const Segment *segs, int nseg, int j, int D) {
    size_t at = 0, lo, hi;
    for (int i = 0; i < nseg; i++) {
        chunk_range(segs[i].n, j, D, &lo, &hi);
        if (buf) memcpy(buf + at, segs[i].p + lo, (hi - lo) * sizeof(float));
        at += hi - lo;
    }
    return at;
}
static void chunks_unpack(const float *buf, const Segment *segs, int nseg, int j, int D, int add) {
    size_t at = 0, lo, hi;
    for (int i = 0; i < nseg; i++) {
        chunk_range(segs[i].n, j, D, &lo, &hi);
        float *p = segs[i].p;
        if (add)  // the partial sum that came round the ring, then this replica's value
            for (size_t e = lo; e < hi; e++) p[e] = buf[at + e - lo] + p[e];
        else
            memcpy(p + lo, buf + at, (hi - lo) * sizeof(float));
        at += hi - lo;
    }
}

// D-1 ring steps; at step k replica d sends chunk (d - k - 1 + gather) mod D
// to replica d+1 and receives chunk (d - k - 2 + gather) mod D from replica
// d-1. Reduce-scatter (gather = 0) adds what it receives into its own values,
// so after the last step replica d holds the sum of chunk d. All-gather
// (gather = 1) copies: replica d starts from its finished chunk d and ends
// with every chunk.
//
// The order of each sum: chunk c's partial sum starts on replica c+1 and
// travels c+2, c+3, ... round to replica c, each adding its own value last:
// ((g[c+1] + g[c+2]) + ...) + g[c], replicas mod D. It depends only on c and
// D, so for a fixed D it is the same for any stage count, schedule and zero
// stage (and with D = 2 it is simply g[0] + g[1], addition being commutative).
//
// Bytes: each step moves one chunk of every segment each way, so over D-1
// steps a replica sends (and receives) (D-1)/D * n values per segment (exactly
// when D divides n): (D-1)/D * P values, 4(D-1)/D * P bytes, for P the
// bucket's parameters. An all-reduce is a reduce-scatter then an all-gather:
// 2(D-1)/D * P values, 8(D-1)/D * P bytes.
static int ring_collective(Links *links, const Segment *segs, int nseg, int bucket, int gather) {
    int D = links->replicas, d = links->replica;
    if (D == 1) return 0;
    if (links->replica_prev_fd < 0 || links->replica_next_fd < 0)
        return fail("stage [%d,%d): a data-parallel collective but no links to the other replicas", links->lo,
                    links->hi);
    size_t most = 0;
    for (int j = 0; j < D; j++) {
        size_t n = chunks_pack(NULL, segs, nseg, j, D);
        most = n > most ? n : most;
    }
    if (most > (size_t)INT32_MAX / sizeof(float))
        return fail("stage [%d,%d): bucket %d's chunks are too large for one message", links->lo, links->hi, bucket);
    float *out = (float *)malloc((most ? most : 1) * sizeof(float));
    float *in = (float *)malloc((most ? most : 1) * sizeof(float));
    int rc = 0;
    if (!out || !in) rc = fail("out of memory for the collective of bucket %d", bucket);
    for (int step = 0; step < D - 1 && rc == 0; step++) {
        int send_chunk = ((d - step - 1 + gather) % D + D) % D, recv_chunk = ((d - step - 2 + gather) % D + D) % D;
        size_t nsend = chunks_pack(out, segs, nseg, send_chunk, D);
        size_t nrecv = chunks_pack(NULL, segs, nseg, recv_chunk, D);
        int32_t wire = gather ? WIRE_GATHER : WIRE_REDUCE;
        Transfer transfers[2];
        transfer_make(&transfers[0], links->replica_next_fd, 1, wire, bucket, out, nsend * sizeof(float));
        transfer_make(&transfers[1], links->replica_prev_fd, 0, wire, bucket, in, nrecv * sizeof(float));
        rc = transfers_run_counted(links, transfers, 2, TRAFFIC_DATA_PARALLEL);
        if (rc == 0) chunks_unpack(in, segs, nseg, recv_chunk, D, !gather);
    }
    free(out);
    free(in);
    return rc;
}

// ----------------------------------------------------------------------------
// what every Stage begins with: its links, and how it shares the optimizer
// state with its replicas
//
// Both trainers' struct Stage hold a StageBase as their first member (each
// checks that with a static_assert), so a pointer to a Stage is a pointer to
// its StageBase too (C11 6.7.2.1; in C++ both are standard-layout). The calls
// of the stage API that only set or read it are written here, once for both;
// stage_set_replicas, which each trainer checks and sizes in its own way,
// records the ring through set_replica_ring.

typedef struct {
    Links links;  // sockets to the neighbouring stages, the tied stage and the replica ring
    int zero;     // the zero stage: 0 every replica keeps everything whole; 1, 3 replica d owns chunk d
} StageBase;

void stage_set_peers(Stage *s, int prev_fd, int next_fd, int tied_fd, double timeout_s) {
    Links *links = &((StageBase *)s)->links;
    links->prev_fd = prev_fd;
    links->next_fd = next_fd;
    links->tied_fd = tied_fd;
    links->timeout_s = timeout_s;
}

// The ring of replicas and the zero stage, as each trainer's
// stage_set_replicas records them once it has checked and sized them.
static void set_replica_ring(Stage *s, int prev_fd, int next_fd, int replica, int replicas, int zero) {
    StageBase *base = (StageBase *)s;
    base->links.replica_prev_fd = prev_fd;
    base->links.replica_next_fd = next_fd;
    base->links.replica = replica;
    base->links.replicas = replicas;
    base->zero = zero;
}

// The shard of AdamW's state this rank keeps (see shard_elems): chunk d of D
// under --zero 1 and 3, the whole stage under zero 0.
static void optimizer_shard(const Stage *s, int *part, int *parts) {
    const StageBase *base = (const StageBase *)s;
    *part = base->zero > 0 ? base->links.replica : 0;
    *parts = base->zero > 0 ? base->links.replicas : 1;
}

void stage_bytes_moved(const Stage *s, uint64_t sent[NUM_TRAFFIC], uint64_t received[NUM_TRAFFIC]) {
    const Links *links = &((const StageBase *)s)->links;
    memcpy(sent, links->bytes_sent, sizeof links->bytes_sent);
    memcpy(received, links->bytes_received, sizeof links->bytes_received);
}

// ----------------------------------------------------------------------------
// --zero 3's pools of layer buffers: equal buffers handed out and given back,
// count of them, elems floats each, in one allocation that the trainer makes
// (host memory on the CPU, device memory on the GPU); the bookkeeping here
// is the host's alike

typedef struct {
    float *memory, **free_list;
    int count, nfree;
    size_t elems;
} BufferPool;

// Every buffer free again (a step's list starts holding none).
static void pool_reset(BufferPool *pool) {
    pool->nfree = pool->count;
    for (int i = 0; i < pool->count; i++) pool->free_list[i] = pool->memory + (size_t)i * pool->elems;
}

// The bytes of count buffers of elems floats (checked for overflow).
static int pool_bytes(int count, size_t elems, const char *what, size_t *bytes) {
    if (count && elems > SIZE_MAX / sizeof(float) / count)
        return fail("%s: %d x %zu floats overflow", what, count, elems);
    *bytes = (size_t)count * elems * sizeof(float);
    return 0;
}

// The pool over memory, all free; the free list is the pool's own.
static int pool_init(BufferPool *pool, float *memory, int count, size_t elems, const char *what) {
    pool->free_list = (float **)calloc_or_fail(count, sizeof(float *), what);
    if (!pool->free_list) return -1;
    pool->memory = memory;
    pool->count = count;
    pool->elems = elems;
    pool_reset(pool);
    return 0;
}

// A free buffer, or NULL when the list holds all of them.
static float *pool_take(BufferPool *pool) { return pool->nfree ? pool->free_list[--pool->nfree] : NULL; }
static void pool_give(BufferPool *pool, float *buf) { pool->free_list[pool->nfree++] = buf; }

// held[k][b]: the buffer bucket b of a stage of nl layers holds, of its whole
// parameters (k = 0) or gradients (k = 1), from pools[k] or the whole
// tensors' own (bucket nl). A list starts holding none (a failed one may have
// left some out) but the whole tensors' gradient buffer, which every list
// holds from its start to its end.
static void buckets_release(float **held[2], BufferPool pools[2], int nl, float *whole_grads) {
    for (int k = 0; k < 2; k++) {
        for (int b = 0; b < nl; b++) held[k][b] = NULL;
        pool_reset(&pools[k]);
    }
    held[0][nl] = NULL;
    held[1][nl] = whole_grads;
}

// ----------------------------------------------------------------------------
// the executor's bookkeeping, the same for both trainers: which activation
// buffer holds which micro-batch, when it is freed, the micro-batch losses,
// and each op's start and end

typedef struct {
    int m;                   // micro-batches in this step: every rank runs one FWD per micro-batch
    int activation_buffers;  // the stage's activation buffers (the validator's peak)
    int *acts_of, *last_op;  // per micro-batch: its activation buffer (-1: none), the index of its last op
    float *mb_losses;        // per micro-batch mean loss (the last stage)
    int cap;
    double *op_times;        // start and end of each op, CLOCK_MONOTONIC seconds
    int op_times_cap;
    int op;                  // the index of the op whose hook runs (one that queues its work records it)
    double op_start;         // when it started: a hook that first waits for another thread moves it past the wait
} OpRun;

// pipeline sends and receives: consecutive ones run as one group
static int is_message(int kind) { return kind >= OP_SEND_ACT && kind <= OP_RECV_GRAD; }
// data-parallel collectives and FREE: their part is a bucket, and they have no micro-batch
static int is_bucket_op(int kind) { return kind >= OP_ALLREDUCE && kind < NUM_OPS; }
// the collectives of gradients
static int reduces(int kind) { return kind == OP_ALLREDUCE || kind == OP_REDUCE_SCATTER; }
// A reduction of the whole-tensor bucket of a stage with wte: the replicas sum
// the whole d(wte), so each first completes its own (stage_sum_wte_grads).
static int reduces_wte(const Layout *layout, int kind, int bucket) {
    return reduces(kind) && bucket == layout->nl && layout->sizes[P_WTE];
}

// Checks an op list of (kind, mb, part) triples against a stage of nl layers
// and readies the bookkeeping for it. Each micro-batch's forward starts once:
// with its whole-stage FWD or its layer-0 one.
static int oprun_begin(OpRun *run, const int *ops, int nops, int nl) {
    run->m = 0;
    for (int i = 0; i < nops; i++) {
        const int *op = ops + OP_INTS * i;
        if (op[0] < 0 || op[0] >= NUM_OPS) return fail("op %d: unknown kind %d", i, op[0]);
        run->m += op[0] == OP_FWD && op[2] <= 0;
    }
    for (int i = 0; i < nops; i++) {
        const int *op = ops + OP_INTS * i;
        int kind = op[0], mb = op[1], part = op[2];
        if (is_bucket_op(kind) ? mb != -1 || part < 0 || part > nl
                               : mb < 0 || mb >= run->m || part < -1 || part >= nl || (is_message(kind) && part != -1))
            return fail("op %d: %s (mb %d, part %d) for %d micro-batch(es) and %d layer(s): expected mb -1 and a "
                        "bucket 0..%d, or a micro-batch and part -1 (a message or the whole stage) or a layer",
                        i, OP_NAMES[kind], mb, part, run->m, nl, nl);
    }
    if (run->m > run->cap) {
        free(run->acts_of); free(run->last_op); free(run->mb_losses);
        run->acts_of = (int *)malloc(run->m * sizeof(int));
        run->last_op = (int *)malloc(run->m * sizeof(int));
        run->mb_losses = (float *)malloc(run->m * sizeof(float));
        run->cap = run->acts_of && run->last_op && run->mb_losses ? run->m : 0;
        if (!run->cap) return fail("out of memory for the op list's bookkeeping");
    }
    if (nops > run->op_times_cap) {
        free(run->op_times);
        run->op_times = (double *)malloc(2 * nops * sizeof(double));
        run->op_times_cap = run->op_times ? nops : 0;
        if (!run->op_times) return fail("out of memory for the op times");
    }
    for (int i = 0; i < run->m; i++) { run->acts_of[i] = -1; run->mb_losses[i] = 0.0f; }
    // a micro-batch holds its activation buffer from its first op to its
    // last, as the validator counts it
    for (int i = 0; i < nops; i++)
        if (!is_bucket_op(ops[OP_INTS * i])) run->last_op[ops[OP_INTS * i + 1]] = i;
    return 0;
}

// The activation buffer of micro-batch mb (its index), taking a free one on
// its first op; -1 when all are held.
static int oprun_acts_of(OpRun *run, int mb, int lo, int hi) {
    if (run->acts_of[mb] >= 0) return run->acts_of[mb];
    for (int i = 0; i < run->activation_buffers; i++) {
        int used = 0;
        for (int j = 0; j < run->m; j++) used |= run->acts_of[j] == i;
        if (!used) return run->acts_of[mb] = i;
    }
    return fail("stage [%d,%d): micro-batch %d needs an activation buffer but all %d are held "
                "(the schedule holds more than the validator's peak)", lo, hi, mb, run->activation_buffers);
}

// Ops [i, i+n) ran from t0 to t1: record that, and free the activation
// buffers of the micro-batches whose last op this was.
static void oprun_done(OpRun *run, const int *ops, int i, int n, double t0, double t1) {
    for (int k = i; k < i + n; k++) {
        run->op_times[2 * k] = t0;
        run->op_times[2 * k + 1] = t1;
        const int *op = ops + OP_INTS * k;
        if (!is_bucket_op(op[0]) && run->last_op[op[1]] == k) run->acts_of[op[1]] = -1;
    }
}

// The sum of the micro-batch losses, in micro-batch order.
static float oprun_loss_sum(const OpRun *run) {
    float sum = 0.0f;
    for (int i = 0; i < run->m; i++) sum += run->mb_losses[i];
    return sum;
}

static void oprun_free(OpRun *run) {
    free(run->acts_of); free(run->last_op); free(run->mb_losses); free(run->op_times);
}

// ----------------------------------------------------------------------------
// --zero 3's comm thread, the same for both trainers
//
// The collectives of a step's op list (ALLGATHER, REDUCE_SCATTER) run on a
// thread of their own, in list order, so the gather of layer l+1 runs while
// layer l computes (pipeline.fsdp_ops places it one layer early for that).
// The compute thread queues them and waits only for what it needs: the
// gather of the layer it computes (fsdp_wait_gathered), a free gradient
// buffer (fsdp_take_grad_buffers), a gather's end before its FREE, and the
// queue's end at the end of the list (fsdp_list_end). Everything the two
// threads share is guarded by `lock`; the collectives themselves run outside
// it, and each has the links' timeout (a ring step's, or the NCCL wait's), so
// every wait here ends. The link pacing clocks are per thread: the comm
// thread paces the replica ring, the compute thread the pipeline and the
// tied swap. The trainer's half of a collective is its `ring`
// hook, which moves one bucket's buffer: ALLGATHER fills buf with the
// bucket's whole parameters, REDUCE_SCATTER sums buf, the bucket's whole
// gradient, over the replicas into this replica's shard.

typedef struct {
    int kind, bucket, op;  // a collective of the op list, and its index there
    double start, end;     // when the comm thread ran it, CLOCK_MONOTONIC seconds
} QueuedCollective;

typedef struct {
    const Layout *layout;                 // the stage's
    float **held[2];                      // per bucket: the buffer of its whole parameters [0], gradients [1]; or NULL
    BufferPool pools[2];                  // layer buckets' buffers: gathered parameters, gradients
    float *whole[2];                      // the whole-tensor bucket's, held from a step's start to its end
    int (*ring)(void *stage, int kind, int bucket, float *buf);  // the trainer's collective of a bucket's buffer
    void *stage;                          // the trainer's Stage, passed back to ring
    pthread_t thread;
    int started, quit;
    pthread_mutex_t lock;
    pthread_cond_t changed;               // the queue, a bucket or a buffer changed
    QueuedCollective *queue;              // the list's collectives so far; [head, tail) still to run
    int head, tail, cap;
    int *pending[2];                      // per bucket: its ALLGATHER [0], REDUCE_SCATTER [1] is queued or running
    int failed, skip;                     // a collective failed (error holds why); the list failed: run no more
    char error[1024];
} Fsdp;

// Waits (lock held) until ready(fsdp, arg) or the comm thread has failed,
// whose message it then fails with.
static int fsdp_wait(Fsdp *fsdp, int (*ready)(const Fsdp *, int), int arg) {
    while (!ready(fsdp, arg) && !fsdp->failed) pthread_cond_wait(&fsdp->changed, &fsdp->lock);
    return fsdp->failed ? fail("%s", fsdp->error) : 0;
}
static int queue_empty(const Fsdp *fsdp, int arg) { (void)arg; return fsdp->head == fsdp->tail; }
static int gathered_or_idle(const Fsdp *fsdp, int bucket) { return !fsdp->pending[0][bucket]; }
static int grad_buffer_free(const Fsdp *fsdp, int arg) { (void)arg; return fsdp->pools[1].nfree > 0; }

// One queued collective on the comm thread: the bucket's buffer out of the
// pool (a gather's) or from the compute (a reduce-scatter's), the trainer's
// ring, and the buffer back where it goes. Returns with the lock held.
static int fsdp_run(Fsdp *fsdp, int kind, int bucket) {
    const Layout *layout = fsdp->layout;
    int nl = layout->nl, gather = kind == OP_ALLGATHER;
    if (gather && bucket < nl && !fsdp->pools[0].nfree)  // the validator's peak rules it out
        return fail("stage [%d,%d): ALLGATHER of bucket %d but all %d gathered buffers are held (the op list holds "
                    "more than the validator's peak)", layout->lo, layout->hi, bucket, fsdp->pools[0].count);
    float *buf = !gather ? fsdp->held[1][bucket] : bucket < nl ? pool_take(&fsdp->pools[0]) : fsdp->whole[0];
    pthread_mutex_unlock(&fsdp->lock);
    int rc = fsdp->ring(fsdp->stage, kind, bucket, buf);
    pthread_mutex_lock(&fsdp->lock);
    if (rc) return -1;
    if (gather) {
        fsdp->held[0][bucket] = buf;
    } else if (bucket < nl) {  // the layer's gradient is in the shard: its buffer goes back
        pool_give(&fsdp->pools[1], buf);
        fsdp->held[1][bucket] = NULL;
    }
    return 0;
}

static void *fsdp_thread_main(void *arg) {
    Fsdp *fsdp = (Fsdp *)arg;
    pthread_mutex_lock(&fsdp->lock);
    for (;;) {
        while (!fsdp->quit && fsdp->head == fsdp->tail) pthread_cond_wait(&fsdp->changed, &fsdp->lock);
        if (fsdp->quit) break;
        // a copy: the compute thread may grow (move) the queue while this runs
        QueuedCollective job = fsdp->queue[fsdp->head];
        double start = now_seconds();
        int rc = fsdp->failed || fsdp->skip ? 0 : fsdp_run(fsdp, job.kind, job.bucket);
        fsdp->queue[fsdp->head].start = start;
        fsdp->queue[fsdp->head].end = now_seconds();
        if (rc) {
            snprintf(fsdp->error, sizeof fsdp->error, "%s", gpt_last_error());
            fsdp->failed = 1;
        }
        fsdp->pending[job.kind == OP_REDUCE_SCATTER][job.bucket] = 0;
        fsdp->head++;
        pthread_cond_broadcast(&fsdp->changed);
    }
    pthread_mutex_unlock(&fsdp->lock);
    return NULL;
}

// Readies --zero 3's bookkeeping for a stage of that layout whose whole[]
// buffers are set, its pools' sizes too (their buffers may come later), and
// starts the comm thread, which runs ring(stage, ...).
static int fsdp_start(Fsdp *fsdp, const Layout *layout, int (*ring)(void *, int, int, float *), void *stage) {
    fsdp->layout = layout;
    fsdp->ring = ring;
    fsdp->stage = stage;
    for (int k = 0; k < 2; k++) {
        fsdp->held[k] = (float **)calloc_or_fail(layout->nl + 1, sizeof(float *), "the held buckets");
        fsdp->pending[k] = (int *)calloc_or_fail(layout->nl + 1, sizeof(int), "the pending collectives");
        if (!fsdp->held[k] || !fsdp->pending[k]) return -1;
    }
    buckets_release(fsdp->held, fsdp->pools, layout->nl, fsdp->whole[1]);  // the d(wte) sum may come before any list
    if (pthread_mutex_init(&fsdp->lock, NULL)) return fail("cannot make the comm thread's lock");
    if (pthread_cond_init(&fsdp->changed, NULL)) {
        pthread_mutex_destroy(&fsdp->lock);
        return fail("cannot make its condition");
    }
    if (pthread_create(&fsdp->thread, NULL, fsdp_thread_main, fsdp)) {
        pthread_cond_destroy(&fsdp->changed);
        pthread_mutex_destroy(&fsdp->lock);
        return fail("cannot start the comm thread");
    }
    fsdp->started = 1;
    return 0;
}

// Ends the comm thread (after the collective it runs, if any) and frees the
// bookkeeping; the trainer frees the buffers, which it made.
static void fsdp_stop(Fsdp *fsdp) {
    if (fsdp->started) {
        pthread_mutex_lock(&fsdp->lock);
        fsdp->quit = 1;
        pthread_cond_broadcast(&fsdp->changed);
        pthread_mutex_unlock(&fsdp->lock);
        pthread_join(fsdp->thread, NULL);
        pthread_cond_destroy(&fsdp->changed);
        pthread_mutex_destroy(&fsdp->lock);
        fsdp->started = 0;
    }
    free(fsdp->queue);
    for (int k = 0; k < 2; k++) { free(fsdp->held[k]); free(fsdp->pending[k]); }
    fsdp->queue = NULL;
    fsdp->held[0] = fsdp->held[1] = NULL;
    fsdp->pending[0] = fsdp->pending[1] = NULL;
}

// Every list starts with an idle comm thread (a failed list's rest is
// skipped) and holding nothing (a failed one may have left buffers out).
static void fsdp_list_begin(Fsdp *fsdp) {
    pthread_mutex_lock(&fsdp->lock);
    while (!queue_empty(fsdp, 0)) pthread_cond_wait(&fsdp->changed, &fsdp->lock);
    fsdp->head = fsdp->tail = fsdp->failed = fsdp->skip = 0;
    buckets_release(fsdp->held, fsdp->pools, fsdp->layout->nl, fsdp->whole[1]);
    pthread_mutex_unlock(&fsdp->lock);
}

// Waits until the comm thread has run every collective queued so far (only
// the compute thread queues them, so none starts before it queues again).
static int fsdp_drain(Fsdp *fsdp) {
    pthread_mutex_lock(&fsdp->lock);
    int rc = fsdp_wait(fsdp, queue_empty, 0);
    pthread_mutex_unlock(&fsdp->lock);
    return rc;
}

// The list is done when its last collective is. A collective's op time is
// then the comm thread's, when it ran, rather than the moment the compute
// thread queued it: what a trace and the bubble want.
static int fsdp_list_end(Fsdp *fsdp, OpRun *run) {
    int rc = fsdp_drain(fsdp);
    pthread_mutex_lock(&fsdp->lock);
    for (int i = 0; i < fsdp->tail && rc == 0; i++) {
        const QueuedCollective *job = &fsdp->queue[i];
        run->op_times[2 * job->op] = job->start;
        run->op_times[2 * job->op + 1] = job->end;
    }
    pthread_mutex_unlock(&fsdp->lock);
    return rc;
}

// A list failed: the comm thread finishes the collective it is in (a ring
// step times out) and runs no more of it.
static void fsdp_list_failed(Fsdp *fsdp) {
    pthread_mutex_lock(&fsdp->lock);
    fsdp->skip = 1;
    pthread_mutex_unlock(&fsdp->lock);
}

// Queues op `op`'s ALLGATHER or REDUCE_SCATTER of a bucket for the comm
// thread (lock held).
static int fsdp_enqueue(Fsdp *fsdp, int kind, int bucket, int op) {
    if (fsdp->tail == fsdp->cap) {  // the queue only grows within a list: it is emptied at every list's end
        int cap = 2 * fsdp->cap + 16;
        QueuedCollective *grown = (QueuedCollective *)realloc(fsdp->queue, (size_t)cap * sizeof(QueuedCollective));
        if (!grown) return fail("out of memory for the collectives' queue");
        fsdp->queue = grown;
        fsdp->cap = cap;
    }
    fsdp->queue[fsdp->tail++] = (QueuedCollective){kind, bucket, op, 0.0, 0.0};
    fsdp->pending[kind == OP_REDUCE_SCATTER][bucket] = 1;
    pthread_cond_broadcast(&fsdp->changed);
    return 0;
}

// Op `op` of the list, an ALLGATHER, FREE or REDUCE_SCATTER of a bucket, on
// the compute thread: the collectives are queued for the comm thread, a FREE
// gives the bucket's buffer back once its gather is done.
static int fsdp_collective(Fsdp *fsdp, int kind, int bucket, int op) {
    const Layout *layout = fsdp->layout;
    if (kind != OP_ALLGATHER && kind != OP_FREE && kind != OP_REDUCE_SCATTER)
        return fail("stage [%d,%d): %s of bucket %d under --zero 3 (its gradients are reduce-scattered)", layout->lo,
                    layout->hi, OP_NAMES[kind], bucket);
    int rc = 0;
    pthread_mutex_lock(&fsdp->lock);
    if (kind == OP_ALLGATHER) {
        rc = fsdp->held[0][bucket] || fsdp->pending[0][bucket]
                 ? fail("stage [%d,%d): ALLGATHER of bucket %d, which is held", layout->lo, layout->hi, bucket)
                 : fsdp_enqueue(fsdp, kind, bucket, op);
    } else if (kind == OP_FREE) {
        rc = fsdp_wait(fsdp, gathered_or_idle, bucket);
        if (rc == 0 && !fsdp->held[0][bucket])
            rc = fail("stage [%d,%d): FREE of bucket %d, which is not held", layout->lo, layout->hi, bucket);
        if (rc == 0 && bucket < layout->nl) pool_give(&fsdp->pools[0], fsdp->held[0][bucket]);
        if (rc == 0) fsdp->held[0][bucket] = NULL;
        pthread_cond_broadcast(&fsdp->changed);
    } else {
        rc = !fsdp->held[1][bucket] || fsdp->pending[1][bucket]
                 ? fail("stage [%d,%d): REDUCE_SCATTER of bucket %d, which has no gradient this step", layout->lo,
                        layout->hi, bucket)
                 : fsdp_enqueue(fsdp, kind, bucket, op);
    }
    pthread_mutex_unlock(&fsdp->lock);
    return rc;
}

// FWD and BWD_INPUT of layers [l0, l1) need their parameters, and the whole
// tensors' when they run the embedding or the head: gathered, waiting for the
// comm thread to finish the gather if it has it queued. The op's time starts
// after the wait, so that it is the compute's alone and the wait shows as the
// bubble it is.
static int fsdp_wait_gathered(Fsdp *fsdp, OpRun *run, int kind, int l0, int l1) {
    const Layout *layout = fsdp->layout;
    int nl = layout->nl, whole = (layout->first && l0 == 0) || (layout->last && l1 == nl), rc = 0;
    pthread_mutex_lock(&fsdp->lock);
    for (int b = l0; b <= nl && rc == 0; b++) {
        if (b == l1) b = nl;
        if (b == nl && !whole) break;
        rc = fsdp_wait(fsdp, gathered_or_idle, b);
        if (rc == 0 && !fsdp->held[0][b])
            rc = fail("stage [%d,%d): %s of layer %d, but bucket %d is not gathered (ALLGATHER it first)",
                      layout->lo, layout->hi, OP_NAMES[kind], l0, b);
    }
    pthread_mutex_unlock(&fsdp->lock);
    run->op_start = now_seconds();
    return rc;
}

// BWD_WEIGHT of layers [l0, l1): a layer's first backward of the step takes a
// gradient buffer, one the validator counted free once the comm thread has
// reduce-scattered what held it (its reduce-scatters lag the list, never
// block on the compute). fresh[l - l0] is the buffer layer l took, which
// the trainer zeroes (the micro-batches sum into it), or NULL. The op's time
// starts after any wait, as fsdp_wait_gathered's.
static int fsdp_take_grad_buffers(Fsdp *fsdp, OpRun *run, int l0, int l1, float **fresh) {
    const Layout *layout = fsdp->layout;
    int rc = 0;
    pthread_mutex_lock(&fsdp->lock);
    for (int l = l0; l < l1 && rc == 0; l++) {
        fresh[l - l0] = NULL;
        if (fsdp->pending[1][l])
            rc = fail("stage [%d,%d): BWD_WEIGHT of layer %d after its REDUCE_SCATTER", layout->lo, layout->hi, l);
        if (rc || fsdp->held[1][l]) continue;
        if (fsdp->pools[1].count == 0)
            rc = fail("stage [%d,%d): layer %d needs a gradient buffer but the stage has none (the op list holds more "
                      "than the validator's peak)", layout->lo, layout->hi, l);
        if (rc == 0) rc = fsdp_wait(fsdp, grad_buffer_free, 0);
        if (rc == 0) fresh[l - l0] = fsdp->held[1][l] = pool_take(&fsdp->pools[1]);
    }
    pthread_mutex_unlock(&fsdp->lock);
    run->op_start = now_seconds();
    return rc;
}

// ----------------------------------------------------------------------------
// the op-list executor, written once for both trainers. A trainer hands it its
// compute and its buffers as function pointers (common.h calls nothing a
// trainer defines); `stage` is the trainer's own Stage, passed back to each.

// The layers [l0, l1) a compute op of part `part` runs (part -1: the whole stage).
static void op_layers(const Layout *layout, int part, int *l0, int *l1) {
    *l0 = part < 0 ? 0 : part;
    *l1 = part < 0 ? layout->nl : part + 1;
}

typedef struct {
    // readies a step of m micro-batches (training with m > 0: zero the gradients)
    int (*begin)(void *stage, int m, int training);
    // FWD of micro-batch mb into activation buffer `acts_index`, of the whole
    // stage (part -1) or its layer `part`: its (B,T) tokens on the first and
    // the last stage (NULL elsewhere); the last stage records the micro-batch's
    // mean loss, in the OpRun's mb_losses[mb] by the time end returns; dloss
    // is d(loss)/d(each token's loss) for a trainer that fuses it in
    int (*forward)(void *stage, int acts_index, int mb, int part, const int *inputs, const int *targets, float dloss,
                   int training);
    int (*backward_input)(void *stage, int acts_index, int part, float dloss);
    int (*backward_weight)(void *stage, int acts_index, int part);
    // the four message buffers of an activation buffer, indexed by kind -
    // OP_SEND_ACT: the stage's output (SEND_ACT), its input (RECV_ACT),
    // d(input) (SEND_GRAD), d(output) (RECV_GRAD); in the trainer's memory
    // (the GPU's for CUDA)
    void (*message_buffers)(void *stage, int acts_index, void *bufs[4]);
    // moves a group of n sends/receives, bufs[i] the buffer of op i
    int (*exchange)(void *stage, const int *ops, int n, void *const *bufs);
    // a data-parallel collective, or FREE, of a bucket (reductions only in a training list)
    int (*collective)(void *stage, int kind, int bucket);
    // after every op that started at t_start (the GPU waits for its stream
    // there, so the op times are the work's); may be NULL
    int (*op_done)(void *stage, int kind, double t_start);
    // after the last op (the GPU fetches the losses); may be NULL
    int (*end)(void *stage, int m);
} StageHooks;

// Runs one step's op list for a stage of that layout, micro-batches of B*T
// tokens, one of `replicas` data-parallel replicas; see stage_run in gpt.h.
static int run_op_list(const StageHooks *hooks, void *stage, OpRun *run, const Layout *layout, size_t BT, int replicas,
                       const int *ops, int nops, const int *inputs, const int *targets, int training,
                       float *loss_sum) {
    *loss_sum = 0.0f;
    if (oprun_begin(run, ops, nops, layout->nl)) return -1;
    int m = run->m;
    if (layout->first && m && !inputs) return fail("the first stage needs input tokens");
    if (layout->last && m && !targets) return fail("the last stage needs target tokens");
    // the tokens index wte and the softmax: all of them checked before any op runs
    if ((layout->first && m && check_tokens(inputs, m * BT, layout->cfg.vocab_size, "input")) ||
        (layout->last && m && check_tokens(targets, m * BT, layout->cfg.vocab_size, "target")))
        return -1;
    if (hooks->begin(stage, m, training)) return -1;
    // the mean over the global batch: m micro-batches on each of the D replicas
    float dloss = 1.0f / (float)(BT * m * replicas);
    for (int i = 0; i < nops;) {
        int kind = ops[OP_INTS * i], mb = ops[OP_INTS * i + 1], part = ops[OP_INTS * i + 2], n = 1;
        run->op = i;
        run->op_start = now_seconds();
        if (is_message(kind)) {
            while (i + n < nops && is_message(ops[OP_INTS * (i + n)])) n++;
            if (n > MAX_GROUP) return fail("a group of %d sends/receives is more than %d", n, MAX_GROUP);
            void *bufs[MAX_GROUP];
            for (int k = 0; k < n; k++) {
                void *mine[4];
                int acts_index = oprun_acts_of(run, ops[OP_INTS * (i + k) + 1], layout->lo, layout->hi);
                if (acts_index < 0) return -1;
                hooks->message_buffers(stage, acts_index, mine);
                bufs[k] = mine[ops[OP_INTS * (i + k)] - OP_SEND_ACT];
            }
            if (hooks->exchange(stage, ops + OP_INTS * i, n, bufs)) return -1;
        } else if (is_bucket_op(kind)) {
            if (!training && reduces(kind)) return fail("op %d: %s of bucket %d in a forward-only op list", i,
                                                        OP_NAMES[kind], part);
            if (hooks->collective(stage, kind, part)) return -1;
        } else {
            int acts_index = oprun_acts_of(run, mb, layout->lo, layout->hi);
            if (acts_index < 0) return -1;
            if (kind == OP_FWD) {
                if (hooks->forward(stage, acts_index, mb, part, layout->first ? inputs + mb * BT : NULL,
                                   layout->last ? targets + mb * BT : NULL, dloss, training))
                    return -1;
            } else if (!training) {
                return fail("op %d: %s in a forward-only op list", i, OP_NAMES[kind]);
            } else if (kind == OP_BWD_INPUT ? hooks->backward_input(stage, acts_index, part, dloss)
                                            : hooks->backward_weight(stage, acts_index, part)) {
                return -1;
            }
        }
        if (hooks->op_done && hooks->op_done(stage, kind, run->op_start)) return -1;
        oprun_done(run, ops, i, n, run->op_start, now_seconds());
        i += n;
    }
    if (hooks->end && hooks->end(stage, m)) return -1;
    *loss_sum = layout->last ? oprun_loss_sum(run) : 0.0f;
    return 0;
}

// ----------------------------------------------------------------------------
// optimizer scalars: the learning-rate schedule and the grad norm from its parts

float gpt_lr_at(int step, float max_lr, int warmup, int total_steps, float min_frac) {
    float min_lr = max_lr * min_frac;
    if (step < warmup) return max_lr * (step + 1) / warmup;
    if (step >= total_steps - 1) return min_lr;
    float progress = (float)(step - warmup) / (float)(total_steps - 1 - warmup);
    return min_lr + 0.5f * (1.0f + cosf((float)PI * progress)) * (max_lr - min_lr);
}

double gpt_norm_from_parts(const double *parts, int L) {
    double total = 0.0;
    for (int i = 0; i < NUM_PARAM_TENSORS * L; i++) total += parts[i];
    return sqrt(total);
}

// ----------------------------------------------------------------------------
// sampling: top-k with temperature from one row of logits

typedef struct { float logit; int id; } Candidate;

// What stage_sample checks before it runs, on either trainer: a whole-model
// stage and a prompt of tokens in the vocabulary. Returns the top_k to use
// (one outside [1, V] is all of V), or -1 with a message.
static int sample_check(const Layout *layout, const int *prompt, int np, int top_k) {
    int V = layout->cfg.vocab_size;
    if (!(layout->first && layout->last)) return fail("sampling needs the whole model in one stage");
    if (np < 1) return fail("sampling needs a prompt of at least one token");
    for (int i = 0; i < np; i++)
        if (prompt[i] < 0 || prompt[i] >= V) return fail("prompt token %d is outside the vocabulary", prompt[i]);
    return top_k <= 0 || top_k > V ? V : top_k;
}

// cand has room for top_k entries (1 <= top_k <= V); temperature 0 is greedy.
static int sample_top_k(const float *logits, int V, float temperature, int top_k, uint64_t *rng,
                        Candidate *cand) {
    int k = 0;  // the top_k largest, sorted, by insertion (k is small)
    for (int i = 0; i < V; i++) {
        float x = logits[i];
        if (k == top_k && x <= cand[k - 1].logit) continue;
        int j = k < top_k ? k++ : k - 1;
        while (j > 0 && cand[j - 1].logit < x) { cand[j] = cand[j - 1]; j--; }
        cand[j].logit = x;
        cand[j].id = i;
    }
    if (temperature <= 0.0f) return cand[0].id;
    double sum = 0.0;
    for (int i = 0; i < k; i++) sum += exp((cand[i].logit - cand[0].logit) / temperature);
    double r = uniform01(rng) * sum, acc = 0.0;
    for (int i = 0; i < k; i++) {
        acc += exp((cand[i].logit - cand[0].logit) / temperature);
        if (r < acc) return cand[i].id;
    }
    return cand[k - 1].id;
}

// ----------------------------------------------------------------------------
// the standalone trainers, ./train_gpt and ./train_gpt_cu: single-process
// training from the shell, the same for both
//
// Each trainer's main(), the last thing in its file, hands train_main its
// stage API as a table of function pointers (a Trainer), as run_op_list takes
// StageHooks: the loop is written once, here, and common.h calls nothing a
// trainer defines. Built only into the binaries (-DTRAIN_GPT_MAIN): the
// Python bindings link the stage API alone.

#ifdef TRAIN_GPT_MAIN

// A run's flags (the defaults are parse_flags').
typedef struct {
    const char *train_pattern, *val_pattern;  // -i, -j: token shards
    const char *model;                        // -e: a preset or an llm.c model file
    const char *checkpoint_dir;               // -o, NULL for none
    const char *tokenizer;                    // -z
    int B, T, micro_batches, steps;           // -b, -t, -a, -n
    int warmup, val_every, sample_tokens;     // -u, -v, -g
    int checkpoint_every, keep, threads;      // -k, -K, -p
    int resume, overwrite;                    // -r, -w
    float lr;                                 // -l
    uint64_t seed;                            // -x
} TrainFlags;

static void usage(const char *name) {
    fprintf(stderr,
        "usage: %s [flags]   (single-process training; python3 train.py does more)\n"
        "  -i PATTERN  train shards (data/shakespeare/shakespeare_train_*.bin)\n"
        "  -j PATTERN  val shards   (data/shakespeare/shakespeare_val_*.bin)\n"
        "  -e MODEL    preset (tiny, d6, d8, d12, ...) or an llm.c model file (tiny)\n"
        "  -b B -t T   micro-batch size and sequence length (8, 64)\n"
        "  -a M        micro-batches per step (1)\n"
        "  -n STEPS    optimizer steps (50)\n"
        "  -l LR -u WARMUP   learning rate and warmup steps (1e-3, 10)\n"
        "  -v EVERY    validation every N steps, 0 = never (25)\n"
        "  -g TOKENS   tokens to sample at the end (64)\n"
        "  -o DIR -k EVERY   checkpoint directory and interval (none)\n"
        "  -r          resume from the newest checkpoint in -o\n"
        "  -w          start over in -o, deleting the checkpoints it holds\n"
        "  -K KEEP     keep only the newest KEEP checkpoints, 0 = all (0)\n"
        "  -x SEED -p THREADS  (1337, all cores)\n"
        "  -z PATH     tokenizer for printing samples (data/gpt2_tokenizer.bin)\n", name);
}

// A whole decimal number in [lo, hi] for flag f, or -1 with a message.
static int parse_integer(const char *f, const char *v, long long lo, long long hi, long long *out) {
    char *end;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (errno || end == v || *end || x < lo || x > hi)
        return fail("%s %s: expected a whole number in [%lld, %lld]", f, v, lo, hi);
    *out = x;
    return 0;
}

// argv into *flags: 0; 1 for a flag it does not know (-h among them), to
// print the usage; -1 with a message for a value out of its bounds, which
// keep the run sane (threads: up to 4 per core).
static int parse_flags(TrainFlags *flags, int argc, char **argv) {
    memset(flags, 0, sizeof *flags);
    flags->train_pattern = "data/shakespeare/shakespeare_train_*.bin";
    flags->val_pattern = "data/shakespeare/shakespeare_val_*.bin";
    flags->model = "tiny";
    flags->tokenizer = "data/gpt2_tokenizer.bin";
    flags->B = 8; flags->T = 64; flags->micro_batches = 1; flags->steps = 50;
    flags->warmup = 10; flags->val_every = 25; flags->sample_tokens = 64;
    flags->lr = 1e-3f;
    flags->seed = 1337;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (strcmp(f, "-r") == 0) { flags->resume = 1; continue; }
        if (strcmp(f, "-w") == 0) { flags->overwrite = 1; continue; }
        if (f[0] != '-' || strlen(f) != 2 || i + 1 >= argc) return 1;
        const char *v = argv[++i];
        struct { char flag; int *to; long long lo, hi; } ints[] = {
            {'b', &flags->B, 1, INT_MAX}, {'t', &flags->T, 1, MAX_SEQ_LEN}, {'a', &flags->micro_batches, 1, 1024},
            {'n', &flags->steps, 0, MAX_CHECKPOINT_STEP}, {'u', &flags->warmup, 0, MAX_CHECKPOINT_STEP},
            {'v', &flags->val_every, 0, MAX_CHECKPOINT_STEP}, {'g', &flags->sample_tokens, 0, 100000},
            {'k', &flags->checkpoint_every, 0, MAX_CHECKPOINT_STEP}, {'K', &flags->keep, 0, MAX_CHECKPOINT_STEP},
            {'p', &flags->threads, 0, 4 * (cores > 0 ? cores : 1)},
        };
        int known = 0;
        for (size_t k = 0; k < sizeof ints / sizeof ints[0]; k++) {
            long long x = 0;
            if (ints[k].flag != f[1]) continue;
            if (parse_integer(f, v, ints[k].lo, ints[k].hi, &x)) return -1;
            *ints[k].to = (int)x;
            known = 1;
        }
        if (known) continue;
        char *end;
        switch (f[1]) {
        case 'i': flags->train_pattern = v; break;
        case 'j': flags->val_pattern = v; break;
        case 'e': flags->model = v; break;
        case 'o': flags->checkpoint_dir = v; break;
        case 'z': flags->tokenizer = v; break;
        case 'l':
            flags->lr = strtof(v, &end);
            if (end == v || *end || !isfinite(flags->lr) || flags->lr <= 0.0f || flags->lr > 10.0f)
                return fail("-l %s: expected a learning rate in (0, 10]", v);
            break;
        case 'x':
            errno = 0;
            flags->seed = strtoull(v, &end, 10);
            if (errno || end == v || *end || v[0] == '-') return fail("-x %s: expected a seed in [0, 2^64)", v);
            break;
        default: return 1;
        }
    }
    if ((flags->resume || flags->overwrite || flags->keep || flags->checkpoint_every) && !flags->checkpoint_dir)
        return fail("-r, -w, -k and -K need a checkpoint directory (-o)");
    if (flags->resume && flags->overwrite) return fail("-r continues what -w would delete: pick one");
    return 0;
}

// What train_main needs of a trainer: its name, the stage API it implements
// (gpt.h; in the order train_main calls it), and two calls of its own.
typedef struct {
    const char *name;  // the binary, for the usage line
    Stage *(*create)(GPTConfig cfg, int lo, int hi, int B, int T, int activation_buffers);
    int (*load)(Stage *s, const char *path);
    int (*init)(Stage *s, uint64_t seed);
    int (*read_checkpoint)(Stage *s, const char *dir, int64_t step, TrainState *ts);
    int (*run)(Stage *s, const int *ops, int nops, const int *inputs, const int *targets, int training,
               float *loss_sum);
    int (*sum_wte_grads)(Stage *s);
    void (*grad_norm_parts)(Stage *s, double *parts);
    void (*adamw)(Stage *s, float lr, float weight_decay, float grad_scale, int step);
    int (*write_checkpoint)(Stage *s, const char *dir, const TrainState *ts);
    int (*sample)(Stage *s, const int *prompt, int np, int n, float temperature, int top_k, uint64_t seed,
                  int *out);
    void (*free)(Stage *s);
    // 0, or -1 with the message of a failure that one of the void calls
    // (grad_norm_parts, adamw) recorded; NULL where they cannot fail
    int (*check)(Stage *s);
    // prints what the run computes on
    void (*describe)(Stage *s);
} Trainer;

static int die(void) {
    fprintf(stderr, "error: %s\n", gpt_last_error());
    return 1;
}

static int trainer_check(const Trainer *trainer, Stage *s) { return trainer->check ? trainer->check(s) : 0; }

// llm.c's tokenizer file, to print samples as text
typedef struct { int n, eot; char **tokens; } Tokenizer;

// Reads a tokenizer that can decode every id of a vocab_size vocabulary.
static int tokenizer_read(Tokenizer *tk, const char *path, int vocab_size) {
    FILE *f = fopen(path, "rb");
    if (!f) return fail("%s: cannot open tokenizer (%s)", path, strerror(errno));
    int32_t h[HEADER_INTS];
    int rc = -1;
    if (fread(h, sizeof h, 1, f) != 1 || h[0] != TOKENIZER_MAGIC || h[1] != 2) {
        fail("%s: not an llm.c tokenizer file (version 2)", path);
        goto done;
    }
    if (h[2] < vocab_size || h[2] > MAX_VOCAB || h[3] < 0 || h[3] >= vocab_size) {
        fail("%s: tokenizer of %d tokens (end of text %d) for a model of %d: expected at least as many, "
             "at most %d, and its end of text among the model's", path, h[2], h[3], vocab_size, MAX_VOCAB);
        goto done;
    }
    tk->n = h[2];
    tk->eot = h[3];
    if (!(tk->tokens = (char **)calloc_or_fail(tk->n, sizeof(char *), "the tokenizer"))) goto done;
    for (int i = 0; i < tk->n; i++) {
        unsigned char len;
        if (fread(&len, 1, 1, f) != 1) { fail("%s: truncated at token %d of %d", path, i, tk->n); goto done; }
        if (!(tk->tokens[i] = (char *)calloc_or_fail(len + 1, 1, "a token"))) goto done;
        if (fread(tk->tokens[i], 1, len, f) != len) {
            fail("%s: truncated at token %d of %d", path, i, tk->n);
            goto done;
        }
    }
    rc = 0;
done:
    fclose(f);
    return rc;
}

static void tokenizer_free(Tokenizer *tk) {
    for (int i = 0; tk->tokens && i < tk->n; i++) free(tk->tokens[i]);
    free(tk->tokens);
}

// The mean loss of the first `batches` batches of val, forward only.
static float validation_loss(const Trainer *trainer, Stage *s, DataLoader *val, int *inputs, int *targets,
                             int batches) {
    int ops[OP_INTS] = {OP_FWD, 0, -1};
    float sum = 0.0f, loss = 0.0f;
    dataloader_set_position(val, 0, 0);
    for (int i = 0; i < batches; i++) {
        if (dataloader_next(val, inputs, targets) || trainer->run(s, ops, 1, inputs, targets, 0, &loss)) return NAN;
        sum += loss;
    }
    return sum / batches;
}

// n sampled tokens as text, or as ids where there is no tokenizer
static void print_sample(const Tokenizer *tokenizer, const int *tokens, int n) {
    printf("sample:\n");
    for (int i = 0; i < n; i++) {
        if (tokenizer->tokens) printf("%s", tokenizer->tokens[tokens[i]]);
        else printf("%d ", tokens[i]);
    }
    printf("\n");
}

// One run from the command line: 0, or 1 with the error on stderr.
// Everything the run needs is checked before its first step.
static int train_main(int argc, char **argv, const Trainer *trainer) {
    TrainFlags flags;
    int parsed = parse_flags(&flags, argc, argv);
    if (parsed > 0) usage(trainer->name);
    if (parsed) return parsed > 0 ? 1 : die();
    gpt_set_threads(flags.threads);
    GPTConfig cfg;
    int from_file = gpt_config_from_name(flags.model, &cfg) != 0;
    if (from_file && gpt_read_config(flags.model, &cfg)) return die();
    Stage *s = trainer->create(cfg, 0, cfg.num_layers, flags.B, flags.T, 1);
    if (!s) return die();
    if (from_file ? trainer->load(s, flags.model) : trainer->init(s, flags.seed))
        return die();
    DataLoader *train = dataloader_open(flags.train_pattern, flags.B, flags.T);
    if (!train || dataloader_check_vocab(train, cfg.vocab_size)) return die();
    DataLoader *val = flags.val_every > 0 ? dataloader_open(flags.val_pattern, flags.B, flags.T) : NULL;
    if (flags.val_every > 0 && (!val || dataloader_check_vocab(val, cfg.vocab_size))) return die();
    Tokenizer tokenizer;
    memset(&tokenizer, 0, sizeof tokenizer);
    // no tokenizer file prints token ids; one that is there must fit the model
    if (flags.sample_tokens > 0 && access(flags.tokenizer, F_OK) == 0 &&
        tokenizer_read(&tokenizer, flags.tokenizer, cfg.vocab_size))
        return die();
    const char *dir = flags.checkpoint_dir;
    int mode = flags.resume ? CKPT_RESUME : flags.overwrite ? CKPT_OVERWRITE : CKPT_FRESH;
    int dir_lock = dir ? checkpoint_dir_claim(dir, mode, "resume it (-r) or start over (-w)") : -1;
    if (dir && dir_lock < 0) return die();
    int start = 0;
    if (flags.resume) {
        int64_t last = checkpoint_latest_usable(dir, &cfg);
        TrainState ts;
        if (last < 0) { fail("-r: no usable checkpoint in %s", dir); return die(); }
        if (trainer->read_checkpoint(s, dir, last, &ts) || dataloader_set_position(train, ts.shard, ts.pos))
            return die();
        start = (int)ts.step;
        printf("resumed from %s step %d\n", dir, start);
    }
    int M = flags.micro_batches;
    size_t BT = (size_t)flags.B * flags.T;
    int *inputs = (int *)calloc_or_fail(M * BT, sizeof(int), "the inputs");
    int *targets = (int *)calloc_or_fail(M * BT, sizeof(int), "the targets");
    int *ops = (int *)calloc_or_fail(OP_INTS * 3 * M, sizeof(int), "the op list");
    double *parts = (double *)calloc_or_fail(NUM_PARAM_TENSORS * cfg.num_layers, sizeof(double), "the norm parts");
    if (!inputs || !targets || !ops || !parts) return die();
    for (int mb = 0; mb < M; mb++) {  // one stage: F, B, W per micro-batch
        int op[3 * OP_INTS] = {OP_FWD, mb, -1, OP_BWD_INPUT, mb, -1, OP_BWD_WEIGHT, mb, -1};
        memcpy(ops + 3 * OP_INTS * mb, op, sizeof op);
    }
    trainer->describe(s);
    printf("model L=%d NH=%d C=%d, B=%d T=%d micro-batches=%d, %zu parameters\n",
           cfg.num_layers, cfg.num_heads, cfg.channels, flags.B, flags.T, M, model_size(&cfg));
    for (int step = start; step < flags.steps; step++) {
        double t0 = now_seconds();
        for (int mb = 0; mb < M; mb++)
            if (dataloader_next(train, inputs + mb * BT, targets + mb * BT)) return die();
        float loss;
        if (trainer->run(s, ops, 3 * M, inputs, targets, 1, &loss)) return die();
        loss /= M;
        if (trainer->sum_wte_grads(s)) return die();
        trainer->grad_norm_parts(s, parts);
        double norm = gpt_norm_from_parts(parts, cfg.num_layers);
        if (!isfinite(loss) || !isfinite(norm)) {
            fprintf(stderr, "error: step %d: loss %g, grad norm %g: not finite; stopped before its update and "
                            "checkpoint\n", step + 1, loss, norm);
            return 1;
        }
        float scale = norm > 1.0 ? (float)(1.0 / norm) : 1.0f;
        float step_lr = gpt_lr_at(step, flags.lr, flags.warmup, flags.steps, 0.1f);
        trainer->adamw(s, step_lr, 0.1f, scale, step + 1);
        if (trainer_check(trainer, s)) return die();
        double ms = 1e3 * (now_seconds() - t0);
        printf("step %d/%d | loss %f | lr %.2e | norm %.4f | %.0f ms | %.0f tok/s\n", step + 1, flags.steps,
               loss, step_lr, norm, ms, M * BT / ms * 1e3);
        fflush(stdout);
        if (val && (step + 1) % flags.val_every == 0)
            printf("val loss %f\n", validation_loss(trainer, s, val, inputs, targets, 10));
        int checkpoint_now = dir && flags.checkpoint_every > 0 &&
                             ((step + 1) % flags.checkpoint_every == 0 || step + 1 == flags.steps);
        if (checkpoint_now) {
            TrainState ts = {step + 1, 0, 0};
            dataloader_get_position(train, &ts.shard, &ts.pos);
            if (trainer->write_checkpoint(s, dir, &ts) || checkpoint_commit(dir, step + 1) ||
                (flags.keep && checkpoint_prune(dir, flags.keep)))
                return die();
        }
    }
    if (flags.sample_tokens > 0) {
        int n = flags.sample_tokens;
        int prompt = tokenizer.tokens ? tokenizer.eot : cfg.vocab_size > 50256 ? 50256 : 0;
        int *out = (int *)calloc_or_fail(1 + n, sizeof(int), "the sample");
        if (!out || trainer->sample(s, &prompt, 1, n, 1.0f, 40, flags.seed, out)) return die();
        print_sample(&tokenizer, out + 1, n);
        free(out);
    }
    tokenizer_free(&tokenizer);
    if (dir_lock >= 0) close(dir_lock);
    dataloader_free(train);
    dataloader_free(val);
    trainer->free(s);
    free(inputs); free(targets); free(ops); free(parts);
    return 0;
}

#endif

#endif
