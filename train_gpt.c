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
// the device API (a CPU has none), checkpoint I/O, sampling, and main(),
// last, which hands this stage API to common.h's train_main.
#define _POSIX_C_SOURCE 200809L
#define _DARWIN_C_SOURCE  // macOS hides MSG_DONTWAIT and MSG_NOSIGNAL from plain POSIX
#include "common.h"
#include "asm/sgemm.h"

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
    if (asm_sgemm_available()) asm_gemm_nt(out, inp, W, bias, N, IC, OC);
    else gemm_nt(out, inp, W, bias, N, IC, OC);
}

// dinp (N,IC) = dout (N,OC) @ W (OC,IC)
static void matmul_backward_input(float *dinp, const float *dout, const float *W,
                                  int N, int IC, int OC) {
    if (asm_sgemm_available()) asm_gemm_nn(dinp, dout, OC, 1, W, N, OC, IC, 0);
    else gemm_nn(dinp, dout, OC, 1, W, N, OC, IC, 0);
}

// dW (OC,IC) += dout^T @ inp, dbias (OC) += column sums of dout
static void matmul_backward_weight(float *dW, float *dbias, const float *dout,
                                   const float *inp, int N, int IC, int OC) {
    if (asm_sgemm_available()) asm_gemm_nn(dW, dout, 1, OC, inp, OC, N, IC, 1);
    else gemm_nn(dW, dout, 1, OC, inp, OC, N, IC, 1);
    if (dbias) {  // column sums, rows in order, a strip of columns per thread
        #pragma omp parallel for
        for (int o0 = 0; o0 < OC; o0 += 64) {
            int o1 = o0 + 64 < OC ? o0 + 64 : OC;
            float s[64] = {0};
            for (int n = 0; n < N; n++)
                for (int o = o0; o < o1; o++) s[o - o0] += dout[(size_t)n * OC + o];
            for (int o = o0; o < o1; o++) dbias[o] += s[o - o0];
        }
    }
}

// a . b in 8 interleaved lanes summed in a fixed order: gcc vectorises it,
// where one running sum is a chain of dependent adds it must keep in order
static inline float dot(const float *a, const float *b, int n) {
    float lane[8] = {0}, s = 0.0f;
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lane[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s += a[i] * b[i];
    for (int l = 0; l < 8; l++) s += lane[l];
    return s;
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
                    a[t2] = dot(q, k, hs) * scale;
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
                float datt_dot_att = 0.0f;
                for (int t2 = 0; t2 <= t; t2++) {
                    const float *v = qkv + (size_t)(b * T + t2) * C3 + 2 * C + h * hs;
                    float *dv = dqkv + (size_t)(b * T + t2) * C3 + 2 * C + h * hs;
                    for (int i = 0; i < hs; i++) dv[i] += a[t2] * d[i];
                    datt[t2] = dot(d, v, hs);
                    datt_dot_att += a[t2] * datt[t2];
                }
                // through the softmax, then the scaled q.k
                for (int t2 = 0; t2 <= t; t2++) {
                    float dpre = a[t2] * (datt[t2] - datt_dot_att) * scale;
                    const float *k = qkv + (size_t)(b * T + t2) * C3 + C + h * hs;
                    float *dk = dqkv + (size_t)(b * T + t2) * C3 + C + h * hs;
                    for (int i = 0; i < hs; i++) { dq[i] += dpre * k[i]; dk[i] += dpre * q[i]; }
                }
            }
            free(datt);
        }
}

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)

// e^y for -87 <= y <= 88 (the callers clamp), in a form gcc vectorises
// (libm's expf and tanhf are one scalar call per element, which made GELU
// and the softmax the largest costs of a CPU step outside the matmuls):
// y = n ln 2 + r with |r| <= ln(2) / 2 (ln 2 split in two so n ln 2 is
// exact), e^r by its Taylor series to r^6 (relative error 1.2e-7), times 2^n
// built in the exponent bits. n is rounded by adding 1.5 * 2^23, which
// pushes the fraction out of the mantissa and leaves n in its low bits, read
// back as an integer (floorf, or converting a float to int, would not
// vectorise, round as wanted or be defined for a NaN). A NaN y gives NaN.
static inline float exp_vec(float y) {
    float t = y * 1.44269504f + 12582912.0f;  // 1.5 * 2^23 + n, n = round(y / ln 2)
    float n = t - 12582912.0f;
    float r = fmaf(n, -1.42860677e-6f, fmaf(n, -0.693145752f, y));
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    uint32_t tb;
    memcpy(&tb, &t, sizeof tb);
    uint32_t bits = (tb - 0x4B400000u + 127u) << 23;  // 2^n: the exponent n + 127
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

// min(x, c) for x, c >= 0 (or max for both <= 0) on the bits, which order
// like the magnitudes (a float compare, fminf or floorf stops gcc's
// vectoriser); a NaN stays NaN, so that it reaches the loss
static inline float clamp_magnitude(float x, float c) {
    uint32_t xb, cb;
    memcpy(&xb, &x, sizeof xb);
    memcpy(&cb, &c, sizeof cb);
    uint32_t keep = (xb < cb) | ((xb & 0x7FFFFFFFu) > 0x7F800000u);  // smaller, or NaN
    xb = keep * xb + (1u - keep) * cb;
    memcpy(&x, &xb, sizeof x);
    return x;
}

// tanh(u) = sign(u) (1 - 2 / (e^2|u| + 1)), with |u| clamped to 9 (tanh(9)
// is 1 in fp32). Within 1.6e-7 of tanh(u), and within 1e-7 relative for
// |u| >= 1 (measured on a 40M-point grid over [-20, 20]); the GELU's 1 + tanh
// never needs more.
static inline float tanh_gelu(float u) {
    float e = exp_vec(2.0f * clamp_magnitude(fabsf(u), 9.0f));
    return copysignf(1.0f - 2.0f / (e + 1.0f), u);
}

static void gelu_forward(float *out, const float *inp, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        out[i] = 0.5f * x * (1.0f + tanh_gelu(GELU_SCALE * (x + 0.044715f * x * x * x)));
    }
}

// dinp = gelu'(inp) * dout
static void gelu_backward(float *dinp, const float *inp, const float *dout, size_t n) {
    #pragma omp parallel for
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float u = GELU_SCALE * (x + 0.044715f * x * x * x);
        float th = tanh_gelu(u);
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
        // the max and the sum in 16 interleaved lanes, so both vectorise;
        // e^(x - max) clamped to e^-87 (below it, fp32 is denormal: p is 0
        // to within 1e-38 either way)
        float lane[16], maxv = -INFINITY, sum = 0.0f;
        for (int l = 0; l < 16; l++) lane[l] = -INFINITY;
        int i = 0;
        for (; i + 16 <= V; i += 16)
            for (int l = 0; l < 16; l++) lane[l] = p[i + l] > lane[l] ? p[i + l] : lane[l];
        for (; i < V; i++) maxv = p[i] > maxv ? p[i] : maxv;
        for (int l = 0; l < 16; l++) maxv = lane[l] > maxv ? lane[l] : maxv;
        for (int l = 0; l < 16; l++) lane[l] = 0.0f;
        for (i = 0; i + 16 <= V; i += 16)
            for (int l = 0; l < 16; l++) {
                p[i + l] = exp_vec(clamp_magnitude(p[i + l] - maxv, -87.0f));
                lane[l] += p[i + l];
            }
        for (; i < V; i++) { p[i] = exp_vec(clamp_magnitude(p[i] - maxv, -87.0f)); sum += p[i]; }
        for (int l = 0; l < 16; l++) sum += lane[l];
        for (i = 0; i < V; i++) p[i] /= sum;
        for (i = V; i < Vp; i++) p[i] = 0.0f;
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
} Activations;

// A pool (common.h) of count buffers of elems floats in host memory.
static void pool_free(BufferPool *pool) {
    free(pool->memory);
    free(pool->free_list);
    memset(pool, 0, sizeof *pool);
}
static int pool_make(BufferPool *pool, int count, size_t elems, const char *what) {
    pool_free(pool);
    size_t bytes = 0;
    if (pool_bytes(count, elems, what, &bytes)) return -1;
    float *memory = (float *)calloc_or_fail(bytes, 1, what);
    if (!memory) return -1;
    if (pool_init(pool, memory, count, elems, what)) { free(memory); return -1; }
    return 0;
}

struct Stage {
    StageBase base;                    // first: its links and zero stage (common.h)
    Layout layout;                     // which layers and tensors this stage holds
    int B, T;
    float *params, *grads;             // stage layout (common.h)
    float *m, *v;                      // AdamW's moments: this rank's shard (optimizer_shard)
    float *dwte_embed;                 // first stage: the embedding's share of d(wte)
    Activations *acts;                 // activation buffers: one per micro-batch in flight
    OpRun run;                         // the executor's bookkeeping (common.h)
    float *scratch_c, *scratch_4c;     // (B,T,C), (B,T,4C): gradients used at once
    int wte_summed;                    // d(wte) = head + embedding done for this step's gradients
    size_t opt_elems, acts_elems;      // floats in m (and in v), in one activation buffer
    // --zero 3 (FSDP): while `sharded`, params and grads above are this
    // rank's shards, packed like m and v, and a step's whole parameters and
    // gradients live in buffers, a bucket at a time (see the executor)
    int sharded;
    size_t shard_at[NUM_PARAM_TENSORS], chunk_n[NUM_PARAM_TENSORS];  // (t, l)'s chunk: shard_at[t] + l * chunk_n[t]
    size_t in_bucket[NUM_PARAM_TENSORS];  // where tensor t starts in its bucket's buffer
    Fsdp fsdp;                         // the buffers each bucket holds this step, and the comm thread (common.h)
};
static_assert(offsetof(Stage, base) == 0, "a Stage begins with its StageBase (common.h)");

static float *tensor(Stage *s, float *base, int t) { return s->layout.sizes[t] ? base + s->layout.offsets[t] : NULL; }
// layer l (stage-local) of per-layer tensor t
static float *layer_tensor(Stage *s, float *base, int t, int l) {
    return base + s->layout.offsets[t] + l * gpt_tensor_size(&s->layout.cfg, t, 1);
}

// Tensor t of layer l (l is ignored for a whole tensor) as the compute sees
// it: in the stage layout, or under --zero 3 in the buffer its bucket holds
// this step (NULL when it holds none; the executor checks before it runs).
static float *held_tensor(Stage *s, int grads, int t, int l) {
    if (!s->sharded) return is_layer_tensor(t) ? layer_tensor(s, grads ? s->grads : s->params, t, l)
                                               : tensor(s, grads ? s->grads : s->params, t);
    float *buf = s->layout.sizes[t] ? s->fsdp.held[grads][is_layer_tensor(t) ? l : s->layout.nl] : NULL;
    return buf ? buf + s->in_bucket[t] : NULL;
}
static float *param_of(Stage *s, int t, int l) { return held_tensor(s, 0, t, l); }
static float *grad_of(Stage *s, int t, int l) { return held_tensor(s, 1, t, l); }

// the whole stage's tensors: not while they are sharded (zero 3)
float *stage_param(Stage *s, int t, size_t *n) {
    *n = s->sharded ? 0 : s->layout.sizes[t];
    return *n ? tensor(s, s->params, t) : NULL;
}
float *stage_grad(Stage *s, int t, size_t *n) {
    *n = s->sharded ? 0 : s->layout.sizes[t];
    return *n ? tensor(s, s->grads, t) : NULL;
}
float *stage_wte_embed_grad(Stage *s, size_t *n) {
    *n = s->layout.first ? s->layout.sizes[P_WTE] : 0;
    return s->dwte_embed;
}
const double *stage_op_times(const Stage *s) { return s->run.op_times; }

static int activations_alloc(Stage *s, Activations *acts) {
    size_t B = s->B, T = s->T, C = s->layout.cfg.channels, NH = s->layout.cfg.num_heads, nl = s->layout.nl;
    size_t BT = B * T, Vp = s->layout.cfg.padded_vocab_size;
    size_t last = s->layout.last;
    struct { float **p; size_t n; } bufs[] = {
        {&acts->x0, BT * C},
        {&acts->ln1, nl * BT * C}, {&acts->ln1_mean, nl * BT}, {&acts->ln1_rstd, nl * BT},
        {&acts->qkv, nl * BT * 3 * C}, {&acts->att, nl * B * NH * T * T},
        {&acts->atty, nl * BT * C}, {&acts->res2, nl * BT * C},
        {&acts->ln2, nl * BT * C}, {&acts->ln2_mean, nl * BT}, {&acts->ln2_rstd, nl * BT},
        {&acts->fch, nl * BT * 4 * C}, {&acts->fch_gelu, nl * BT * 4 * C}, {&acts->res3, nl * BT * C},
        {&acts->lnf, last * BT * C}, {&acts->lnf_mean, last * BT}, {&acts->lnf_rstd, last * BT},
        {&acts->probs, last * BT * Vp}, {&acts->losses, last * BT},
        {&acts->dresid, (nl + 1) * BT * C}, {&acts->dln1, nl * BT * C}, {&acts->dqkv, nl * BT * 3 * C},
        {&acts->dres2, nl * BT * C}, {&acts->dln2, nl * BT * C}, {&acts->dfch, nl * BT * 4 * C},
        {&acts->dlnf, last * BT * C},
    };
    size_t total = 0;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) total += bufs[i].n;
    s->acts_elems = total;
    acts->memory = calloc_or_fail(total, sizeof(float), "the activations of one micro-batch");
    acts->inputs = calloc_or_fail(BT, sizeof(int), "a micro-batch's inputs");
    acts->targets = calloc_or_fail(BT, sizeof(int), "a micro-batch's targets");
    if (!acts->memory || !acts->inputs || !acts->targets) return -1;
    float *p = acts->memory;
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) { *bufs[i].p = p; p += bufs[i].n; }
    return 0;
}

Stage *stage_create(GPTConfig cfg, int lo, int hi, int B, int T, int activation_buffers) {
    if (check_stage_args(cfg, lo, hi, B, T, activation_buffers)) return NULL;
    if (asm_sgemm_error()) { fail("%s", asm_sgemm_error()); return NULL; }
    Stage *s = calloc_or_fail(1, sizeof(Stage), "the stage");
    if (!s) return NULL;
    s->layout = layout_make(cfg, lo, hi);
    s->B = B; s->T = T; s->run.activation_buffers = activation_buffers;
    s->base.links = links_make(lo, hi);
    size_t P = s->layout.num_params, BTC = (size_t)B * T * cfg.channels;
    s->params = calloc_or_fail(P, sizeof(float), "the parameters");
    s->grads = calloc_or_fail(P, sizeof(float), "the gradients");
    s->opt_elems = P;
    s->m = calloc_or_fail(P, sizeof(float), "AdamW's m");
    s->v = calloc_or_fail(P, sizeof(float), "AdamW's v");
    s->dwte_embed =
        s->layout.first ? calloc_or_fail(s->layout.sizes[P_WTE], sizeof(float), "d(wte) of the embedding") : NULL;
    s->scratch_c = calloc_or_fail(BTC, sizeof(float), "the (B,T,C) scratch");
    s->scratch_4c = calloc_or_fail(4 * BTC, sizeof(float), "the (B,T,4C) scratch");
    s->acts = calloc_or_fail(activation_buffers, sizeof(Activations), "the activation buffers");
    if (!s->params || !s->grads || !s->m || !s->v || (s->layout.first && !s->dwte_embed) ||
        !s->scratch_c || !s->scratch_4c || !s->acts) {
        stage_free(s);
        return NULL;
    }
    for (int i = 0; i < activation_buffers; i++)
        if (activations_alloc(s, &s->acts[i])) { stage_free(s); return NULL; }
    return s;
}

void stage_free(Stage *s) {
    if (!s) return;
    fsdp_stop(&s->fsdp);  // first: a collective it is still in reads and writes what follows
    for (int i = 0; s->acts && i < s->run.activation_buffers; i++) {
        free(s->acts[i].memory); free(s->acts[i].inputs); free(s->acts[i].targets);
    }
    free(s->acts);
    oprun_free(&s->run);
    free(s->params); free(s->grads); free(s->m); free(s->v); free(s->dwte_embed);
    free(s->scratch_c); free(s->scratch_4c);
    pool_free(&s->fsdp.pools[0]); pool_free(&s->fsdp.pools[1]);
    free(s->fsdp.whole[0]); free(s->fsdp.whole[1]);
    free(s);
}

static void shard_copy(Stage *s, float *whole_stage, float *shard, int unpack);

// Under --zero 3 the whole stage is drawn once and only this rank's chunks
// kept (train.py draws before it shards, so this path is for other callers).
int stage_init(Stage *s, uint64_t seed) {
    if (!s->sharded) { init_params(&s->layout, s->params, seed); return 0; }
    float *whole_stage = calloc_or_fail(s->layout.num_params, sizeof(float), "the parameters, before sharding");
    if (!whole_stage) return -1;
    init_params(&s->layout, whole_stage, seed);
    shard_copy(s, whole_stage, s->params, 0);
    free(whole_stage);
    return 0;
}

// The stage's forward of layers [l0, l1) for one micro-batch of shape (B,T),
// with the embedding before layer 0 and the final layernorm after the last
// ([0, nl) is the whole stage, what a whole-stage FWD runs); sampling calls it
// with B=1 and a shorter T.
static void stage_forward(Stage *s, Activations *acts, int B, int T, int l0, int l1) {
    const GPTConfig *cfg = &s->layout.cfg;
    int C = cfg->channels, NH = cfg->num_heads, N = B * T;
    size_t BTC = (size_t)s->B * s->T * C;  // per-layer stride in the activation buffer
    if (s->layout.first && l0 == 0)
        encoder_forward(acts->x0, acts->inputs, param_of(s, P_WTE, 0), param_of(s, P_WPE, 0), B, T, C);
    for (int l = l0; l < l1; l++) {
        float *x = l == 0 ? acts->x0 : acts->res3 + (l - 1) * BTC;
        float *ln1 = acts->ln1 + l * BTC, *qkv = acts->qkv + 3 * l * BTC, *atty = acts->atty + l * BTC;
        float *att = acts->att + (size_t)l * s->B * NH * s->T * s->T;
        float *res2 = acts->res2 + l * BTC, *ln2 = acts->ln2 + l * BTC;
        float *fch = acts->fch + 4 * l * BTC, *fchg = acts->fch_gelu + 4 * l * BTC, *res3 = acts->res3 + l * BTC;
        size_t lN = (size_t)l * s->B * s->T;
        layernorm_forward(ln1, acts->ln1_mean + lN, acts->ln1_rstd + lN, x,
                          param_of(s, P_LN1W, l), param_of(s, P_LN1B, l), N, C);
        matmul_forward(qkv, ln1, param_of(s, P_QKVW, l), param_of(s, P_QKVB, l), N, C, 3 * C);
        attention_forward(atty, att, qkv, B, T, C, NH);
        matmul_forward(res2, atty, param_of(s, P_ATTPROJW, l), param_of(s, P_ATTPROJB, l), N, C, C);
        residual_add(res2, x, (size_t)N * C);
        layernorm_forward(ln2, acts->ln2_mean + lN, acts->ln2_rstd + lN, res2,
                          param_of(s, P_LN2W, l), param_of(s, P_LN2B, l), N, C);
        matmul_forward(fch, ln2, param_of(s, P_FCW, l), param_of(s, P_FCB, l), N, C, 4 * C);
        gelu_forward(fchg, fch, (size_t)N * 4 * C);
        matmul_forward(res3, fchg, param_of(s, P_FCPROJW, l), param_of(s, P_FCPROJB, l), N, 4 * C, C);
        residual_add(res3, res2, (size_t)N * C);
    }
    if (s->layout.last && l1 == s->layout.nl)
        layernorm_forward(acts->lnf, acts->lnf_mean, acts->lnf_rstd, acts->res3 + (s->layout.nl - 1) * BTC,
                          param_of(s, P_LNFW, 0), param_of(s, P_LNFB, 0), N, C);
}

static float *stage_output(Stage *s, Activations *acts) {
    return acts->res3 + (size_t)(s->layout.nl - 1) * s->B * s->T * s->layout.cfg.channels;
}

// logits, softmax and loss for a full micro-batch (last stage)
static float stage_loss(Stage *s, Activations *acts) {
    int N = s->B * s->T, C = s->layout.cfg.channels, Vp = s->layout.cfg.padded_vocab_size;
    matmul_forward(acts->probs, acts->lnf, param_of(s, P_WTE, 0), NULL, N, C, Vp);
    return crossentropy_forward(acts->probs, acts->losses, acts->targets, N, s->layout.cfg.vocab_size, Vp);
}

// BWD_INPUT of layers [l0, l1), from the top down: from the loss (last
// stage, with layer nl-1) or the received d(output) to d(input of layer l0),
// in dresid[l0] (dresid[0]: d(stage input)), keeping what BWD_WEIGHT will need.
static void stage_backward_input(Stage *s, Activations *acts, float dloss, int l0, int l1) {
    const GPTConfig *cfg = &s->layout.cfg;
    int C = cfg->channels, NH = cfg->num_heads, B = s->B, T = s->T, N = B * T;
    size_t BTC = (size_t)N * C;
    float *dtop = acts->dresid + s->layout.nl * BTC;
    if (s->layout.last && l1 == s->layout.nl) {
        crossentropy_backward(acts->probs, acts->targets, dloss, N, cfg->padded_vocab_size);
        matmul_backward_input(acts->dlnf, acts->probs, param_of(s, P_WTE, 0), N, C, cfg->padded_vocab_size);
        memset(dtop, 0, BTC * sizeof(float));
        layernorm_backward_input(dtop, acts->dlnf, stage_output(s, acts), param_of(s, P_LNFW, 0),
                                 acts->lnf_mean, acts->lnf_rstd, N, C);
    }
    for (int l = l1 - 1; l >= l0; l--) {
        float *x = l == 0 ? acts->x0 : acts->res3 + (l - 1) * BTC;
        float *dout = acts->dresid + (l + 1) * BTC;
        float *dfch = acts->dfch + 4 * l * BTC, *dln2 = acts->dln2 + l * BTC, *dres2 = acts->dres2 + l * BTC;
        float *dqkv = acts->dqkv + 3 * l * BTC, *dln1 = acts->dln1 + l * BTC, *dx = acts->dresid + l * BTC;
        size_t lN = (size_t)l * N;
        matmul_backward_input(s->scratch_4c, dout, param_of(s, P_FCPROJW, l), N, 4 * C, C);
        gelu_backward(dfch, acts->fch + 4 * l * BTC, s->scratch_4c, 4 * BTC);
        matmul_backward_input(dln2, dfch, param_of(s, P_FCW, l), N, C, 4 * C);
        memcpy(dres2, dout, BTC * sizeof(float));
        layernorm_backward_input(dres2, dln2, acts->res2 + l * BTC, param_of(s, P_LN2W, l),
                                 acts->ln2_mean + lN, acts->ln2_rstd + lN, N, C);
        matmul_backward_input(s->scratch_c, dres2, param_of(s, P_ATTPROJW, l), N, C, C);
        attention_backward(dqkv, s->scratch_c, acts->qkv + 3 * l * BTC,
                           acts->att + (size_t)l * B * NH * T * T, B, T, C, NH);
        matmul_backward_input(dln1, dqkv, param_of(s, P_QKVW, l), N, C, 3 * C);
        memcpy(dx, dres2, BTC * sizeof(float));
        layernorm_backward_input(dx, dln1, x, param_of(s, P_LN1W, l),
                                 acts->ln1_mean + lN, acts->ln1_rstd + lN, N, C);
    }
}

// BWD_WEIGHT of layers [l0, l1): accumulate this micro-batch's parameter
// gradients (the head's with layer nl-1, the embedding's with layer 0). Each
// layer's gradients are its own, so the order of the layers changes no bit.
static void stage_backward_weight(Stage *s, Activations *acts, int l0, int l1) {
    const GPTConfig *cfg = &s->layout.cfg;
    int C = cfg->channels, N = s->B * s->T;
    size_t BTC = (size_t)N * C;
    if (s->layout.last && l1 == s->layout.nl) {
        matmul_backward_weight(grad_of(s, P_WTE, 0), NULL, acts->probs, acts->lnf, N, C, cfg->padded_vocab_size);
        layernorm_backward_weight(grad_of(s, P_LNFW, 0), grad_of(s, P_LNFB, 0), acts->dlnf,
                                  stage_output(s, acts), acts->lnf_mean, acts->lnf_rstd, N, C);
    }
    for (int l = l1 - 1; l >= l0; l--) {
        float *x = l == 0 ? acts->x0 : acts->res3 + (l - 1) * BTC;
        size_t lN = (size_t)l * N;
        layernorm_backward_weight(grad_of(s, P_LN1W, l), grad_of(s, P_LN1B, l),
                                  acts->dln1 + l * BTC, x, acts->ln1_mean + lN, acts->ln1_rstd + lN, N, C);
        matmul_backward_weight(grad_of(s, P_QKVW, l), grad_of(s, P_QKVB, l),
                               acts->dqkv + 3 * l * BTC, acts->ln1 + l * BTC, N, C, 3 * C);
        matmul_backward_weight(grad_of(s, P_ATTPROJW, l), grad_of(s, P_ATTPROJB, l),
                               acts->dres2 + l * BTC, acts->atty + l * BTC, N, C, C);
        layernorm_backward_weight(grad_of(s, P_LN2W, l), grad_of(s, P_LN2B, l),
                                  acts->dln2 + l * BTC, acts->res2 + l * BTC, acts->ln2_mean + lN,
                                  acts->ln2_rstd + lN, N, C);
        matmul_backward_weight(grad_of(s, P_FCW, l), grad_of(s, P_FCB, l),
                               acts->dfch + 4 * l * BTC, acts->ln2 + l * BTC, N, C, 4 * C);
        matmul_backward_weight(grad_of(s, P_FCPROJW, l), grad_of(s, P_FCPROJB, l),
                               acts->dresid + (l + 1) * BTC, acts->fch_gelu + 4 * l * BTC, N, 4 * C, C);
    }
    if (s->layout.first && l0 == 0)
        encoder_backward(s->dwte_embed, grad_of(s, P_WPE, 0), acts->dresid, acts->inputs, s->B, s->T, C);
}

// ----------------------------------------------------------------------------
// executor: one rank's op list for one step, with no Python in the loop. The
// loop is common.h's run_op_list; these are its hooks.

// This rank's chunk of every segment, from an array in the stage layout into
// a shard (or back: unpack), where shard_at and chunk_n place them.
static void shard_copy(Stage *s, float *whole_stage, float *shard, int unpack) {
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t seg = segment_elems(&s->layout, t), lo, hi;
        chunk_range(seg, s->base.links.replica, s->base.links.replicas, &lo, &hi);
        for (int l = 0; l < segment_count(&s->layout, t); l++) {
            float *in_stage = whole_stage + s->layout.offsets[t] + l * seg + lo;
            float *in_shard = shard + s->shard_at[t] + l * s->chunk_n[t];
            memcpy(unpack ? in_stage : in_shard, unpack ? in_shard : in_stage, s->chunk_n[t] * sizeof(float));
        }
    }
}

// Elements of the whole-tensor bucket (wte, wpe, lnf: those the stage has).
static size_t whole_bucket_elems(const Layout *layout) {
    size_t n = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) n += is_layer_tensor(t) ? 0 : layout->sizes[t];
    return n;
}

static int fsdp_ring(void *stage, int kind, int bucket, float *buf);

// --zero 3: the shard's offsets, where each tensor sits in its bucket's
// buffer, and params and grads cut down to their shards (keeping the chunks
// of the parameters the stage holds now).
static int stage_shard(Stage *s) {
    size_t at = shard_offsets(&s->layout, s->base.links.replica, s->base.links.replicas, s->shard_at, s->chunk_n);
    size_t in_layer, in_whole;
    bucket_offsets(&s->layout, 1, s->in_bucket, &in_layer, &in_whole);
    float *params = calloc_or_fail(at, sizeof(float), "the parameters' shard");
    float *grads = calloc_or_fail(at, sizeof(float), "the gradients' shard");
    s->fsdp.whole[0] = calloc_or_fail(in_whole, sizeof(float), "the whole tensors' gathered parameters");
    s->fsdp.whole[1] = calloc_or_fail(in_whole, sizeof(float), "the whole tensors' gradients");
    if (!params || !grads || !s->fsdp.whole[0] || !s->fsdp.whole[1]) {
        free(params); free(grads);
        return -1;
    }
    shard_copy(s, s->params, params, 0);
    free(s->params); free(s->grads);
    s->params = params;
    s->grads = grads;
    s->fsdp.pools[0].elems = s->fsdp.pools[1].elems = in_layer;
    s->sharded = 1;
    return fsdp_start(&s->fsdp, &s->layout, fsdp_ring, s);
}

int stage_set_replicas(Stage *s, int prev_fd, int next_fd, int replica, int replicas, int zero) {
    if (zero != 0 && zero != 1 && zero != 3) return fail("--zero %d: expected 0, 1 or 3", zero);
    if (s->base.zero || s->base.links.replicas > 1) return fail("stage_set_replicas: the replicas are set once");
    set_replica_ring(s, prev_fd, next_fd, replica, replicas, zero);
    int part, parts;
    optimizer_shard(s, &part, &parts);
    s->opt_elems = shard_elems(&s->layout, part, parts);
    free(s->m); free(s->v);
    s->m = calloc_or_fail(s->opt_elems, sizeof(float), "AdamW's m");
    s->v = calloc_or_fail(s->opt_elems, sizeof(float), "AdamW's v");
    if (!s->m || !s->v) return -1;
    return zero == 3 ? stage_shard(s) : 0;
}

int stage_set_layer_buffers(Stage *s, int gathered, int grads) {
    if (!s->sharded) return fail("layer buffers are --zero 3's, and this stage is not sharded");
    if (gathered < 0 || grads < 0 || gathered > s->layout.nl || grads > s->layout.nl)
        return fail("%d gathered and %d gradient buffers for %d layers", gathered, grads, s->layout.nl);
    BufferPool *pools = s->fsdp.pools;
    return pool_make(&pools[0], gathered, pools[0].elems, "the gathered layers' buffers") ||
           pool_make(&pools[1], grads, pools[1].elems, "the layers' gradient buffers") ? -1 : 0;
}

// What stage_create, stage_set_replicas and stage_set_layer_buffers allocated.
void stage_memory_bytes(const Stage *s, uint64_t bytes[NUM_MEMORY]) {
    size_t P = s->sharded ? s->opt_elems : s->layout.num_params;  // zero 3's shard is the optimizer's
    const BufferPool *pools = s->fsdp.pools;
    size_t whole = s->fsdp.whole[0] ? whole_bucket_elems(&s->layout) : 0, BT = (size_t)s->B * s->T;
    bytes[MEMORY_PARAMS] = 4 * P;
    bytes[MEMORY_GRADS] = 4 * (P + (s->dwte_embed ? s->layout.sizes[P_WTE] : 0));
    bytes[MEMORY_OPTIMIZER] = 8 * s->opt_elems;
    bytes[MEMORY_GATHERED] = 4 * ((size_t)pools[0].count * pools[0].elems + whole);
    bytes[MEMORY_GRAD_BUFFERS] = 4 * ((size_t)pools[1].count * pools[1].elems + whole);
    // the activation buffers and their token ids, the (B,T,C) and (B,T,4C) scratch
    bytes[MEMORY_ACTIVATIONS] =
        4 * ((size_t)s->run.activation_buffers * (s->acts_elems + 2 * BT) + 5 * BT * s->layout.cfg.channels);
}

// --zero 3 after the last step: the whole stage's parameters, gathered once,
// kept in the stage layout (grads too, zeroed), so sampling and forward-only
// lists work as under --zero 1.
int stage_unshard_params(Stage *s) {
    if (!s->sharded) return 0;
    float *params = calloc_or_fail(s->layout.num_params, sizeof(float), "the gathered parameters");
    float *grads = calloc_or_fail(s->layout.num_params, sizeof(float), "the gradients");
    if (!params || !grads) { free(params); free(grads); return -1; }
    shard_copy(s, params, s->params, 1);
    int rc = 0;
    for (int b = 0; b <= s->layout.nl && rc == 0; b++) {
        int tensors[NUM_PARAM_TENSORS], layers[NUM_PARAM_TENSORS];
        Segment segs[NUM_PARAM_TENSORS];
        int n = bucket_segments(&s->layout, b, tensors, layers);
        for (int i = 0; i < n; i++) {
            segs[i].p = params + s->layout.offsets[tensors[i]] + layers[i] * segment_elems(&s->layout, tensors[i]);
            segs[i].n = segment_elems(&s->layout, tensors[i]);
        }
        rc = ring_collective(&s->base.links, segs, n, b, 1);
    }
    if (rc) { free(params); free(grads); return -1; }
    free(s->params); free(s->grads);
    s->params = params;
    s->grads = grads;
    s->sharded = 0;
    return 0;
}

// --zero 3 (FSDP). The stage keeps chunk d of every segment of its
// parameters, gradients and AdamW state. In a step, a layer's whole
// parameters exist only from its ALLGATHER to its FREE, in a buffer of the
// gathered pool, and its whole gradient from its first BWD_WEIGHT to its
// REDUCE_SCATTER, in a buffer of the gradient pool; both pools have what the
// validator counted as this rank's peak. With m > 1 micro-batches a layer's
// gradient buffer stays from the first micro-batch's backward to the last:
// summing the micro-batches locally first, then over the ring, is the order
// zero 0 sums in, which keeps zero 3 bitwise equal to it (torch's FSDP
// reduce-scatters every micro-batch instead, which sums in another order).
// The whole-tensor bucket (wte, wpe, lnf) has its own two buffers, gathered
// at the start of the step and held to its end: the embedding uses wte first
// and the head last, so it is needed at both ends of every micro-batch.

static int hook_begin(void *stage, int m, int training) {
    Stage *s = (Stage *)stage;
    if (s->sharded) fsdp_list_begin(&s->fsdp);
    if (training && m) {  // a step's list; one without micro-batches works on the gradients as they are
        if (s->sharded) memset(s->fsdp.whole[1], 0, whole_bucket_elems(&s->layout) * sizeof(float));
        else memset(s->grads, 0, s->layout.num_params * sizeof(float));
        if (s->layout.first) memset(s->dwte_embed, 0, s->layout.sizes[P_WTE] * sizeof(float));
        s->wte_summed = 0;
    }
    return 0;
}

static int hook_forward(void *stage, int acts_index, int mb, int part, const int *inputs, const int *targets,
                        float dloss, int training) {
    (void)dloss; (void)training;
    Stage *s = (Stage *)stage;
    Activations *acts = &s->acts[acts_index];
    size_t BT = (size_t)s->B * s->T;
    int l0, l1;
    op_layers(&s->layout, part, &l0, &l1);
    if (s->sharded && fsdp_wait_gathered(&s->fsdp, &s->run, OP_FWD, l0, l1)) return -1;
    if (inputs && l0 == 0) memcpy(acts->inputs, inputs, BT * sizeof(int));
    stage_forward(s, acts, s->B, s->T, l0, l1);
    if (targets && l1 == s->layout.nl) {
        memcpy(acts->targets, targets, BT * sizeof(int));
        s->run.mb_losses[mb] = stage_loss(s, acts);
    }
    return 0;
}

static int hook_backward_input(void *stage, int acts_index, int part, float dloss) {
    Stage *s = (Stage *)stage;
    int l0, l1;
    op_layers(&s->layout, part, &l0, &l1);
    if (s->sharded && fsdp_wait_gathered(&s->fsdp, &s->run, OP_BWD_INPUT, l0, l1)) return -1;
    stage_backward_input(s, &s->acts[acts_index], dloss, l0, l1);
    return 0;
}

static int hook_backward_weight(void *stage, int acts_index, int part) {
    Stage *s = (Stage *)stage;
    int l0, l1;
    op_layers(&s->layout, part, &l0, &l1);
    float *fresh[MAX_LAYERS];  // --zero 3: the gradient buffers its layers took, which the micro-batches sum into
    if (s->sharded && fsdp_take_grad_buffers(&s->fsdp, &s->run, l0, l1, fresh)) return -1;
    for (int l = l0; s->sharded && l < l1; l++)
        if (fresh[l - l0]) memset(fresh[l - l0], 0, s->fsdp.pools[1].elems * sizeof(float));
    stage_backward_weight(s, &s->acts[acts_index], l0, l1);
    return 0;
}

static void hook_message_buffers(void *stage, int acts_index, void *bufs[4]) {
    Stage *s = (Stage *)stage;
    Activations *acts = &s->acts[acts_index];
    bufs[0] = stage_output(s, acts);
    bufs[1] = acts->x0;
    bufs[2] = acts->dresid;
    bufs[3] = acts->dresid + (size_t)s->layout.nl * s->B * s->T * s->layout.cfg.channels;
}

static int hook_exchange(void *stage, const int *ops, int n, void *const *bufs) {
    Stage *s = (Stage *)stage;
    return comm_group(&s->base.links, ops, n, bufs, (size_t)s->B * s->T * s->layout.cfg.channels * sizeof(float));
}

// A bucket's (tensor, layer) segments: in the stage layout of base (params
// or grads), or under --zero 3 in the bucket's buffer buf; sets tensors[i] too.
static int bucket_in(Stage *s, float *base, float *buf, int bucket, Segment *segs, int *tensors) {
    int layers[NUM_PARAM_TENSORS];
    int n = bucket_segments(&s->layout, bucket, tensors, layers);
    for (int i = 0; i < n; i++) {
        segs[i].p = buf ? buf + s->in_bucket[tensors[i]] : layer_tensor(s, base, tensors[i], layers[i]);
        segs[i].n = segment_elems(&s->layout, tensors[i]);
    }
    return n;
}

// --zero 3: this replica's chunks of a bucket between its whole buffer
// (segs) and the shard, shard to buffer before an all-gather, buffer to shard
// after a reduce-scatter.
static void bucket_chunks_copy(Stage *s, const Segment *segs, const int *tensors, int n, int bucket, float *shard,
                               int to_shard) {
    ChunkCopy copies[NUM_PARAM_TENSORS];
    bucket_chunk_copies(segs, tensors, n, bucket, s->base.links.replica, s->base.links.replicas, shard, s->shard_at,
                        s->chunk_n, to_shard, copies);
    for (int i = 0; i < n; i++) memcpy(copies[i].dst, copies[i].src, copies[i].count * sizeof(float));
}

// The ring half of --zero 3's ALLGATHER and REDUCE_SCATTER of the bucket
// in buf, on the comm thread (common.h's Fsdp).
// Bytes: a gather or a reduce-scatter of bucket b moves (D-1)/D * P_b values
// each way (ring_collective), so a step in which bucket b is gathered g_b
// times moves sum_b (g_b + 1)(D-1)/D * P_b values each way, 4x that in bytes:
// 3(D-1)/D * P for layers gathered twice (forward, backward) per micro-batch
// of a one-micro-batch step, 2(D-1)/D * P_b for the whole-tensor bucket, which
// is gathered once.
static int fsdp_ring(void *stage, int kind, int bucket, float *buf) {
    Stage *s = (Stage *)stage;
    int tensors[NUM_PARAM_TENSORS];
    Segment segs[NUM_PARAM_TENSORS];
    int n = bucket_in(s, NULL, buf, bucket, segs, tensors);
    if (kind == OP_ALLGATHER) {  // this replica's chunks, then the others' from the ring
        bucket_chunks_copy(s, segs, tensors, n, bucket, s->params, 0);
        return ring_collective(&s->base.links, segs, n, bucket, 1);
    }
    if (ring_collective(&s->base.links, segs, n, bucket, 0)) return -1;
    bucket_chunks_copy(s, segs, tensors, n, bucket, s->grads, 1);
    return 0;
}

// ALLREDUCE / REDUCE_SCATTER of a bucket's gradients, ALLGATHER of its
// parameters (into the stage's own under --zero 1); under --zero 3 queued
// for the comm thread, FREE too.
static int hook_collective(void *stage, int kind, int bucket) {
    Stage *s = (Stage *)stage;
    if (reduces_wte(&s->layout, kind, bucket) && stage_sum_wte_grads(s)) return -1;
    if (s->sharded) return fsdp_collective(&s->fsdp, kind, bucket, s->run.op);
    Segment segs[NUM_PARAM_TENSORS];
    int tensors[NUM_PARAM_TENSORS];
    if (kind == OP_FREE) return fail("FREE of bucket %d: only --zero 3 gathers buckets to free", bucket);
    if (kind == OP_ALLGATHER)
        return ring_collective(&s->base.links, segs, bucket_in(s, s->params, NULL, bucket, segs, tensors), bucket, 1);
    int n = bucket_in(s, s->grads, NULL, bucket, segs, tensors);
    if (ring_collective(&s->base.links, segs, n, bucket, 0)) return -1;
    return kind == OP_ALLREDUCE ? ring_collective(&s->base.links, segs, n, bucket, 1) : 0;
}

static int hook_end(void *stage, int m) {
    (void)m;
    Stage *s = (Stage *)stage;
    return s->sharded ? fsdp_list_end(&s->fsdp, &s->run) : 0;
}

static const StageHooks CPU_HOOKS = {hook_begin, hook_forward, hook_backward_input, hook_backward_weight,
                                     hook_message_buffers, hook_exchange, hook_collective, NULL, hook_end};

int stage_run(Stage *s, const int *ops, int nops, const int *inputs, const int *targets,
              int training, float *loss_sum) {
    int rc = run_op_list(&CPU_HOOKS, s, &s->run, &s->layout, (size_t)s->B * s->T, s->base.links.replicas, ops, nops,
                         inputs, targets, training, loss_sum);
    if (rc && s->sharded) fsdp_list_failed(&s->fsdp);
    return rc;
}

// ----------------------------------------------------------------------------
// optimizer

int stage_sum_wte_grads(Stage *s) {
    if ((!s->layout.first && !s->layout.last) || s->wte_summed) return 0;
    float *head = grad_of(s, P_WTE, 0), *embed = s->dwte_embed;
    size_t n = s->layout.sizes[P_WTE];
    if (!(s->layout.first && s->layout.last)) {
        // the first stage has the embedding's part, the last the head's: swap
        // them through the scratch of the other (the last stage's dwte_embed is unused)
        if (!s->dwte_embed) s->dwte_embed = malloc(n * sizeof(float));
        if (!(embed = s->dwte_embed)) return fail("out of memory for d(wte)");
        if (s->layout.first ? tied_swap(&s->base.links, embed, head, n * sizeof(float))
                            : tied_swap(&s->base.links, head, embed, n * sizeof(float)))
            return -1;
    }
    for (size_t i = 0; i < n; i++) head[i] = head[i] + embed[i];
    s->wte_summed = 1;
    return 0;
}

// The sum of squares of n floats in double: fixed chunks summed in parallel,
// each in 32 interleaved lanes (it vectorises as four independent chains of
// 8 doubles, so the adds overlap: 2.5x faster than one chain), then the
// chunks in order, which makes the result independent of the thread count.
#define SUMSQ_CHUNK 65536
static double sum_squares(const float *p, size_t n) {
    size_t nchunks = (n + SUMSQ_CHUNK - 1) / SUMSQ_CHUNK;
    double *chunk = malloc(nchunks * sizeof(double)), total = 0.0;
    #pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nchunks; c++) {
        size_t lo = c * SUMSQ_CHUNK, hi = lo + SUMSQ_CHUNK < n ? lo + SUMSQ_CHUNK : n;
        double lane[32] = {0};
        size_t i = lo;
        for (; i + 32 <= hi; i += 32)
            for (int k = 0; k < 32; k++) lane[k] += (double)p[i + k] * p[i + k];
        for (; i < hi; i++) lane[0] += (double)p[i] * p[i];
        double sum = 0.0;
        for (int k = 0; k < 32; k++) sum += lane[k];
        chunk[c] = sum;
    }
    for (size_t c = 0; c < nchunks; c++) total += chunk[c];
    free(chunk);
    return total;
}

// Each (tensor, layer) part over this replica's chunk of the segment (all of
// it when D = 1): the launcher adds the D chunks' parts in replica order, so
// the norm is the same for every zero stage, sharded gradients or not.
void stage_grad_norm_parts(Stage *s, double *parts) {
    int L = s->layout.cfg.num_layers;
    memset(parts, 0, sizeof(double) * NUM_PARAM_TENSORS * L);
    for (int t = 0; t < NUM_PARAM_TENSORS; t++)
        for (int l = 0; l < s->layout.nl; l++) {
            if (!owns_tensor(&s->layout, t) || (!is_layer_tensor(t) && l > 0)) continue;
            size_t lo, hi;
            chunk_range(segment_elems(&s->layout, t), s->base.links.replica, s->base.links.replicas, &lo, &hi);
            int part = t * L + (is_layer_tensor(t) ? s->layout.lo + l : 0);
            const float *chunk = s->sharded ? s->grads + s->shard_at[t] + l * s->chunk_n[t]
                                            : layer_tensor(s, s->grads, t, l) + lo;
            parts[part] = sum_squares(chunk, hi - lo);
        }
}

void stage_adamw(Stage *s, float lr, float weight_decay, float grad_scale, int step) {
    const float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
    float bc1 = 1.0f - powf(b1, (float)step), bc2 = 1.0f - powf(b2, (float)step);
    // zero 0: every element; zero 1: chunk d of each segment (ALLGATHER
    // spreads the rest), whose m and v are this rank's shard
    int part, parts;
    optimizer_shard(s, &part, &parts);
    size_t at_shard = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        float wd = is_matrix(t) ? weight_decay : 0.0f;
        size_t seg = segment_elems(&s->layout, t), lo, hi;
        chunk_range(seg, part, parts, &lo, &hi);
        for (int l = 0; l < segment_count(&s->layout, t); l++, at_shard += hi - lo) {
            // the parameters and gradients: in place, or (zero 3) where m and v are
            size_t at = s->sharded ? at_shard : s->layout.offsets[t] + l * seg + lo;
            float *p = s->params + at, *g = s->grads + at, *m = s->m + at_shard, *v = s->v + at_shard;
            #pragma omp parallel for
            for (size_t i = 0; i < hi - lo; i++) {
                float gi = g[i] * grad_scale;
                m[i] = b1 * m[i] + (1.0f - b1) * gi;
                v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
                float mhat = m[i] / bc1, vhat = v[i] / bc2;
                p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
            }
        }
    }
}

// ----------------------------------------------------------------------------
// the device half of the API, for a trainer without one

int gpt_device_count(void) { return 0; }
void stage_sync_to_host(Stage *s) { (void)s; }
void stage_sync_to_device(Stage *s) { (void)s; }
int gpt_nccl_unique_id(unsigned char id[GPT_NCCL_ID_BYTES]) {
    (void)id;
    return fail("NCCL needs the CUDA trainer (--device cuda)");
}
int stage_set_nccl(Stage *s, const unsigned char id[GPT_NCCL_ID_BYTES], int nranks, int rank) {
    (void)s; (void)id; (void)nranks; (void)rank;
    return fail("NCCL needs the CUDA trainer (--device cuda)");
}
int stage_set_replica_nccl(Stage *s, const unsigned char id[GPT_NCCL_ID_BYTES], int replicas, int replica) {
    return stage_set_nccl(s, id, replicas, replica);
}

// ----------------------------------------------------------------------------
// checkpoint I/O (the file formats are in common.h)

int stage_load(Stage *s, const char *path) {
    if (!s->sharded) return model_file_read(&s->layout, path, s->params);
    float *whole_stage = calloc_or_fail(s->layout.num_params, sizeof(float), "the parameters, before sharding");
    int rc = !whole_stage || model_file_read(&s->layout, path, whole_stage) ? -1 : 0;
    if (rc == 0) shard_copy(s, whole_stage, s->params, 0);
    free(whole_stage);
    return rc;
}

// zero 0: replica 0 writes what all replicas hold alike; zero 1: replica d its chunks
int stage_write_checkpoint(Stage *s, const char *dir, const TrainState *ts) {
    if (s->base.zero == 0 && s->base.links.replica > 0) return 0;
    int part, parts;
    optimizer_shard(s, &part, &parts);
    return checkpoint_files_write(&s->layout, dir, ts, s->params, s->sharded, s->m, s->v, part, parts);
}

int stage_read_checkpoint(Stage *s, const char *dir, int64_t step, TrainState *ts) {
    int part, parts;
    optimizer_shard(s, &part, &parts);
    return checkpoint_files_read(&s->layout, dir, step, ts, s->params, s->sharded, s->m, s->v, part, parts);
}

// ----------------------------------------------------------------------------
// sampling

int stage_sample(Stage *s, const int *prompt, int np, int n, float temperature, int top_k,
                 uint64_t seed, int *out) {
    if ((top_k = sample_check(&s->layout, prompt, np, top_k)) < 0) return -1;
    if (s->sharded) return fail("sampling needs the whole parameters: stage_unshard_params first (--zero 3)");
    int V = s->layout.cfg.vocab_size, C = s->layout.cfg.channels, Vp = s->layout.cfg.padded_vocab_size;
    Candidate *cand = malloc(sizeof(Candidate) * top_k);
    if (!cand) return fail("out of memory for top-k");
    memcpy(out, prompt, np * sizeof(int));
    Activations *acts = &s->acts[0];
    uint64_t rng = seed;
    for (int len = np; len < np + n; len++) {
        // no KV cache: rerun the last T tokens (cheap at the sizes we sample)
        int T = len < s->T ? len : s->T;
        memcpy(acts->inputs, out + len - T, T * sizeof(int));
        stage_forward(s, acts, 1, T, 0, s->layout.nl);
        matmul_forward(acts->probs, acts->lnf + (size_t)(T - 1) * C, param_of(s, P_WTE, 0), NULL, 1, C, Vp);
        out[len] = sample_top_k(acts->probs, V, temperature, top_k, &rng, cand);
    }
    free(cand);
    return 0;
}

// ----------------------------------------------------------------------------
// main: ./train_gpt, single-process training from the shell (-h lists the
// flags; python3 train.py runs pipelines). The loop is common.h's
// train_main, written once for both trainers: it drives this file's stage
// API through the table below.

#ifdef TRAIN_GPT_MAIN
static void describe_cpu(Stage *s) {
    (void)s;
#ifdef _OPENMP
    printf("device: CPU, %d thread(s), GEMM kernel: %s\n", omp_get_max_threads(), asm_sgemm_name());
#endif
}

// this file's stage API, in the order of common.h's Trainer
static const Trainer CPU_TRAINER = {"./train_gpt", stage_create, stage_load, stage_init, stage_read_checkpoint,
                                    stage_run, stage_sum_wte_grads, stage_grad_norm_parts, stage_adamw,
                                    stage_write_checkpoint, stage_sample, stage_free, NULL, describe_cpu};

int main(int argc, char **argv) { return train_main(argc, argv, &CPU_TRAINER); }
#endif
