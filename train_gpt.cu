// train_gpt.cu: GPT-2 training on NVIDIA GPUs, one pipeline stage per
// process, with the same stage API (gpt.h) and op-list executor as the CPU
// trainer train_gpt.c, which is the semantic reference for everything here.
//
// Precision: fp32 master weights, fp32 AdamW moments and fp32 gradients
// (accumulated across micro-batches); bf16 copies of the weights (refreshed
// by every AdamW step) feed the matmuls; activations and activation
// gradients are bf16; layernorm statistics, softmax and the loss are fp32.
// Built with -DGPT_FP32 everything is fp32 (cuBLASLt with CUBLAS_COMPUTE_32F,
// no TF32), for close comparison with train_gpt.c.
//
// Matmuls go through cuBLASLt, with the bias, residual (beta = 1 with C !=
// D), GELU and GELU-gradient epilogues; weight gradients accumulate with
// beta = 1 into fp32. Our own kernels: embedding, layernorm, GELU (when not
// fused), softmax + cross-entropy, bias/layernorm weight gradients, AdamW,
// grad-norm parts, and causal attention: a flash-attention style kernel on
// tensor cores (mma.sync m16n8k16 bf16, head size 64) that keeps the
// logsumexp per row and recomputes in the backward pass, plus a simple
// fp32-accumulating kernel for every other head size and for the fp32 build.
//
// Determinism: no float atomics anywhere. Every reduction runs in a fixed
// order that depends only on the shapes (per-block partial sums, then a
// fixed-order pass); the embedding gradient sums each token's positions in
// order (buckets built on the host); attention computes dK/dV per key block
// and dQ in a separate pass; cuBLASLt runs one algorithm per shape, chosen
// once. Every device tensor starts on a 256-byte boundary whatever the stage
// split, so S stages compute bitwise what one stage computes.
//
// Environment: GPT_DEVICE (GPU index, default 0), GPT_ATTN=simple (skip the
// tensor-core attention) or GPT_ATTN=mma_sync (tensor cores without cp.async
// tile pipelining), GPT_FUSE_GELU=0 (GELU as separate kernels),
// GPT_PROFILE=1 (per-kernel-category GPU times, printed when the stage is
// freed).
//
// Sections: precision and checks, kernels, profiling, the stage, cuBLASLt
// GEMMs, PTX twins, layer launchers, stage layout, model, transport,
// executor, optimizer, device API, checkpoints, sampling, and main(), last,
// which hands this stage API to common.h's train_main.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cublasLt.h>
#include <cublas_api.h>
#include <nccl.h>
#include <limits.h>
#include <stdint.h>
#include "common.h"

// ----------------------------------------------------------------------------
// precision and checks

typedef __nv_bfloat16 bf16;
#ifdef GPT_FP32
typedef float floatX;
#define CUDA_X CUDA_R_32F
#define NCCL_X ncclFloat
#define PRECISION_NAME "fp32"
__device__ __forceinline__ float tof(float x) { return x; }
__device__ __forceinline__ floatX tox(float x) { return x; }
#else
typedef bf16 floatX;
#define CUDA_X CUDA_R_16BF
#define NCCL_X ncclBfloat16
#define PRECISION_NAME "bf16"
__device__ __forceinline__ float tof(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ floatX tox(float x) { return __float2bfloat16(x); }
#endif

// A CUDA, cuBLASLt or NCCL call that does not return its library's success:
// -1 with a message naming the library, its error, the call and the line
#define STATUS_CHECK(type, ok, lib, to_string, call, text)                                      \
    do {                                                                                        \
        type e_ = (call);                                                                       \
        if (e_ != ok) return fail(lib " error: %s (%s, %s:%d)", to_string(e_), text, __FILE__, __LINE__); \
    } while (0)
#define CUDA_CHECK(call) STATUS_CHECK(cudaError_t, cudaSuccess, "CUDA", cudaGetErrorString, call, #call)
#define LT_CHECK(call) \
    STATUS_CHECK(cublasStatus_t, CUBLAS_STATUS_SUCCESS, "cuBLASLt", cublasGetStatusString, call, #call)
#define NCCL_CHECK(call) STATUS_CHECK(ncclResult_t, ncclSuccess, "NCCL", ncclGetErrorString, call, #call)
// after a kernel launch: launch errors now, faults at the next synchronisation
#define LAUNCH_CHECK() CUDA_CHECK(cudaGetLastError())
#define CHECK(x) do { if (x) return -1; } while (0)

static size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }
static unsigned grid_for(size_t n, int block) {
    size_t g = (n + block - 1) / block;
    return (unsigned)(g < 1 ? 1 : g > 65536 * 8 ? 65536 * 8 : g);  // grid-stride loops cover the rest
}

// ----------------------------------------------------------------------------
// kernels
//
// Shapes as in train_gpt.c: B batch, T time, C channels, NH heads, D = C/NH
// head size, N = B*T rows. Row-major; linear weights (OC, IC).

__device__ __forceinline__ float warp_sum(float v) {
    // butterfly: every lane adds the same two partials (in swapped order, which
    // is exact), so all lanes hold the bitwise same total
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// x0 = wte[token] + wpe[t], from the fp32 master weights
__global__ void encoder_forward_kernel(floatX *out, const int *inp, const float *wte, const float *wpe,
                                       int T, int C, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t bt = i / C;
        int c = (int)(i % C), t = (int)(bt % T);
        out[i] = tox(wte[(size_t)inp[bt] * C + c] + wpe[(size_t)t * C + c]);
    }
}

// d(wte) rows: one block per distinct token, its positions summed in (b,t) order
__global__ void encoder_backward_wte_kernel(float *dwte, const floatX *dout, const int *tok,
                                            const int *start, const int *pos, int C) {
    int u = blockIdx.x;
    int s0 = start[u], s1 = start[u + 1];
    float *row = dwte + (size_t)tok[u] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int p = s0; p < s1; p++) acc += tof(dout[(size_t)pos[p] * C + c]);
        row[c] += acc;
    }
}

// d(wpe)[t] += sum over b, in b order
__global__ void encoder_backward_wpe_kernel(float *dwpe, const floatX *dout, int B, int T, int C) {
    size_t n = (size_t)T * C;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int b = 0; b < B; b++) acc += tof(dout[(size_t)b * n + i]);
        dwpe[i] += acc;
    }
}

// one warp per row; mean and rstd kept for the backward pass
__global__ void layernorm_forward_kernel(floatX *out, float *mean, float *rstd, const floatX *inp,
                                         const float *w, const float *b, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    const floatX *x = inp + (size_t)row * C;
    float sum = 0.0f;
    for (int c = lane; c < C; c += 32) sum += tof(x[c]);
    float m = warp_sum(sum) / C;
    float var = 0.0f;
    for (int c = lane; c < C; c += 32) { float d = tof(x[c]) - m; var += d * d; }
    float s = 1.0f / sqrtf(warp_sum(var) / C + 1e-5f);
    floatX *o = out + (size_t)row * C;
    for (int c = lane; c < C; c += 32) o[c] = tox((tof(x[c]) - m) * s * w[c] + b[c]);
    if (lane == 0) { mean[row] = m; rstd[row] = s; }
}

// dinp = resid + d(layernorm)/d(inp) . dout (the input half; resid may be NULL)
__global__ void layernorm_backward_input_kernel(floatX *dinp, const floatX *resid, const floatX *dout,
                                                const floatX *inp, const float *w, const float *mean,
                                                const float *rstd, int N, int C) {
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (row >= N) return;
    size_t off = (size_t)row * C;
    const floatX *x = inp + off, *d = dout + off;
    float m = mean[row], s = rstd[row];
    float a = 0.0f, bn = 0.0f;
    for (int c = lane; c < C; c += 32) {
        float dn = w[c] * tof(d[c]);
        a += dn;
        bn += dn * (tof(x[c]) - m) * s;
    }
    a = warp_sum(a) / C;
    bn = warp_sum(bn) / C;
    for (int c = lane; c < C; c += 32) {
        float norm = (tof(x[c]) - m) * s;
        float v = (w[c] * tof(d[c]) - a - norm * bn) * s;
        if (resid) v = tof(resid[off + c]) + v;
        dinp[off + c] = tox(v);
    }
}

// Column sums over N rows in two deterministic passes: blocks of 64 columns x
// rows_per_block rows write partial sums, then colsum_finish adds the
// partials in block order. MODE 0: bias gradient (sum of dout). MODE 1:
// layernorm weight and bias gradients (sum of dout * norm, sum of dout).
#define CS_COLS 64
#define CS_ROWS 256
template <int MODE>
__global__ void colsum_partial_kernel(float *partials, const floatX *d, const floatX *inp, const float *mean,
                                      const float *rstd, int N, int OC) {
    __shared__ float sh[2][8][CS_COLS];
    int c0 = blockIdx.x * CS_COLS + threadIdx.x * 2;
    int r0 = blockIdx.y * CS_ROWS, r1 = min(N, r0 + CS_ROWS);
    float a[2] = {0.0f, 0.0f}, bsum[2] = {0.0f, 0.0f};
    for (int r = r0 + threadIdx.y; r < r1; r += 8) {
        size_t off = (size_t)r * OC;
        for (int j = 0; j < 2; j++) {
            int c = c0 + j;
            if (c >= OC) continue;
            float dv = tof(d[off + c]);
            a[j] += dv;
            if (MODE == 1) bsum[j] += dv * (tof(inp[off + c]) - mean[r]) * rstd[r];
        }
    }
    for (int j = 0; j < 2; j++) {
        sh[0][threadIdx.y][threadIdx.x * 2 + j] = a[j];
        sh[1][threadIdx.y][threadIdx.x * 2 + j] = bsum[j];
    }
    __syncthreads();
    if (threadIdx.y == 0) {
        for (int j = 0; j < 2; j++) {
            int c = c0 + j;
            if (c >= OC) continue;
            for (int q = 0; q < (MODE == 1 ? 2 : 1); q++) {
                float s = 0.0f;
                for (int y = 0; y < 8; y++) s += sh[q][y][threadIdx.x * 2 + j];
                partials[((size_t)blockIdx.y * 2 + q) * OC + c] = s;
            }
        }
    }
}

// out0[c] += sum of partial 0 (dout), out1[c] += sum of partial 1 (dout*norm)
__global__ void colsum_finish_kernel(float *out0, float *out1, const float *partials, int nblocks, int OC) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= OC) return;
    float s0 = 0.0f, s1 = 0.0f;
    for (int i = 0; i < nblocks; i++) {
        s0 += partials[((size_t)i * 2) * OC + c];
        if (out1) s1 += partials[((size_t)i * 2 + 1) * OC + c];
    }
    out0[c] += s0;
    if (out1) out1[c] += s1;
}

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)

__global__ void gelu_forward_kernel(floatX *out, const floatX *inp, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = tof(inp[i]);
        out[i] = tox(0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x))));
    }
}

__global__ void gelu_backward_kernel(floatX *dinp, const floatX *inp, const floatX *dout, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float x = tof(inp[i]);
        float u = GELU_SCALE * (x + 0.044715f * x * x * x);
        float th = tanhf(u);
        float sech2 = 1.0f - th * th;
        float du = GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] = tox((0.5f * (1.0f + th) + 0.5f * x * sech2 * du) * tof(dout[i]));
    }
}

// One block per row of logits (Vp wide, the first V real): the loss in fp32
// and, when training, the logits overwritten in place by
// d(loss)/d(logits) = (softmax - onehot(target)) * dloss, padded columns 0.
#define CE_THREADS 1024  // two rows per SM at a time: the second pass over a row (100 KB at d12) hits L2
#define CE_PTX_MAX_VP (7 * CE_THREADS * 8)  // asm/crossentropy.ptx keeps a row in registers: 7 x 8 bf16 a thread
__global__ void __launch_bounds__(CE_THREADS) crossentropy_kernel(floatX *logits, float *losses,
                                                                  const int *targets, int V, int Vp,
                                                                  float dloss, int write_grad) {
    __shared__ float sm[CE_THREADS], ss[CE_THREADS];
    int tid = threadIdx.x;
    floatX *x = logits + (size_t)blockIdx.x * Vp;
    int target = targets[blockIdx.x];
    float xt = tof(x[target]);  // read before any thread overwrites the row
    float m = -INFINITY, s = 0.0f;
    for (int i = tid; i < V; i += CE_THREADS) {
        float v = tof(x[i]);
        if (v > m) { s = s * expf(m - v) + 1.0f; m = v; }
        else s += expf(v - m);
    }
    sm[tid] = m; ss[tid] = s;
    __syncthreads();
    for (int stride = CE_THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) {
            float m1 = sm[tid], m2 = sm[tid + stride], s1 = ss[tid], s2 = ss[tid + stride];
            if (m2 != -INFINITY) {
                if (m1 == -INFINITY) { m1 = m2; s1 = s2; }
                else {
                    float mm = fmaxf(m1, m2);
                    s1 = s1 * expf(m1 - mm) + s2 * expf(m2 - mm);
                    m1 = mm;
                }
            }
            sm[tid] = m1; ss[tid] = s1;
        }
        __syncthreads();
    }
    float lse = sm[0] + logf(ss[0]);
    if (tid == 0) losses[blockIdx.x] = lse - xt;
    if (!write_grad) return;
    for (int i = tid; i < Vp; i += CE_THREADS) {
        float g = 0.0f;
        if (i < V) g = (expf(tof(x[i]) - lse) - (i == target ? 1.0f : 0.0f)) * dloss;
        x[i] = tox(g);
    }
}

// the mean of n losses in a fixed order (one block)
__global__ void mean_kernel(float *out, const float *v, int n) {
    __shared__ float sh[1024];
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += 1024) s += v[i];
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int stride = 512; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) sh[threadIdx.x] += sh[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) *out = sh[0] / n;
}

// ---- attention
//
// qkv (B,T,3C) holds q, k, v side by side, head h owning channels
// [h*D, (h+1)*D) of each. The forward pass writes out (B,T,C) and lse
// (B,NH,T), the log2-domain logsumexp of each row of scaled scores
// (scale_log2 = log2(e)/sqrt(D)), so P = exp2(s * scale_log2 - lse). The
// backward pass recomputes P from it; delta = rowsum(dout * out).

__global__ void attention_delta_kernel(float *delta, const floatX *dout, const floatX *out, int B, int T,
                                       int NH, int D) {
    size_t nw = (size_t)B * T * NH, stride = (size_t)gridDim.x * blockDim.x / 32;
    int lane = threadIdx.x % 32, C = NH * D;
    for (size_t w = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; w < nw; w += stride) {
        size_t bt = w / NH;
        int h = (int)(w % NH);
        const floatX *d = dout + bt * C + h * D, *o = out + bt * C + h * D;
        float s = 0.0f;
        for (int i = lane; i < D; i += 32) s += tof(d[i]) * tof(o[i]);
        s = warp_sum(s);
        size_t b = bt / T, t = bt % T;
        if (lane == 0) delta[(b * NH + h) * T + t] = s;
    }
}

// The simple kernels: one warp per query (forward, dq) or per key (dk, dv),
// fp32 throughout, any head size up to 128. Scores of a query row live in
// shared memory (T floats per warp).
#define SIMPLE_WARPS 4

__global__ void attention_forward_simple_kernel(floatX *out, float *lse, const floatX *qkv, int T, int NH,
                                                int D, float scale_log2) {
    extern __shared__ float smem[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int t = blockIdx.x * SIMPLE_WARPS + warp, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    if (t >= T) return;
    int C = NH * D;
    size_t C3 = 3 * (size_t)C;
    float *qv = smem + warp * (D + T), *sc = qv + D;
    const floatX *base = qkv + (size_t)b * T * C3 + h * D;
    for (int d = lane; d < D; d += 32) qv[d] = tof(base[(size_t)t * C3 + d]);
    __syncwarp();
    float mx = -INFINITY;
    for (int j = lane; j <= t; j += 32) {
        const floatX *k = base + (size_t)j * C3 + C;
        float s = 0.0f;
        for (int d = 0; d < D; d++) s += qv[d] * tof(k[d]);
        s *= scale_log2;
        sc[j] = s;
        mx = fmaxf(mx, s);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j <= t; j += 32) {
        float p = exp2f(sc[j] - mx);
        sc[j] = p;
        sum += p;
    }
    sum = warp_sum(sum);
    __syncwarp();
    float inv = 1.0f / sum;
    for (int d = lane; d < D; d += 32) {
        float o = 0.0f;
        for (int j = 0; j <= t; j++) o += sc[j] * tof(base[(size_t)j * C3 + 2 * C + d]);
        out[((size_t)b * T + t) * C + h * D + d] = tox(o * inv);
    }
    if (lane == 0) lse[(size_t)bh * T + t] = mx + log2f(sum);
}

__global__ void attention_backward_dq_simple_kernel(floatX *dqkv, const floatX *dout, const floatX *qkv,
                                                    const float *lse, const float *delta, int T, int NH, int D,
                                                    float scale, float scale_log2) {
    extern __shared__ float smem[];
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int t = blockIdx.x * SIMPLE_WARPS + warp, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    if (t >= T) return;
    int C = NH * D;
    size_t C3 = 3 * (size_t)C;
    float *qv = smem + warp * (2 * D + T), *dv = qv + D, *ds = dv + D;
    const floatX *base = qkv + (size_t)b * T * C3 + h * D;
    for (int d = lane; d < D; d += 32) {
        qv[d] = tof(base[(size_t)t * C3 + d]);
        dv[d] = tof(dout[((size_t)b * T + t) * C + h * D + d]);
    }
    __syncwarp();
    float L = lse[(size_t)bh * T + t], E = delta[(size_t)bh * T + t];
    for (int j = lane; j <= t; j += 32) {
        const floatX *k = base + (size_t)j * C3 + C, *v = base + (size_t)j * C3 + 2 * C;
        float s = 0.0f, dp = 0.0f;
        for (int d = 0; d < D; d++) { s += qv[d] * tof(k[d]); dp += dv[d] * tof(v[d]); }
        float p = exp2f(s * scale_log2 - L);
        ds[j] = p * (dp - E);
    }
    __syncwarp();
    for (int d = lane; d < D; d += 32) {
        float acc = 0.0f;
        for (int j = 0; j <= t; j++) acc += ds[j] * tof(base[(size_t)j * C3 + C + d]);
        dqkv[((size_t)b * T + t) * C3 + h * D + d] = tox(acc * scale);
    }
}

__global__ void attention_backward_dkv_simple_kernel(floatX *dqkv, const floatX *dout, const floatX *qkv,
                                                     const float *lse, const float *delta, int T, int NH, int D,
                                                     float scale, float scale_log2) {
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int j = blockIdx.x * SIMPLE_WARPS + warp, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    if (j >= T) return;
    int C = NH * D;
    size_t C3 = 3 * (size_t)C;
    const floatX *base = qkv + (size_t)b * T * C3 + h * D;
    float kr[4], vr[4], dk[4], dv[4];
    for (int i = 0; i < 4; i++) {
        int d = lane + 32 * i;
        kr[i] = d < D ? tof(base[(size_t)j * C3 + C + d]) : 0.0f;
        vr[i] = d < D ? tof(base[(size_t)j * C3 + 2 * C + d]) : 0.0f;
        dk[i] = dv[i] = 0.0f;
    }
    for (int t = j; t < T; t++) {
        const floatX *q = base + (size_t)t * C3, *g = dout + ((size_t)b * T + t) * C + h * D;
        float qd[4], gd[4], s = 0.0f, dp = 0.0f;
        for (int i = 0; i < 4; i++) {
            int d = lane + 32 * i;
            qd[i] = d < D ? tof(q[d]) : 0.0f;
            gd[i] = d < D ? tof(g[d]) : 0.0f;
            s += kr[i] * qd[i];
            dp += vr[i] * gd[i];
        }
        s = warp_sum(s);
        dp = warp_sum(dp);
        float p = exp2f(s * scale_log2 - lse[(size_t)bh * T + t]);
        float ds = p * (dp - delta[(size_t)bh * T + t]);
        for (int i = 0; i < 4; i++) { dv[i] += p * gd[i]; dk[i] += ds * qd[i]; }
    }
    for (int i = 0; i < 4; i++) {
        int d = lane + 32 * i;
        if (d >= D) continue;
        dqkv[((size_t)b * T + j) * C3 + C + h * D + d] = tox(dk[i] * scale);
        dqkv[((size_t)b * T + j) * C3 + 2 * C + h * D + d] = tox(dv[i]);
    }
}

// The tensor-core kernels (bf16 build, D = 64): blocks of 64 queries or keys,
// four warps of 16 rows each, mma.sync m16n8k16 (bf16 in, fp32 accumulate).
// Tiles of 64 rows x 64 columns sit in shared memory with rows padded to 72
// elements (144 bytes), so ldmatrix reads 8 rows on distinct banks.
//
// Fragment layouts (PTX ISA, m16n8k16 bf16), g = lane/4, q = lane%4:
//   A (16x16): a0a1 (row g, cols 2q..), a2a3 (row g+8), a4a5 (row g, cols 2q+8..), a6a7 (row g+8, cols 2q+8..)
//   B (16x8):  b0b1 (rows 2q, 2q+1, col g), b2b3 (rows 2q+8, 2q+9, col g)
//   C (16x8):  c0c1 (row g, cols 2q, 2q+1), c2c3 (row g+8, same cols)
// so the accumulators of two adjacent 8-column tiles are, packed to bf16, the
// A fragment of one 16-column chunk (the P @ V trick of flash attention 2).
#ifndef GPT_FP32
#define AT 64      // rows per tile, and the head size
#define APAD 72
typedef bf16 Tile[AT][APAD];

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const bf16 *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_u32(p)) : "memory");
}
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (lo) is the low half
    return *reinterpret_cast<uint32_t *>(&v);
}

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int nbytes) {
    // nbytes 0 writes 16 zero bytes and reads nothing
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(nbytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// 64 rows of 64 elements from src (row stride ld) into dst, rows >= nvalid
// zero: with PIPE through cp.async (complete after cp_async_wait_all and a
// barrier), else plain loads and stores (complete after a barrier)
template <bool PIPE>
__device__ __forceinline__ void load_tile(Tile &dst, const bf16 *src, size_t ld, int nvalid) {
    for (int i = threadIdx.x; i < AT * 8; i += blockDim.x) {
        int r = i >> 3, c = (i & 7) * 8;
        bool ok = r < nvalid;
        const bf16 *g = ok ? src + (size_t)r * ld + c : src;
        if (PIPE) {
            cp_async16(&dst[r][c], g, ok ? 16 : 0);
        } else {
            uint4 v = make_uint4(0, 0, 0, 0);
            if (ok) v = *reinterpret_cast<const uint4 *>(g);
            *reinterpret_cast<uint4 *>(&dst[r][c]) = v;
        }
    }
}
// all of this thread's tile loads have landed; a barrier must follow
template <bool PIPE>
__device__ __forceinline__ void tiles_commit_and_wait() {
    if (PIPE) { cp_async_commit(); cp_async_wait_all(); }
}
template <bool PIPE>
__device__ __forceinline__ void tiles_commit() {
    if (PIPE) cp_async_commit();
}

// A fragment of rows r0..r0+15, columns k0..k0+15 of X (X is m x k)
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const Tile &X, int r0, int k0) {
    int lane = threadIdx.x & 31;
    ldsm_x4(a, &X[r0 + (lane & 7) + ((lane >> 3) & 1) * 8][k0 + (lane >> 4) * 8]);
}
// B fragments of the 8-column tiles n0 (b[0], b[1]) and n0+8 (b[2], b[3]),
// rows k0..k0+15, where B[k][n] = X[n][k] (X holds B transposed, n x k)
__device__ __forceinline__ void frag_b_nk(uint32_t (&b)[4], const Tile &X, int n0, int k0) {
    int lane = threadIdx.x & 31;
    ldsm_x4(b, &X[n0 + (lane >> 4) * 8 + (lane & 7)][k0 + ((lane >> 3) & 1) * 8]);
}
// the same where B[k][n] = X[k][n] (X is k x n), through ldmatrix .trans
__device__ __forceinline__ void frag_b_kn(uint32_t (&b)[4], const Tile &X, int k0, int n0) {
    int lane = threadIdx.x & 31;
    ldsm_x4_trans(b, &X[k0 + ((lane >> 3) & 1) * 8 + (lane & 7)][n0 + (lane >> 4) * 8]);
}
// A fragment of columns 16*kc.. of a 16 x 64 accumulator, rounded to bf16
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&s)[8][4], int kc) {
    a[0] = pack_bf16(s[2 * kc][0], s[2 * kc][1]);
    a[1] = pack_bf16(s[2 * kc][2], s[2 * kc][3]);
    a[2] = pack_bf16(s[2 * kc + 1][0], s[2 * kc + 1][1]);
    a[3] = pack_bf16(s[2 * kc + 1][2], s[2 * kc + 1][3]);
}
// acc (16 x 64) += A (16 x 64, in registers, 4 chunks) @ B (64 x 64), with
// B[k][n] = X[n][k]
__device__ __forceinline__ void mma_rows_nk(float (&acc)[8][4], const uint32_t (&a)[4][4], const Tile &X) {
    for (int kk = 0; kk < 4; kk++)
        for (int np = 0; np < 4; np++) {
            uint32_t b[4];
            frag_b_nk(b, X, np * 16, kk * 16);
            mma_bf16(acc[2 * np], a[kk], b[0], b[1]);
            mma_bf16(acc[2 * np + 1], a[kk], b[2], b[3]);
        }
}
// acc (16 x 64) += P (16 x 64 accumulator, rounded to bf16) @ X (64 x 64)
__device__ __forceinline__ void mma_acc_kn(float (&acc)[8][4], const float (&p)[8][4], const Tile &X) {
    for (int kc = 0; kc < 4; kc++) {
        uint32_t a[4];
        acc_to_a(a, p, kc);
        for (int np = 0; np < 4; np++) {
            uint32_t b[4];
            frag_b_kn(b, X, kc * 16, np * 16);
            mma_bf16(acc[2 * np], a, b[0], b[1]);
            mma_bf16(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}
__device__ __forceinline__ void zero_acc(float (&acc)[8][4]) {
    for (int i = 0; i < 8; i++)
        for (int e = 0; e < 4; e++) acc[i][e] = 0.0f;
}

// The three kernels double-buffer their streamed tiles: iteration i waits
// for tile i (and, through the barrier, for every warp to be done with tile
// i-1), starts loading tile i+1 into the other buffer, then computes on tile i,
// so with PIPE (cp.async) the loads overlap the tensor-core work.

// The key loop of the forward and of dq: waits until key block kb's K and V
// tiles are in Ks[kb & 1], Vs[kb & 1] (returned: kb & 1), and unless kb is
// the last, starts block kb + 1's into the other pair, to land during kb's math.
template <bool PIPE>
__device__ int kv_tiles_next(Tile *Ks, Tile *Vs, const bf16 *base, int C, size_t C3, int T, int kb, int last) {
    int cur = kb & 1, k1 = (kb + 1) * AT;
    tiles_commit_and_wait<PIPE>();
    __syncthreads();
    if (kb < last) {
        load_tile<PIPE>(Ks[cur ^ 1], base + C + (size_t)k1 * C3, C3, T - k1);
        load_tile<PIPE>(Vs[cur ^ 1], base + 2 * C + (size_t)k1 * C3, C3, T - k1);
        tiles_commit<PIPE>();
    }
    return cur;
}

// forward: one block per (64 queries, b*h), heavy blocks (late queries) first
template <bool PIPE>
__global__ void __launch_bounds__(128) attention_forward_mma_kernel(bf16 *out, float *lse, const bf16 *qkv,
                                                                   int T, int NH, float scale_log2) {
    __shared__ __align__(16) Tile Qs, Ks[2], Vs[2];
    int nqb = (T + AT - 1) / AT, qb = nqb - 1 - blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int C = NH * AT, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    size_t C3 = 3 * (size_t)C;
    const bf16 *base = qkv + (size_t)b * T * C3 + h * AT;
    int q0 = qb * AT, qrow = q0 + warp * 16 + g;  // this thread's rows: qrow, qrow + 8
    load_tile<PIPE>(Qs, base + (size_t)q0 * C3, C3, T - q0);
    load_tile<PIPE>(Ks[0], base + C, C3, T);
    load_tile<PIPE>(Vs[0], base + 2 * C, C3, T);
    tiles_commit_and_wait<PIPE>();
    __syncthreads();
    uint32_t qa[4][4];
    for (int kk = 0; kk < 4; kk++) frag_a(qa[kk], Qs, warp * 16, kk * 16);
    float o[8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    zero_acc(o);
    for (int kb = 0; kb <= qb; kb++) {
        int k0 = kb * AT, cur = kv_tiles_next<PIPE>(Ks, Vs, base, C, C3, T, kb, qb);
        float s[8][4];
        zero_acc(s);
        mma_rows_nk(s, qa, Ks[cur]);
        float mx[2] = {-INFINITY, -INFINITY};
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++) {
                float v = s[nt][e] * scale_log2;
                if (kb == qb && k0 + nt * 8 + 2 * tq + (e & 1) > qrow + (e >> 1) * 8) v = -INFINITY;
                s[nt][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        float alpha[2], rs[2] = {0.0f, 0.0f};
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            float mnew = fmaxf(m[r], mx[r]);  // finite: key k0 <= every query row here
            alpha[r] = exp2f(m[r] - mnew);
            m[r] = mnew;
        }
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++) {
                float p = exp2f(s[nt][e] - m[e >> 1]);
                s[nt][e] = p;
                rs[e >> 1] += p;
            }
        for (int r = 0; r < 2; r++) l[r] = l[r] * alpha[r] + rs[r];
        for (int nd = 0; nd < 8; nd++)
            for (int e = 0; e < 4; e++) o[nd][e] *= alpha[e >> 1];
        mma_acc_kn(o, s, Vs[cur]);
    }
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        int q = qrow + r * 8;
        if (q >= T) continue;
        float inv = 1.0f / l[r];
        bf16 *op = out + ((size_t)b * T + q) * C + h * AT;
        for (int nd = 0; nd < 8; nd++)
            *reinterpret_cast<__nv_bfloat162 *>(&op[nd * 8 + 2 * tq]) =
                __floats2bfloat162_rn(o[nd][2 * r] * inv, o[nd][2 * r + 1] * inv);
        if (tq == 0) lse[(size_t)bh * T + q] = m[r] + log2f(l[r]);
    }
}

// backward, dK and dV: one block per (64 keys, b*h), looping over the query
// blocks at or after it; each warp owns 16 keys, so no two blocks write the
// same rows
template <bool PIPE>
__global__ void __launch_bounds__(128) attention_backward_dkv_mma_kernel(bf16 *dqkv, const bf16 *qkv,
                                                                        const bf16 *dout, const float *lse,
                                                                        const float *delta, int T, int NH,
                                                                        float scale, float scale_log2) {
    __shared__ __align__(16) Tile Qs[2], Ds[2];
    __shared__ float Ls[2][AT], Es[2][AT];
    int nqb = (T + AT - 1) / AT, kb = blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int C = NH * AT, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    size_t C3 = 3 * (size_t)C;
    const bf16 *base = qkv + (size_t)b * T * C3 + h * AT, *dbase = dout + (size_t)b * T * C + h * AT;
    int k0 = kb * AT, krow = k0 + warp * 16 + g;  // this thread's keys: krow, krow + 8
    // K and V of this block into the second buffers (read once, into registers);
    // the first query block into the first
    load_tile<PIPE>(Qs[1], base + C + (size_t)k0 * C3, C3, T - k0);
    load_tile<PIPE>(Ds[1], base + 2 * C + (size_t)k0 * C3, C3, T - k0);
    load_tile<PIPE>(Qs[0], base + (size_t)k0 * C3, C3, T - k0);
    load_tile<PIPE>(Ds[0], dbase + (size_t)k0 * C, C, T - k0);
    for (int i = threadIdx.x; i < AT; i += blockDim.x) {
        int q = k0 + i;
        Ls[0][i] = q < T ? lse[(size_t)bh * T + q] : INFINITY;  // rows past T: P = 0
        Es[0][i] = q < T ? delta[(size_t)bh * T + q] : 0.0f;
    }
    tiles_commit_and_wait<PIPE>();
    __syncthreads();
    uint32_t ka[4][4], va[4][4];
    for (int kk = 0; kk < 4; kk++) {
        frag_a(ka[kk], Qs[1], warp * 16, kk * 16);
        frag_a(va[kk], Ds[1], warp * 16, kk * 16);
    }
    float dk[8][4], dv[8][4];
    zero_acc(dk);
    zero_acc(dv);
    for (int qb = kb; qb < nqb; qb++) {
        int q0 = qb * AT, cur = (qb - kb) & 1;
        tiles_commit_and_wait<PIPE>();
        __syncthreads();
        if (qb + 1 < nqb) {
            int q1 = q0 + AT;
            load_tile<PIPE>(Qs[cur ^ 1], base + (size_t)q1 * C3, C3, T - q1);
            load_tile<PIPE>(Ds[cur ^ 1], dbase + (size_t)q1 * C, C, T - q1);
            tiles_commit<PIPE>();
            for (int i = threadIdx.x; i < AT; i += blockDim.x) {
                int q = q1 + i;
                Ls[cur ^ 1][i] = q < T ? lse[(size_t)bh * T + q] : INFINITY;
                Es[cur ^ 1][i] = q < T ? delta[(size_t)bh * T + q] : 0.0f;
            }
        }
        float p[8][4], dp[8][4];
        zero_acc(p);
        zero_acc(dp);
        mma_rows_nk(p, ka, Qs[cur]);   // S^T = K Q^T (16 keys x 64 queries)
        mma_rows_nk(dp, va, Ds[cur]);  // dP^T = V dO^T
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++) {
                int ql = nt * 8 + 2 * tq + (e & 1);
                float v = exp2f(p[nt][e] * scale_log2 - Ls[cur][ql]);
                if (qb == kb && krow + (e >> 1) * 8 > q0 + ql) v = 0.0f;
                p[nt][e] = v;
            }
        mma_acc_kn(dv, p, Ds[cur]);  // dV += P^T dO
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++) p[nt][e] *= dp[nt][e] - Es[cur][nt * 8 + 2 * tq + (e & 1)];
        mma_acc_kn(dk, p, Qs[cur]);  // dK += dS^T Q
    }
    for (int r = 0; r < 2; r++) {
        int key = krow + r * 8;
        if (key >= T) continue;
        bf16 *row = dqkv + ((size_t)b * T + key) * C3 + h * AT;
        for (int nd = 0; nd < 8; nd++) {
            *reinterpret_cast<__nv_bfloat162 *>(&row[C + nd * 8 + 2 * tq]) =
                __floats2bfloat162_rn(dk[nd][2 * r] * scale, dk[nd][2 * r + 1] * scale);
            *reinterpret_cast<__nv_bfloat162 *>(&row[2 * C + nd * 8 + 2 * tq]) =
                __floats2bfloat162_rn(dv[nd][2 * r], dv[nd][2 * r + 1]);
        }
    }
}

// backward, dQ: one block per (64 queries, b*h), looping over key blocks
template <bool PIPE>
__global__ void __launch_bounds__(128) attention_backward_dq_mma_kernel(bf16 *dqkv, const bf16 *qkv,
                                                                       const bf16 *dout, const float *lse,
                                                                       const float *delta, int T, int NH,
                                                                       float scale, float scale_log2) {
    __shared__ __align__(16) Tile Ks[2], Vs[2];
    int nqb = (T + AT - 1) / AT, qb = nqb - 1 - blockIdx.x, bh = blockIdx.y, b = bh / NH, h = bh % NH;
    int C = NH * AT, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    size_t C3 = 3 * (size_t)C;
    const bf16 *base = qkv + (size_t)b * T * C3 + h * AT, *dbase = dout + (size_t)b * T * C + h * AT;
    int q0 = qb * AT, qrow = q0 + warp * 16 + g;
    // Q and dO of this block into the second buffers (read once, into
    // registers); the first key block into the first
    load_tile<PIPE>(Ks[1], base + (size_t)q0 * C3, C3, T - q0);
    load_tile<PIPE>(Vs[1], dbase + (size_t)q0 * C, C, T - q0);
    load_tile<PIPE>(Ks[0], base + C, C3, T);
    load_tile<PIPE>(Vs[0], base + 2 * C, C3, T);
    tiles_commit_and_wait<PIPE>();
    __syncthreads();
    uint32_t qa[4][4], da[4][4];
    for (int kk = 0; kk < 4; kk++) {
        frag_a(qa[kk], Ks[1], warp * 16, kk * 16);
        frag_a(da[kk], Vs[1], warp * 16, kk * 16);
    }
    float L[2], E[2];
    for (int r = 0; r < 2; r++) {
        int q = qrow + r * 8;
        L[r] = q < T ? lse[(size_t)bh * T + q] : INFINITY;
        E[r] = q < T ? delta[(size_t)bh * T + q] : 0.0f;
    }
    float dq[8][4];
    zero_acc(dq);
    for (int kb = 0; kb <= qb; kb++) {
        int k0 = kb * AT, cur = kv_tiles_next<PIPE>(Ks, Vs, base, C, C3, T, kb, qb);
        float s[8][4], dp[8][4];
        zero_acc(s);
        zero_acc(dp);
        mma_rows_nk(s, qa, Ks[cur]);   // S = Q K^T
        mma_rows_nk(dp, da, Vs[cur]);  // dP = dO V^T
        for (int nt = 0; nt < 8; nt++)
            for (int e = 0; e < 4; e++) {
                int r = e >> 1;
                float p = exp2f(s[nt][e] * scale_log2 - L[r]);
                if (kb == qb && k0 + nt * 8 + 2 * tq + (e & 1) > qrow + r * 8) p = 0.0f;
                s[nt][e] = p * (dp[nt][e] - E[r]);
            }
        mma_acc_kn(dq, s, Ks[cur]);  // dQ += dS K
    }
    for (int r = 0; r < 2; r++) {
        int q = qrow + r * 8;
        if (q >= T) continue;
        bf16 *row = dqkv + ((size_t)b * T + q) * C3 + h * AT;
        for (int nd = 0; nd < 8; nd++)
            *reinterpret_cast<__nv_bfloat162 *>(&row[nd * 8 + 2 * tq]) =
                __floats2bfloat162_rn(dq[nd][2 * r] * scale, dq[nd][2 * r + 1] * scale);
    }
}
#endif  // !GPT_FP32

// ---- optimizer and bookkeeping

__global__ void adamw_kernel(float *p, floatX *px, const float *g, float *m, float *v, size_t n, float lr,
                             float b1, float b2, float bc1, float bc2, float eps, float wd, float grad_scale) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] * grad_scale;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / bc1, vhat = vi / bc2;
        float pi = p[i];
        pi -= lr * (mhat / (sqrtf(vhat) + eps) + wd * pi);
        p[i] = pi;
        if (px) px[i] = tox(pi);
    }
}

__global__ void to_floatx_kernel(floatX *dst, const float *src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = tox(src[i]);
}

__global__ void add_kernel(float *a, const float *b, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        a[i] = a[i] + b[i];
}

// grad-norm parts: each block sums the squares of one chunk of one (tensor,
// layer) segment in double; the host adds a segment's chunks in order
#define NORM_CHUNK 16384
#define NORM_THREADS 256
typedef struct { size_t offset, n; int first_block, nblocks, part; } NormSeg;

__global__ void sumsq_kernel(double *out, const float *g, const NormSeg *segs, const int *block_seg) {
    __shared__ double sh[NORM_THREADS];
    NormSeg sg = segs[block_seg[blockIdx.x]];
    size_t k = blockIdx.x - sg.first_block;
    size_t begin = sg.offset + k * NORM_CHUNK, end = sg.offset + sg.n;
    if (end > begin + NORM_CHUNK) end = begin + NORM_CHUNK;
    double acc = 0.0;
    for (size_t i = begin + threadIdx.x; i < end; i += NORM_THREADS) acc += (double)g[i] * g[i];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = NORM_THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) sh[threadIdx.x] += sh[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = sh[0];
}

// logits of one row for sampling: one warp per vocabulary entry, fp32
__global__ void lm_head_row_kernel(float *logits, const floatX *x, const floatX *wte, int V, int C) {
    int v = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (v >= V) return;
    const floatX *w = wte + (size_t)v * C;
    float s = 0.0f;
    for (int c = lane; c < C; c += 32) s += tof(x[c]) * tof(w[c]);
    s = warp_sum(s);
    if (lane == 0) logits[v] = s;
}

// ----------------------------------------------------------------------------
// profiling (GPT_PROFILE=1): cudaEvents around each kernel category; the table
// (per step, the first step left out as warmup) is printed when the stage is
// freed

enum { PC_ENCODER, PC_LAYERNORM, PC_MM_FWD, PC_MM_BWD_IN, PC_MM_BWD_W, PC_BIAS_LN_GRAD, PC_ATTN_FWD,
       PC_ATTN_BWD, PC_GELU, PC_LOSS, PC_ADAMW, PC_NORM, PC_SUM_WTE, PC_COPY, NUM_PC };
static const char *const PC_NAMES[NUM_PC] = {
    "embedding fwd/bwd", "layernorm fwd + bwd input", "matmul fwd (cuBLASLt)", "matmul bwd input (cuBLASLt)",
    "matmul bwd weight (cuBLASLt)", "bias + layernorm weight grads", "attention fwd", "attention bwd",
    "gelu (unfused)", "softmax + cross-entropy", "adamw", "grad norm", "wte grad sum", "host<->device copies"};
#define PROF_EVENTS 1024

typedef struct {
    int on, n, runs;
    cudaEvent_t ev[2 * PROF_EVENTS];
    int cat[PROF_EVENTS];
    double ms[NUM_PC], comm_ms;
    long calls[NUM_PC];
} Prof;

// ----------------------------------------------------------------------------
// the stage

typedef struct {
    int transa, transb;
    int64_t m, n, k, lda, ldb, ldd;
    cudaDataType_t ab, cd;
    int epi, beta;
} GemmKey;

typedef struct {
    GemmKey key;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, ld;
    cublasLtMatmulAlgo_t algo;
    int ok;  // 0: no algorithm for this shape and epilogue
} GemmPlan;
#define MAX_PLANS 256
enum { ATTN_SIMPLE, ATTN_MMA_SYNC, ATTN_MMA_PIPELINED };
#define LT_WORKSPACE (32u << 20)

// One micro-batch's activations on the device, as in train_gpt.c's Activations;
// per-layer buffers hold nl layers at the strides in Stage (st_*).
typedef struct {
    int *inputs, *targets;               // (B,T)
    int *bk_tok, *bk_start, *bk_pos;     // embedding-gradient buckets (first stage)
    int nuniq;
    floatX *x0;                          // stage input
    floatX *ln1, *qkv, *atty, *res2, *ln2, *fch, *fchg, *res3;
    float *ln1_mean, *ln1_rstd, *ln2_mean, *ln2_rstd, *lse;
    floatX *lnf;
    float *lnf_mean, *lnf_rstd;
    floatX *logits;                      // (B,T,Vp): logits, then d(logits) when training
    float *losses;                       // (B,T)
    floatX *dresid;                      // (nl+1) x (B,T,C): [l] = d(input of layer l)
    floatX *dln1, *dqkv, *dres2, *dln2, *dfch, *dlnf;
    void *mem;
} Activations;

struct Stage {
    StageBase base;                      // first: its links and zero stage (common.h)
    Layout layout;
    int B, T, device, hs;
    // parameters on the device: each (tensor, layer) segment at a 512-byte
    // aligned offset (dev_start[t] + l * dev_stride[t]), the same whatever the
    // stage split; zero padding between segments
    size_t dev_start[NUM_PARAM_TENSORS], dev_stride[NUM_PARAM_TENSORS], dev_len[NUM_PARAM_TENSORS], P_dev;
    float *d_params, *d_grads, *d_m, *d_v;
    // AdamW's m and v: opt_elems each, in the device layout above under zero 0,
    // or under --zero 1 and 3 this replica's shard packed as common.h's shard_elems
    // (chunk d of every segment, back to back), which is also how the host
    // mirrors h_m, h_v and the checkpoint code lay them out
    size_t opt_elems;
    // --zero 1 and 3 over NCCL: a bucket packed for ncclReduceScatter/ncclAllGather,
    // D slots of bucket_slot_elems(bucket) elements (slot j: chunk j of each
    // of its segments, back to back); collective_elems: the largest bucket's
    float *d_collective;
    size_t collective_elems;
    floatX *d_params_x;                  // the matmuls' copy (== d_params in the fp32 build)
    // --zero 3 (FSDP): while `sharded`, d_params and d_grads are this
    // replica's shards, packed like d_m and d_v, with no matmuls' copy; a
    // step's whole parameters and gradients live in device buffers, a bucket
    // at a time (see the executor), each tensor at in_bucket[t]
    int sharded;
    size_t shard_at[NUM_PARAM_TENSORS], chunk_n[NUM_PARAM_TENSORS];  // (t, l)'s chunk: shard_at[t] + l * chunk_n[t]
    size_t in_bucket[NUM_PARAM_TENSORS], whole_elems;  // 512-byte aligned offsets; the whole tensors' buffer size
    Fsdp fsdp;                           // the device buffers each bucket holds this step, and the comm thread
    floatX *gathered_x, *whole_x;        // the matmuls' copies of fsdp.pools[0]'s buffers and whole[0], laid out alike
    float *d_dwte_embed;                 // the embedding's share of d(wte) (first stage; scratch on the last)
    float *h_params, *h_grads, *h_m, *h_v, *h_dwte_embed;  // host mirrors, common.h layout
    float *h_shard;                      // --zero 3: the parameters' shard, for checkpoints
    float *h_swap_send, *h_swap_recv;    // tied-embedding swap over sockets
    Activations *acts;                   // activation buffers: one per micro-batch in flight
    OpRun run;                           // the executor's bookkeeping (common.h)
    float *d_mb_losses;
    int d_mb_cap;
    size_t st_c, st_3c, st_4c, st_n, st_lse, acts_bytes;
    floatX *scratch_c, *scratch_4c;
    float *d_partials, *d_delta, *d_sample_logits, *h_sample_logits;
    // grad-norm segments
    NormSeg *segs, *d_segs;
    int nsegs, norm_blocks;
    int *d_block_seg;
    double *d_norm_partials, *h_norm_partials;
    // host scratch for the embedding buckets
    int *h_counts, *h_tok, *h_start, *h_pos;
    // cuBLASLt
    cublasLtHandle_t lt;
    void *workspace;
    GemmPlan plans[MAX_PLANS];
    int nplans;
    int fuse_gelu_fwd, fuse_gelu_bwd;
    int attn_mma;  // ATTN_SIMPLE, or the tensor-core kernels with plain or cp.async tile loads
    int ptx;       // GPT_PTX: which PTX twins (asm/*.ptx) replace CUDA C kernels (PTX_* bits)
    cudaStream_t stream;
    cudaStream_t comm_stream;  // --zero 3's comm thread's
    // transport
    char *pinned;
    size_t pinned_cap;
    ncclComm_t nccl;
    int nccl_rank, nccl_ranks;
    ncclComm_t replica_nccl;  // the stage's data-parallel replicas, when each has a GPU of its own
    int wte_summed;  // d(wte) = head + embedding done for this step's gradients
    char broken[1024];  // a failure inside a void API function, reported by the next call
    Prof prof;
};
static_assert(offsetof(Stage, base) == 0, "a Stage begins with its StageBase (common.h)");

static void mark_broken(Stage *s) {
    if (!s->broken[0]) snprintf(s->broken, sizeof s->broken, "%s", gpt_last_error());
}
static int check_broken(Stage *s) {
    return s->broken[0] ? fail("an earlier call failed: %s", s->broken) : 0;
}

static int prof_flush(Stage *s) {
    Prof *prof = &s->prof;
    if (!prof->on || prof->n == 0) return 0;
    CUDA_CHECK(cudaEventSynchronize(prof->ev[2 * prof->n - 1]));
    for (int i = 0; i < prof->n; i++) {
        float ms = 0.0f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, prof->ev[2 * i], prof->ev[2 * i + 1]));
        prof->ms[prof->cat[i]] += ms;
        prof->calls[prof->cat[i]]++;
    }
    prof->n = 0;
    return 0;
}
static int prof_begin(Stage *s, int cat) {
    Prof *prof = &s->prof;
    if (!prof->on) return -1;
    if (prof->n == PROF_EVENTS && prof_flush(s)) return -1;
    if (cudaEventRecord(prof->ev[2 * prof->n], s->stream) != cudaSuccess) return -1;
    prof->cat[prof->n] = cat;
    return prof->n++;
}
static void prof_end(Stage *s, int i) {
    if (i >= 0) cudaEventRecord(s->prof.ev[2 * i + 1], s->stream);
}
// runs the statement (which may return -1) inside a profiled region of category cat
#define PROF(cat, ...) do { int pi_ = prof_begin(s, cat); __VA_ARGS__; prof_end(s, pi_); } while (0)

static void prof_report(Stage *s) {
    Prof *prof = &s->prof;
    if (!prof->on || prof->runs == 0) return;
    prof_flush(s);
    int steps = prof->runs > 1 ? prof->runs - 1 : 1;
    double total = 0.0;
    for (int c = 0; c < NUM_PC; c++) total += prof->ms[c];
    fprintf(stderr, "GPT_PROFILE stage [%d,%d) B=%d T=%d %s: GPU time per step over %d step(s)%s\n", s->layout.lo,
            s->layout.hi, s->B, s->T, PRECISION_NAME, steps, prof->runs > 1 ? " (first step left out)" : "");
    fprintf(stderr, "GPT_PROFILE %-34s %10s %10s %7s\n", "category", "calls", "ms", "%");
    for (int c = 0; c < NUM_PC; c++) {
        if (!prof->calls[c]) continue;
        fprintf(stderr, "GPT_PROFILE %-34s %10.1f %10.3f %6.1f%%\n", PC_NAMES[c], (double)prof->calls[c] / steps,
                prof->ms[c] / steps, total > 0 ? 100.0 * prof->ms[c] / total : 0.0);
    }
    fprintf(stderr, "GPT_PROFILE %-34s %10s %10.3f %6.1f%%\n", "total (kernels)", "", total / steps, 100.0);
    if (prof->comm_ms > 0)
        fprintf(stderr, "GPT_PROFILE %-34s %10s %10.3f\n", "communication (host wall)", "", prof->comm_ms / steps);
}

// ----------------------------------------------------------------------------
// cuBLASLt GEMMs: one plan per shape and epilogue, made once (cuBLASLt is
// column-major: a row-major (R, K) matrix is a column-major (K, R) one)

static int gemm_plan_make(Stage *s, GemmPlan *plan, const GemmKey *key, const void *bias, const void *aux,
                          int64_t aux_ld) {
    memset(plan, 0, sizeof *plan);
    plan->key = *key;
    cublasOperation_t ta = key->transa ? CUBLAS_OP_T : CUBLAS_OP_N, tb = key->transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    LT_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    cublasLtEpilogue_t epi = (cublasLtEpilogue_t)key->epi;
    LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi));
    // the pointers set here only tell the heuristic their alignment (256 bytes,
    // as every call's); each call sets its own
    if (bias)
        LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias));
    if (aux) {
        LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux,
                                                sizeof aux));
        LT_CHECK(cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld,
                                                sizeof aux_ld));
    }
    LT_CHECK(cublasLtMatrixLayoutCreate(&plan->la, key->ab, key->transa ? key->k : key->m,
                                        key->transa ? key->m : key->k, key->lda));
    LT_CHECK(cublasLtMatrixLayoutCreate(&plan->lb, key->ab, key->transb ? key->n : key->k,
                                        key->transb ? key->k : key->n, key->ldb));
    LT_CHECK(cublasLtMatrixLayoutCreate(&plan->ld, key->cd, key->m, key->n, key->ldd));
    cublasLtMatmulPreference_t pref;
    LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = LT_WORKSPACE;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulAlgoGetHeuristic(s->lt, plan->desc, plan->la, plan->lb, plan->ld, plan->ld, pref, 1, &res,
                                            &found);
    cublasLtMatmulPreferenceDestroy(pref);
    // "not supported" and no result mean: no kernel for this combination
    if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED)
        return fail("cuBLASLt heuristic failed: %s (m=%lld n=%lld k=%lld)", cublasGetStatusString(st),
                    (long long)key->m, (long long)key->n, (long long)key->k);
    plan->ok = st == CUBLAS_STATUS_SUCCESS && found > 0 && res.state == CUBLAS_STATUS_SUCCESS;
    if (plan->ok) plan->algo = res.algo;
    return 0;
}

static void gemm_plan_free(GemmPlan *plan) {
    if (plan->desc) cublasLtMatmulDescDestroy(plan->desc);
    if (plan->la) cublasLtMatrixLayoutDestroy(plan->la);
    if (plan->lb) cublasLtMatrixLayoutDestroy(plan->lb);
    if (plan->ld) cublasLtMatrixLayoutDestroy(plan->ld);
    memset(plan, 0, sizeof *plan);
}

// D (m x n) = op(A) op(B) [+ beta * C] [+ bias] [epilogue]. Returns 0, -1 on
// error, or 1 when cuBLASLt has no algorithm for this epilogue (the caller
// then runs the unfused path).
static int gemm(Stage *s, int transa, int transb, int64_t m, int64_t n, int64_t k, const void *A, int64_t lda,
                const void *Bm, int64_t ldb, void *D, int64_t ldd, cudaDataType_t cd, const void *Cm, float beta,
                int epi, const void *bias, const void *aux, int64_t aux_ld) {
    GemmKey key;
    memset(&key, 0, sizeof key);
    key.transa = transa; key.transb = transb; key.m = m; key.n = n; key.k = k;
    key.lda = lda; key.ldb = ldb; key.ldd = ldd; key.ab = CUDA_X; key.cd = cd; key.epi = epi; key.beta = beta != 0.0f;
    GemmPlan *plan = NULL, tmp;
    for (int i = 0; i < s->nplans && !plan; i++)
        if (memcmp(&s->plans[i].key, &key, sizeof key) == 0) plan = &s->plans[i];
    int temporary = 0;
    if (!plan) {
        if (s->nplans < MAX_PLANS) {
            plan = &s->plans[s->nplans];
            if (gemm_plan_make(s, plan, &key, bias, aux, aux_ld)) { gemm_plan_free(plan); return -1; }
            s->nplans++;
        } else {
            plan = &tmp;
            temporary = 1;
            if (gemm_plan_make(s, plan, &key, bias, aux, aux_ld)) { gemm_plan_free(plan); return -1; }
        }
    }
    int rc = 1;
    if (plan->ok) {
        rc = -1;
        float alpha = 1.0f;
        cublasStatus_t st = CUBLAS_STATUS_SUCCESS;
        if (bias)
            st = cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof bias);
        if (aux && st == CUBLAS_STATUS_SUCCESS)
            st = cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux,
                                                sizeof aux);
        if (st == CUBLAS_STATUS_SUCCESS)
            st = cublasLtMatmul(s->lt, plan->desc, &alpha, A, plan->la, Bm, plan->lb, &beta, Cm ? Cm : D, plan->ld, D,
                                plan->ld, &plan->algo, s->workspace, LT_WORKSPACE, s->stream);
        if (st != CUBLAS_STATUS_SUCCESS)
            fail("cuBLASLt matmul failed: %s (m=%lld n=%lld k=%lld epilogue %d)", cublasGetStatusString(st),
                 (long long)m, (long long)n, (long long)k, epi);
        else
            rc = 0;
    }
    if (temporary) gemm_plan_free(plan);
    return rc;
}

// ----------------------------------------------------------------------------
// PTX twins of the memory-bound kernels (asm/*.ptx, sm_90a; asm/README.md):
// asm/ptx.mk assembles them with ptxas and embeds the cubins in
// build/ptx_kernels.h; they are loaded once per process with
// cudaLibraryLoadData (no -lcuda) and launched with cudaLaunchKernel with the
// CUDA C kernels' arguments. GPT_PTX (read at stage_create): unset (the ones
// measured faster, where they apply: PTX_DEFAULT below), 0 (the CUDA C
// kernels), 1 or all, or a comma list of adamw, gelu, layernorm_fwd,
// layernorm_bwd, layernorm, crossentropy. bf16 build only; a request that
// cannot be met fails.

#if __has_include("build/ptx_kernels.h")
#include "build/ptx_kernels.h"
#endif

enum { PTX_ADAMW = 1, PTX_GELU = 2, PTX_LN_FWD = 4, PTX_LN_BWD = 8, PTX_CE = 16, PTX_ALL = 31 };
enum { PK_ADAMW, PK_GELU_FWD, PK_GELU_BWD, PK_LN_FWD, PK_LN_BWD, PK_CE, PK_GEMM, NUM_PK };
static cudaKernel_t g_ptx_kernels[NUM_PK];

#ifndef GPT_FP32
static int g_ptx_loaded;

static int ptx_load(void) {
#ifndef GPT_HAVE_PTX_KERNELS
    return fail("GPT_PTX: this build has no PTX kernels (build/ptx_kernels.h was not generated: "
                "ptxas or bin2c was missing, see asm/ptx.mk)");
#else
    if (g_ptx_loaded) return 0;
    struct { const unsigned char *image; const char *file, *name; int k; } tab[] = {
        {ptx_cubin_adamw, "adamw", "ptx_adamw", PK_ADAMW},
        {ptx_cubin_gelu, "gelu", "ptx_gelu_forward", PK_GELU_FWD},
        {ptx_cubin_gelu, "gelu", "ptx_gelu_backward", PK_GELU_BWD},
        {ptx_cubin_layernorm, "layernorm", "ptx_layernorm_forward", PK_LN_FWD},
        {ptx_cubin_layernorm, "layernorm", "ptx_layernorm_backward_input", PK_LN_BWD},
        {ptx_cubin_crossentropy, "crossentropy", "ptx_crossentropy", PK_CE},
        {ptx_cubin_gemm, "gemm", "ptx_gemm_bf16", PK_GEMM},  // benchmarked, not trained with
    };
    cudaLibrary_t lib = NULL;
    const unsigned char *lib_image = NULL;
    for (size_t i = 0; i < sizeof tab / sizeof tab[0]; i++) {
        if (tab[i].image != lib_image) {  // one library per cubin (entries of a file are adjacent)
            cudaError_t e = cudaLibraryLoadData(&lib, tab[i].image, NULL, NULL, 0, NULL, NULL, 0);
            if (e != cudaSuccess) {
                cudaGetLastError();
                return fail("GPT_PTX: loading asm/%s.ptx (an sm_90a cubin: H100/H200 only) failed: %s", tab[i].file,
                            cudaGetErrorString(e));
            }
            lib_image = tab[i].image;
        }
        cudaError_t e = cudaLibraryGetKernel(&g_ptx_kernels[tab[i].k], lib, tab[i].name);
        if (e != cudaSuccess) {
            cudaGetLastError();
            return fail("GPT_PTX: kernel %s not found in asm/%s.ptx: %s", tab[i].name, tab[i].file,
                        cudaGetErrorString(e));
        }
    }
    g_ptx_loaded = 1;
    return 0;
#endif
}
#endif

// GPT_PTX -> s->ptx, loading the kernels when any is selected
// Without GPT_PTX, the PTX kernels, each measured faster than its CUDA C twin
// on the H100 (asm/README.md), run wherever they can: a bf16 build on an sm_90
// device, shapes they support.
#define PTX_DEFAULT PTX_ALL

static void ptx_default(Stage *s) {
    s->ptx = 0;
#if !defined(GPT_FP32) && defined(GPT_HAVE_PTX_KERNELS)
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, s->device) != cudaSuccess || prop.major != 9 || prop.minor != 0) {
        cudaGetLastError();
        return;
    }
    int bits = PTX_DEFAULT;
    if (s->layout.cfg.channels % 8) bits &= ~(PTX_GELU | PTX_LN_FWD | PTX_LN_BWD);
    if (s->layout.cfg.channels > 1792) bits &= ~(PTX_LN_FWD | PTX_LN_BWD);  // 7 chunks of 8 a lane at most
    if (s->layout.cfg.padded_vocab_size % 8 || s->layout.cfg.padded_vocab_size > CE_PTX_MAX_VP) bits &= ~PTX_CE;
    if (bits && ptx_load() == 0) s->ptx = bits;
#endif
}

static int ptx_select(Stage *s, const char *env) {
    s->ptx = 0;
    if (!env || !*env) {
        ptx_default(s);
        return 0;
    }
    if (strcmp(env, "0") == 0) return 0;
    if (strcmp(env, "1") == 0 || strcmp(env, "all") == 0) {
        s->ptx = PTX_ALL;
    } else {
        static const struct { const char *name; int bits; } names[] = {
            {"adamw", PTX_ADAMW}, {"gelu", PTX_GELU}, {"layernorm_fwd", PTX_LN_FWD},
            {"layernorm_bwd", PTX_LN_BWD}, {"layernorm", PTX_LN_FWD | PTX_LN_BWD}, {"crossentropy", PTX_CE}};
        const char *p = env;
        while (*p) {
            size_t len = strcspn(p, ",");
            int found = 0;
            for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
                if (len == strlen(names[i].name) && strncmp(p, names[i].name, len) == 0) {
                    s->ptx |= names[i].bits;
                    found = 1;
                }
            if (!found)
                return fail("GPT_PTX=%s: expected 0, 1, all, or a comma list of adamw, gelu, layernorm_fwd, "
                            "layernorm_bwd, layernorm, crossentropy", env);
            p += len + (p[len] == ',');
        }
    }
#ifdef GPT_FP32
    return fail("GPT_PTX=%s: the PTX kernels are for the bf16 build; this is the fp32 build", env);
#else
    if ((s->ptx & (PTX_GELU | PTX_LN_FWD | PTX_LN_BWD)) && s->layout.cfg.channels % 8)
        return fail("GPT_PTX=%s: the PTX GELU and layernorm kernels move 8 bf16 at a time and need channels "
                    "%% 8 == 0 (channels = %d)", env, s->layout.cfg.channels);
    if ((s->ptx & (PTX_LN_FWD | PTX_LN_BWD)) && s->layout.cfg.channels > 1792)
        return fail("GPT_PTX=%s: the PTX layernorm kernels hold a row in registers (at most 7 chunks of 8 bf16 "
                    "a lane) and need channels <= 1792 (channels = %d)", env, s->layout.cfg.channels);
    if ((s->ptx & PTX_CE) && (s->layout.cfg.padded_vocab_size % 8 || s->layout.cfg.padded_vocab_size > CE_PTX_MAX_VP))
        return fail("GPT_PTX=%s: the PTX cross-entropy kernel holds a row in registers (7 chunks of 8 bf16 a "
                    "thread) and needs padded_vocab_size %% 8 == 0 and <= %d (it is %d)", env, CE_PTX_MAX_VP,
                    s->layout.cfg.padded_vocab_size);
    return ptx_load();
#endif
}

static int ptx_launch(Stage *s, int k, size_t grid, int block, void **args) {
    CUDA_CHECK(cudaLaunchKernel((const void *)g_ptx_kernels[k], dim3((unsigned)grid), dim3(block), args, 0,
                                s->stream));
    return 0;
}

// ----------------------------------------------------------------------------
// layer launchers: the matmuls on cuBLASLt, the rest on our kernels (or their
// PTX twins)

// matmul_forward and matmul_backward_input return 1 where cuBLASLt cannot
// fuse their epilogue (the caller then runs it unfused); must makes that an
// error where there is nothing to fuse
static int must(int rc) { return rc == 1 ? fail("cuBLASLt has no algorithm for a plain matmul") : rc; }

// out (N,OC) = inp (N,IC) @ W^T + bias [+ resid]; with pre != NULL, out =
// gelu(that) and pre = that (returns 1 if cuBLASLt cannot fuse it)
static int matmul_forward(Stage *s, floatX *out, const floatX *inp, const floatX *W, const floatX *bias,
                          const floatX *resid, int N, int IC, int OC, floatX *pre) {
    int epi = !bias ? CUBLASLT_EPILOGUE_DEFAULT : pre ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_BIAS;
    return gemm(s, 1, 0, OC, N, IC, W, IC, inp, IC, out, OC, CUDA_X, resid, resid ? 1.0f : 0.0f, epi, bias, pre, OC);
}

// dinp (N,IC) = dout (N,OC) @ W (OC,IC); with pre != NULL, times gelu'(pre)
static int matmul_backward_input(Stage *s, floatX *dinp, const floatX *dout, const floatX *W, int N, int IC,
                                 int OC, const floatX *pre) {
    return gemm(s, 0, 0, IC, N, OC, W, IC, dout, OC, dinp, IC, CUDA_X, NULL, 0.0f,
                pre ? CUBLASLT_EPILOGUE_DGELU : CUBLASLT_EPILOGUE_DEFAULT, NULL, pre, IC);
}

static int colsum_blocks(int N) { return (N + CS_ROWS - 1) / CS_ROWS; }

// Over the rows of dout (N,C): dsum (C) += the sums of its columns, and, with
// inp, dnorm (C) += those of dout * (inp - mean) * rstd. The one launch of the
// column-sum kernels: a layernorm's weight and bias gradients (dnorm, dsum),
// or, without inp, a bias's (dsum, from matmul_backward_weight).
static int column_sums(Stage *s, float *dnorm, float *dsum, const floatX *dout, const floatX *inp, const float *mean,
                       const float *rstd, int N, int C) {
    PROF(PC_BIAS_LN_GRAD, {
        dim3 grid((C + CS_COLS - 1) / CS_COLS, colsum_blocks(N)), block(32, 8);
        if (inp)
            colsum_partial_kernel<1><<<grid, block, 0, s->stream>>>(s->d_partials, dout, inp, mean, rstd, N, C);
        else
            colsum_partial_kernel<0><<<grid, block, 0, s->stream>>>(s->d_partials, dout, NULL, NULL, NULL, N, C);
        LAUNCH_CHECK();
        colsum_finish_kernel<<<(C + 255) / 256, 256, 0, s->stream>>>(dsum, dnorm, s->d_partials, colsum_blocks(N), C);
        LAUNCH_CHECK();
    });
    return 0;
}

// dW (OC,IC) += dout^T @ inp in fp32, dbias (OC) += column sums of dout
static int matmul_backward_weight(Stage *s, float *dW, float *dbias, const floatX *dout, const floatX *inp, int N,
                                  int IC, int OC) {
    PROF(PC_MM_BWD_W, CHECK(must(gemm(s, 0, 1, IC, OC, N, inp, IC, dout, OC, dW, IC, CUDA_R_32F, NULL, 1.0f,
                                      CUBLASLT_EPILOGUE_DEFAULT, NULL, NULL, 0))));
    if (dbias) CHECK(column_sums(s, NULL, dbias, dout, NULL, NULL, NULL, N, OC));
    return 0;
}

static int layernorm_forward(Stage *s, floatX *out, float *mean, float *rstd, const floatX *inp,
                             const float *w, const float *b, int N, int C) {
    PROF(PC_LAYERNORM, {
        if (s->ptx & PTX_LN_FWD) {
            void *args[] = {&out, &mean, &rstd, &inp, &w, &b, &N, &C};
            CHECK(ptx_launch(s, PK_LN_FWD, (N + 7) / 8, 256, args));
        } else
            layernorm_forward_kernel<<<(N + 7) / 8, 256, 0, s->stream>>>(out, mean, rstd, inp, w, b, N, C);
        LAUNCH_CHECK();
    });
    return 0;
}

static int layernorm_backward_input(Stage *s, floatX *dinp, const floatX *resid, const floatX *dout,
                                    const floatX *inp, const float *w, const float *mean, const float *rstd,
                                    int N, int C) {
    PROF(PC_LAYERNORM, {
        if (s->ptx & PTX_LN_BWD) {
            void *args[] = {&dinp, &resid, &dout, &inp, &w, &mean, &rstd, &N, &C};
            CHECK(ptx_launch(s, PK_LN_BWD, (N + 7) / 8, 256, args));
        } else
            layernorm_backward_input_kernel<<<(N + 7) / 8, 256, 0, s->stream>>>(dinp, resid, dout, inp, w, mean,
                                                                                rstd, N, C);
        LAUNCH_CHECK();
    });
    return 0;
}

static int attention_forward(Stage *s, floatX *out, float *lse, const floatX *qkv, int B, int T) {
    int NH = s->layout.cfg.num_heads, D = s->hs;
    float scale_log2 = 1.4426950408889634f / sqrtf((float)D);
    PROF(PC_ATTN_FWD, {
#ifndef GPT_FP32
        if (s->attn_mma) {
            dim3 grid((T + AT - 1) / AT, B * NH);
            if (s->attn_mma == ATTN_MMA_PIPELINED)
                attention_forward_mma_kernel<true><<<grid, 128, 0, s->stream>>>(out, lse, qkv, T, NH, scale_log2);
            else
                attention_forward_mma_kernel<false><<<grid, 128, 0, s->stream>>>(out, lse, qkv, T, NH, scale_log2);
        } else
#endif
        {
            size_t sm = SIMPLE_WARPS * (size_t)(D + T) * sizeof(float);
            attention_forward_simple_kernel<<<dim3((T + SIMPLE_WARPS - 1) / SIMPLE_WARPS, B * NH), 32 * SIMPLE_WARPS,
                                              sm, s->stream>>>(out, lse, qkv, T, NH, D, scale_log2);
        }
        LAUNCH_CHECK();
    });
    return 0;
}

// dqkv = backward of attention_forward (out is its output, dout d(out))
static int attention_backward(Stage *s, floatX *dqkv, const floatX *dout, const floatX *qkv, const floatX *out,
                              const float *lse, int B, int T) {
    int NH = s->layout.cfg.num_heads, D = s->hs;
    float scale = 1.0f / sqrtf((float)D), scale_log2 = 1.4426950408889634f * scale;
    PROF(PC_ATTN_BWD, {
        size_t warps = (size_t)B * T * NH;
        attention_delta_kernel<<<grid_for(warps * 32, 256), 256, 0, s->stream>>>(s->d_delta, dout, out, B, T, NH, D);
        LAUNCH_CHECK();
#ifndef GPT_FP32
        if (s->attn_mma) {
            dim3 grid((T + AT - 1) / AT, B * NH);
            if (s->attn_mma == ATTN_MMA_PIPELINED) {
                attention_backward_dkv_mma_kernel<true><<<grid, 128, 0, s->stream>>>(dqkv, qkv, dout, lse, s->d_delta,
                                                                                    T, NH, scale, scale_log2);
                LAUNCH_CHECK();
                attention_backward_dq_mma_kernel<true><<<grid, 128, 0, s->stream>>>(dqkv, qkv, dout, lse, s->d_delta,
                                                                                   T, NH, scale, scale_log2);
            } else {
                attention_backward_dkv_mma_kernel<false><<<grid, 128, 0, s->stream>>>(dqkv, qkv, dout, lse,
                                                                                     s->d_delta, T, NH, scale,
                                                                                     scale_log2);
                LAUNCH_CHECK();
                attention_backward_dq_mma_kernel<false><<<grid, 128, 0, s->stream>>>(dqkv, qkv, dout, lse,
                                                                                    s->d_delta, T, NH, scale,
                                                                                    scale_log2);
            }
            LAUNCH_CHECK();
        } else
#endif
        {
            dim3 grid((T + SIMPLE_WARPS - 1) / SIMPLE_WARPS, B * NH);
            size_t sm = SIMPLE_WARPS * (size_t)(2 * D + T) * sizeof(float);
            attention_backward_dq_simple_kernel<<<grid, 32 * SIMPLE_WARPS, sm, s->stream>>>(
                dqkv, dout, qkv, lse, s->d_delta, T, NH, D, scale, scale_log2);
            LAUNCH_CHECK();
            attention_backward_dkv_simple_kernel<<<grid, 32 * SIMPLE_WARPS, 0, s->stream>>>(
                dqkv, dout, qkv, lse, s->d_delta, T, NH, D, scale, scale_log2);
            LAUNCH_CHECK();
        }
    });
    return 0;
}

static int gelu_forward(Stage *s, floatX *out, const floatX *inp, size_t n) {
    PROF(PC_GELU, {
        if (s->ptx & PTX_GELU) {  // n = N * 4C, a multiple of 8 (ptx_select checked C)
            void *args[] = {&out, &inp, &n};
            CHECK(ptx_launch(s, PK_GELU_FWD, grid_for(n / 8, 256), 256, args));
        } else
            gelu_forward_kernel<<<grid_for(n, 256), 256, 0, s->stream>>>(out, inp, n);
        LAUNCH_CHECK();
    });
    return 0;
}

static int gelu_backward(Stage *s, floatX *dinp, const floatX *inp, const floatX *dout, size_t n) {
    PROF(PC_GELU, {
        if (s->ptx & PTX_GELU) {
            void *args[] = {&dinp, &inp, &dout, &n};
            CHECK(ptx_launch(s, PK_GELU_BWD, grid_for(n / 8, 256), 256, args));
        } else
            gelu_backward_kernel<<<grid_for(n, 256), 256, 0, s->stream>>>(dinp, inp, dout, n);
        LAUNCH_CHECK();
    });
    return 0;
}

// ----------------------------------------------------------------------------
// stage layout

static size_t seg_elems(const Stage *s, int t) {
    return is_layer_tensor(t) ? gpt_tensor_size(&s->layout.cfg, t, 1) : s->layout.sizes[t];
}
static int seg_count(const Stage *s, int t) {
    return !s->layout.sizes[t] ? 0 : is_layer_tensor(t) ? s->layout.nl : 1;
}
// layer l (stage-local; 0 for non-layer tensors) of tensor t on the device
static float *dparam(Stage *s, float *base, int t, int l) { return base + s->dev_start[t] + l * s->dev_stride[t]; }
static float *hparam(Stage *s, float *base, int t, int l) { return base + s->layout.offsets[t] + l * seg_elems(s, t); }

// Tensor t of layer l (l is ignored for a whole tensor) as the compute sees
// it: in the device layout, or under --zero 3 in the buffer its bucket holds
// this step (the executor checks that it holds one before the compute runs).
static float *held_tensor(Stage *s, int grads, int t, int l) {
    if (!s->sharded) return dparam(s, grads ? s->d_grads : s->d_params, t, l);
    return s->fsdp.held[grads][is_layer_tensor(t) ? l : s->layout.nl] + s->in_bucket[t];
}
static float *param_of(Stage *s, int t, int l) { return held_tensor(s, 0, t, l); }
static float *grad_of(Stage *s, int t, int l) { return held_tensor(s, 1, t, l); }
// the matmuls' copy of a gathered buffer of parameters (--zero 3) or of the stage's
static floatX *params_x_of(Stage *s, const float *buf) {
    return buf == s->fsdp.whole[0] ? s->whole_x : s->gathered_x + (buf - s->fsdp.pools[0].memory);
}
static floatX *xparam(Stage *s, int t, int l) {
    if (!s->sharded) return s->d_params_x + s->dev_start[t] + l * s->dev_stride[t];
    return params_x_of(s, s->fsdp.held[0][is_layer_tensor(t) ? l : s->layout.nl]) + s->in_bucket[t];
}

// the whole stage's tensors (host copies): not while they are sharded (zero 3)
float *stage_param(Stage *s, int t, size_t *n) {
    *n = s->sharded ? 0 : s->layout.sizes[t];
    return *n ? s->h_params + s->layout.offsets[t] : NULL;
}
float *stage_grad(Stage *s, int t, size_t *n) {
    *n = s->sharded ? 0 : s->layout.sizes[t];
    return *n ? s->h_grads + s->layout.offsets[t] : NULL;
}
const double *stage_op_times(const Stage *s) { return s->run.op_times; }

// device <-> host mirror for whole-stage parameter-shaped buffers
static int download_params(Stage *s, float *host, const float *dev) {
    for (int t = 0; t < NUM_PARAM_TENSORS; t++)
        for (int l = 0; l < seg_count(s, t); l++)
            CUDA_CHECK(cudaMemcpyAsync(hparam(s, host, t, l), dev + s->dev_start[t] + l * s->dev_stride[t],
                                       seg_elems(s, t) * sizeof(float), cudaMemcpyDeviceToHost, s->stream));
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}
static int upload_params(Stage *s, float *dev, float *host) {
    for (int t = 0; t < NUM_PARAM_TENSORS; t++)
        for (int l = 0; l < seg_count(s, t); l++)
            CUDA_CHECK(cudaMemcpyAsync(dev + s->dev_start[t] + l * s->dev_stride[t], hparam(s, host, t, l),
                                       seg_elems(s, t) * sizeof(float), cudaMemcpyHostToDevice, s->stream));
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}
// the matmuls' copy of the weights from the fp32 masters
static int refresh_params_x(Stage *s) {
#ifdef GPT_FP32
    (void)s;
#else
    to_floatx_kernel<<<grid_for(s->P_dev, 256), 256, 0, s->stream>>>(s->d_params_x, s->d_params, s->P_dev);
    LAUNCH_CHECK();
#endif
    return 0;
}

// The pieces of an activation buffer: name, element size, elements. Per-layer
// pieces use the stage's strides so that every layer starts 256-byte aligned.
typedef struct { void **p; size_t elem, n; } Piece;

static int activations_pieces(Stage *s, Activations *acts, Piece *pc) {
    size_t nl = s->layout.nl, first = s->layout.first, last = s->layout.last, BT = (size_t)s->B * s->T;
    size_t V = s->layout.cfg.vocab_size, Vp = s->layout.cfg.padded_vocab_size, X = sizeof(floatX), F = sizeof(float);
    size_t nuniq = BT < V ? BT : V;
    int n = 0;
#define PIECE(ptr, size, count) (pc[n].p = (void **)(ptr), pc[n].elem = (size), pc[n].n = (count), n++)
    PIECE(&acts->inputs, 4, first * BT);
    PIECE(&acts->targets, 4, last * BT);
    PIECE(&acts->bk_tok, 4, first * nuniq);
    PIECE(&acts->bk_start, 4, first * (nuniq + 1));
    PIECE(&acts->bk_pos, 4, first * BT);
    PIECE(&acts->x0, X, s->st_c);
    PIECE(&acts->ln1, X, nl * s->st_c);
    PIECE(&acts->qkv, X, nl * s->st_3c);
    PIECE(&acts->atty, X, nl * s->st_c);
    PIECE(&acts->res2, X, nl * s->st_c);
    PIECE(&acts->ln2, X, nl * s->st_c);
    PIECE(&acts->fch, X, nl * s->st_4c);
    PIECE(&acts->fchg, X, nl * s->st_4c);
    PIECE(&acts->res3, X, nl * s->st_c);
    PIECE(&acts->ln1_mean, F, nl * s->st_n);
    PIECE(&acts->ln1_rstd, F, nl * s->st_n);
    PIECE(&acts->ln2_mean, F, nl * s->st_n);
    PIECE(&acts->ln2_rstd, F, nl * s->st_n);
    PIECE(&acts->lse, F, nl * s->st_lse);
    PIECE(&acts->lnf, X, last * s->st_c);
    PIECE(&acts->lnf_mean, F, last * s->st_n);
    PIECE(&acts->lnf_rstd, F, last * s->st_n);
    PIECE(&acts->logits, X, last * BT * Vp);
    PIECE(&acts->losses, F, last * BT);
    PIECE(&acts->dresid, X, (nl + 1) * s->st_c);
    PIECE(&acts->dln1, X, nl * s->st_c);
    PIECE(&acts->dqkv, X, nl * s->st_3c);
    PIECE(&acts->dres2, X, nl * s->st_c);
    PIECE(&acts->dln2, X, nl * s->st_c);
    PIECE(&acts->dfch, X, nl * s->st_4c);
    PIECE(&acts->dlnf, X, last * s->st_c);
#undef PIECE
    return n;
}

static size_t activations_size(Stage *s) {
    Activations acts;
    Piece pc[40];
    int n = activations_pieces(s, &acts, pc);
    size_t total = 0;
    for (int i = 0; i < n; i++) total += round_up(pc[i].elem * pc[i].n, 512);
    return total;
}

// points the activation buffer's pieces into its allocation acts->mem
static int activations_partition(Stage *s, Activations *acts) {
    Piece pc[40];
    int n = activations_pieces(s, acts, pc);
    CUDA_CHECK(cudaMemsetAsync(acts->mem, 0, s->acts_bytes, s->stream));
    char *p = (char *)acts->mem;
    for (int i = 0; i < n; i++) {
        *pc[i].p = pc[i].n ? (void *)p : NULL;
        p += round_up(pc[i].elem * pc[i].n, 512);
    }
    return 0;
}

static double mib(size_t bytes) { return bytes / 1048576.0; }

// The grad-norm segments: each (tensor, layer) segment the stage owns, or
// with D > 1 replicas this replica's chunk of it, as the CPU trainer sums
// them: the launcher adds the D chunks' parts in replica order, so zero 0 and
// --zero 1 (whose replica d has summed gradients in chunk d only) add the
// same numbers in the same order (under --zero 3 the chunks are the shard's).
// A block sums NORM_CHUNK elements.
static void norm_segments_plan(Stage *s) {
    int L = s->layout.cfg.num_layers, blocks = 0;
    s->nsegs = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        if (!owns_tensor(&s->layout, t)) continue;
        size_t lo, hi;
        chunk_range(seg_elems(s, t), s->base.links.replica, s->base.links.replicas, &lo, &hi);
        for (int l = 0; l < seg_count(s, t); l++) {
            NormSeg *sg = &s->segs[s->nsegs++];
            sg->offset = s->sharded ? s->shard_at[t] + l * s->chunk_n[t] : s->dev_start[t] + l * s->dev_stride[t] + lo;
            sg->n = hi - lo;
            sg->first_block = blocks;
            sg->nblocks = (int)((sg->n + NORM_CHUNK - 1) / NORM_CHUNK);
            sg->part = t * L + (is_layer_tensor(t) ? s->layout.lo + l : 0);
            blocks += sg->nblocks;
        }
    }
    s->norm_blocks = blocks;
}

// (Re)makes the grad-norm kernel's tables on the device for the segments
// norm_segments_plan chose, and the partial sums' buffers.
static int norm_segments_upload(Stage *s) {
    CUDA_CHECK(cudaFree(s->d_norm_partials)); CUDA_CHECK(cudaFree(s->d_segs)); CUDA_CHECK(cudaFree(s->d_block_seg));
    s->d_norm_partials = NULL; s->d_segs = NULL; s->d_block_seg = NULL;
    free(s->h_norm_partials);
    size_t blocks = s->norm_blocks > 0 ? (size_t)s->norm_blocks : 1, segs = s->nsegs > 0 ? (size_t)s->nsegs : 1;
    CUDA_CHECK(cudaMalloc((void **)&s->d_norm_partials, blocks * sizeof(double)));
    CUDA_CHECK(cudaMalloc((void **)&s->d_segs, segs * sizeof(NormSeg)));
    CUDA_CHECK(cudaMalloc((void **)&s->d_block_seg, blocks * sizeof(int)));
    s->h_norm_partials = (double *)malloc(blocks * sizeof(double));
    int *block_seg = (int *)malloc(blocks * sizeof(int));
    if (!s->h_norm_partials || !block_seg) { free(block_seg); return fail("out of host memory"); }
    for (int i = 0; i < s->nsegs; i++)
        for (int b = 0; b < s->segs[i].nblocks; b++) block_seg[s->segs[i].first_block + b] = i;
    cudaError_t e1 = cudaMemcpy(s->d_segs, s->segs, segs * sizeof(NormSeg), cudaMemcpyHostToDevice);
    cudaError_t e2 = cudaMemcpy(s->d_block_seg, block_seg, blocks * sizeof(int), cudaMemcpyHostToDevice);
    free(block_seg);
    CUDA_CHECK(e1);
    CUDA_CHECK(e2);
    return 0;
}

// all device allocations of the stage, counted before any is made
typedef struct { size_t params, acts, scratch, total; } MemPlan;

static MemPlan mem_plan(Stage *s) {
    MemPlan mp;
    size_t BT = (size_t)s->B * s->T, C = s->layout.cfg.channels, X = sizeof(floatX);
    size_t Vp = s->layout.cfg.padded_vocab_size, NH = s->layout.cfg.num_heads;
    mp.params = s->P_dev * 4 * sizeof(float);
#ifndef GPT_FP32
    mp.params += s->P_dev * sizeof(bf16);
#endif
    if (s->layout.first || s->layout.last)
        mp.params += Vp * C * sizeof(float);  // d(wte) embedding share / swap scratch
    mp.acts = s->acts_bytes;
    size_t rb = (size_t)colsum_blocks((int)BT);
    mp.scratch = round_up(BT * C * X, 512) + round_up(4 * BT * C * X, 512) + round_up(rb * 2 * 4 * C * 4, 512) +
                 round_up(BT * NH * 4, 512) + LT_WORKSPACE + round_up((size_t)s->norm_blocks * 8, 512) +
                 round_up((size_t)s->nsegs * sizeof(NormSeg), 512) + round_up((size_t)s->norm_blocks * 4, 512) +
                 round_up(s->layout.cfg.vocab_size * 4, 512) + 4096;
    mp.total = mp.params + mp.acts * s->run.activation_buffers + mp.scratch;
    return mp;
}

static int oom_message(Stage *s, const MemPlan *mp, size_t free_b, size_t total_b) {
    return fail("out of GPU memory: stage [%d,%d) with B=%d T=%d needs %.1f MiB (parameters, gradients and AdamW "
                "state %.1f MiB, activations %.1f MiB x %d buffer(s), scratch %.1f MiB) but GPU %d has %.1f MiB free "
                "of %.1f MiB; use a smaller batch (-b/--batch-size), more micro-batches or more stages",
                s->layout.lo, s->layout.hi, s->B, s->T, mib(mp->total), mib(mp->params), mib(mp->acts),
                s->run.activation_buffers, mib(mp->scratch), s->device, mib(free_b), mib(total_b));
}

// cudaMalloc that reports the whole plan when the device is out of memory
#define DMALLOC(ptr, bytes)                                                              \
    do {                                                                                 \
        cudaError_t em_ = cudaMalloc((void **)(ptr), (bytes));                           \
        if (em_ == cudaErrorMemoryAllocation) {                                          \
            cudaGetLastError();                                                          \
            size_t f_ = 0, t_ = 0;                                                       \
            cudaMemGetInfo(&f_, &t_);                                                    \
            return oom_message(s, &mp, f_, t_);                                          \
        }                                                                                \
        CUDA_CHECK(em_);                                                                 \
    } while (0)

static int stage_alloc(Stage *s) {
    const GPTConfig *cfg = &s->layout.cfg;
    size_t BT = (size_t)s->B * s->T, C = cfg->channels, X = sizeof(floatX), V = cfg->vocab_size;
    size_t P = s->layout.num_params, Vp = cfg->padded_vocab_size;
    CUDA_CHECK(cudaSetDevice(s->device));
    CUDA_CHECK(cudaStreamCreateWithFlags(&s->stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaStreamCreateWithFlags(&s->comm_stream, cudaStreamNonBlocking));
    LT_CHECK(cublasLtCreate(&s->lt));
    MemPlan mp = mem_plan(s);
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (mp.total > free_b) return oom_message(s, &mp, free_b, total_b);
    // device
    DMALLOC(&s->d_params, s->P_dev * sizeof(float));
    DMALLOC(&s->d_grads, s->P_dev * sizeof(float));
    s->opt_elems = s->P_dev;  // zero 0 until stage_set_replicas says otherwise
    DMALLOC(&s->d_m, s->P_dev * sizeof(float));
    DMALLOC(&s->d_v, s->P_dev * sizeof(float));
#ifdef GPT_FP32
    s->d_params_x = s->d_params;
#else
    DMALLOC(&s->d_params_x, s->P_dev * sizeof(bf16));
#endif
    CUDA_CHECK(cudaMemsetAsync(s->d_params, 0, s->P_dev * sizeof(float), s->stream));
    CUDA_CHECK(cudaMemsetAsync(s->d_grads, 0, s->P_dev * sizeof(float), s->stream));
    CUDA_CHECK(cudaMemsetAsync(s->d_m, 0, s->P_dev * sizeof(float), s->stream));
    CUDA_CHECK(cudaMemsetAsync(s->d_v, 0, s->P_dev * sizeof(float), s->stream));
    CHECK(refresh_params_x(s));
    if (s->layout.first) {
        DMALLOC(&s->d_dwte_embed, Vp * C * sizeof(float));
        CUDA_CHECK(cudaMemsetAsync(s->d_dwte_embed, 0, Vp * C * sizeof(float), s->stream));
    }
    DMALLOC(&s->scratch_c, BT * C * X);
    DMALLOC(&s->scratch_4c, 4 * BT * C * X);
    DMALLOC(&s->d_partials, (size_t)colsum_blocks((int)BT) * 2 * 4 * C * sizeof(float));
    DMALLOC(&s->d_delta, BT * cfg->num_heads * sizeof(float));
    DMALLOC(&s->workspace, LT_WORKSPACE);
    if (s->layout.first && s->layout.last) DMALLOC(&s->d_sample_logits, V * sizeof(float));
    for (int i = 0; i < s->run.activation_buffers; i++) {
        DMALLOC(&s->acts[i].mem, s->acts_bytes);
        CHECK(activations_partition(s, &s->acts[i]));
    }
    CHECK(norm_segments_upload(s));
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    // host
    s->h_params = (float *)calloc(P, sizeof(float));
    s->h_grads = (float *)calloc(P, sizeof(float));
    s->h_dwte_embed = s->layout.first ? (float *)calloc(Vp * C, sizeof(float)) : NULL;
    s->h_sample_logits = (float *)malloc(V * sizeof(float));
    s->h_counts = (int *)calloc(V, sizeof(int));
    s->h_tok = (int *)malloc((BT < V ? BT : V) * sizeof(int));
    s->h_start = (int *)malloc(((BT < V ? BT : V) + 1) * sizeof(int));
    s->h_pos = (int *)malloc(BT * sizeof(int));
    if (!s->h_params || !s->h_grads || (s->layout.first && !s->h_dwte_embed) || !s->h_sample_logits || !s->h_counts ||
        !s->h_tok || !s->h_start || !s->h_pos)
        return fail("out of host memory: the stage's host copies need %.1f MiB", mib(2 * P * sizeof(float)));
    if (s->prof.on)
        for (int i = 0; i < 2 * PROF_EVENTS; i++) CUDA_CHECK(cudaEventCreate(&s->prof.ev[i]));
    return 0;
}

Stage *stage_create(GPTConfig cfg, int lo, int hi, int B, int T, int activation_buffers) {
    if (check_stage_args(cfg, lo, hi, B, T, activation_buffers)) return NULL;
    int hs = cfg.channels / cfg.num_heads;
    if (hs > 128) { fail("head size %d: the CUDA attention supports head sizes up to 128", hs); return NULL; }
    if ((size_t)B * T > (size_t)INT_MAX / 4 || (size_t)B * cfg.num_heads > 65535) {
        fail("batch %d x sequence %d is too large for one micro-batch on the GPU", B, T);
        return NULL;
    }
    int ndev = 0;
    cudaError_t e = cudaGetDeviceCount(&ndev);
    if (e != cudaSuccess || ndev < 1) {
        cudaGetLastError();
        fail("no CUDA device available (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "none visible");
        return NULL;
    }
    const char *env = getenv("GPT_DEVICE");
    int device = env && *env ? atoi(env) : 0;
    if (device < 0 || device >= ndev) {
        fail("GPT_DEVICE=%d but %d CUDA device(s) are visible", device, ndev);
        return NULL;
    }
    Stage *s = (Stage *)calloc(1, sizeof(Stage));
    if (!s) { fail("out of host memory"); return NULL; }
    s->layout = layout_make(cfg, lo, hi);
    s->B = B; s->T = T; s->run.activation_buffers = activation_buffers; s->device = device; s->hs = hs;
    s->base.links = links_make(lo, hi);
    env = getenv("GPT_FUSE_GELU");
    s->fuse_gelu_fwd = s->fuse_gelu_bwd = !(env && strcmp(env, "0") == 0);
    env = getenv("GPT_ATTN");
#ifdef GPT_FP32
    s->attn_mma = ATTN_SIMPLE;
#else
    s->attn_mma = hs != 64 || (env && strcmp(env, "simple") == 0) ? ATTN_SIMPLE
                : env && strcmp(env, "mma_sync") == 0 ? ATTN_MMA_SYNC : ATTN_MMA_PIPELINED;
#endif
    env = getenv("GPT_PROFILE");
    s->prof.on = env && strcmp(env, "0") != 0 && *env;
    if (ptx_select(s, getenv("GPT_PTX"))) { stage_free(s); return NULL; }
    // device parameter layout and grad-norm segments
    size_t off = 0;
    s->segs = (NormSeg *)calloc(NUM_PARAM_TENSORS * (size_t)s->layout.nl, sizeof(NormSeg));
    s->acts = (Activations *)calloc(activation_buffers, sizeof(Activations));
    if (!s->segs || !s->acts) { fail("out of host memory"); stage_free(s); return NULL; }
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        s->dev_start[t] = off;
        s->dev_stride[t] = round_up(seg_elems(s, t), 128);
        s->dev_len[t] = seg_count(s, t) * s->dev_stride[t];
        off += s->dev_len[t];
    }
    s->P_dev = off;
    norm_segments_plan(s);
    size_t BT = (size_t)B * T, C = cfg.channels;
    s->st_c = round_up(BT * C, 128);
    s->st_3c = round_up(3 * BT * C, 128);
    s->st_4c = round_up(4 * BT * C, 128);
    s->st_n = round_up(BT, 128);
    s->st_lse = round_up(BT * cfg.num_heads, 128);
    s->acts_bytes = activations_size(s);
    if (stage_alloc(s)) {
        char msg[1024];
        snprintf(msg, sizeof msg, "%s", gpt_last_error());
        stage_free(s);
        fail("%s", msg);
        return NULL;
    }
    return s;
}

void stage_free(Stage *s) {
    if (!s) return;
    fsdp_stop(&s->fsdp);  // first: the comm thread uses what follows
    if (s->stream) {
        cudaSetDevice(s->device);
        cudaStreamSynchronize(s->stream);
        prof_report(s);
    }
    if (s->nccl) ncclCommDestroy(s->nccl);
    if (s->replica_nccl) ncclCommDestroy(s->replica_nccl);
    for (int i = 0; i < s->nplans; i++) gemm_plan_free(&s->plans[i]);
    for (int i = 0; s->acts && i < s->run.activation_buffers; i++) cudaFree(s->acts[i].mem);
    cudaFree(s->d_params); cudaFree(s->d_grads); cudaFree(s->d_m); cudaFree(s->d_v);
#ifndef GPT_FP32
    cudaFree(s->d_params_x);
#endif
    cudaFree(s->d_dwte_embed); cudaFree(s->d_mb_losses);
    cudaFree(s->scratch_c); cudaFree(s->scratch_4c); cudaFree(s->d_partials); cudaFree(s->d_delta);
    cudaFree(s->workspace); cudaFree(s->d_norm_partials); cudaFree(s->d_segs); cudaFree(s->d_block_seg);
    cudaFree(s->d_sample_logits); cudaFree(s->d_collective);
    for (int k = 0; k < 2; k++) {
        cudaFree(s->fsdp.pools[k].memory); free(s->fsdp.pools[k].free_list); cudaFree(s->fsdp.whole[k]);
    }
#ifndef GPT_FP32
    cudaFree(s->gathered_x); cudaFree(s->whole_x);
#endif
    if (s->pinned) cudaFreeHost(s->pinned);
    if (s->prof.on)
        for (int i = 0; i < 2 * PROF_EVENTS; i++)
            if (s->prof.ev[i]) cudaEventDestroy(s->prof.ev[i]);
    if (s->lt) cublasLtDestroy(s->lt);
    if (s->stream) cudaStreamDestroy(s->stream);
    if (s->comm_stream) cudaStreamDestroy(s->comm_stream);
    free(s->h_params); free(s->h_grads); free(s->h_m); free(s->h_v); free(s->h_dwte_embed); free(s->h_shard);
    free(s->h_swap_send); free(s->h_swap_recv);
    free(s->h_norm_partials); free(s->h_sample_logits);
    free(s->h_counts); free(s->h_tok); free(s->h_start); free(s->h_pos);
    free(s->segs); free(s->acts);
    oprun_free(&s->run);
    free(s);
}

// ----------------------------------------------------------------------------
// model

// layer l of an activation buffer's per-layer piece
#define LAYER_C(buf, l) ((buf) + (size_t)(l) * s->st_c)
#define LAYER_3C(buf, l) ((buf) + (size_t)(l) * s->st_3c)
#define LAYER_4C(buf, l) ((buf) + (size_t)(l) * s->st_4c)
#define LAYER_N(buf, l) ((buf) + (size_t)(l) * s->st_n)

static floatX *stage_output(Stage *s, Activations *acts) { return LAYER_C(acts->res3, s->layout.nl - 1); }

// Uploads micro-batch tokens (checked against the vocabulary) and, for the
// embedding gradient, the positions of each distinct token in (b,t) order.
static int upload_tokens(Stage *s, Activations *acts, const int *inputs, const int *targets, int mb) {
    size_t BT = (size_t)s->B * s->T;
    int V = s->layout.cfg.vocab_size;
    const int *lists[2] = {inputs, targets};
    for (int k = 0; k < 2; k++) {
        if (!lists[k]) continue;
        for (size_t i = 0; i < BT; i++)
            if (lists[k][i] < 0 || lists[k][i] >= V)
                return fail("%s token %d at position %zu of micro-batch %d is outside the vocabulary (%d)",
                            k ? "target" : "input", lists[k][i], i, mb, V);
    }
    if (inputs) {
        CUDA_CHECK(cudaMemcpyAsync(acts->inputs, inputs, BT * sizeof(int), cudaMemcpyHostToDevice, s->stream));
        // counting sort by token, stable in (b,t)
        int *cnt = s->h_counts;
        memset(cnt, 0, V * sizeof(int));
        for (size_t i = 0; i < BT; i++) cnt[inputs[i]]++;
        int nu = 0, acc = 0;
        for (int v = 0; v < V; v++) {
            if (!cnt[v]) continue;
            s->h_tok[nu] = v;
            s->h_start[nu] = acc;
            int c = cnt[v];
            cnt[v] = acc;  // now the next free position of token v
            acc += c;
            nu++;
        }
        s->h_start[nu] = acc;
        for (size_t i = 0; i < BT; i++) s->h_pos[cnt[inputs[i]]++] = (int)i;
        acts->nuniq = nu;
        CUDA_CHECK(cudaMemcpyAsync(acts->bk_tok, s->h_tok, nu * sizeof(int), cudaMemcpyHostToDevice, s->stream));
        CUDA_CHECK(cudaMemcpyAsync(acts->bk_start, s->h_start, (nu + 1) * sizeof(int), cudaMemcpyHostToDevice,
                                   s->stream));
        CUDA_CHECK(cudaMemcpyAsync(acts->bk_pos, s->h_pos, BT * sizeof(int), cudaMemcpyHostToDevice, s->stream));
    }
    if (targets)
        CUDA_CHECK(cudaMemcpyAsync(acts->targets, targets, BT * sizeof(int), cudaMemcpyHostToDevice, s->stream));
    // the host arrays are reused by the next micro-batch
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}

// The stage's forward of layers [l0, l1) for one micro-batch of shape (B,T),
// with the embedding before layer 0 and the final layernorm after the last
// ([0, nl) is the whole stage, what a whole-stage FWD runs); sampling calls
// it with B = 1.
static int stage_forward(Stage *s, Activations *acts, int B, int T, int l0, int l1) {
    const GPTConfig *cfg = &s->layout.cfg;
    int C = cfg->channels, N = B * T;
    if (s->layout.first && l0 == 0) {
        size_t n = (size_t)N * C;
        PROF(PC_ENCODER, {
            encoder_forward_kernel<<<grid_for(n, 256), 256, 0, s->stream>>>(
                acts->x0, acts->inputs, param_of(s, P_WTE, 0), param_of(s, P_WPE, 0), T, C, n);
            LAUNCH_CHECK();
        });
    }
    for (int l = l0; l < l1; l++) {
        floatX *x = l == 0 ? acts->x0 : LAYER_C(acts->res3, l - 1);
        floatX *ln1 = LAYER_C(acts->ln1, l), *qkv = LAYER_3C(acts->qkv, l), *atty = LAYER_C(acts->atty, l);
        floatX *res2 = LAYER_C(acts->res2, l), *ln2 = LAYER_C(acts->ln2, l), *fch = LAYER_4C(acts->fch, l);
        floatX *fchg = LAYER_4C(acts->fchg, l), *res3 = LAYER_C(acts->res3, l);
        CHECK(layernorm_forward(s, ln1, LAYER_N(acts->ln1_mean, l), LAYER_N(acts->ln1_rstd, l), x,
                                param_of(s, P_LN1W, l), param_of(s, P_LN1B, l), N, C));
        PROF(PC_MM_FWD, CHECK(must(matmul_forward(s, qkv, ln1, xparam(s, P_QKVW, l), xparam(s, P_QKVB, l), NULL, N,
                                                  C, 3 * C, NULL))));
        CHECK(attention_forward(s, atty, acts->lse + (size_t)l * s->st_lse, qkv, B, T));
        PROF(PC_MM_FWD, CHECK(must(matmul_forward(s, res2, atty, xparam(s, P_ATTPROJW, l), xparam(s, P_ATTPROJB, l),
                                                  x, N, C, C, NULL))));
        CHECK(layernorm_forward(s, ln2, LAYER_N(acts->ln2_mean, l), LAYER_N(acts->ln2_rstd, l), res2,
                                param_of(s, P_LN2W, l), param_of(s, P_LN2B, l), N, C));
        int rc = 1;
        if (s->fuse_gelu_fwd) {
            PROF(PC_MM_FWD, rc = matmul_forward(s, fchg, ln2, xparam(s, P_FCW, l), xparam(s, P_FCB, l), NULL, N, C,
                                                4 * C, fch));
            CHECK(rc < 0);
            if (rc == 1) s->fuse_gelu_fwd = 0;  // no fused kernel for this shape: from now on unfused
        }
        if (rc == 1) {
            PROF(PC_MM_FWD, CHECK(must(matmul_forward(s, fch, ln2, xparam(s, P_FCW, l), xparam(s, P_FCB, l), NULL, N,
                                                      C, 4 * C, NULL))));
            CHECK(gelu_forward(s, fchg, fch, (size_t)N * 4 * C));
        }
        PROF(PC_MM_FWD, CHECK(must(matmul_forward(s, res3, fchg, xparam(s, P_FCPROJW, l), xparam(s, P_FCPROJB, l),
                                                  res2, N, 4 * C, C, NULL))));
    }
    if (s->layout.last && l1 == s->layout.nl)
        CHECK(layernorm_forward(s, acts->lnf, acts->lnf_mean, acts->lnf_rstd, stage_output(s, acts),
                                param_of(s, P_LNFW, 0), param_of(s, P_LNFB, 0), N, C));
    return 0;
}

// logits, loss (into d_mb_losses[mb]) and, when training, d(logits) in place
static int stage_loss(Stage *s, Activations *acts, int mb, float dloss, int training) {
    int N = s->B * s->T, C = s->layout.cfg.channels, V = s->layout.cfg.vocab_size, Vp = s->layout.cfg.padded_vocab_size;
    PROF(PC_MM_FWD,
         CHECK(must(matmul_forward(s, acts->logits, acts->lnf, xparam(s, P_WTE, 0), NULL, NULL, N, C, Vp, NULL))));
    PROF(PC_LOSS, {
        if (s->ptx & PTX_CE) {  // Vp % 8 == 0 (ptx_select checked it)
            floatX *logits = acts->logits;
            float *losses = acts->losses;
            int *targets = acts->targets;
            void *args[] = {&logits, &losses, &targets, &V, &Vp, &dloss, &training};
            CHECK(ptx_launch(s, PK_CE, N, CE_THREADS, args));
        } else
            crossentropy_kernel<<<N, CE_THREADS, 0, s->stream>>>(acts->logits, acts->losses, acts->targets, V, Vp,
                                                                 dloss, training);
        LAUNCH_CHECK();
        mean_kernel<<<1, 1024, 0, s->stream>>>(s->d_mb_losses + mb, acts->losses, N);
        LAUNCH_CHECK();
    });
    return 0;
}

// BWD_INPUT of layers [l0, l1), from the top down: from d(logits) (last
// stage, with layer nl-1) or the received d(output) to d(input of layer l0)
// in dresid[l0] (dresid[0]: d(stage input)), keeping what BWD_WEIGHT needs.
static int stage_backward_input(Stage *s, Activations *acts, int l0, int l1) {
    const GPTConfig *cfg = &s->layout.cfg;
    int C = cfg->channels, B = s->B, T = s->T, N = B * T, Vp = cfg->padded_vocab_size;
    floatX *dtop = LAYER_C(acts->dresid, s->layout.nl);
    if (s->layout.last && l1 == s->layout.nl) {
        PROF(PC_MM_BWD_IN,
             CHECK(must(matmul_backward_input(s, acts->dlnf, acts->logits, xparam(s, P_WTE, 0), N, C, Vp, NULL))));
        CHECK(layernorm_backward_input(s, dtop, NULL, acts->dlnf, stage_output(s, acts), param_of(s, P_LNFW, 0),
                                       acts->lnf_mean, acts->lnf_rstd, N, C));
    }
    for (int l = l1 - 1; l >= l0; l--) {
        floatX *x = l == 0 ? acts->x0 : LAYER_C(acts->res3, l - 1);
        floatX *dout = LAYER_C(acts->dresid, l + 1), *dfch = LAYER_4C(acts->dfch, l), *dln2 = LAYER_C(acts->dln2, l);
        floatX *dres2 = LAYER_C(acts->dres2, l), *dqkv = LAYER_3C(acts->dqkv, l), *dln1 = LAYER_C(acts->dln1, l);
        floatX *dx = LAYER_C(acts->dresid, l), *fch = LAYER_4C(acts->fch, l);
        int rc = 1;
        if (s->fuse_gelu_bwd) {
            PROF(PC_MM_BWD_IN, rc = matmul_backward_input(s, dfch, dout, xparam(s, P_FCPROJW, l), N, 4 * C, C, fch));
            CHECK(rc < 0);
            if (rc == 1) s->fuse_gelu_bwd = 0;
        }
        if (rc == 1) {
            PROF(PC_MM_BWD_IN, CHECK(must(matmul_backward_input(s, s->scratch_4c, dout, xparam(s, P_FCPROJW, l), N,
                                                                4 * C, C, NULL))));
            CHECK(gelu_backward(s, dfch, fch, s->scratch_4c, (size_t)N * 4 * C));
        }
        PROF(PC_MM_BWD_IN, CHECK(must(matmul_backward_input(s, dln2, dfch, xparam(s, P_FCW, l), N, C, 4 * C, NULL))));
        CHECK(layernorm_backward_input(s, dres2, dout, dln2, LAYER_C(acts->res2, l), param_of(s, P_LN2W, l),
                                       LAYER_N(acts->ln2_mean, l), LAYER_N(acts->ln2_rstd, l), N, C));
        PROF(PC_MM_BWD_IN, CHECK(must(matmul_backward_input(s, s->scratch_c, dres2, xparam(s, P_ATTPROJW, l), N, C,
                                                            C, NULL))));
        CHECK(attention_backward(s, dqkv, s->scratch_c, LAYER_3C(acts->qkv, l), LAYER_C(acts->atty, l),
                                 acts->lse + (size_t)l * s->st_lse, B, T));
        PROF(PC_MM_BWD_IN, CHECK(must(matmul_backward_input(s, dln1, dqkv, xparam(s, P_QKVW, l), N, C, 3 * C, NULL))));
        CHECK(layernorm_backward_input(s, dx, dres2, dln1, x, param_of(s, P_LN1W, l), LAYER_N(acts->ln1_mean, l),
                                       LAYER_N(acts->ln1_rstd, l), N, C));
    }
    return 0;
}

// BWD_WEIGHT of layers [l0, l1): accumulate this micro-batch's parameter
// gradients (the head's with layer nl-1, the embedding's with layer 0). Each
// layer's gradients are its own, so the order of the layers changes no bit.
static int stage_backward_weight(Stage *s, Activations *acts, int l0, int l1) {
    const GPTConfig *cfg = &s->layout.cfg;
    int C = cfg->channels, N = s->B * s->T, Vp = cfg->padded_vocab_size;
    if (s->layout.last && l1 == s->layout.nl) {
        CHECK(matmul_backward_weight(s, grad_of(s, P_WTE, 0), NULL, acts->logits, acts->lnf, N, C, Vp));
        CHECK(column_sums(s, grad_of(s, P_LNFW, 0), grad_of(s, P_LNFB, 0), acts->dlnf, stage_output(s, acts),
                          acts->lnf_mean, acts->lnf_rstd, N, C));
    }
    for (int l = l0; l < l1; l++) {
        floatX *x = l == 0 ? acts->x0 : LAYER_C(acts->res3, l - 1);
        CHECK(column_sums(s, grad_of(s, P_LN1W, l), grad_of(s, P_LN1B, l), LAYER_C(acts->dln1, l), x,
                          LAYER_N(acts->ln1_mean, l), LAYER_N(acts->ln1_rstd, l), N, C));
        CHECK(matmul_backward_weight(s, grad_of(s, P_QKVW, l), grad_of(s, P_QKVB, l), LAYER_3C(acts->dqkv, l),
                                     LAYER_C(acts->ln1, l), N, C, 3 * C));
        CHECK(matmul_backward_weight(s, grad_of(s, P_ATTPROJW, l), grad_of(s, P_ATTPROJB, l),
                                     LAYER_C(acts->dres2, l), LAYER_C(acts->atty, l), N, C, C));
        CHECK(column_sums(s, grad_of(s, P_LN2W, l), grad_of(s, P_LN2B, l), LAYER_C(acts->dln2, l),
                          LAYER_C(acts->res2, l), LAYER_N(acts->ln2_mean, l), LAYER_N(acts->ln2_rstd, l), N, C));
        CHECK(matmul_backward_weight(s, grad_of(s, P_FCW, l), grad_of(s, P_FCB, l), LAYER_4C(acts->dfch, l),
                                     LAYER_C(acts->ln2, l), N, C, 4 * C));
        CHECK(matmul_backward_weight(s, grad_of(s, P_FCPROJW, l), grad_of(s, P_FCPROJB, l),
                                     LAYER_C(acts->dresid, l + 1), LAYER_4C(acts->fchg, l), N, 4 * C, C));
    }
    if (s->layout.first && l0 == 0) {
        PROF(PC_ENCODER, {
            if (acts->nuniq > 0) {
                encoder_backward_wte_kernel<<<acts->nuniq, 256, 0, s->stream>>>(
                    s->d_dwte_embed, acts->dresid, acts->bk_tok, acts->bk_start, acts->bk_pos, C);
                LAUNCH_CHECK();
            }
            encoder_backward_wpe_kernel<<<grid_for((size_t)s->T * C, 256), 256, 0, s->stream>>>(
                grad_of(s, P_WPE, 0), acts->dresid, s->B, s->T, C);
            LAUNCH_CHECK();
        });
    }
    return 0;
}

// ----------------------------------------------------------------------------
// transport: NCCL when set (ranks on separate GPUs), else the sockets of
// common.h with the device buffers staged through pinned host memory

// Elements of one of the D slots of bucket's packed buffer (--zero 1 and 3
// over NCCL): chunk 0 of each of its segments, the largest chunk (chunk_range).
static size_t bucket_slot_elems(const Stage *s, int bucket) {
    int tensors[NUM_PARAM_TENSORS], layers[NUM_PARAM_TENSORS];
    int n = bucket_segments(&s->layout, bucket, tensors, layers);
    size_t slot = 0, lo, hi;
    for (int i = 0; i < n; i++) {
        chunk_range(seg_elems(s, tensors[i]), 0, s->base.links.replicas, &lo, &hi);
        slot += hi - lo;
    }
    return slot;
}

// --zero 1 and 3 over NCCL: the packed buffer for the largest bucket, made once
// both the ring (stage_set_replicas) and the communicator are known.
static int collective_buffer_make(Stage *s) {
    if (s->base.zero == 0 || !s->replica_nccl || s->d_collective) return 0;
    size_t D = (size_t)s->base.links.replicas, most = 0;
    for (int bucket = 0; bucket <= s->layout.nl; bucket++) {
        size_t slot = bucket_slot_elems(s, bucket);
        most = slot > most ? slot : most;
    }
    if (most > SIZE_MAX / sizeof(float) / D)
        return fail("stage [%d,%d): a bucket's %zu x %zu packed values overflow", s->layout.lo, s->layout.hi, D, most);
    CUDA_CHECK(cudaSetDevice(s->device));
    CUDA_CHECK(cudaMalloc((void **)&s->d_collective, (D * most > 0 ? D * most : 1) * sizeof(float)));
    s->collective_elems = D * most;
    return 0;
}

// Where a bucket's segments are: a whole-stage array in the device layout
// (d_params, d_grads), one in the host mirrors' (h_params, h_grads), or under
// --zero 3 the bucket's own buffer (each tensor at in_bucket[t]).
enum { IN_DEVICE_LAYOUT, IN_HOST_LAYOUT, IN_BUCKET_BUFFER };

// A bucket's (tensor, layer) segments in `at`, laid out as `where` says; sets
// tensors[i] and layers[i] too. Returns how many.
static int bucket_in(Stage *s, int where, float *at, int bucket, Segment *segs, int *tensors, int *layers) {
    int n = bucket_segments(&s->layout, bucket, tensors, layers);
    for (int i = 0; i < n; i++) {
        int t = tensors[i], l = layers[i];
        segs[i].p = where == IN_BUCKET_BUFFER ? at + s->in_bucket[t]
                  : where == IN_HOST_LAYOUT   ? hparam(s, at, t, l)
                                              : dparam(s, at, t, l);
        segs[i].n = seg_elems(s, t);
    }
    return n;
}

// --zero 3: this replica's chunk of each of a bucket's segments (device or
// host memory: cudaMemcpyDefault tells them apart) into the shard
// (to_shard), or from it; queued on `stream`.
static int bucket_chunks_copy(Stage *s, cudaStream_t stream, const Segment *segs, const int *tensors, int n,
                              int bucket, float *shard, int to_shard) {
    ChunkCopy copies[NUM_PARAM_TENSORS];
    bucket_chunk_copies(segs, tensors, n, bucket, s->base.links.replica, s->base.links.replicas, shard, s->shard_at,
                        s->chunk_n, to_shard, copies);
    for (int i = 0; i < n; i++)
        CUDA_CHECK(cudaMemcpyAsync(copies[i].dst, copies[i].src, copies[i].count * sizeof(float), cudaMemcpyDefault,
                                   stream));
    return 0;
}

// The same for every bucket of a whole-stage array `at` (laid out as `where` says).
static int stage_chunks_copy(Stage *s, int where, float *at, float *shard, int to_shard) {
    for (int b = 0; b <= s->layout.nl; b++) {
        int tensors[NUM_PARAM_TENSORS], layers[NUM_PARAM_TENSORS];
        Segment segs[NUM_PARAM_TENSORS];
        int n = bucket_in(s, where, at, b, segs, tensors, layers);
        CHECK(bucket_chunks_copy(s, s->stream, segs, tensors, n, b, shard, to_shard));
    }
    return 0;
}

// d_grads made anew as `bytes`, zeroed (its old values are spent).
static int grads_remake(Stage *s, size_t bytes) {
    CUDA_CHECK(cudaFree(s->d_grads));
    s->d_grads = NULL;
    CUDA_CHECK(cudaMalloc((void **)&s->d_grads, bytes));
    CUDA_CHECK(cudaMemsetAsync(s->d_grads, 0, bytes, s->stream));
    return 0;
}

// --zero 3: d_params from the device layout into a shard of `bytes`
// (to_shard), or from the shard into the zeroed layout, this replica's
// chunks copied; d_grads as large. The new parameters are made in the
// gradients' place and then swap with the old, so every allocation stays
// the stage's (stage_free frees it) whatever call fails.
static int params_relayout(Stage *s, size_t bytes, int to_shard) {
    CHECK(grads_remake(s, bytes));
    CHECK(to_shard ? stage_chunks_copy(s, IN_DEVICE_LAYOUT, s->d_params, s->d_grads, 1)
                   : stage_chunks_copy(s, IN_DEVICE_LAYOUT, s->d_grads, s->d_params, 0));
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    float *params = s->d_grads;
    s->d_grads = s->d_params;
    s->d_params = params;
    return grads_remake(s, bytes);
}

static int fsdp_ring(void *stage, int kind, int bucket, float *buf);

// --zero 3: the shard's offsets, where each tensor sits in its bucket's
// buffer, d_params cut down to its shard (the chunks of the parameters the
// stage holds now), d_grads to a zeroed one, no matmuls' copy of the whole
// stage, and the whole tensors' two buffers (with the gathered one's copy).
static int stage_shard(Stage *s) {
    size_t n = shard_offsets(&s->layout, s->base.links.replica, s->base.links.replicas, s->shard_at, s->chunk_n);
    size_t layer, bytes = (n ? n : 1) * sizeof(float);
    bucket_offsets(&s->layout, 128, s->in_bucket, &layer, &s->whole_elems);
    size_t whole = s->whole_elems ? s->whole_elems : 1;
    CHECK(params_relayout(s, bytes, 1));
#ifdef GPT_FP32
    s->d_params_x = NULL;
#else
    CUDA_CHECK(cudaFree(s->d_params_x));
    s->d_params_x = NULL;
    CUDA_CHECK(cudaMalloc((void **)&s->whole_x, whole * sizeof(floatX)));
#endif
    for (int k = 0; k < 2; k++) {
        CUDA_CHECK(cudaMalloc((void **)&s->fsdp.whole[k], whole * sizeof(float)));
        CUDA_CHECK(cudaMemsetAsync(s->fsdp.whole[k], 0, whole * sizeof(float), s->stream));
    }
#ifdef GPT_FP32
    s->whole_x = s->fsdp.whole[0];
#endif
    s->fsdp.pools[0].elems = s->fsdp.pools[1].elems = layer;
    s->sharded = 1;
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return fsdp_start(&s->fsdp, &s->layout, fsdp_ring, s);
}

// zero 0 keeps every replica's optimizer state whole; --zero 1 swaps m and v
// for this replica's shard (zeroed: call it before any step or checkpoint
// read), and --zero 3 the parameters and gradients too (stage_shard). The
// grad-norm segments become this replica's chunks for any D > 1.
int stage_set_replicas(Stage *s, int prev_fd, int next_fd, int replica, int replicas, int zero) {
    if (zero != 0 && zero != 1 && zero != 3) return fail("--zero %d: expected 0, 1 or 3", zero);
    if (s->base.zero || s->base.links.replicas > 1) return fail("stage_set_replicas: the replicas are set once");
    if (replicas < 1 || replica < 0 || replica >= replicas)
        return fail("replica %d of %d replicas is out of range", replica, replicas);
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    set_replica_ring(s, prev_fd, next_fd, replica, replicas, zero);
    if (zero == 3) CHECK(stage_shard(s));
    norm_segments_plan(s);
    CHECK(norm_segments_upload(s));
    if (zero == 0) return 0;
    int part, parts;
    optimizer_shard(s, &part, &parts);
    CUDA_CHECK(cudaFree(s->d_m)); CUDA_CHECK(cudaFree(s->d_v));
    s->d_m = s->d_v = NULL;
    free(s->h_m); free(s->h_v);  // ensure_moment_mirrors makes them shard-sized
    s->h_m = s->h_v = NULL;
    s->opt_elems = shard_elems(&s->layout, part, parts);
    size_t bytes = (s->opt_elems > 0 ? s->opt_elems : 1) * sizeof(float);
    CUDA_CHECK(cudaMalloc((void **)&s->d_m, bytes));
    CUDA_CHECK(cudaMalloc((void **)&s->d_v, bytes));
    CUDA_CHECK(cudaMemsetAsync(s->d_m, 0, bytes, s->stream));
    CUDA_CHECK(cudaMemsetAsync(s->d_v, 0, bytes, s->stream));
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return collective_buffer_make(s);
}

// A pool (common.h) of count zeroed buffers of elems floats in device memory.
static int device_pool_make(Stage *s, BufferPool *pool, int count, size_t elems, const char *what) {
    CUDA_CHECK(cudaFree(pool->memory));
    free(pool->free_list);
    memset(pool, 0, sizeof *pool);
    size_t bytes = 0;
    if (pool_bytes(count, elems, what, &bytes)) return -1;
    float *memory = NULL;
    CUDA_CHECK(cudaMalloc((void **)&memory, bytes ? bytes : 1));
    if (pool_init(pool, memory, count, elems, what)) { cudaFree(memory); return -1; }
    CUDA_CHECK(cudaMemsetAsync(memory, 0, bytes, s->stream));
    return 0;
}

// --zero 3: the device buffers for gathered layer parameters (each with its
// matmuls' copy, laid out alike in gathered_x) and for layers' whole
// gradients, the validator's peaks for this rank's op lists.
int stage_set_layer_buffers(Stage *s, int gathered, int grads) {
    if (!s->sharded) return fail("layer buffers are --zero 3's, and this stage is not sharded");
    if (gathered < 0 || grads < 0 || gathered > s->layout.nl || grads > s->layout.nl)
        return fail("%d gathered and %d gradient buffers for %d layers", gathered, grads, s->layout.nl);
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    BufferPool *pools = s->fsdp.pools;
    size_t elems = pools[0].elems;
    CHECK(device_pool_make(s, &pools[0], gathered, elems, "the gathered layers' buffers"));
    CHECK(device_pool_make(s, &pools[1], grads, elems, "the layers' gradient buffers"));
#ifdef GPT_FP32
    s->gathered_x = pools[0].memory;
#else
    CUDA_CHECK(cudaFree(s->gathered_x));
    s->gathered_x = NULL;
    CUDA_CHECK(cudaMalloc((void **)&s->gathered_x, ((size_t)gathered * elems + 1) * sizeof(floatX)));
#endif
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}

// What the stage holds on the device, by kind; under --zero 3 the
// parameters and gradients are the shard (the optimizer's).
void stage_memory_bytes(const Stage *s, uint64_t bytes[NUM_MEMORY]) {
    memset(bytes, 0, NUM_MEMORY * sizeof(uint64_t));
    size_t P = s->sharded ? s->opt_elems : s->P_dev;
    const BufferPool *pools = s->fsdp.pools;
    size_t gathered = (size_t)pools[0].count * pools[0].elems + (s->fsdp.whole[0] ? s->whole_elems : 0);
    size_t grad_buffers = (size_t)pools[1].count * pools[1].elems + (s->fsdp.whole[1] ? s->whole_elems : 0);
    // with their matmuls' copy in the bf16 build, which a shard has not
    size_t params_x = sizeof(floatX) < sizeof(float) && !s->sharded ? P * sizeof(floatX) : 0;
    bytes[MEMORY_PARAMS] = P * sizeof(float) + params_x;
    bytes[MEMORY_GRADS] = P * sizeof(float) + (s->layout.first ? s->layout.sizes[P_WTE] * sizeof(float) : 0);
    bytes[MEMORY_OPTIMIZER] = 2 * s->opt_elems * sizeof(float);
    // --zero 3's gathered parameters, with their matmuls' copies in the bf16 build
    bytes[MEMORY_GATHERED] = gathered * (sizeof(float) + (sizeof(floatX) < sizeof(float) ? sizeof(floatX) : 0));
    // --zero 3's gradient buffers, and over NCCL (--zero 1 and 3) the packed bucket
    bytes[MEMORY_GRAD_BUFFERS] = (grad_buffers + s->collective_elems) * sizeof(float);
    bytes[MEMORY_ACTIVATIONS] = (uint64_t)s->run.activation_buffers * s->acts_bytes;
}

// Waits for a stream (and the NCCL operations on it) without ever hanging:
// a peer error or no completion within the link timeout aborts the
// communicator and fails.
static int nccl_wait(Stage *s, cudaStream_t stream, ncclComm_t *comm, const char *what) {
    double start = now_seconds();
    for (;;) {
        cudaError_t q = cudaStreamQuery(stream);
        if (q == cudaSuccess) return 0;
        if (q != cudaErrorNotReady) CUDA_CHECK(q);
        ncclResult_t ar = ncclSuccess;
        NCCL_CHECK(ncclCommGetAsyncError(*comm, &ar));
        if (ar != ncclSuccess && ar != ncclInProgress) {
            ncclCommAbort(*comm);
            *comm = NULL;
            return fail("stage [%d,%d): NCCL failed during %s: %s", s->layout.lo, s->layout.hi, what,
                        ncclGetErrorString(ar));
        }
        if (now_seconds() - start > s->base.links.timeout_s) {
            ncclCommAbort(*comm);
            *comm = NULL;
            return fail("stage [%d,%d): no progress from a peer for %.0f s during %s over NCCL", s->layout.lo,
                        s->layout.hi, s->base.links.timeout_s, what);
        }
        usleep(50);
    }
}

// n sends/receives as one NCCL group: peers[i] the rank, counts of dtype
static int nccl_exchange(Stage *s, int n, const int *sending, const int *peers, void *const *bufs, size_t count,
                         ncclDataType_t dtype, const char *what) {
    if (!s->nccl) return fail("stage [%d,%d): NCCL is not set up", s->layout.lo, s->layout.hi);
    // NCCL wants one communicator's operations in flight at a time (its
    // "using multiple NCCL communicators concurrently" rule), so under
    // --zero 3 the comm thread's collectives on the replicas' end first
    // (over sockets too: one rule, and replicas on sockets beside stages on
    // NCCL is rare). Only this thread queues collectives, so none starts
    // until the exchange is over: every rank's NCCL calls come in its list's
    // order, as without the comm thread, and deadlock only where they would.
    if (s->sharded) CHECK(fsdp_drain(&s->fsdp));
    NCCL_CHECK(ncclGroupStart());
    ncclResult_t r = ncclSuccess;
    for (int i = 0; i < n && r == ncclSuccess; i++)
        r = sending[i] ? ncclSend(bufs[i], count, dtype, peers[i], s->nccl, s->stream)
                       : ncclRecv(bufs[i], count, dtype, peers[i], s->nccl, s->stream);
    ncclResult_t r2 = ncclGroupEnd();
    if (r != ncclSuccess) return fail("NCCL error in %s: %s", what, ncclGetErrorString(r));
    if (r2 != ncclSuccess) return fail("NCCL error in %s: %s", what, ncclGetErrorString(r2));
    return nccl_wait(s, s->stream, &s->nccl, what);
}

// the peer rank of a comm op: next = rank + 1, previous = rank - 1; a
// one-rank communicator talks to itself
static int nccl_peer(Stage *s, int to_next) {
    if (s->nccl_ranks == 1) return 0;
    int p = s->nccl_rank + (to_next ? 1 : -1);
    return p >= 0 && p < s->nccl_ranks ? p : -1;
}

// The executor's hook for an activation buffer's message buffers (device memory), in
// common.h's order: output, input, d(input), d(output).
static void hook_message_buffers(void *stage, int acts_index, void *bufs[4]) {
    Stage *s = (Stage *)stage;
    Activations *acts = &s->acts[acts_index];
    bufs[0] = stage_output(s, acts);
    bufs[1] = acts->x0;
    bufs[2] = acts->dresid;
    bufs[3] = LAYER_C(acts->dresid, s->layout.nl);
}

// The executor's hook for a group of sends/receives of device buffers dev[i]:
// NCCL, or the sockets staged through pinned host memory.
static int hook_exchange(void *stage, const int *ops, int n, void *const *dev) {
    Stage *s = (Stage *)stage;
    size_t BTC = (size_t)s->B * s->T * s->layout.cfg.channels, nbytes = BTC * sizeof(floatX);
    if (s->nccl) {
        int sending[MAX_GROUP] = {0}, peers[MAX_GROUP] = {0};
        for (int i = 0; i < n; i++) {
            int kind = ops[OP_INTS * i], to_next = kind == OP_SEND_ACT || kind == OP_RECV_GRAD;
            sending[i] = kind == OP_SEND_ACT || kind == OP_SEND_GRAD;
            peers[i] = nccl_peer(s, to_next);
            if (peers[i] < 0)
                return fail("stage [%d,%d): %s mb %d but there is no %s stage", s->layout.lo, s->layout.hi,
                            OP_NAMES[kind], ops[OP_INTS * i + 1], to_next ? "next" : "previous");
        }
        CHECK(nccl_exchange(s, n, sending, peers, dev, BTC, NCCL_X, "activation/gradient exchange"));
        for (int i = 0; i < n; i++) links_count(&s->base.links, TRAFFIC_PIPELINE, sending[i], nbytes);
        return 0;
    }
    if ((size_t)n * nbytes > s->pinned_cap) {
        if (s->pinned) CUDA_CHECK(cudaFreeHost(s->pinned));
        s->pinned = NULL;
        s->pinned_cap = 0;
        CUDA_CHECK(cudaHostAlloc((void **)&s->pinned, (size_t)n * nbytes, cudaHostAllocDefault));
        s->pinned_cap = (size_t)n * nbytes;
    }
    void *bufs[MAX_GROUP];
    for (int i = 0; i < n; i++) {
        bufs[i] = s->pinned + (size_t)i * nbytes;
        if (ops[OP_INTS * i] == OP_SEND_ACT || ops[OP_INTS * i] == OP_SEND_GRAD)
            CUDA_CHECK(cudaMemcpyAsync(bufs[i], dev[i], nbytes, cudaMemcpyDeviceToHost, s->stream));
    }
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    CHECK(comm_group(&s->base.links, ops, n, bufs, nbytes));
    for (int i = 0; i < n; i++)
        if (ops[OP_INTS * i] == OP_RECV_ACT || ops[OP_INTS * i] == OP_RECV_GRAD)
            CUDA_CHECK(cudaMemcpyAsync(dev[i], bufs[i], nbytes, cudaMemcpyHostToDevice, s->stream));
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}

int gpt_nccl_unique_id(unsigned char id[GPT_NCCL_ID_BYTES]) {
    ncclUniqueId u;
    static_assert(sizeof u == GPT_NCCL_ID_BYTES, "NCCL unique id size");
    NCCL_CHECK(ncclGetUniqueId(&u));
    memcpy(id, &u, sizeof u);
    return 0;
}

// (Re)makes *comm as rank `rank` of nranks from the id the rendezvous carried.
static int nccl_comm_init(Stage *s, ncclComm_t *comm, const unsigned char id[GPT_NCCL_ID_BYTES], int nranks, int rank) {
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return fail("NCCL: rank %d of %d ranks is out of range", rank, nranks);
    CUDA_CHECK(cudaSetDevice(s->device));
    if (*comm) { ncclCommDestroy(*comm); *comm = NULL; }
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    NCCL_CHECK(ncclCommInitRank(comm, nranks, u, rank));
    return 0;
}

int stage_set_nccl(Stage *s, const unsigned char id[GPT_NCCL_ID_BYTES], int nranks, int rank) {
    CHECK(nccl_comm_init(s, &s->nccl, id, nranks, rank));
    s->nccl_rank = rank;
    s->nccl_ranks = nranks;
    return 0;
}

int stage_set_replica_nccl(Stage *s, const unsigned char id[GPT_NCCL_ID_BYTES], int replicas, int replica) {
    if (s->base.zero > 0 && (replicas != s->base.links.replicas || replica != s->base.links.replica))
        return fail("NCCL: replica %d of %d, but the ring has this stage as replica %d of %d", replica, replicas,
                    s->base.links.replica, s->base.links.replicas);
    CHECK(nccl_comm_init(s, &s->replica_nccl, id, replicas, replica));
    return collective_buffer_make(s);
}

// ALLREDUCE of a bucket's device segments over NCCL: one ncclAllReduce per
// (tensor, layer) segment, in one group, on the stage's stream, waited for as
// the sends are. NCCL picks its own algorithm and order of the sums (not the
// sockets' canonical one), and its ring moves 2(D-1)/D * n values per segment
// each way (8(D-1)/D * n bytes in fp32), which is what the byte counters
// record (they cannot see NCCL's wire).
static int nccl_allreduce_bucket(Stage *s, cudaStream_t stream, const Segment *segs, int n, int bucket) {
    int D = s->base.links.replicas;
    NCCL_CHECK(ncclGroupStart());
    ncclResult_t r = ncclSuccess;
    for (int i = 0; i < n && r == ncclSuccess; i++)
        r = ncclAllReduce(segs[i].p, segs[i].p, segs[i].n, ncclFloat, ncclSum, s->replica_nccl, stream);
    ncclResult_t r2 = ncclGroupEnd();
    if (r != ncclSuccess || r2 != ncclSuccess)
        return fail("NCCL error in the all-reduce of bucket %d: %s", bucket, ncclGetErrorString(r != ncclSuccess ? r : r2));
    CHECK(nccl_wait(s, stream, &s->replica_nccl, "a data-parallel all-reduce"));
    for (int i = 0; i < n; i++) {
        uint64_t bytes = 2 * (uint64_t)(D - 1) * segs[i].n / D * sizeof(float);
        links_count(&s->base.links, TRAFFIC_DATA_PARALLEL, 1, bytes);
        links_count(&s->base.links, TRAFFIC_DATA_PARALLEL, 0, bytes);
    }
    return 0;
}

// The matmuls' copy of a bucket's parameters after an all-gather replaced
// them: each segment at its own offset in the copy xbase of the array base
// it lies in (d_params, or under --zero 3 the gathered buffer), then waits.
static int params_x_refresh(cudaStream_t stream, const Segment *segs, int n, const float *base, floatX *xbase) {
#ifdef GPT_FP32
    (void)segs; (void)n; (void)base; (void)xbase;
#else
    for (int i = 0; i < n; i++) {
        to_floatx_kernel<<<grid_for(segs[i].n, 256), 256, 0, stream>>>(xbase + (segs[i].p - base), segs[i].p,
                                                                        segs[i].n);
        LAUNCH_CHECK();
    }
#endif
    CUDA_CHECK(cudaStreamSynchronize(stream));
    return 0;
}

// Over NCCL (--zero 1 and 3): chunk j of each of a bucket's device segments
// into slot j of the packed buffer (to_slot), or back. Packing zeroes the
// slot's tail past the chunks, so the reduction never reads memory nothing wrote.
static int bucket_slot_copy(Stage *s, cudaStream_t stream, const Segment *segs, int n, int j, size_t slot,
                            int to_slot) {
    float *buf = s->d_collective + (size_t)j * slot;
    size_t at = 0, lo, hi;
    for (int i = 0; i < n; i++) {
        chunk_range(segs[i].n, j, s->base.links.replicas, &lo, &hi);
        float *chunk = segs[i].p + lo;
        CUDA_CHECK(cudaMemcpyAsync(to_slot ? buf + at : chunk, to_slot ? chunk : buf + at, (hi - lo) * sizeof(float),
                                   cudaMemcpyDeviceToDevice, stream));
        at += hi - lo;
    }
    if (to_slot && at < slot) CUDA_CHECK(cudaMemsetAsync(buf + at, 0, (slot - at) * sizeof(float), stream));
    return 0;
}

// REDUCE_SCATTER (of gradients) or ALLGATHER (of parameters) of a bucket's
// device segments over NCCL, in place on the packed buffer of D slots: the
// reduce-scatter packs every chunk j into slot j and leaves the sum of slot
// d, which goes back into chunk d; the all-gather packs chunk d into slot d
// and unpacks every slot. On the stage's stream, waited for as the sends are.
// Each moves (D-1) slots each way (4(D-1) * slot bytes in fp32, a little
// over (D-1)/D of the bucket for the padding), which the byte counters
// record (they cannot see NCCL's wire); NCCL picks its own order of the sums.
static int nccl_shard_collective(Stage *s, cudaStream_t stream, int gather, const Segment *segs, int n, int bucket) {
    int D = s->base.links.replicas, d = s->base.links.replica;
    size_t slot = bucket_slot_elems(s, bucket);
    if (!s->d_collective || (size_t)D * slot > s->collective_elems)
        return fail("stage [%d,%d): %s of bucket %d over NCCL but no packed buffer for it (--zero 1 and 3 set it up)",
                    s->layout.lo, s->layout.hi, gather ? "ALLGATHER" : "REDUCE_SCATTER", bucket);
    float *mine = s->d_collective + (size_t)d * slot;
    for (int j = 0; j < D; j++)
        if (!gather || j == d) CHECK(bucket_slot_copy(s, stream, segs, n, j, slot, 1));
    ncclResult_t r = gather ? ncclAllGather(mine, s->d_collective, slot, ncclFloat, s->replica_nccl, stream)
                            : ncclReduceScatter(s->d_collective, mine, slot, ncclFloat, ncclSum, s->replica_nccl,
                                                stream);
    if (r != ncclSuccess)
        return fail("NCCL error in the %s of bucket %d: %s", gather ? "all-gather" : "reduce-scatter", bucket,
                    ncclGetErrorString(r));
    CHECK(nccl_wait(s, stream, &s->replica_nccl,
                    gather ? "a data-parallel all-gather" : "a data-parallel reduce-scatter"));
    for (int j = 0; j < D; j++)
        if (gather ? j != d : j == d) CHECK(bucket_slot_copy(s, stream, segs, n, j, slot, 0));
    CUDA_CHECK(cudaStreamSynchronize(stream));
    uint64_t bytes = (uint64_t)(D - 1) * slot * sizeof(float);
    links_count(&s->base.links, TRAFFIC_DATA_PARALLEL, 1, bytes);
    links_count(&s->base.links, TRAFFIC_DATA_PARALLEL, 0, bytes);
    return 0;
}

// Chunk `part` of `parts` of each of a bucket's segments between the device
// (dev) and the host mirror (host), then waits.
static int bucket_host_copy(cudaStream_t stream, const Segment *dev, const Segment *host, int n, int part, int parts,
                            int to_host) {
    size_t lo, hi;
    for (int i = 0; i < n; i++) {
        chunk_range(dev[i].n, part, parts, &lo, &hi);
        float *d = dev[i].p + lo, *h = host[i].p + lo;
        CUDA_CHECK(cudaMemcpyAsync(to_host ? h : d, to_host ? d : h, (hi - lo) * sizeof(float),
                                   to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice, stream));
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    return 0;
}

// ALLREDUCE / REDUCE_SCATTER of a bucket's gradients, ALLGATHER of its
// parameters, on its device segments dev (in the stage's arrays, or under
// --zero 3 in the bucket's buffer): NCCL when the replicas have GPUs of
// their own, else common.h's socket ring with the bucket staged through the
// host mirrors, copying only what the ring reads or changed. The ring's sums
// are canonical, so over sockets --zero 1 and 3 are bitwise zero 0.
static int bucket_collective(Stage *s, cudaStream_t stream, int kind, const Segment *dev, int n, int bucket) {
    int gather = kind == OP_ALLGATHER, D = s->base.links.replicas, d = s->base.links.replica;
    if (s->replica_nccl)
        return kind == OP_ALLREDUCE ? nccl_allreduce_bucket(s, stream, dev, n, bucket)
                                    : nccl_shard_collective(s, stream, gather, dev, n, bucket);
    int tensors[NUM_PARAM_TENSORS], layers[NUM_PARAM_TENSORS];
    Segment host[NUM_PARAM_TENSORS];
    bucket_in(s, IN_HOST_LAYOUT, gather ? s->h_params : s->h_grads, bucket, host, tensors, layers);
    // down: the whole gradients, or the parameters' chunk d that the all-gather starts from
    CHECK(bucket_host_copy(stream, dev, host, n, gather ? d : 0, gather ? D : 1, 1));
    if (!gather) CHECK(ring_collective(&s->base.links, host, n, bucket, 0));
    if (kind != OP_REDUCE_SCATTER) CHECK(ring_collective(&s->base.links, host, n, bucket, 1));
    // up: after a reduce-scatter only chunk d is summed; the rest are partial sums
    int scattered = kind == OP_REDUCE_SCATTER;
    return bucket_host_copy(stream, dev, host, n, scattered ? d : 0, scattered ? D : 1, 0);
}

// ----------------------------------------------------------------------------
// executor: one rank's op list for one step, with no Python in the loop. The
// loop is common.h's run_op_list; these are its hooks (the message ones are
// with the transport above).
//
// --zero 3 (FSDP), as train_gpt.c runs it: the stage keeps chunk d of every
// segment of its parameters, gradients and AdamW state. In a step, a layer's
// whole parameters exist only from its ALLGATHER to its FREE, in a device
// buffer of the gathered pool (with the matmuls' copy, refreshed after the
// gather), and its whole gradient from its first BWD_WEIGHT to its
// REDUCE_SCATTER, in a buffer of the gradient pool; both pools have what the
// validator counted as this rank's peak. The micro-batches' gradients sum in
// the buffer, then over the ring: zero 0's order, so over the sockets zero 3
// is bitwise zero 0. The whole-tensor bucket (wte, wpe, lnf) has its own two
// buffers, gathered at the start of the step and held to its end. The
// collectives run on common.h's comm thread (Fsdp), on a stream of their
// own, so the gather of layer l+1 overlaps the compute of layer l. The two
// streams need no events: the compute thread waits for its stream after
// every compute op (hook_op_done), so whatever it hands the comm thread has
// nothing in flight, and it waits for the comm thread (under the Fsdp lock)
// before it touches what a collective wrote.

// The device half of an ALLGATHER or REDUCE_SCATTER of the bucket in buf, on
// the comm thread and comm_stream: fill buf with the bucket's whole
// parameters (and their matmuls' copy), or sum buf over the replicas into
// this replica's shard of d_grads.
static int fsdp_ring(void *stage, int kind, int bucket, float *buf) {
    Stage *s = (Stage *)stage;
    int tensors[NUM_PARAM_TENSORS], layers[NUM_PARAM_TENSORS];
    Segment segs[NUM_PARAM_TENSORS];
    CUDA_CHECK(cudaSetDevice(s->device));  // the current device is the thread's
    int n = bucket_in(s, IN_BUCKET_BUFFER, buf, bucket, segs, tensors, layers);
    if (kind == OP_ALLGATHER) {  // this replica's chunks, then the others' from the ring
        CHECK(bucket_chunks_copy(s, s->comm_stream, segs, tensors, n, bucket, s->d_params, 0));
        CHECK(bucket_collective(s, s->comm_stream, kind, segs, n, bucket));
        return params_x_refresh(s->comm_stream, segs, n, buf, params_x_of(s, buf));
    }
    CHECK(bucket_collective(s, s->comm_stream, kind, segs, n, bucket));
    CHECK(bucket_chunks_copy(s, s->comm_stream, segs, tensors, n, bucket, s->d_grads, 1));
    CUDA_CHECK(cudaStreamSynchronize(s->comm_stream));
    return 0;
}

// --zero 3 after the last step: the whole stage's parameters, gathered once
// into the device layout (with the matmuls' copy, and zeroed gradients), so
// sampling and forward-only lists work as under --zero 1.
int stage_unshard_params(Stage *s) {
    if (!s->sharded) return 0;
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    CHECK(params_relayout(s, s->P_dev * sizeof(float), 0));
#ifdef GPT_FP32
    s->d_params_x = s->d_params;
#else
    CUDA_CHECK(cudaMalloc((void **)&s->d_params_x, s->P_dev * sizeof(bf16)));
#endif
    s->sharded = 0;
    for (int b = 0; b <= s->layout.nl; b++) {
        int tensors[NUM_PARAM_TENSORS], layers[NUM_PARAM_TENSORS];
        Segment segs[NUM_PARAM_TENSORS];
        int n = bucket_in(s, IN_DEVICE_LAYOUT, s->d_params, b, segs, tensors, layers);
        CHECK(bucket_collective(s, s->stream, OP_ALLGATHER, segs, n, b));
    }
    CHECK(refresh_params_x(s));
    norm_segments_plan(s);
    CHECK(norm_segments_upload(s));
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}

// ALLREDUCE / REDUCE_SCATTER of a bucket's gradients, ALLGATHER of its
// parameters (--zero 1, after AdamW updated chunk d), in the stage's own
// arrays; under --zero 3 queued for the comm thread, FREE too.
static int hook_collective(void *stage, int kind, int bucket) {
    Stage *s = (Stage *)stage;
    // the replicas sum the whole d(wte), so each first completes its own
    if (reduces_wte(&s->layout, kind, bucket)) CHECK(stage_sum_wte_grads(s));
    if (s->sharded) return fsdp_collective(&s->fsdp, kind, bucket, s->run.op);
    if (kind == OP_FREE) return fail("FREE of bucket %d: only --zero 3 gathers buckets to free", bucket);
    int gather = kind == OP_ALLGATHER, tensors[NUM_PARAM_TENSORS], layers[NUM_PARAM_TENSORS];
    Segment segs[NUM_PARAM_TENSORS];
    int n = bucket_in(s, IN_DEVICE_LAYOUT, gather ? s->d_params : s->d_grads, bucket, segs, tensors, layers);
    CHECK(bucket_collective(s, s->stream, kind, segs, n, bucket));
    return gather ? params_x_refresh(s->stream, segs, n, s->d_params, s->d_params_x) : 0;
}

static int hook_begin(void *stage, int m, int training) {
    Stage *s = (Stage *)stage;
    if (m > s->d_mb_cap) {
        CUDA_CHECK(cudaFree(s->d_mb_losses));
        s->d_mb_losses = NULL;
        s->d_mb_cap = 0;
        CUDA_CHECK(cudaMalloc(&s->d_mb_losses, m * sizeof(float)));
        s->d_mb_cap = m;
    }
    if (m) CUDA_CHECK(cudaMemsetAsync(s->d_mb_losses, 0, m * sizeof(float), s->stream));
    if (s->sharded) fsdp_list_begin(&s->fsdp);
    if (training && m) {  // a step's list; one without micro-batches works on the gradients as they are
        s->wte_summed = 0;
        // under --zero 3 a layer's gradient buffer is zeroed when a list takes it
        float *grads = s->sharded ? s->fsdp.whole[1] : s->d_grads;
        CUDA_CHECK(cudaMemsetAsync(grads, 0, (s->sharded ? s->whole_elems : s->P_dev) * sizeof(float), s->stream));
        if (s->layout.first)
            CUDA_CHECK(cudaMemsetAsync(s->d_dwte_embed, 0, s->layout.sizes[P_WTE] * sizeof(float), s->stream));
    }
    // the comm thread's gathers read the shard that AdamW wrote on this stream
    if (s->sharded) CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}

static int hook_forward(void *stage, int acts_index, int mb, int part, const int *inputs, const int *targets,
                        float dloss, int training) {
    Stage *s = (Stage *)stage;
    Activations *acts = &s->acts[acts_index];
    int l0, l1, nl = s->layout.nl;
    op_layers(&s->layout, part, &l0, &l1);
    if (s->sharded) CHECK(fsdp_wait_gathered(&s->fsdp, &s->run, OP_FWD, l0, l1));
    // the inputs with layer 0 (the embedding), the targets with the last (the loss)
    inputs = l0 == 0 ? inputs : NULL;
    targets = l1 == nl ? targets : NULL;
    if (inputs || targets) PROF(PC_COPY, CHECK(upload_tokens(s, acts, inputs, targets, mb)));
    CHECK(stage_forward(s, acts, s->B, s->T, l0, l1));
    if (s->layout.last && l1 == nl) CHECK(stage_loss(s, acts, mb, dloss, training));
    return 0;
}

static int hook_backward_input(void *stage, int acts_index, int part, float dloss) {
    (void)dloss;  // stage_loss fused it into d(logits)
    Stage *s = (Stage *)stage;
    int l0, l1;
    op_layers(&s->layout, part, &l0, &l1);
    if (s->sharded) CHECK(fsdp_wait_gathered(&s->fsdp, &s->run, OP_BWD_INPUT, l0, l1));
    return stage_backward_input(s, &s->acts[acts_index], l0, l1);
}

static int hook_backward_weight(void *stage, int acts_index, int part) {
    Stage *s = (Stage *)stage;
    int l0, l1;
    op_layers(&s->layout, part, &l0, &l1);
    float *fresh[MAX_LAYERS];  // --zero 3: the gradient buffers its layers took, which the micro-batches sum into
    if (s->sharded) {
        CHECK(fsdp_take_grad_buffers(&s->fsdp, &s->run, l0, l1, fresh));
        for (int l = l0; l < l1; l++)
            if (fresh[l - l0])
                CUDA_CHECK(cudaMemsetAsync(fresh[l - l0], 0, s->fsdp.pools[1].elems * sizeof(float), s->stream));
    }
    return stage_backward_weight(s, &s->acts[acts_index], l0, l1);
}

// compute ops: wait for the work, so op times are the GPU's and faults surface here
static int hook_op_done(void *stage, int kind, double t_start) {
    Stage *s = (Stage *)stage;
    if (is_message(kind) || is_bucket_op(kind)) {
        if (s->prof.on) s->prof.comm_ms += 1e3 * (now_seconds() - t_start);
        return 0;
    }
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}

static int hook_end(void *stage, int m) {
    Stage *s = (Stage *)stage;
    if (m) {
        CUDA_CHECK(cudaMemcpyAsync(s->run.mb_losses, s->d_mb_losses, m * sizeof(float), cudaMemcpyDeviceToHost, s->stream));
        CUDA_CHECK(cudaStreamSynchronize(s->stream));
    }
    return s->sharded ? fsdp_list_end(&s->fsdp, &s->run) : 0;
}

static const StageHooks CUDA_HOOKS = {hook_begin, hook_forward, hook_backward_input, hook_backward_weight,
                                      hook_message_buffers, hook_exchange, hook_collective, hook_op_done, hook_end};

int stage_run(Stage *s, const int *ops, int nops, const int *inputs, const int *targets, int training,
              float *loss_sum) {
    *loss_sum = 0.0f;
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    if (s->prof.on) {
        CHECK(prof_flush(s));
        if (++s->prof.runs == 2) {  // the first step is warmup
            memset(s->prof.ms, 0, sizeof s->prof.ms);
            memset(s->prof.calls, 0, sizeof s->prof.calls);
            s->prof.comm_ms = 0.0;
        }
    }
    int rc = run_op_list(&CUDA_HOOKS, s, &s->run, &s->layout, (size_t)s->B * s->T, s->base.links.replicas, ops, nops,
                         inputs, targets, training, loss_sum);
    if (rc) {  // leave nothing in flight on failure
        if (s->sharded) fsdp_list_failed(&s->fsdp);
        cudaStreamSynchronize(s->stream);
    }
    return rc;
}

// ----------------------------------------------------------------------------
// optimizer

int stage_sum_wte_grads(Stage *s) {
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    if ((!s->layout.first && !s->layout.last) || s->wte_summed) return 0;
    size_t n = s->layout.sizes[P_WTE];
    float *head = grad_of(s, P_WTE, 0);
    if (!(s->layout.first && s->layout.last)) {
        // the first stage has the embedding's part, the last the head's: swap
        // them (the last stage receives into its d_dwte_embed scratch)
        if (!s->d_dwte_embed) CUDA_CHECK(cudaMalloc(&s->d_dwte_embed, n * sizeof(float)));
        float *send = s->layout.first ? s->d_dwte_embed : head, *recv = s->layout.first ? head : s->d_dwte_embed;
        if (s->nccl) {
            // the other end of this replica's pipeline: ranks are replica * S + stage
            int S = s->nccl_ranks / s->base.links.replicas;
            int peer = S == 1 ? s->nccl_rank : s->layout.first ? s->nccl_rank + S - 1 : s->nccl_rank - (S - 1);
            int sending[2] = {1, 0}, peers[2] = {peer, peer};
            void *bufs[2] = {send, recv};
            // fp32 on the wire: both ends must add the very same numbers
            PROF(PC_SUM_WTE, CHECK(nccl_exchange(s, 2, sending, peers, bufs, n, ncclFloat, "the d(wte) swap")));
            for (int i = 0; i < 2; i++) links_count(&s->base.links, TRAFFIC_TIED, sending[i], n * sizeof(float));
        } else {
            if (!s->h_swap_send) s->h_swap_send = (float *)malloc(n * sizeof(float));
            if (!s->h_swap_recv) s->h_swap_recv = (float *)malloc(n * sizeof(float));
            if (!s->h_swap_send || !s->h_swap_recv) return fail("out of host memory for d(wte)");
            CUDA_CHECK(cudaMemcpyAsync(s->h_swap_send, send, n * sizeof(float), cudaMemcpyDeviceToHost, s->stream));
            CUDA_CHECK(cudaStreamSynchronize(s->stream));
            CHECK(tied_swap(&s->base.links, s->h_swap_send, s->h_swap_recv, n * sizeof(float)));
            CUDA_CHECK(cudaMemcpyAsync(recv, s->h_swap_recv, n * sizeof(float), cudaMemcpyHostToDevice, s->stream));
        }
    }
    float *embed = s->d_dwte_embed;
    PROF(PC_SUM_WTE, {
        add_kernel<<<grid_for(n, 256), 256, 0, s->stream>>>(head, embed, n);
        LAUNCH_CHECK();
    });
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    s->wte_summed = 1;
    return 0;
}

static int grad_norm_parts(Stage *s, double *parts) {
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    if (s->norm_blocks > 0) {
        PROF(PC_NORM, {
            sumsq_kernel<<<s->norm_blocks, NORM_THREADS, 0, s->stream>>>(s->d_norm_partials, s->d_grads, s->d_segs,
                                                                        s->d_block_seg);
            LAUNCH_CHECK();
        });
        CUDA_CHECK(cudaMemcpyAsync(s->h_norm_partials, s->d_norm_partials, s->norm_blocks * sizeof(double),
                                   cudaMemcpyDeviceToHost, s->stream));
        CUDA_CHECK(cudaStreamSynchronize(s->stream));
    }
    for (int i = 0; i < s->nsegs; i++) {
        double acc = 0.0;
        for (int b = 0; b < s->segs[i].nblocks; b++) acc += s->h_norm_partials[s->segs[i].first_block + b];
        parts[s->segs[i].part] = acc;
    }
    return 0;
}

// Each (tensor, layer) part over this replica's chunk of the segment (all of
// it when D = 1; see norm_segments_plan): the launcher adds the D chunks'
// parts in replica order.
void stage_grad_norm_parts(Stage *s, double *parts) {
    memset(parts, 0, sizeof(double) * NUM_PARAM_TENSORS * s->layout.cfg.num_layers);
    if (grad_norm_parts(s, parts)) mark_broken(s);
}

// --zero 1 and 3: AdamW on chunk d of each segment, its m and v packed in the
// shard (zero 1's ALLGATHER spreads the other chunks after the step; zero 3
// keeps the parameters and gradients packed there too, and its gathers make
// the matmuls' copies). A chunk starts
// anywhere in its segment, so the CUDA C kernel runs (the PTX twin wants
// whole padded segments); the two are bitwise the same.
static int adamw_shard(Stage *s, float lr, float weight_decay, float grad_scale, float b1, float b2, float bc1,
                       float bc2, float eps) {
    int part, parts;
    optimizer_shard(s, &part, &parts);
    size_t at_shard = 0;
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        float wd = is_matrix(t) ? weight_decay : 0.0f;
        size_t lo, hi;
        chunk_range(seg_elems(s, t), part, parts, &lo, &hi);
        for (int l = 0; l < seg_count(s, t) && hi > lo; l++, at_shard += hi - lo) {
            size_t o = s->sharded ? at_shard : s->dev_start[t] + l * s->dev_stride[t] + lo;
#ifdef GPT_FP32
            floatX *px = NULL;
#else
            floatX *px = s->sharded ? NULL : s->d_params_x + o;
#endif
            PROF(PC_ADAMW, {
                adamw_kernel<<<grid_for(hi - lo, 256), 256, 0, s->stream>>>(s->d_params + o, px, s->d_grads + o,
                                                                           s->d_m + at_shard, s->d_v + at_shard,
                                                                           hi - lo, lr, b1, b2, bc1, bc2, eps, wd,
                                                                           grad_scale);
                LAUNCH_CHECK();
            });
        }
    }
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}

static int adamw(Stage *s, float lr, float weight_decay, float grad_scale, int step) {
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    const float b1 = 0.9f, b2 = 0.95f, eps = 1e-8f;
    float bc1 = 1.0f - powf(b1, (float)step), bc2 = 1.0f - powf(b2, (float)step);
    if (s->base.zero > 0) return adamw_shard(s, lr, weight_decay, grad_scale, b1, b2, bc1, bc2, eps);
    for (int t = 0; t < NUM_PARAM_TENSORS; t++) {
        size_t n = s->dev_len[t], o = s->dev_start[t];
        if (!n) continue;
        float wd = is_matrix(t) ? weight_decay : 0.0f;
#ifdef GPT_FP32
        floatX *px = NULL;
#else
        floatX *px = s->d_params_x + o;
#endif
        PROF(PC_ADAMW, {
            if (s->ptx & PTX_ADAMW) {  // n: whole 128-element padded segments, a multiple of 4
                float *p = s->d_params + o, *g = s->d_grads + o, *m = s->d_m + o, *v = s->d_v + o;
                float a_b1 = b1, a_b2 = b2, a_eps = eps;
                void *args[] = {&p, &px, &g, &m, &v, &n, &lr, &a_b1, &a_b2, &bc1, &bc2, &a_eps, &wd, &grad_scale};
                CHECK(ptx_launch(s, PK_ADAMW, grid_for((n + 3) / 4, 256), 256, args));
            } else
                adamw_kernel<<<grid_for(n, 256), 256, 0, s->stream>>>(s->d_params + o, px, s->d_grads + o,
                                                                      s->d_m + o, s->d_v + o, n, lr, b1, b2, bc1,
                                                                      bc2, eps, wd, grad_scale);
            LAUNCH_CHECK();
        });
    }
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}

void stage_adamw(Stage *s, float lr, float weight_decay, float grad_scale, int step) {
    if (adamw(s, lr, weight_decay, grad_scale, step)) mark_broken(s);
}

// ----------------------------------------------------------------------------
// the device half of the API

int gpt_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

// (under --zero 3 the stage has no whole tensors to show: d(wte)'s embedding part only)
static int sync_to_host(Stage *s) {
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    if (!s->sharded) {
        CHECK(download_params(s, s->h_params, s->d_params));
        CHECK(download_params(s, s->h_grads, s->d_grads));
    }
    if (s->layout.first) {
        CUDA_CHECK(cudaMemcpyAsync(s->h_dwte_embed, s->d_dwte_embed, s->layout.sizes[P_WTE] * sizeof(float),
                                   cudaMemcpyDeviceToHost, s->stream));
        CUDA_CHECK(cudaStreamSynchronize(s->stream));
    }
    return 0;
}
void stage_sync_to_host(Stage *s) { if (sync_to_host(s)) mark_broken(s); }

// (under --zero 3 this replica's chunks of the host mirror's parameters
// into the shard: stage_init and stage_load draw or read the whole stage)
static int sync_to_device(Stage *s) {
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    if (s->sharded) {
        CHECK(stage_chunks_copy(s, IN_HOST_LAYOUT, s->h_params, s->d_params, 1));
    } else {
        CHECK(upload_params(s, s->d_params, s->h_params));
        CHECK(refresh_params_x(s));
    }
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}
void stage_sync_to_device(Stage *s) { if (sync_to_device(s)) mark_broken(s); }

float *stage_wte_embed_grad(Stage *s, size_t *n) {
    *n = s->layout.first ? s->layout.sizes[P_WTE] : 0;
    if (!s->layout.first) return NULL;
    // the binding reads this without a sync first: refresh it here
    if (cudaSetDevice(s->device) != cudaSuccess ||
        cudaMemcpyAsync(s->h_dwte_embed, s->d_dwte_embed, *n * sizeof(float), cudaMemcpyDeviceToHost,
                        s->stream) != cudaSuccess ||
        cudaStreamSynchronize(s->stream) != cudaSuccess) {
        fail("copying d(wte) to the host failed: %s", cudaGetErrorString(cudaGetLastError()));
        mark_broken(s);
    }
    return s->h_dwte_embed;
}

int stage_init(Stage *s, uint64_t seed) {
    init_params(&s->layout, s->h_params, seed);
    return sync_to_device(s);
}

// A test-only entry point (not in gpt.h; tests reach it through ctypes): a
// one-rank NCCL communicator sends n floats to itself in one group, as the
// executor's groups do, first as fp32 and then the same bytes as 2n bf16;
// the received bytes must equal the sent ones. Then it runs each
// data-parallel collective (all-reduce, reduce-scatter, all-gather), which
// over one rank must return its input exactly.
extern "C" int gpt_cuda_nccl_selftest(int n) {
    if (n < 1) return fail("selftest: n must be positive");
    if (gpt_device_count() < 1) return fail("no CUDA device");
    CUDA_CHECK(cudaSetDevice(0));
    ncclUniqueId u;
    NCCL_CHECK(ncclGetUniqueId(&u));
    ncclComm_t comm;
    NCCL_CHECK(ncclCommInitRank(&comm, 1, u, 0));
    int rc = -1;
    float *h = (float *)malloc(2 * (size_t)n * sizeof(float)), *d = NULL;
    cudaStream_t st = NULL;
    if (!h) { fail("out of host memory"); goto done; }
    for (int i = 0; i < n; i++) h[i] = (float)(i % 251) - 125.0f + 1.0f / (1 + i % 7);
    if (cudaStreamCreate(&st) != cudaSuccess || cudaMalloc(&d, 2 * (size_t)n * sizeof(float)) != cudaSuccess ||
        cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice) != cudaSuccess) {
        fail("CUDA setup failed: %s", cudaGetErrorString(cudaGetLastError()));
        goto done;
    }
    for (int pass = 0; pass < 2; pass++) {
        ncclDataType_t dt = pass == 0 ? ncclFloat : ncclBfloat16;
        size_t count = pass == 0 ? (size_t)n : 2 * (size_t)n;
        if (cudaMemset(d + n, 0, n * sizeof(float)) != cudaSuccess) {
            fail("CUDA error: %s", cudaGetErrorString(cudaGetLastError()));
            goto done;
        }
        ncclResult_t r = ncclGroupStart();
        if (r == ncclSuccess) r = ncclSend(d, count, dt, 0, comm, st);
        if (r == ncclSuccess) r = ncclRecv(d + n, count, dt, 0, comm, st);
        ncclResult_t r2 = ncclGroupEnd();
        if (r != ncclSuccess || r2 != ncclSuccess) {
            fail("NCCL send/recv to self failed: %s", ncclGetErrorString(r != ncclSuccess ? r : r2));
            goto done;
        }
        if (cudaStreamSynchronize(st) != cudaSuccess ||
            cudaMemcpy(h + n, d + n, n * sizeof(float), cudaMemcpyDeviceToHost) != cudaSuccess) {
            fail("CUDA error after NCCL: %s", cudaGetErrorString(cudaGetLastError()));
            goto done;
        }
        if (memcmp(h, h + n, n * sizeof(float)) != 0) {
            fail("NCCL send/recv to self (%s) delivered different bytes", pass == 0 ? "fp32" : "bf16");
            goto done;
        }
    }
    // the data-parallel collectives: over one rank, each must hand back its input
    for (int op = 0; op < 3; op++) {
        const char *name[3] = {"ncclAllReduce", "ncclReduceScatter", "ncclAllGather"};
        ncclResult_t r = cudaMemset(d + n, 0, n * sizeof(float)) == cudaSuccess ? ncclSuccess : ncclUnhandledCudaError;
        if (r == ncclSuccess)
            r = op == 0 ? ncclAllReduce(d, d + n, n, ncclFloat, ncclSum, comm, st)
              : op == 1 ? ncclReduceScatter(d, d + n, n, ncclFloat, ncclSum, comm, st)
                        : ncclAllGather(d, d + n, n, ncclFloat, comm, st);
        if (r != ncclSuccess) {
            fail("%s on one rank failed: %s", name[op], ncclGetErrorString(r));
            goto done;
        }
        if (cudaStreamSynchronize(st) != cudaSuccess ||
            cudaMemcpy(h + n, d + n, n * sizeof(float), cudaMemcpyDeviceToHost) != cudaSuccess) {
            fail("CUDA error after %s: %s", name[op], cudaGetErrorString(cudaGetLastError()));
            goto done;
        }
        if (memcmp(h, h + n, n * sizeof(float)) != 0) {
            fail("%s on one rank did not hand back its input", name[op]);
            goto done;
        }
    }
    rc = 0;
done:
    if (d) cudaFree(d);
    if (st) cudaStreamDestroy(st);
    free(h);
    ncclCommDestroy(comm);
    return rc;
}

// ----------------------------------------------------------------------------
// checkpoint I/O (the file formats are in common.h), through the host mirrors

int stage_load(Stage *s, const char *path) {
    CHECK(model_file_read(&s->layout, path, s->h_params));
    return sync_to_device(s);
}

// The host mirrors of m and v (and under --zero 3 of the parameters' shard)
// hold the optimizer shard (shard_elems), which is the stage layout under
// zero 0 (part 0 of 1).
static int ensure_moment_mirrors(Stage *s) {
    int part, parts;
    optimizer_shard(s, &part, &parts);
    size_t n = shard_elems(&s->layout, part, parts);
    if (!s->h_m) s->h_m = (float *)calloc(n > 0 ? n : 1, sizeof(float));
    if (!s->h_v) s->h_v = (float *)calloc(n > 0 ? n : 1, sizeof(float));
    if (s->sharded && !s->h_shard) s->h_shard = (float *)calloc(n > 0 ? n : 1, sizeof(float));
    return s->h_m && s->h_v && (!s->sharded || s->h_shard) ? 0 : fail("out of host memory for the AdamW state");
}

// m and v (and under --zero 3 the parameters' shard) between the device and
// their host mirrors: zero 0's are in the padded device layout, the shards of
// --zero 1 and 3 are packed alike on both sides.
static int moments_copy(Stage *s, int to_host) {
    if (s->base.zero == 0)
        return to_host ? download_params(s, s->h_m, s->d_m) || download_params(s, s->h_v, s->d_v)
                       : upload_params(s, s->d_m, s->h_m) || upload_params(s, s->d_v, s->h_v);
    cudaMemcpyKind dir = to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
    size_t bytes = s->opt_elems * sizeof(float);
    float *host[3] = {s->h_m, s->h_v, s->h_shard}, *dev[3] = {s->d_m, s->d_v, s->d_params};
    for (int i = 0; i < 2 + s->sharded; i++)
        CUDA_CHECK(cudaMemcpyAsync(to_host ? host[i] : dev[i], to_host ? dev[i] : host[i], bytes, dir, s->stream));
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    return 0;
}

// zero 0: replica 0 writes what every replica holds alike; --zero 1 and 3:
// replica d writes chunk d of every segment, parameters and moments, so the
// D replicas write one whole llm.c model file and state file between them.
int stage_write_checkpoint(Stage *s, const char *dir, const TrainState *ts) {
    CHECK(check_broken(s));
    if (s->base.zero == 0 && s->base.links.replica > 0) return 0;
    CUDA_CHECK(cudaSetDevice(s->device));
    CHECK(ensure_moment_mirrors(s));
    if (!s->sharded) CHECK(download_params(s, s->h_params, s->d_params));
    CHECK(moments_copy(s, 1));
    int part, parts;
    optimizer_shard(s, &part, &parts);
    return checkpoint_files_write(&s->layout, dir, ts, s->sharded ? s->h_shard : s->h_params, s->sharded, s->h_m,
                                  s->h_v, part, parts);
}

// Every replica reads the whole parameters (under --zero 3 its chunks of
// them) and its shard of m and v (whatever split wrote them).
int stage_read_checkpoint(Stage *s, const char *dir, int64_t step, TrainState *ts) {
    CHECK(check_broken(s));
    CUDA_CHECK(cudaSetDevice(s->device));
    CHECK(ensure_moment_mirrors(s));
    int part, parts;
    optimizer_shard(s, &part, &parts);
    CHECK(checkpoint_files_read(&s->layout, dir, step, ts, s->sharded ? s->h_shard : s->h_params, s->sharded,
                                s->h_m, s->h_v, part, parts));
    CHECK(moments_copy(s, 0));
    return s->sharded ? 0 : sync_to_device(s);
}

// ----------------------------------------------------------------------------
// sampling: the forward pass over a fixed window of T tokens (causal, so the
// zeros after the last real token change nothing before it), logits of the
// last real position in fp32, top-k on the host

int stage_sample(Stage *s, const int *prompt, int np, int n, float temperature, int top_k, uint64_t seed, int *out) {
    if ((top_k = sample_check(&s->layout, prompt, np, top_k)) < 0) return -1;
    CHECK(check_broken(s));
    if (s->sharded) return fail("sampling needs the whole parameters: stage_unshard_params first (--zero 3)");
    CUDA_CHECK(cudaSetDevice(s->device));
    int V = s->layout.cfg.vocab_size, C = s->layout.cfg.channels, T = s->T;
    Candidate *cand = (Candidate *)malloc(sizeof(Candidate) * top_k);
    int *window = (int *)calloc(T, sizeof(int));
    if (!cand || !window) { free(cand); free(window); return fail("out of host memory for sampling"); }
    memcpy(out, prompt, np * sizeof(int));
    Activations *acts = &s->acts[0];
    uint64_t rng = seed;
    int rc = -1;
    for (int len = np; len < np + n; len++) {
        int used = len < T ? len : T;
        memset(window, 0, T * sizeof(int));
        memcpy(window, out + len - used, used * sizeof(int));
        if (cudaMemcpyAsync(acts->inputs, window, T * sizeof(int), cudaMemcpyHostToDevice, s->stream) != cudaSuccess) {
            fail("CUDA error: %s", cudaGetErrorString(cudaGetLastError()));
            goto done;
        }
        if (stage_forward(s, acts, 1, T, 0, s->layout.nl)) goto done;
        lm_head_row_kernel<<<(V + 7) / 8, 256, 0, s->stream>>>(s->d_sample_logits, acts->lnf + (size_t)(used - 1) * C,
                                                               xparam(s, P_WTE, 0), V, C);
        if (cudaGetLastError() != cudaSuccess ||
            cudaMemcpyAsync(s->h_sample_logits, s->d_sample_logits, V * sizeof(float), cudaMemcpyDeviceToHost,
                            s->stream) != cudaSuccess ||
            cudaStreamSynchronize(s->stream) != cudaSuccess) {
            fail("CUDA error while sampling: %s", cudaGetErrorString(cudaGetLastError()));
            goto done;
        }
        out[len] = sample_top_k(s->h_sample_logits, V, temperature, top_k, &rng, cand);
    }
    rc = 0;
done:
    free(cand);
    free(window);
    return rc;
}

// ----------------------------------------------------------------------------
// main: ./train_gpt_cu, the flags of ./train_gpt (-h lists them). The loop is
// common.h's train_main, written once for both trainers: it drives this
// file's stage API through the table below, and check_broken reports a
// failure that a void call of it recorded.

#ifdef TRAIN_GPT_MAIN
static void describe_gpu(Stage *s) {
    cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, s->device);
    printf("device %d: %s (%s, attention %s)\n", s->device, prop.name, PRECISION_NAME,
           s->attn_mma == ATTN_MMA_PIPELINED ? "tensor-core, pipelined" : s->attn_mma ? "tensor-core" : "simple");
}

// this file's stage API, in the order of common.h's Trainer
static const Trainer GPU_TRAINER = {"./train_gpt_cu", stage_create, stage_load, stage_init, stage_read_checkpoint,
                                    stage_run, stage_sum_wte_grads, stage_grad_norm_parts, stage_adamw,
                                    stage_write_checkpoint, stage_sample, stage_free, check_broken, describe_gpu};

int main(int argc, char **argv) { return train_main(argc, argv, &GPU_TRAINER); }
#endif
