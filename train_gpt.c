// train_gpt.c: GPT-2 training on the CPU in fp32, one pipeline stage at a time.
//
// A Stage owns layers [lo, hi) (plus the embedding on the first stage and the
// final layernorm + LM head on the last) and runs an op list per step: FWD,
// BWD_INPUT, BWD_WEIGHT for a micro-batch, and sends/receives to its
// neighbours. Every matmul's backward is split into the input-gradient part
// (BWD_INPUT, on the critical path between stages) and the weight-gradient part
// (BWD_WEIGHT, which a zero-bubble schedule defers into the idle time).
//
// Determinism: every parallel loop writes disjoint outputs and sums in a fixed
// order, so results do not depend on the thread count, and a model split into
// S stages computes bitwise the same as one stage.
//
// Sections, in the order data flows: layers, model, executor, optimizer,
// data, checkpoint I/O, sampling, main.
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <math.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "gpt.h"

// ----------------------------------------------------------------------------
// errors: one line, kept until the next failure

static _Thread_local char g_error[1024];

const char *gpt_last_error(void) { return g_error; }

static int fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_error, sizeof g_error, fmt, ap);
    va_end(ap);
    return -1;
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

// ----------------------------------------------------------------------------
// layers
//
// Shapes: B batch, T time, C channels, NH heads, OC/IC a matmul's output and
// input channels, N = B*T rows. Linear weights are (OC, IC) as in llm.c.

// out = wte[inp] + wpe[t]
static void encoder_forward(float *out, const int *inp, const float *wte,
                            const float *wpe, int B, int T, int C) {
    #pragma omp parallel for
    for (int bt = 0; bt < B * T; bt++) {
        const float *wt = wte + (size_t)inp[bt] * C, *wp = wpe + (size_t)(bt % T) * C;
        float *o = out + (size_t)bt * C;
        for (int c = 0; c < C; c++) o[c] = wt[c] + wp[c];
    }
}

// Scatter-add in (b,t) order so repeated tokens always sum the same way;
// parallel over channels, which no two rows share.
static void encoder_backward(float *dwte, float *dwpe, const float *dout,
                             const int *inp, int B, int T, int C) {
    #pragma omp parallel for
    for (int c0 = 0; c0 < C; c0 += 16) {
        int c1 = c0 + 16 < C ? c0 + 16 : C;
        for (int bt = 0; bt < B * T; bt++) {
            const float *d = dout + (size_t)bt * C;
            float *wt = dwte + (size_t)inp[bt] * C, *wp = dwpe + (size_t)(bt % T) * C;
            for (int c = c0; c < c1; c++) { wt[c] += d[c]; wp[c] += d[c]; }
        }
    }
}

// out = (x - mean) * rstd * w + b per row, keeping mean and rstd for backward
static void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float m = 0.0f, v = 0.0f;
        for (int c = 0; c < C; c++) m += x[c];
        m /= C;
        for (int c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
        float s = 1.0f / sqrtf(v / C + 1e-5f);
        float *o = out + (size_t)n * C;
        for (int c = 0; c < C; c++) o[c] = (x[c] - m) * s * w[c] + b[c];
        mean[n] = m;
        rstd[n] = s;
    }
}

// dinp += d(layernorm)/d(inp) . dout (the input half of the backward)
static void layernorm_backward_input(float *dinp, const float *dout, const float *inp,
                                     const float *w, const float *mean,
                                     const float *rstd, int N, int C) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
        float m = mean[n], s = rstd[n];
        float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
        for (int c = 0; c < C; c++) {
            float dnorm = w[c] * d[c];
            dnorm_mean += dnorm;
            dnorm_norm_mean += dnorm * (x[c] - m) * s;
        }
        dnorm_mean /= C;
        dnorm_norm_mean /= C;
        float *di = dinp + (size_t)n * C;
        for (int c = 0; c < C; c++) {
            float norm = (x[c] - m) * s;
            di[c] += (w[c] * d[c] - dnorm_mean - norm * dnorm_norm_mean) * s;
        }
    }
}

// dw += sum_n dout * norm, db += sum_n dout (the weight half), rows in order
static void layernorm_backward_weight(float *dw, float *db, const float *dout,
                                      const float *inp, const float *mean,
                                      const float *rstd, int N, int C) {
    #pragma omp parallel for
    for (int c0 = 0; c0 < C; c0 += 16) {
        int c1 = c0 + 16 < C ? c0 + 16 : C;
        for (int n = 0; n < N; n++) {
            const float *x = inp + (size_t)n * C, *d = dout + (size_t)n * C;
            for (int c = c0; c < c1; c++) {
                dw[c] += d[c] * (x[c] - mean[n]) * rstd[n];
                db[c] += d[c];
            }
        }
    }
}

// The two GEMM shapes training needs. Register tiles of RM rows by a strip of
// columns keep accumulators in vector registers; each tile is owned by one
// thread and sums in a fixed order, so the thread count never changes a bit.
#define RM 4
#define RN 64

// out (M,N) = A (M,K) @ W^T + bias, W (N,K) row-major: the forward matmul,
// each output a dot product of two contiguous rows.
static void gemm_nt(float *out, const float *A, const float *W, const float *bias,
                    int M, int K, int N) {
    int mb = (M + RM - 1) / RM, nb = (N + RM - 1) / RM;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int j = 0; j < nb; j++) {
        for (int i = 0; i < mb; i++) {
            int m0 = i * RM, n0 = j * RM;
            if (m0 + RM <= M && n0 + RM <= N) {
                // 16 dot products at once: each step loads RM rows of A and
                // of W and does RM*RM fused multiply-adds per vector lane
                float acc[RM][RM][16] = {{{0}}};
                int k = 0;
                for (; k + 16 <= K; k += 16)
                    for (int r = 0; r < RM; r++)
                        for (int c = 0; c < RM; c++)
                            for (int l = 0; l < 16; l++)
                                acc[r][c][l] += A[(size_t)(m0 + r) * K + k + l] *
                                                W[(size_t)(n0 + c) * K + k + l];
                for (int r = 0; r < RM; r++)
                    for (int c = 0; c < RM; c++) {
                        float s = 0.0f;
                        for (int l = 0; l < 16; l++) s += acc[r][c][l];
                        for (int kk = k; kk < K; kk++)
                            s += A[(size_t)(m0 + r) * K + kk] * W[(size_t)(n0 + c) * K + kk];
                        out[(size_t)(m0 + r) * N + n0 + c] = s + (bias ? bias[n0 + c] : 0.0f);
                    }
            } else {
                for (int m = m0; m < M && m < m0 + RM; m++)
                    for (int n = n0; n < N && n < n0 + RM; n++) {
                        float acc[16] = {0};
                        int k = 0;
                        for (; k + 16 <= K; k += 16)
                            for (int l = 0; l < 16; l++)
                                acc[l] += A[(size_t)m * K + k + l] * W[(size_t)n * K + k + l];
                        float s = 0.0f;
                        for (int l = 0; l < 16; l++) s += acc[l];
                        for (; k < K; k++) s += A[(size_t)m * K + k] * W[(size_t)n * K + k];
                        out[(size_t)m * N + n] = s + (bias ? bias[n] : 0.0f);
                    }
            }
        }
    }
}

// out (M,N) (+)= A (M,K) @ Bm (K,N), with A read through strides (a(m,k) =
// A[m*sm + k*sk]) so one kernel serves both backward matmuls: dinp = dout @ W
// and dW += dout^T @ inp.
static void gemm_nn(float *out, const float *A, size_t sm, size_t sk, const float *Bm,
                    int M, int K, int N, int accumulate) {
    int mb = (M + RM - 1) / RM, nb = (N + RN - 1) / RN;
    #pragma omp parallel for collapse(2) schedule(static)
    for (int i = 0; i < mb; i++) {
        for (int j = 0; j < nb; j++) {
            int m0 = i * RM, n0 = j * RN;
            if (m0 + RM <= M && n0 + RN <= N) {
                float acc[RM][RN] = {{0}};
                for (int k = 0; k < K; k++) {
                    const float *b = Bm + (size_t)k * N + n0;
                    for (int r = 0; r < RM; r++) {
                        float a = A[(size_t)(m0 + r) * sm + (size_t)k * sk];
                        for (int c = 0; c < RN; c++) acc[r][c] += a * b[c];
                    }
                }
                for (int r = 0; r < RM; r++) {
                    float *o = out + (size_t)(m0 + r) * N + n0;
                    for (int c = 0; c < RN; c++) o[c] = accumulate ? o[c] + acc[r][c] : acc[r][c];
                }
            } else {
                int m1 = m0 + RM < M ? m0 + RM : M, n1 = n0 + RN < N ? n0 + RN : N;
                for (int m = m0; m < m1; m++) {
                    float acc[RN] = {0};
                    for (int k = 0; k < K; k++) {
                        float a = A[(size_t)m * sm + (size_t)k * sk];
                        for (int n = n0; n < n1; n++) acc[n - n0] += a * Bm[(size_t)k * N + n];
                    }
                    float *o = out + (size_t)m * N;
                    for (int n = n0; n < n1; n++) o[n] = accumulate ? o[n] + acc[n - n0] : acc[n - n0];
                }
            }
        }
    }
}

// out (N,OC) = inp (N,IC) @ W^T + bias
static void matmul_forward(float *out, const float *inp, const float *W,
                           const float *bias, int N, int IC, int OC) {
    gemm_nt(out, inp, W, bias, N, IC, OC);
}

// dinp (N,IC) = dout (N,OC) @ W (OC,IC)
static void matmul_backward_input(float *dinp, const float *dout, const float *W,
                                  int N, int IC, int OC) {
    gemm_nn(dinp, dout, OC, 1, W, N, OC, IC, 0);
}

// dW (OC,IC) += dout^T @ inp, dbias (OC) += column sums of dout
static void matmul_backward_weight(float *dW, float *dbias, const float *dout,
                                   const float *inp, int N, int IC, int OC) {
    gemm_nn(dW, dout, 1, OC, inp, OC, N, IC, 1);
    if (dbias) {
        #pragma omp parallel for
        for (int o = 0; o < OC; o++) {
            float s = 0.0f;
            for (int n = 0; n < N; n++) s += dout[(size_t)n * OC + o];
            dbias[o] += s;
        }
    }
}

// Causal self-attention. qkv (B,T,3C) holds q, k, v side by side; head h owns
// channels [h*hs, (h+1)*hs). att (B,NH,T,T) keeps the softmax for backward;
// out (B,T,C) is the heads' outputs merged back.
static void attention_forward(float *out, float *att, const float *qkv,
                              int B, int T, int C, int NH) {
    int hs = C / NH, C3 = 3 * C;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for collapse(3)
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < NH; h++) {
                const float *q = qkv + (size_t)(b * T + t) * C3 + h * hs;
                float *a = att + ((size_t)(b * NH + h) * T + t) * T;
                float maxv = -INFINITY;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *k = qkv + (size_t)(b * T + t2) * C3 + C + h * hs;
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) s += q[i] * k[i];
                    a[t2] = s * scale;
                    if (a[t2] > maxv) maxv = a[t2];
                }
                float sum = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) { a[t2] = expf(a[t2] - maxv); sum += a[t2]; }
                for (int t2 = 0; t2 <= t; t2++) a[t2] /= sum;
                for (int t2 = t + 1; t2 < T; t2++) a[t2] = 0.0f;
                float *o = out + (size_t)(b * T + t) * C + h * hs;
                for (int i = 0; i < hs; i++) o[i] = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v = qkv + (size_t)(b * T + t2) * C3 + 2 * C + h * hs;
                    for (int i = 0; i < hs; i++) o[i] += a[t2] * v[i];
                }
            }
}

// dqkv (B,T,3C) = backward of attention_forward. One thread per (b, h): the
// k and v gradients of a head sum over every later query, all inside it.
static void attention_backward(float *dqkv, const float *dout, const float *qkv,
                               const float *att, int B, int T, int C, int NH) {
    int hs = C / NH, C3 = 3 * C;
    float scale = 1.0f / sqrtf((float)hs);
    #pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++) {
            float *datt = malloc(sizeof(float) * T);
            for (int t = 0; t < T; t++) {
                float *dq = dqkv + (size_t)(b * T + t) * C3 + h * hs;
                for (int i = 0; i < hs; i++) dq[i] = 0.0f;
            }
            for (int t = 0; t < T; t++)
                for (int i = 0; i < 2 * hs; i++) {
                    int c = i < hs ? C + h * hs + i : 2 * C + h * hs + (i - hs);
                    dqkv[(size_t)(b * T + t) * C3 + c] = 0.0f;
                }
            for (int t = 0; t < T; t++) {
                const float *a = att + ((size_t)(b * NH + h) * T + t) * T;
                const float *d = dout + (size_t)(b * T + t) * C + h * hs;
                const float *q = qkv + (size_t)(b * T + t) * C3 + h * hs;
                float *dq = dqkv + (size_t)(b * T + t) * C3 + h * hs;
                // through out = att @ v
                float dot = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v = qkv + (size_t)(b * T + t2) * C3 + 2 * C + h * hs;
                    float *dv = dqkv + (size_t)(b * T + t2) * C3 + 2 * C + h * hs;
                    float s = 0.0f;
                    for (int i = 0; i < hs; i++) { s += d[i] * v[i]; dv[i] += a[t2] * d[i]; }
                    datt[t2] = s;
                    dot += a[t2] * s;
                }
                // through the softmax, then the scaled q.k
                for (int t2 = 0; t2 <= t; t2++) {
                    float dpre = a[t2] * (datt[t2] - dot) * scale;
                    const float *k = qkv + (size_t)(b * T + t2) * C3 + C + h * hs;
                    float *dk = dqkv + (size_t)(b * T + t2) * C3 + C + h * hs;
                    for (int i = 0; i < hs; i++) { dq[i] += dpre * k[i]; dk[i] += dpre * q[i]; }
                }
            }
            free(datt);
        }
}

#define PI 3.14159265358979323846
#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)

static void gelu_forward(float *out, const float *inp, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
    }
}

// dinp = gelu'(inp) * dout
static void gelu_backward(float *dinp, const float *inp, const float *dout, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float u = GELU_SCALE * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float sech2 = 1.0f - th * th;
        float du = GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = (0.5f * (1.0f + th) + 0.5f * x * sech2 * du) * dout[i];
    }
}

static void residual_add(float *out, const float *inp, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) out[i] += inp[i];
}

// logits (N,Vp) -> probs in place (softmax over the first V columns only; the
// padded ones get probability 0); losses[n] = -log p(target). Returns the mean.
static float crossentropy_forward(float *probs, float *losses, const int *targets,
                                  int N, int V, int Vp) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *p = probs + (size_t)n * Vp;
        float maxv = -INFINITY;
        for (int i = 0; i < V; i++) if (p[i] > maxv) maxv = p[i];
        float sum = 0.0f;
        for (int i = 0; i < V; i++) { p[i] = expf(p[i] - maxv); sum += p[i]; }
        for (int i = 0; i < V; i++) p[i] /= sum;
        for (int i = V; i < Vp; i++) p[i] = 0.0f;
        losses[n] = -logf(p[targets[n]]);
    }
    float mean = 0.0f;
    for (int n = 0; n < N; n++) mean += losses[n];
    return mean / N;
}

// probs -> dlogits in place: (p - onehot(target)) * dloss
static void crossentropy_backward(float *probs, const int *targets, float dloss,
                                  int N, int Vp) {
    #pragma omp parallel for
    for (int n = 0; n < N; n++) {
        float *p = probs + (size_t)n * Vp;
        for (int i = 0; i < Vp; i++) p[i] *= dloss;
        p[targets[n]] -= dloss;
    }
}

// ----------------------------------------------------------------------------
// model

const char *const PARAM_NAMES[NUM_PARAM_TENSORS] = {
    "wte", "wpe", "ln1w", "ln1b", "qkvw", "qkvb", "attprojw", "attprojb",
    "ln2w", "ln2b", "fcw", "fcb", "fcprojw", "fcprojb", "lnfw", "lnfb"};

static int is_layer_tensor(int t) { return t != P_WTE && t != P_WPE && t != P_LNFW && t != P_LNFB; }
static int is_matrix(int t) {
    return t == P_WTE || t == P_WPE || t == P_QKVW || t == P_ATTPROJW || t == P_FCW || t == P_FCPROJW;
}

size_t gpt_tensor_size(const GPTConfig *cfg, int t, int layers) {
    size_t C = cfg->channels;
    switch (t) {
    case P_WTE: return (size_t)cfg->padded_vocab_size * C;
    case P_WPE: return (size_t)cfg->max_seq_len * C;
    case P_QKVW: return layers * 3 * C * C;
    case P_QKVB: return layers * 3 * C;
    case P_ATTPROJW: return layers * C * C;
    case P_FCW: case P_FCPROJW: return layers * 4 * C * C;
    case P_FCB: return layers * 4 * C;
    case P_LNFW: case P_LNFB: return C;
    default: return layers * C;  // ln1w ln1b attprojb ln2w ln2b fcprojb
    }
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
            *cfg = (GPTConfig){1024, 50257, 50304, presets[i].L, presets[i].NH, presets[i].C};
            return 0;
        }
    return fail("unknown model '%s' (expected tiny, d6, d8, d12, d24, d36 or d48)", name);
}

// One micro-batch's activations and their gradients. Per-layer buffers hold
// the stage's nl layers back to back. The gradients are kept (not reused as in
// llm.c) because BWD_WEIGHT may run long after BWD_INPUT.
typedef struct {
    int *inputs, *targets;            // (B,T)
    float *x0;                        // (B,T,C) stage input
    float *ln1, *ln1_mean, *ln1_rstd; // (nl,B,T,C), (nl,B,T)
    float *qkv;                       // (nl,B,T,3C)
    float *att;                       // (nl,B,NH,T,T)
    float *atty, *res2;               // (nl,B,T,C)
    float *ln2, *ln2_mean, *ln2_rstd;
    float *fch, *fch_gelu;            // (nl,B,T,4C)
    float *res3;                      // (nl,B,T,C) layer outputs
    float *lnf, *lnf_mean, *lnf_rstd; // last stage
    float *probs;                     // (B,T,Vp) logits, then probs, then dlogits
    float *losses;                    // (B,T)
    float *dresid;                    // (nl+1,B,T,C): d(input of layer l); [nl] = d(stage output)
    float *dln1, *dqkv, *dres2, *dln2, *dfch;
    float *dlnf;
    float *memory;
} Slot;

struct Stage {
    GPTConfig cfg;
    int lo, hi, nl, first, last;
    int B, T, nslots;
    size_t sizes[NUM_PARAM_TENSORS];   // this stage's share of each tensor
    size_t offsets[NUM_PARAM_TENSORS];
    size_t num_params;
    float *params, *grads, *m, *v;
    float *dwte_embed;                 // first stage: the embedding's share of d(wte)
    Slot *slots;
    int *slot_of;                      // micro-batch -> slot, -1 if not held
    int slot_of_cap;
    float *mb_losses;
    float *scratch_c, *scratch_4c;     // (B,T,C), (B,T,4C): gradients used at once
    int prev_fd, next_fd;
    double timeout_s;
    double *op_times;
    int op_times_cap;
    double t0;
};

static float *tensor(Stage *s, float *base, int t) { return s->sizes[t] ? base + s->offsets[t] : NULL; }
// layer l (stage-local) of per-layer tensor t
static float *layer_tensor(Stage *s, float *base, int t, int l) {
    return base + s->offsets[t] + l * gpt_tensor_size(&s->cfg, t, 1);
}

float *stage_param(Stage *s, int t, size_t *n) { *n = s->sizes[t]; return tensor(s, s->params, t); }
float *stage_grad(Stage *s, int t, size_t *n) { *n = s->sizes[t]; return tensor(s, s->grads, t); }
float *stage_wte_embed_grad(Stage *s, size_t *n) {
    *n = s->first ? s->sizes[P_WTE] : 0;
    return s->dwte_embed;
}
const double *stage_op_times(const Stage *s) { return s->op_times; }

static int slot_alloc(Stage *s, Slot *a) {
    size_t B = s->B, T = s->T, C = s->cfg.channels, NH = s->cfg.num_heads, nl = s->nl;
    size_t BT = B * T, Vp = s->cfg.padded_vocab_size;
    size_t last = s->last;
    struct { float **p; size_t n; } bufs[] = {
        {&a->x0, BT * C},
        {&a->ln1, nl * BT * C}, {&a->ln1_mean, nl * BT}, {&a->ln1_rstd, nl * BT},
        {&a->qkv, nl * BT * 3 * C}, {&a->att, nl * B * NH * T * T},
        {&a->atty, nl * BT * C}, {&a->res2, nl * BT * C},
        {&a->ln2, nl * BT * C}, {&a->ln2_mean, nl * BT}, {&a->ln2_rstd, nl * BT},
        {&a->fch, nl * BT * 4 * C}, {&a->fch_gelu, nl * BT * 4 * C}, {&a->res3, nl * BT * C},
        {&a->lnf, last * BT * C}, {&a->lnf_mean, last * BT}, {&a->lnf_rstd, last * BT},
        {&a->probs, last * BT * Vp}, {&a->losses, last * BT},
        {&a->dresid, (nl + 1) * BT * C}, {&a->dln1, nl * BT * C}, {&a->dqkv, nl * BT * 3 * C},
        {&a->dres2, nl * BT * C}, {&a->dln2, nl * BT * C}, {&a->dfch, nl * BT * 4 * C},
        {&a->dlnf, last * BT * C},
    };
    size_t total = 0;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) total += bufs[i].n;
    a->memory = calloc(total, sizeof(float));
    a->inputs = calloc(BT, sizeof(int));
    a->targets = calloc(BT, sizeof(int));
    if (!a->memory || !a->inputs || !a->targets)
        return fail("out of memory: activations for one micro-batch need %.1f MiB",
                    total * 4.0 / (1 << 20));
    float *p = a->memory;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) { *bufs[i].p = p; p += bufs[i].n; }
    return 0;
}

Stage *stage_create(GPTConfig cfg, int lo, int hi, int B, int T, int slots) {
    if (cfg.num_layers < 1 || cfg.channels < 1 || cfg.num_heads < 1 || cfg.channels % cfg.num_heads) {
        fail("bad model shape: L=%d NH=%d C=%d (C must divide into NH heads)",
             cfg.num_layers, cfg.num_heads, cfg.channels);
        return NULL;
    }
    if (lo < 0 || hi > cfg.num_layers || lo >= hi) {
        fail("bad layer range [%d, %d) for a %d-layer model", lo, hi, cfg.num_layers);
        return NULL;
    }
    if (B < 1 || T < 1 || T > cfg.max_seq_len) {
        fail("sequence length %d must be in [1, %d] (the model's context) and batch %d >= 1",
             T, cfg.max_seq_len, B);
        return NULL;
    }
    if (slots < 1) { fail("a stage needs at least one activation slot"); return NULL; }
    Stage *s = calloc(1, sizeof(Stage));
    s->cfg = cfg;
    s->lo = lo; s->hi = hi; s->nl = hi - lo;
    s->first = lo == 0; s->last = hi == cfg.num_layers;
    s->B = B; s->T = T; s->nslots = slots;
    s->prev_fd = s->next_fd = -1;
    s->timeout_s = 60.0;
    s->t0 = now_seconds();
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t n = 0;
        if (is_layer_tensor(t)) n = gpt_tensor_size(&cfg, t, s->nl);
        else if (t == P_WTE) n = (s->first || s->last) ? gpt_tensor_size(&cfg, t, 0) : 0;
        else if (t == P_WPE) n = s->first ? gpt_tensor_size(&cfg, t, 0) : 0;
        else n = s->last ? gpt_tensor_size(&cfg, t, 0) : 0;
        s->sizes[t] = n;
        s->offsets[t] = s->num_params;
        s->num_params += n;
    }
    size_t P = s->num_params, BTC = (size_t)B * T * cfg.channels;
    s->params = calloc(P, sizeof(float));
    s->grads = calloc(P, sizeof(float));
    s->m = calloc(P, sizeof(float));
    s->v = calloc(P, sizeof(float));
    s->dwte_embed = s->first ? calloc(s->sizes[P_WTE], sizeof(float)) : NULL;
    s->scratch_c = calloc(BTC, sizeof(float));
    s->scratch_4c = calloc(4 * BTC, sizeof(float));
    s->slots = calloc(slots, sizeof(Slot));
    if (!s->params || !s->grads || !s->m || !s->v || (s->first && !s->dwte_embed) ||
        !s->scratch_c || !s->scratch_4c || !s->slots) {
        fail("out of memory: %zu parameters need %.1f MiB with gradients and AdamW state",
             P, P * 16.0 / (1 << 20));
        stage_free(s);
        return NULL;
    }
    for (int i = 0; i < slots; i++)
        if (slot_alloc(s, &s->slots[i])) { stage_free(s); return NULL; }
    return s;
}

void stage_free(Stage *s) {
    if (!s) return;
    for (int i = 0; s->slots && i < s->nslots; i++) {
        free(s->slots[i].memory); free(s->slots[i].inputs); free(s->slots[i].targets);
    }
    free(s->slots); free(s->slot_of); free(s->mb_losses); free(s->op_times);
    free(s->params); free(s->grads); free(s->m); free(s->v); free(s->dwte_embed);
    free(s->scratch_c); free(s->scratch_4c);
    free(s);
}

// splitmix64: a tiny, good generator whose state is any 64-bit value, which
// lets every (tensor, layer) seed a stream of its own
static uint64_t splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double uniform01(uint64_t *state) { return ((splitmix64(state) >> 11) + 0.5) * 0x1.0p-53; }

static void fill_normal(float *p, size_t n, float std, uint64_t seed) {
    uint64_t st = seed;
    for (size_t i = 0; i < n; i += 2) {  // Box-Muller, two values per draw
        double r = sqrt(-2.0 * log(uniform01(&st))), th = 2.0 * PI * uniform01(&st);
        p[i] = (float)(std * r * cos(th));
        if (i + 1 < n) p[i + 1] = (float)(std * r * sin(th));
    }
}

void stage_init(Stage *s, uint64_t seed) {
    const GPTConfig *c = &s->cfg;
    float resid_std = 0.02f / sqrtf(2.0f * c->num_layers);
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int t = 0; t < NUM_PARAM_TENSORS; t++)
        for (int l = 0; l < s->nl; l++) {
            if (!s->sizes[t] || (!is_layer_tensor(t) && l > 0)) continue;
            int gl = is_layer_tensor(t) ? s->lo + l : 0;  // global layer: the stream's name
            float *p = is_layer_tensor(t) ? layer_tensor(s, s->params, t, l) : tensor(s, s->params, t);
            size_t n = is_layer_tensor(t) ? gpt_tensor_size(c, t, 1) : s->sizes[t];
            uint64_t st = seed * 0x100000001B3ull + (uint64_t)t * 4096 + gl;
            uint64_t stream = splitmix64(&st);
            if (t == P_WTE) {  // padded rows stay zero
                memset(p, 0, n * sizeof(float));
                fill_normal(p, (size_t)c->vocab_size * c->channels, 0.02f, stream);
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

// The stage's forward for one micro-batch of shape (B,T) up to the final
// layernorm; sampling calls it with B=1 and a shorter T.
static void stage_forward(Stage *s, Slot *a, int B, int T) {
    const GPTConfig *c = &s->cfg;
    int C = c->channels, NH = c->num_heads, N = B * T;
    size_t BTC = (size_t)s->B * s->T * C;  // per-layer stride in the slot
    float *P = s->params;
    if (s->first) encoder_forward(a->x0, a->inputs, tensor(s, P, P_WTE), tensor(s, P, P_WPE), B, T, C);
    for (int l = 0; l < s->nl; l++) {
        float *x = l == 0 ? a->x0 : a->res3 + (l - 1) * BTC;
        float *ln1 = a->ln1 + l * BTC, *qkv = a->qkv + 3 * l * BTC, *atty = a->atty + l * BTC;
        float *att = a->att + (size_t)l * s->B * NH * s->T * s->T;
        float *res2 = a->res2 + l * BTC, *ln2 = a->ln2 + l * BTC;
        float *fch = a->fch + 4 * l * BTC, *fchg = a->fch_gelu + 4 * l * BTC, *res3 = a->res3 + l * BTC;
        size_t lN = (size_t)l * s->B * s->T;
        layernorm_forward(ln1, a->ln1_mean + lN, a->ln1_rstd + lN, x,
                          layer_tensor(s, P, P_LN1W, l), layer_tensor(s, P, P_LN1B, l), N, C);
        matmul_forward(qkv, ln1, layer_tensor(s, P, P_QKVW, l), layer_tensor(s, P, P_QKVB, l), N, C, 3 * C);
        attention_forward(atty, att, qkv, B, T, C, NH);
        matmul_forward(res2, atty, layer_tensor(s, P, P_ATTPROJW, l), layer_tensor(s, P, P_ATTPROJB, l), N, C, C);
        residual_add(res2, x, (size_t)N * C);
        layernorm_forward(ln2, a->ln2_mean + lN, a->ln2_rstd + lN, res2,
                          layer_tensor(s, P, P_LN2W, l), layer_tensor(s, P, P_LN2B, l), N, C);
        matmul_forward(fch, ln2, layer_tensor(s, P, P_FCW, l), layer_tensor(s, P, P_FCB, l), N, C, 4 * C);
        gelu_forward(fchg, fch, (size_t)N * 4 * C);
        matmul_forward(res3, fchg, layer_tensor(s, P, P_FCPROJW, l), layer_tensor(s, P, P_FCPROJB, l), N, 4 * C, C);
        residual_add(res3, res2, (size_t)N * C);
    }
    if (s->last)
        layernorm_forward(a->lnf, a->lnf_mean, a->lnf_rstd, a->res3 + (s->nl - 1) * BTC,
                          tensor(s, P, P_LNFW), tensor(s, P, P_LNFB), N, C);
}

static float *stage_output(Stage *s, Slot *a) {
    return a->res3 + (size_t)(s->nl - 1) * s->B * s->T * s->cfg.channels;
}

// logits, softmax and loss for a full micro-batch (last stage)
static float stage_loss(Stage *s, Slot *a) {
    int N = s->B * s->T, C = s->cfg.channels, Vp = s->cfg.padded_vocab_size;
    matmul_forward(a->probs, a->lnf, tensor(s, s->params, P_WTE), NULL, N, C, Vp);
    return crossentropy_forward(a->probs, a->losses, a->targets, N, s->cfg.vocab_size, Vp);
}

// BWD_INPUT: from the loss (last stage) or the received d(output) down to
// d(stage input) in dresid[0], keeping what BWD_WEIGHT will need.
static void stage_backward_input(Stage *s, Slot *a, float dloss) {
    const GPTConfig *c = &s->cfg;
    int C = c->channels, NH = c->num_heads, B = s->B, T = s->T, N = B * T;
    size_t BTC = (size_t)N * C;
    float *P = s->params;
    float *dtop = a->dresid + s->nl * BTC;
    if (s->last) {
        crossentropy_backward(a->probs, a->targets, dloss, N, c->padded_vocab_size);
        matmul_backward_input(a->dlnf, a->probs, tensor(s, P, P_WTE), N, C, c->padded_vocab_size);
        memset(dtop, 0, BTC * sizeof(float));
        layernorm_backward_input(dtop, a->dlnf, stage_output(s, a), tensor(s, P, P_LNFW),
                                 a->lnf_mean, a->lnf_rstd, N, C);
    }
    for (int l = s->nl - 1; l >= 0; l--) {
        float *x = l == 0 ? a->x0 : a->res3 + (l - 1) * BTC;
        float *dout = a->dresid + (l + 1) * BTC;
        float *dfch = a->dfch + 4 * l * BTC, *dln2 = a->dln2 + l * BTC, *dres2 = a->dres2 + l * BTC;
        float *dqkv = a->dqkv + 3 * l * BTC, *dln1 = a->dln1 + l * BTC, *dx = a->dresid + l * BTC;
        size_t lN = (size_t)l * N;
        matmul_backward_input(s->scratch_4c, dout, layer_tensor(s, P, P_FCPROJW, l), N, 4 * C, C);
        gelu_backward(dfch, a->fch + 4 * l * BTC, s->scratch_4c, 4 * BTC);
        matmul_backward_input(dln2, dfch, layer_tensor(s, P, P_FCW, l), N, C, 4 * C);
        memcpy(dres2, dout, BTC * sizeof(float));
        layernorm_backward_input(dres2, dln2, a->res2 + l * BTC, layer_tensor(s, P, P_LN2W, l),
                                 a->ln2_mean + lN, a->ln2_rstd + lN, N, C);
        matmul_backward_input(s->scratch_c, dres2, layer_tensor(s, P, P_ATTPROJW, l), N, C, C);
        attention_backward(dqkv, s->scratch_c, a->qkv + 3 * l * BTC,
                           a->att + (size_t)l * B * NH * T * T, B, T, C, NH);
        matmul_backward_input(dln1, dqkv, layer_tensor(s, P, P_QKVW, l), N, C, 3 * C);
        memcpy(dx, dres2, BTC * sizeof(float));
        layernorm_backward_input(dx, dln1, x, layer_tensor(s, P, P_LN1W, l),
                                 a->ln1_mean + lN, a->ln1_rstd + lN, N, C);
    }
}

// BWD_WEIGHT: accumulate this micro-batch's parameter gradients.
static void stage_backward_weight(Stage *s, Slot *a) {
    const GPTConfig *c = &s->cfg;
    int C = c->channels, N = s->B * s->T;
    size_t BTC = (size_t)N * C;
    float *G = s->grads;
    if (s->last) {
        matmul_backward_weight(tensor(s, G, P_WTE), NULL, a->probs, a->lnf, N, C, c->padded_vocab_size);
        layernorm_backward_weight(tensor(s, G, P_LNFW), tensor(s, G, P_LNFB), a->dlnf,
                                  stage_output(s, a), a->lnf_mean, a->lnf_rstd, N, C);
    }
    for (int l = 0; l < s->nl; l++) {
        float *x = l == 0 ? a->x0 : a->res3 + (l - 1) * BTC;
        size_t lN = (size_t)l * N;
        layernorm_backward_weight(layer_tensor(s, G, P_LN1W, l), layer_tensor(s, G, P_LN1B, l),
                                  a->dln1 + l * BTC, x, a->ln1_mean + lN, a->ln1_rstd + lN, N, C);
        matmul_backward_weight(layer_tensor(s, G, P_QKVW, l), layer_tensor(s, G, P_QKVB, l),
                               a->dqkv + 3 * l * BTC, a->ln1 + l * BTC, N, C, 3 * C);
        matmul_backward_weight(layer_tensor(s, G, P_ATTPROJW, l), layer_tensor(s, G, P_ATTPROJB, l),
                               a->dres2 + l * BTC, a->atty + l * BTC, N, C, C);
        layernorm_backward_weight(layer_tensor(s, G, P_LN2W, l), layer_tensor(s, G, P_LN2B, l),
                                  a->dln2 + l * BTC, a->res2 + l * BTC, a->ln2_mean + lN,
                                  a->ln2_rstd + lN, N, C);
        matmul_backward_weight(layer_tensor(s, G, P_FCW, l), layer_tensor(s, G, P_FCB, l),
                               a->dfch + 4 * l * BTC, a->ln2 + l * BTC, N, C, 4 * C);
        matmul_backward_weight(layer_tensor(s, G, P_FCPROJW, l), layer_tensor(s, G, P_FCPROJB, l),
                               a->dresid + (l + 1) * BTC, a->fch_gelu + 4 * l * BTC, N, 4 * C, C);
    }
    if (s->first)
        encoder_backward(s->dwte_embed, tensor(s, G, P_WPE), a->dresid, a->inputs, s->B, s->T, C);
}

// ----------------------------------------------------------------------------
// executor: one rank's op list for one step, with no Python in the loop

void stage_set_peers(Stage *s, int prev_fd, int next_fd, double timeout_s) {
    s->prev_fd = prev_fd;
    s->next_fd = next_fd;
    s->timeout_s = timeout_s;
}

static const char *const OP_NAMES[NUM_OPS] = {
    "FWD", "BWD_INPUT", "BWD_WEIGHT", "SEND_ACT", "RECV_ACT", "SEND_GRAD", "RECV_GRAD"};

// The slot holding micro-batch mb, taking a free one on first use.
static Slot *slot_for(Stage *s, int mb) {
    if (s->slot_of[mb] >= 0) return &s->slots[s->slot_of[mb]];
    for (int i = 0; i < s->nslots; i++) {
        int used = 0;
        for (int j = 0; j < s->slot_of_cap; j++) used |= s->slot_of[j] == i;
        if (!used) { s->slot_of[mb] = i; return &s->slots[i]; }
    }
    fail("rank holding layers [%d,%d): micro-batch %d needs an activation slot but all %d are held "
         "(the schedule holds more than the validator's peak)", s->lo, s->hi, mb, s->nslots);
    return NULL;
}

// One message on a neighbour link: a small header naming what it carries, so
// a schedule mismatch is reported instead of silently mixing up micro-batches.
typedef struct {
    int fd, sending;
    int32_t header[4];      // kind, mb, float count, magic
    char *payload;
    size_t nbytes, done;    // header + payload bytes
} Transfer;

#define LINK_MAGIC 0x47505432

static size_t transfer_step(Transfer *x) {
    size_t hb = sizeof x->header, off = x->done;
    char *p = off < hb ? (char *)x->header + off : x->payload + (off - hb);
    size_t n = off < hb ? hb - off : x->nbytes - off;
    ssize_t r = x->sending ? send(x->fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL)
                           : recv(x->fd, p, n, MSG_DONTWAIT);
    if (r < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : (size_t)-1;
    if (r == 0 && !x->sending) return (size_t)-1;
    x->done += r;
    return r;
}

// A run of consecutive SEND/RECV ops is one group: all of them progress
// together (poll), so two neighbours sending to each other at the same moment
// never wait on each other. Messages on one link keep their order.
static int run_comm_group(Stage *s, const int *ops, int n) {
    Transfer xs[16];
    if (n > 16) return fail("a group of %d sends/receives is more than 16", n);
    size_t BTC = (size_t)s->B * s->T * s->cfg.channels;
    for (int i = 0; i < n; i++) {
        int kind = ops[2 * i], mb = ops[2 * i + 1];
        int to_next = kind == OP_SEND_ACT || kind == OP_RECV_GRAD;
        Transfer *x = &xs[i];
        x->fd = to_next ? s->next_fd : s->prev_fd;
        if (x->fd < 0) return fail("%s mb %d: this stage has no %s neighbour", OP_NAMES[kind], mb,
                                   to_next ? "next" : "previous");
        x->sending = kind == OP_SEND_ACT || kind == OP_SEND_GRAD;
        Slot *a = slot_for(s, mb);
        if (!a) return -1;
        x->payload = (char *)(kind == OP_SEND_ACT ? stage_output(s, a)
                              : kind == OP_RECV_ACT ? a->x0
                              : kind == OP_SEND_GRAD ? a->dresid
                              : a->dresid + s->nl * BTC);
        int wire_kind = (kind == OP_SEND_ACT || kind == OP_RECV_ACT) ? OP_SEND_ACT : OP_SEND_GRAD;
        int32_t h[4] = {wire_kind, mb, (int32_t)BTC, LINK_MAGIC};
        memcpy(x->header, h, sizeof h);
        x->nbytes = sizeof x->header + BTC * sizeof(float);
        x->done = 0;
    }
    double last_progress = now_seconds();
    for (;;) {
        struct pollfd pf[16];
        int idx[16], np = 0, pending = 0;
        for (int i = 0; i < n; i++) {
            if (xs[i].done == xs[i].nbytes) continue;
            pending++;
            // only the oldest unfinished transfer per (link, direction) may move
            int older = 0;
            for (int j = 0; j < i; j++)
                older |= xs[j].fd == xs[i].fd && xs[j].sending == xs[i].sending && xs[j].done < xs[j].nbytes;
            if (older) continue;
            pf[np] = (struct pollfd){xs[i].fd, xs[i].sending ? POLLOUT : POLLIN, 0};
            idx[np++] = i;
        }
        if (!pending) return 0;
        int r = poll(pf, np, 1000);
        if (r < 0 && errno != EINTR) return fail("poll failed: %s", strerror(errno));
        for (int k = 0; k < np && r > 0; k++) {
            Transfer *x = &xs[idx[k]];
            if (!pf[k].revents) continue;
            int32_t expect_kind = x->header[0], expect_mb = x->header[1];
            size_t moved = transfer_step(x);
            if (moved == (size_t)-1)
                return fail("stage [%d,%d): the %s neighbour closed the link during %s mb %d",
                            s->lo, s->hi, x->fd == s->next_fd ? "next" : "previous",
                            x->sending ? "a send" : "a receive", expect_mb);
            if (moved) last_progress = now_seconds();
            if (!x->sending && x->done == sizeof x->header && moved) {
                if (x->header[3] != LINK_MAGIC || x->header[0] != expect_kind ||
                    x->header[1] != expect_mb || x->header[2] != (int32_t)BTC)
                    return fail("stage [%d,%d): expected %s mb %d from the %s neighbour, got kind %d mb %d",
                                s->lo, s->hi, expect_kind == OP_SEND_ACT ? "activation" : "gradient",
                                expect_mb, x->fd == s->next_fd ? "next" : "previous",
                                x->header[0], x->header[1]);
            }
        }
        if (now_seconds() - last_progress > s->timeout_s)
            return fail("stage [%d,%d): no progress from a neighbour for %.0f s", s->lo, s->hi, s->timeout_s);
    }
}

int stage_run(Stage *s, const int *ops, int nops, const int *inputs, const int *targets,
              int training, float *loss_sum) {
    int m = 0;  // micro-batches in this step: every rank runs one FWD per micro-batch
    for (int i = 0; i < nops; i++) {
        if (ops[2 * i] < 0 || ops[2 * i] >= NUM_OPS || ops[2 * i + 1] < 0)
            return fail("op %d: bad op (%d, %d)", i, ops[2 * i], ops[2 * i + 1]);
        m += ops[2 * i] == OP_FWD;
    }
    for (int i = 0; i < nops; i++)
        if (ops[2 * i + 1] >= m) return fail("op %d: micro-batch %d of only %d", i, ops[2 * i + 1], m);
    if (s->first && !inputs) return fail("the first stage needs input tokens");
    if (s->last && !targets) return fail("the last stage needs target tokens");
    if (m > s->slot_of_cap) {
        free(s->slot_of); free(s->mb_losses);
        s->slot_of = malloc(m * sizeof(int));
        s->mb_losses = malloc(m * sizeof(float));
        s->slot_of_cap = m;
    }
    if (nops > s->op_times_cap) {
        free(s->op_times);
        s->op_times = malloc(2 * nops * sizeof(double));
        s->op_times_cap = nops;
    }
    for (int i = 0; i < s->slot_of_cap; i++) s->slot_of[i] = -1;
    for (int i = 0; i < m; i++) s->mb_losses[i] = 0.0f;
    if (training) {
        memset(s->grads, 0, s->num_params * sizeof(float));
        if (s->first) memset(s->dwte_embed, 0, s->sizes[P_WTE] * sizeof(float));
    }
    size_t BT = (size_t)s->B * s->T;
    for (int i = 0; i < nops;) {
        int kind = ops[2 * i], mb = ops[2 * i + 1];
        double t_start = now_seconds() - s->t0;
        int n = 1;
        if (kind >= OP_SEND_ACT) {
            while (i + n < nops && ops[2 * (i + n)] >= OP_SEND_ACT) n++;
            if (run_comm_group(s, ops + 2 * i, n)) return -1;
            if (!training)  // forward-only: a sent activation is done with
                for (int k = i; k < i + n; k++)
                    if (ops[2 * k] == OP_SEND_ACT) s->slot_of[ops[2 * k + 1]] = -1;
        } else {
            Slot *a = slot_for(s, mb);
            if (!a) return -1;
            if (kind == OP_FWD) {
                if (s->first) memcpy(a->inputs, inputs + mb * BT, BT * sizeof(int));
                stage_forward(s, a, s->B, s->T);
                if (s->last) {
                    memcpy(a->targets, targets + mb * BT, BT * sizeof(int));
                    s->mb_losses[mb] = stage_loss(s, a);
                    if (!training) s->slot_of[mb] = -1;
                }
            } else if (!training) {
                return fail("op %d: %s in a forward-only op list", i, OP_NAMES[kind]);
            } else if (kind == OP_BWD_INPUT) {
                stage_backward_input(s, a, 1.0f / (float)(BT * m));
            } else {
                stage_backward_weight(s, a);
                s->slot_of[mb] = -1;
            }
        }
        double t_end = now_seconds() - s->t0;
        for (int k = i; k < i + n; k++) { s->op_times[2 * k] = t_start; s->op_times[2 * k + 1] = t_end; }
        i += n;
    }
    float sum = 0.0f;
    for (int i = 0; i < m; i++) sum += s->mb_losses[i];
    *loss_sum = sum;
    return 0;
}

// ----------------------------------------------------------------------------
// optimizer

void stage_sum_wte_grads(Stage *s) {
    if (!(s->first && s->last)) return;  // across stages, the launcher exchanges the parts first
    float *head = tensor(s, s->grads, P_WTE);
    for (size_t i = 0; i < s->sizes[P_WTE]; i++) head[i] = head[i] + s->dwte_embed[i];
}

static double sum_squares(const float *p, size_t n) {
    double s = 0.0;
    for (size_t i = 0; i < n; i++) s += (double)p[i] * p[i];
    return s;
}

void stage_grad_norm_parts(Stage *s, double *parts) {
    int L = s->cfg.num_layers;
    memset(parts, 0, sizeof(double) * NUM_PARAM_TENSORS * L);
    #pragma omp parallel for collapse(2) schedule(dynamic)
    for (int t = 0; t < NUM_PARAM_TENSORS; t++)
        for (int l = 0; l < s->nl; l++) {
            if (!s->sizes[t]) continue;
            if (is_layer_tensor(t)) {
                parts[t * L + s->lo + l] =
                    sum_squares(layer_tensor(s, s->grads, t, l), gpt_tensor_size(&s->cfg, t, 1));
            } else if (l == 0 && (t != P_WTE || s->first)) {
                parts[t * L] = sum_squares(tensor(s, s->grads, t), s->sizes[t]);
            }
        }
}

double gpt_norm_from_parts(const double *parts, int L) {
    double total = 0.0;
    for (int i = 0; i < NUM_PARAM_TENSORS * L; i++) total += parts[i];
    return sqrt(total);
}

void stage_adamw(Stage *s, float lr, float weight_decay, float grad_scale, int step) {
    const float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
    float bc1 = 1.0f - powf(b1, (float)step), bc2 = 1.0f - powf(b2, (float)step);
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        float wd = is_matrix(t) ? weight_decay : 0.0f;
        float *p = tensor(s, s->params, t), *g = tensor(s, s->grads, t);
        float *m = tensor(s, s->m, t), *v = tensor(s, s->v, t);
        size_t n = s->sizes[t];
        #pragma omp parallel for
        for (size_t i = 0; i < n; i++) {
            float gi = g[i] * grad_scale;
            m[i] = b1 * m[i] + (1.0f - b1) * gi;
            v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
            float mhat = m[i] / bc1, vhat = v[i] / bc2;
            p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
        }
    }
}

float gpt_lr_at(int step, float max_lr, int warmup, int total_steps, float min_frac) {
    float min_lr = max_lr * min_frac;
    if (step < warmup) return max_lr * (step + 1) / warmup;
    if (step >= total_steps - 1) return min_lr;
    float progress = (float)(step - warmup) / (float)(total_steps - 1 - warmup);
    return min_lr + 0.5f * (1.0f + cosf(PI * progress)) * (max_lr - min_lr);
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

static int read_exact(int fd, void *buf, size_t n, off_t off, const char *path) {
    char *p = buf;
    while (n) {
        ssize_t r = pread(fd, p, n, off);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return fail("%s: read failed (%s)", path, r < 0 ? strerror(errno) : "unexpected end of file");
        p += r; n -= r; off += r;
    }
    return 0;
}

static int write_exact(int fd, const void *buf, size_t n, off_t off, const char *path) {
    const char *p = buf;
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

// Checks the header and size of a shard; loads its tokens when out != NULL.
static int shard_read(const char *path, int64_t need, uint16_t **out, int64_t *ntok) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail("%s: cannot open token shard (%s)", path, strerror(errno));
    int32_t h[HEADER_INTS];
    int rc = -1;
    if (read_exact(fd, h, sizeof h, 0, path)) goto done;
    if (h[0] != SHARD_MAGIC) { fail("%s: not a token shard (magic %d, expected %d)", path, h[0], SHARD_MAGIC); goto done; }
    if (h[1] != 1) { fail("%s: token shard version %d, expected 1", path, h[1]); goto done; }
    int64_t size = file_size(fd), expect = (int64_t)sizeof h + 2 * (int64_t)h[2];
    if (h[2] < 0 || size != expect) {
        fail("%s: token shard is %lld bytes, its header promises %lld (truncated?)", path,
             (long long)size, (long long)expect);
        goto done;
    }
    if (h[2] < need) { fail("%s: %d tokens, fewer than one batch needs (%lld)", path, h[2], (long long)need); goto done; }
    *ntok = h[2];
    if (out) {
        free(*out);
        *out = malloc(2 * (size_t)h[2]);
        if (!*out) { fail("%s: out of memory", path); goto done; }
        if (read_exact(fd, *out, 2 * (size_t)h[2], sizeof h, path)) goto done;
    }
    rc = 0;
done:
    close(fd);
    return rc;
}

DataLoader *dataloader_open(const char *pattern, int B, int T) {
    DataLoader *d = calloc(1, sizeof(DataLoader));
    d->B = B; d->T = T;
    if (glob(pattern, 0, NULL, &d->shards) != 0 || d->shards.gl_pathc == 0) {
        fail("no token shards match '%s' (prepare the data first: python -m dev.data.prepare)", pattern);
        globfree(&d->shards);
        free(d);
        return NULL;
    }
    // check every shard now, so a bad one fails at start, not hours in
    for (size_t i = 0; i < d->shards.gl_pathc; i++) {
        int64_t n;
        if (shard_read(d->shards.gl_pathv[i], (int64_t)B * T + 1, NULL, &n)) { dataloader_free(d); return NULL; }
    }
    if (dataloader_set_position(d, 0, 0)) { dataloader_free(d); return NULL; }
    return d;
}

void dataloader_free(DataLoader *d) {
    if (!d) return;
    globfree(&d->shards);
    free(d->tokens);
    free(d);
}

int dataloader_set_position(DataLoader *d, int64_t shard, int64_t pos) {
    if (shard < 0 || (size_t)shard >= d->shards.gl_pathc) return fail("data position: shard %lld of %zu", (long long)shard, d->shards.gl_pathc);
    if (!d->tokens || (size_t)shard != d->shard)
        if (shard_read(d->shards.gl_pathv[shard], (int64_t)d->B * d->T + 1, &d->tokens, &d->ntok)) return -1;
    if (pos < 0 || pos > d->ntok) return fail("data position: token %lld of %lld", (long long)pos, (long long)d->ntok);
    d->shard = shard;
    d->pos = pos;
    return 0;
}

void dataloader_get_position(const DataLoader *d, int64_t *shard, int64_t *pos) {
    *shard = d->shard;
    *pos = d->pos;
}

int dataloader_next(DataLoader *d, int *inputs, int *targets) {
    int64_t BT = (int64_t)d->B * d->T;
    if (d->pos + BT + 1 > d->ntok)
        if (dataloader_set_position(d, (d->shard + 1) % d->shards.gl_pathc, 0)) return -1;
    const uint16_t *p = d->tokens + d->pos;
    for (int64_t i = 0; i < BT; i++) { inputs[i] = p[i]; targets[i] = p[i + 1]; }
    d->pos += BT;
    return 0;
}

// ----------------------------------------------------------------------------
// checkpoint I/O
//
// Model files are llm.c's: a 256-int header, then the 16 tensors of the whole
// model in order, fp32 (version 3) or bf16 (version 5, read only). The
// optimizer state is ours, laid out the same way:
//   header int32[256]: [0] STATE_MAGIC, [1] version 1, [2] L, [3] C, [4] Vp,
//                      [5] maxT, int64 at ints [8] step, [10] shard, [12] pos
//   then AdamW m for every parameter in model order, then v likewise.
// Each stage writes its slices at their whole-model offsets, so a checkpoint
// made by S stages is one file that any other stage count can read.

// Element offset of a stage's share of tensor t in the whole-model layout.
static size_t model_offset(const Stage *s, int t) {
    size_t off = 0;
    for (int i = 0; i < t; i++) off += gpt_tensor_size(&s->cfg, i, s->cfg.num_layers);
    return off + (is_layer_tensor(t) ? s->lo * gpt_tensor_size(&s->cfg, t, 1) : 0);
}
static size_t model_size(const GPTConfig *c) {
    size_t n = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) n += gpt_tensor_size(c, t, c->num_layers);
    return n;
}
// wte lives on the first and the last stage; the first one writes it
static int stage_writes(const Stage *s, int t) { return s->sizes[t] && (t != P_WTE || s->first); }

static int check_model_header(const int32_t *h, const char *path, GPTConfig *cfg) {
    if (h[0] != MODEL_MAGIC) return fail("%s: not an llm.c model file (magic %d, expected %d)", path, h[0], MODEL_MAGIC);
    if (h[1] != 3 && h[1] != 5) return fail("%s: model version %d, expected 3 (fp32) or 5 (bf16)", path, h[1]);
    *cfg = (GPTConfig){h[2], h[3], h[7], h[4], h[5], h[6]};
    if (cfg->max_seq_len < 1 || cfg->vocab_size < 1 || cfg->padded_vocab_size < cfg->vocab_size ||
        cfg->num_layers < 1 || cfg->num_heads < 1 || cfg->channels < 1 || cfg->channels % cfg->num_heads)
        return fail("%s: implausible model shape in header (maxT=%d V=%d Vp=%d L=%d NH=%d C=%d)", path,
                    h[2], h[3], h[7], h[4], h[5], h[6]);
    return 0;
}

int gpt_read_config(const char *path, GPTConfig *cfg) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail("%s: cannot open model file (%s)", path, strerror(errno));
    int32_t h[HEADER_INTS];
    int rc = read_exact(fd, h, sizeof h, 0, path) || check_model_header(h, path, cfg) ? -1 : 0;
    close(fd);
    return rc;
}

static int same_config(const GPTConfig *a, const GPTConfig *b) {
    return a->max_seq_len == b->max_seq_len && a->vocab_size == b->vocab_size &&
           a->padded_vocab_size == b->padded_vocab_size && a->num_layers == b->num_layers &&
           a->num_heads == b->num_heads && a->channels == b->channels;
}

int stage_load(Stage *s, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return fail("%s: cannot open model file (%s)", path, strerror(errno));
    int32_t h[HEADER_INTS];
    GPTConfig fc;
    int rc = -1;
    if (read_exact(fd, h, sizeof h, 0, path) || check_model_header(h, path, &fc)) goto done;
    if (!same_config(&fc, &s->cfg)) {
        fail("%s: model is L=%d NH=%d C=%d maxT=%d V=%d, this run wants L=%d NH=%d C=%d maxT=%d V=%d", path,
             fc.num_layers, fc.num_heads, fc.channels, fc.max_seq_len, fc.vocab_size, s->cfg.num_layers,
             s->cfg.num_heads, s->cfg.channels, s->cfg.max_seq_len, s->cfg.vocab_size);
        goto done;
    }
    size_t elem = h[1] == 3 ? 4 : 2;
    int64_t expect = (int64_t)sizeof h + (int64_t)(elem * model_size(&fc)), size = file_size(fd);
    if (size != expect) {
        fail("%s: model file is %lld bytes, expected %lld (truncated?)", path, (long long)size, (long long)expect);
        goto done;
    }
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        if (!s->sizes[t]) continue;
        float *p = tensor(s, s->params, t);
        off_t off = sizeof h + elem * model_offset(s, t);
        if (elem == 4) {
            if (read_exact(fd, p, 4 * s->sizes[t], off, path)) goto done;
        } else {  // bf16: the top half of an fp32
            uint16_t *tmp = malloc(2 * s->sizes[t]);
            if (!tmp || read_exact(fd, tmp, 2 * s->sizes[t], off, path)) { free(tmp); goto done; }
            for (size_t i = 0; i < s->sizes[t]; i++) {
                uint32_t bits = (uint32_t)tmp[i] << 16;
                memcpy(&p[i], &bits, 4);
            }
            free(tmp);
        }
    }
    rc = 0;
done:
    close(fd);
    return rc;
}

static void checkpoint_path(char *out, size_t n, const char *dir, const char *what, int64_t step, const char *suffix) {
    snprintf(out, n, "%s/%s_%08lld%s", dir, what, (long long)step, suffix);
}

int stage_write_checkpoint(Stage *s, const char *dir, const TrainState *ts) {
    char mpath[4096], spath[4096];
    checkpoint_path(mpath, sizeof mpath, dir, "model", ts->step, ".bin.tmp");
    checkpoint_path(spath, sizeof spath, dir, "state", ts->step, ".bin.tmp");
    size_t P = model_size(&s->cfg);
    int mfd = open(mpath, O_WRONLY | O_CREAT, 0644);
    if (mfd < 0) return fail("%s: cannot write checkpoint (%s)", mpath, strerror(errno));
    int sfd = open(spath, O_WRONLY | O_CREAT, 0644);
    if (sfd < 0) { close(mfd); return fail("%s: cannot write checkpoint (%s)", spath, strerror(errno)); }
    int rc = -1;
    if (ftruncate(mfd, HEADER_INTS * 4 + 4 * P) || ftruncate(sfd, HEADER_INTS * 4 + 8 * P)) {
        fail("%s: cannot size checkpoint (%s)", dir, strerror(errno));
        goto done;
    }
    if (s->first) {
        const GPTConfig *c = &s->cfg;
        int32_t mh[HEADER_INTS] = {MODEL_MAGIC, 3, c->max_seq_len, c->vocab_size, c->num_layers,
                                   c->num_heads, c->channels, c->padded_vocab_size};
        int32_t sh[HEADER_INTS] = {STATE_MAGIC, 1, c->num_layers, c->channels, c->padded_vocab_size, c->max_seq_len};
        memcpy(&sh[8], &ts->step, 8);
        memcpy(&sh[10], &ts->shard, 8);
        memcpy(&sh[12], &ts->pos, 8);
        if (write_exact(mfd, mh, sizeof mh, 0, mpath) || write_exact(sfd, sh, sizeof sh, 0, spath)) goto done;
    }
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        if (!stage_writes(s, t)) continue;
        size_t off = model_offset(s, t), n = s->sizes[t];
        if (write_exact(mfd, tensor(s, s->params, t), 4 * n, HEADER_INTS * 4 + 4 * off, mpath) ||
            write_exact(sfd, tensor(s, s->m, t), 4 * n, HEADER_INTS * 4 + 4 * off, spath) ||
            write_exact(sfd, tensor(s, s->v, t), 4 * n, HEADER_INTS * 4 + 4 * (P + off), spath))
            goto done;
    }
    rc = 0;
done:
    close(mfd);
    close(sfd);
    return rc;
}

int stage_read_checkpoint(Stage *s, const char *dir, int64_t step, TrainState *ts) {
    char mpath[4096], spath[4096];
    checkpoint_path(mpath, sizeof mpath, dir, "model", step, ".bin");
    checkpoint_path(spath, sizeof spath, dir, "state", step, ".bin");
    if (stage_load(s, mpath)) return -1;
    int fd = open(spath, O_RDONLY);
    if (fd < 0) return fail("%s: cannot open optimizer state (%s)", spath, strerror(errno));
    int32_t h[HEADER_INTS];
    int rc = -1;
    size_t P = model_size(&s->cfg);
    const GPTConfig *c = &s->cfg;
    if (read_exact(fd, h, sizeof h, 0, spath)) goto done;
    if (h[0] != STATE_MAGIC || h[1] != 1) {
        fail("%s: not an optimizer state file (magic %d version %d, expected %d version 1)", spath, h[0], h[1], STATE_MAGIC);
        goto done;
    }
    if (h[2] != c->num_layers || h[3] != c->channels || h[4] != c->padded_vocab_size || h[5] != c->max_seq_len) {
        fail("%s: optimizer state is for another model shape", spath);
        goto done;
    }
    if (file_size(fd) != (int64_t)(sizeof h + 8 * P)) {
        fail("%s: optimizer state is %lld bytes, expected %lld (truncated?)", spath,
             (long long)file_size(fd), (long long)(sizeof h + 8 * P));
        goto done;
    }
    memcpy(&ts->step, &h[8], 8);
    memcpy(&ts->shard, &h[10], 8);
    memcpy(&ts->pos, &h[12], 8);
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        if (!s->sizes[t]) continue;
        size_t off = model_offset(s, t), n = s->sizes[t];
        if (read_exact(fd, tensor(s, s->m, t), 4 * n, sizeof h + 4 * off, spath) ||
            read_exact(fd, tensor(s, s->v, t), 4 * n, sizeof h + 4 * (P + off), spath))
            goto done;
    }
    rc = 0;
done:
    close(fd);
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
        char tmp[4096], final[4096];
        checkpoint_path(tmp, sizeof tmp, dir, what[i], step, ".bin.tmp");
        checkpoint_path(final, sizeof final, dir, what[i], step, ".bin");
        if (fsync_path(tmp)) return -1;
        if (rename(tmp, final)) return fail("%s: cannot rename to %s (%s)", tmp, final, strerror(errno));
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

// ----------------------------------------------------------------------------
// sampling

typedef struct { float logit; int id; } Candidate;

int stage_sample(Stage *s, const int *prompt, int np, int n, float temperature, int top_k,
                 uint64_t seed, int *out) {
    if (!(s->first && s->last)) return fail("sampling needs the whole model in one stage");
    if (np < 1) return fail("sampling needs a prompt of at least one token");
    int V = s->cfg.vocab_size, C = s->cfg.channels, Vp = s->cfg.padded_vocab_size;
    for (int i = 0; i < np; i++)
        if (prompt[i] < 0 || prompt[i] >= V) return fail("prompt token %d is outside the vocabulary", prompt[i]);
    if (top_k <= 0 || top_k > V) top_k = V;
    Candidate *cand = malloc(sizeof(Candidate) * top_k);
    if (!cand) return fail("out of memory for top-k");
    memcpy(out, prompt, np * sizeof(int));
    Slot *a = &s->slots[0];
    uint64_t rng = seed;
    for (int len = np; len < np + n; len++) {
        // no KV cache: rerun the last T tokens (cheap at the sizes we sample)
        int T = len < s->T ? len : s->T;
        memcpy(a->inputs, out + len - T, T * sizeof(int));
        stage_forward(s, a, 1, T);
        matmul_forward(a->probs, a->lnf + (size_t)(T - 1) * C, tensor(s, s->params, P_WTE), NULL, 1, C, Vp);
        // keep the top_k logits, sorted, by insertion (k is small)
        int k = 0;
        for (int i = 0; i < V; i++) {
            float x = a->probs[i];
            if (k == top_k && x <= cand[k - 1].logit) continue;
            int j = k < top_k ? k++ : k - 1;
            while (j > 0 && cand[j - 1].logit < x) { cand[j] = cand[j - 1]; j--; }
            cand[j] = (Candidate){x, i};
        }
        int next = cand[0].id;
        if (temperature > 0.0f) {
            double sum = 0.0;
            for (int i = 0; i < k; i++) sum += exp((cand[i].logit - cand[0].logit) / temperature);
            double r = uniform01(&rng) * sum, acc = 0.0;
            for (int i = 0; i < k; i++) {
                acc += exp((cand[i].logit - cand[0].logit) / temperature);
                if (r < acc) { next = cand[i].id; break; }
            }
        }
        out[len] = next;
    }
    free(cand);
    return 0;
}

// ----------------------------------------------------------------------------
// main: single-process training from the shell, ./train_gpt -h for the flags.
// Built only for the binary (the Python binding links the stage API alone).
#ifdef TRAIN_GPT_MAIN

// llm.c's tokenizer file, for printing samples
typedef struct { int n, eot; char **tokens; } Tokenizer;

static int tokenizer_read(Tokenizer *tk, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return fail("%s: cannot open tokenizer (%s)", path, strerror(errno));
    int32_t h[HEADER_INTS];
    int rc = -1;
    if (fread(h, sizeof h, 1, f) != 1 || h[0] != TOKENIZER_MAGIC || h[1] != 2) {
        fail("%s: not an llm.c tokenizer file (version 2)", path);
        goto done;
    }
    tk->n = h[2];
    tk->eot = h[3];
    tk->tokens = calloc(tk->n, sizeof(char *));
    for (int i = 0; i < tk->n; i++) {
        unsigned char len;
        if (fread(&len, 1, 1, f) != 1) { fail("%s: truncated at token %d", path, i); goto done; }
        tk->tokens[i] = calloc(len + 1, 1);
        if (fread(tk->tokens[i], 1, len, f) != len) { fail("%s: truncated at token %d", path, i); goto done; }
    }
    rc = 0;
done:
    fclose(f);
    return rc;
}

static void usage(void) {
    fprintf(stderr,
        "usage: ./train_gpt [flags]   (single-process training; python train.py does more)\n"
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
        "  -x SEED -p THREADS  (1337, all cores)\n"
        "  -z PATH     tokenizer for printing samples (data/gpt2_tokenizer.bin)\n");
}

static int die(void) {
    fprintf(stderr, "error: %s\n", gpt_last_error());
    return 1;
}

static float validation_loss(Stage *s, DataLoader *val, int *x, int *y, int batches) {
    int ops[2] = {OP_FWD, 0};
    float sum = 0.0f, loss = 0.0f;
    dataloader_set_position(val, 0, 0);
    for (int i = 0; i < batches; i++) {
        if (dataloader_next(val, x, y) || stage_run(s, ops, 1, x, y, 0, &loss)) return NAN;
        sum += loss;
    }
    return sum / batches;
}

int main(int argc, char **argv) {
    const char *train_pat = "data/shakespeare/shakespeare_train_*.bin";
    const char *val_pat = "data/shakespeare/shakespeare_val_*.bin";
    const char *model = "tiny", *ckpt_dir = NULL, *tok_path = "data/gpt2_tokenizer.bin";
    int B = 8, T = 64, M = 1, steps = 50, warmup = 10, val_every = 25, sample_tokens = 64;
    int ckpt_every = 0, resume = 0, threads = 0;
    float lr = 1e-3f;
    uint64_t seed = 1337;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (strcmp(f, "-r") == 0) { resume = 1; continue; }
        if (f[0] != '-' || strlen(f) != 2 || i + 1 >= argc) { usage(); return 1; }
        const char *v = argv[++i];
        switch (f[1]) {
        case 'i': train_pat = v; break;
        case 'j': val_pat = v; break;
        case 'e': model = v; break;
        case 'b': B = atoi(v); break;
        case 't': T = atoi(v); break;
        case 'a': M = atoi(v); break;
        case 'n': steps = atoi(v); break;
        case 'l': lr = (float)atof(v); break;
        case 'u': warmup = atoi(v); break;
        case 'v': val_every = atoi(v); break;
        case 'g': sample_tokens = atoi(v); break;
        case 'o': ckpt_dir = v; break;
        case 'k': ckpt_every = atoi(v); break;
        case 'x': seed = strtoull(v, NULL, 10); break;
        case 'p': threads = atoi(v); break;
        case 'z': tok_path = v; break;
        default: usage(); return 1;
        }
    }
    if (M < 1 || steps < 0) { fprintf(stderr, "error: -a and -n must be positive\n"); return 1; }
    gpt_set_threads(threads);
    GPTConfig cfg;
    int from_file = gpt_config_from_name(model, &cfg) != 0;
    if (from_file && gpt_read_config(model, &cfg)) return die();
    Stage *s = stage_create(cfg, 0, cfg.num_layers, B, T, 1);
    if (!s) return die();
    if (from_file ? stage_load(s, model) : (stage_init(s, seed), 0)) return die();
    DataLoader *train = dataloader_open(train_pat, B, T);
    if (!train) return die();
    DataLoader *val = val_every > 0 ? dataloader_open(val_pat, B, T) : NULL;
    if (val_every > 0 && !val) return die();
    int start = 0;
    if (resume) {
        int64_t last = ckpt_dir ? checkpoint_latest(ckpt_dir) : -1;
        TrainState ts;
        if (last < 0) { fprintf(stderr, "error: -r: no finished checkpoint in %s\n", ckpt_dir ? ckpt_dir : "(no -o)"); return 1; }
        if (stage_read_checkpoint(s, ckpt_dir, last, &ts) || dataloader_set_position(train, ts.shard, ts.pos)) return die();
        start = (int)ts.step;
        printf("resumed from %s step %d\n", ckpt_dir, start);
    }
    size_t BT = (size_t)B * T;
    int *x = malloc(M * BT * sizeof(int)), *y = malloc(M * BT * sizeof(int));
    int *ops = malloc(2 * 3 * M * sizeof(int));
    for (int mb = 0; mb < M; mb++) {  // one stage: F, B, W per micro-batch
        int op[6] = {OP_FWD, mb, OP_BWD_INPUT, mb, OP_BWD_WEIGHT, mb};
        memcpy(ops + 6 * mb, op, sizeof op);
    }
    double *parts = malloc(sizeof(double) * NUM_PARAM_TENSORS * cfg.num_layers);
    printf("model L=%d NH=%d C=%d, B=%d T=%d micro-batches=%d, %zu parameters\n",
           cfg.num_layers, cfg.num_heads, cfg.channels, B, T, M, s->num_params);
    for (int step = start; step < steps; step++) {
        double t0 = now_seconds();
        for (int mb = 0; mb < M; mb++)
            if (dataloader_next(train, x + mb * BT, y + mb * BT)) return die();
        float loss;
        if (stage_run(s, ops, 3 * M, x, y, 1, &loss)) return die();
        loss /= M;
        stage_sum_wte_grads(s);
        stage_grad_norm_parts(s, parts);
        double norm = gpt_norm_from_parts(parts, cfg.num_layers);
        float scale = norm > 1.0 ? (float)(1.0 / norm) : 1.0f;
        float step_lr = gpt_lr_at(step, lr, warmup, steps, 0.1f);
        stage_adamw(s, step_lr, 0.1f, scale, step + 1);
        double ms = 1e3 * (now_seconds() - t0);
        printf("step %d/%d | loss %f | lr %.2e | norm %.4f | %.0f ms | %.0f tok/s\n", step + 1, steps,
               loss, step_lr, norm, ms, M * BT / ms * 1e3);
        if (val && (step + 1) % val_every == 0)
            printf("val loss %f\n", validation_loss(s, val, x, y, 10));
        if (ckpt_dir && ckpt_every > 0 && ((step + 1) % ckpt_every == 0 || step + 1 == steps)) {
            TrainState ts = {step + 1, 0, 0};
            dataloader_get_position(train, &ts.shard, &ts.pos);
            if (stage_write_checkpoint(s, ckpt_dir, &ts) || checkpoint_commit(ckpt_dir, step + 1)) return die();
        }
    }
    if (sample_tokens > 0) {
        Tokenizer tk = {0};
        int have_tk = tokenizer_read(&tk, tok_path) == 0;
        int prompt = have_tk ? tk.eot : 50256;
        int *out = malloc((1 + sample_tokens) * sizeof(int));
        if (stage_sample(s, &prompt, 1, sample_tokens, 1.0f, 40, seed, out)) return die();
        printf("sample:\n");
        for (int i = 1; i <= sample_tokens; i++) {
            if (have_tk) printf("%s", tk.tokens[out[i]]);
            else printf("%d ", out[i]);
        }
        printf("\n");
        free(out);
    }
    dataloader_free(train);
    dataloader_free(val);
    stage_free(s);
    free(x); free(y); free(ops); free(parts);
    return 0;
}
#endif
