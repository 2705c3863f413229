// dev/kernel_bench.cu: the PTX kernels of asm/ against their CUDA C twins
// (tests/test_ptx.py) and their times (dev/bench/bench_ptx.py), and the TMA +
// wgmma GEMM of asm/gemm.ptx against cuBLASLt. It is test and benchmark
// harness, not trainer, so it lives here and not in train_gpt.cu: it includes
// the trainer, so that it drives the trainer's own launchers (ptx_launch,
// matmul_forward, ...) on the same inputs, and builds as its own library,
// build/libkernel_bench.so, which the tests and the benchmark load with ctypes.
// Only the bf16 build has PTX kernels, so this is built without GPT_FP32.
//
//
// gpt_cuda_ptx_bench(kernel, n, C, iters, res): kernel 0 AdamW (n elements),
// 1 GELU forward, 2 GELU backward (n elements), 3 layernorm forward, 4
// layernorm backward input with a residual (n rows of C), 5 a device-to-device
// cudaMemcpy of n bytes, 6 softmax + cross-entropy with its gradient (n rows
// of C = V logits, padded to a multiple of 128). Each variant runs once on the same inputs into its
// own outputs, which are compared; then, when iters > 0, each is timed over
// iters launches (after one warmup) with cudaEvents. res[0] CUDA C ms per
// launch, res[1] PTX ms per launch, res[2] bytes a launch must read and write,
// res[3] output elements that differ bitwise, res[4] the largest |difference|
// relative to the largest |CUDA C output| (the worst over the outputs),
// res[5] output elements compared.

#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled: the driver call, found at run time (no -lcuda)

#include "../train_gpt.cu"

__device__ __forceinline__ float ptxb_f(float x) { return x; }
__device__ __forceinline__ float ptxb_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void ptxb_set(float *p, float x) { *p = x; }
__device__ __forceinline__ void ptxb_set(bf16 *p, float x) { *p = __float2bfloat16(x); }
__device__ __forceinline__ void ptxb_set(unsigned char *p, float x) { *p = (unsigned char)(int)x; }
__device__ __forceinline__ void ptxb_set(int *p, float x) { *p = (int)x; }

// deterministic values offset + scale * u, u in [-1, 1)
template <typename T>
__global__ void ptxb_fill_kernel(T *f, size_t n, unsigned seed, float scale, float offset) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned x = (unsigned)i * 0x9E3779B9u ^ (unsigned)(i >> 32) ^ (seed * 0x85EBCA6Bu + 0x165667B1u);
        x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
        ptxb_set(&f[i], offset + scale * ((float)(x >> 8) * (2.0f / 16777216.0f) - 1.0f));
    }
}

// st[0] += elements whose bits differ, st[1] = max |a - b|, st[2] = max |a| (as float bits)
template <typename T>
__global__ void ptxb_compare_kernel(const T *a, const T *b, size_t n, unsigned *st) {
    unsigned bad = 0, dmax = 0, amax = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned ra = 0, rb = 0;
        memcpy(&ra, &a[i], sizeof(T));
        memcpy(&rb, &b[i], sizeof(T));
        float fa = ptxb_f(a[i]), fb = ptxb_f(b[i]);
        if (ra != rb) {
            bad++;
            float d = fabsf(fa - fb);
            dmax = max(dmax, isnan(d) ? __float_as_uint(INFINITY) : __float_as_uint(d));
        }
        if (!isnan(fa)) amax = max(amax, __float_as_uint(fabsf(fa)));
    }
    bad = __reduce_add_sync(0xffffffffu, bad);
    dmax = __reduce_max_sync(0xffffffffu, dmax);
    amax = __reduce_max_sync(0xffffffffu, amax);
    if (threadIdx.x % 32 == 0) {
        atomicAdd(&st[0], bad);
        atomicMax(&st[1], dmax);
        atomicMax(&st[2], amax);
    }
}

typedef struct {
    void *bufs[24];
    int nb;
    unsigned *d_st;
    Stage *s;
    cudaEvent_t e0, e1;
} PtxBench;

template <typename T>
static int pb_alloc(PtxBench *bench, T **p, size_t n, unsigned seed, float scale, float offset) {
    CUDA_CHECK(cudaMalloc((void **)p, n * sizeof(T) + 16));
    bench->bufs[bench->nb++] = *p;
    ptxb_fill_kernel<T><<<1024, 256, 0, bench->s->stream>>>(*p, n, seed, scale, offset);
    LAUNCH_CHECK();
    return 0;
}

template <typename T>
static int pb_compare(PtxBench *bench, const T *a, const T *c, size_t n, double *res) {
    unsigned st[3];
    CUDA_CHECK(cudaMemsetAsync(bench->d_st, 0, 3 * sizeof(unsigned), bench->s->stream));
    ptxb_compare_kernel<T><<<1024, 256, 0, bench->s->stream>>>(a, c, n, bench->d_st);
    LAUNCH_CHECK();
    CUDA_CHECK(cudaMemcpyAsync(st, bench->d_st, sizeof st, cudaMemcpyDeviceToHost, bench->s->stream));
    CUDA_CHECK(cudaStreamSynchronize(bench->s->stream));
    float dmax, amax;
    memcpy(&dmax, &st[1], 4);
    memcpy(&amax, &st[2], 4);
    double rel = st[0] == 0 ? 0.0 : amax > 0 ? dmax / amax : INFINITY;
    res[3] += st[0];
    if (rel > res[4]) res[4] = rel;
    res[5] += (double)n;
    return 0;
}

// res[k] = ms per call of launch(k), k = 0 (the reference) and 1 (the PTX kernel), after one warmup call
template <typename Launch>
static int pb_time(PtxBench *bench, Launch launch, int iters, double *res) {
    for (int k = 0; iters > 0 && k < 2; k++) {
        CHECK(launch(k));
        CUDA_CHECK(cudaEventRecord(bench->e0, bench->s->stream));
        for (int i = 0; i < iters; i++) CHECK(launch(k));
        CUDA_CHECK(cudaEventRecord(bench->e1, bench->s->stream));
        CUDA_CHECK(cudaEventSynchronize(bench->e1));
        float ms = 0.0f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, bench->e0, bench->e1));
        res[k] = ms / iters;
    }
    return 0;
}

static int ptx_bench_run(PtxBench *bench, int kernel, size_t n, int C, int iters, double *res) {
    Stage *s = bench->s;
    float *p[2] = {}, *m[2] = {}, *v[2] = {}, *g = NULL, *w = NULL, *bb = NULL, *mean[2] = {}, *rstd[2] = {};
    floatX *px[2] = {}, *x = NULL, *dout = NULL, *resid = NULL, *y[2] = {};
    unsigned char *cp[2] = {};
    int *tg = NULL, Vp = (C + 127) / 128 * 128, wg = 1;
    float dloss = 1.0f / (float)n;
    int N = (int)n;
    float lr = 1e-3f, b1 = 0.9f, b2 = 0.95f, bc1 = 1.0f - 0.9f * 0.9f * 0.9f, bc2 = 1.0f - 0.95f * 0.95f * 0.95f;
    float eps = 1e-8f, wd = 0.1f, gs = 0.5f;
    size_t nv = n;  // output elements per variant
    // one launch of variant k (0: CUDA C, 1: PTX), into that variant's outputs
    auto launch = [&](int k) -> int {
        s->ptx = k ? PTX_ALL : 0;
        switch (kernel) {
        case 0:
            if (k) {
                void *args[] = {&p[1], &px[1], &g, &m[1], &v[1], &n, &lr, &b1, &b2, &bc1, &bc2, &eps, &wd, &gs};
                CHECK(ptx_launch(s, PK_ADAMW, grid_for((n + 3) / 4, 256), 256, args));
            } else {
                adamw_kernel<<<grid_for(n, 256), 256, 0, s->stream>>>(p[0], px[0], g, m[0], v[0], n, lr, b1, b2, bc1,
                                                                      bc2, eps, wd, gs);
            }
            LAUNCH_CHECK();
            return 0;
        case 1: return gelu_forward(s, y[k], x, n);
        case 2: return gelu_backward(s, y[k], x, dout, n);
        case 3: return layernorm_forward(s, y[k], mean[k], rstd[k], x, w, bb, N, C);
        case 4: return layernorm_backward_input(s, y[k], resid, dout, x, w, mean[0], rstd[0], N, C);
        case 6:
            if (k) {
                void *args[] = {&y[1], &p[1], &tg, &C, &Vp, &dloss, &wg};
                CHECK(ptx_launch(s, PK_CE, n, CE_THREADS, args));
            } else {
                crossentropy_kernel<<<(unsigned)n, CE_THREADS, 0, s->stream>>>(y[0], p[0], tg, C, Vp, dloss, wg);
            }
            LAUNCH_CHECK();
            return 0;
        default:
            CUDA_CHECK(cudaMemcpyAsync(cp[1], cp[0], n, cudaMemcpyDeviceToDevice, s->stream));
            return 0;
        }
    };
    switch (kernel) {
    case 0:
        if (n % 4) return fail("ptx bench: AdamW needs n %% 4 == 0");
        CHECK(pb_alloc(bench, &g, n, 1, 1e-2f, 0.0f));
        for (int k = 0; k < 2; k++) {  // the same starting state for both variants
            CHECK(pb_alloc(bench, &p[k], n, 2, 0.1f, 0.0f));
            CHECK(pb_alloc(bench, &m[k], n, 3, 1e-3f, 0.0f));
            CHECK(pb_alloc(bench, &v[k], n, 4, 0.5e-5f, 0.5e-5f));
            CHECK(pb_alloc(bench, &px[k], n, 5, 0.0f, 0.0f));
        }
        res[2] = 30.0 * n;  // read p, g, m, v; write p, m, v and the bf16 copy
        break;
    case 1:
    case 2:
        if (n % 8) return fail("ptx bench: GELU needs n %% 8 == 0");
        CHECK(pb_alloc(bench, &x, n, 6, 4.0f, 0.0f));
        CHECK(pb_alloc(bench, &dout, n, 7, 1.0f, 0.0f));
        for (int k = 0; k < 2; k++) CHECK(pb_alloc(bench, &y[k], n, 8, 0.0f, 0.0f));
        res[2] = (kernel == 1 ? 4.0 : 6.0) * n;
        break;
    case 3:
    case 4:
        if (C <= 0 || C % 8 || n < 1 || n > INT_MAX) return fail("ptx bench: layernorm needs C %% 8 == 0 and 1 <= N");
        nv = n * C;
        CHECK(pb_alloc(bench, &x, nv, 9, 2.0f, 0.3f));
        CHECK(pb_alloc(bench, &dout, nv, 10, 1.0f, 0.0f));
        CHECK(pb_alloc(bench, &resid, nv, 11, 1.0f, 0.0f));
        CHECK(pb_alloc(bench, &w, (size_t)C, 12, 0.2f, 1.0f));
        CHECK(pb_alloc(bench, &bb, (size_t)C, 13, 0.1f, 0.0f));
        for (int k = 0; k < 2; k++) {
            CHECK(pb_alloc(bench, &y[k], nv, 14, 0.0f, 0.0f));
            CHECK(pb_alloc(bench, &mean[k], n, 15, 0.0f, 0.0f));
            CHECK(pb_alloc(bench, &rstd[k], n, 16, 0.0f, 0.0f));
        }
        if (kernel == 4) {  // the statistics the backward pass reads, from the CUDA C forward
            s->ptx = 0;
            CHECK(layernorm_forward(s, y[0], mean[0], rstd[0], x, w, bb, N, C));
        }
        res[2] = kernel == 3 ? 4.0 * nv + 8.0 * n + 8.0 * C : 8.0 * nv + 8.0 * n + 4.0 * C;
        break;
    case 6: {
        if (C < 1 || Vp > CE_PTX_MAX_VP || n > INT_MAX)
            return fail("ptx bench: cross-entropy needs 1 <= V, padded V <= %d and n <= INT_MAX rows", CE_PTX_MAX_VP);
        nv = n * Vp;
        for (int k = 0; k < 2; k++) {  // the same logits for both (each variant overwrites its copy)
            CHECK(pb_alloc(bench, &y[k], nv, 19, 4.0f, 0.0f));
            CHECK(pb_alloc(bench, &p[k], n, 20, 0.0f, 0.0f));
        }
        CHECK(pb_alloc(bench, &tg, n, 21, 0.0f, 0.0f));
        int *h = (int *)malloc(n * sizeof(int));
        if (!h) return fail("out of host memory");
        for (size_t i = 0; i < n; i++) h[i] = (int)((i * 2654435761u + 12345u) % (unsigned)C);
        cudaError_t e = cudaMemcpyAsync(tg, h, n * sizeof(int), cudaMemcpyHostToDevice, s->stream);
        if (e == cudaSuccess) e = cudaStreamSynchronize(s->stream);
        free(h);
        if (e != cudaSuccess) return fail("CUDA error: %s", cudaGetErrorString(e));
        res[2] = 4.0 * nv + 8.0 * n;  // read and write the logits; targets, losses
        break;
    }
    case 5:
        CHECK(pb_alloc(bench, &cp[0], n, 17, 0.0f, 0.0f));
        CHECK(pb_alloc(bench, &cp[1], n, 18, 0.0f, 0.0f));
        res[2] = 2.0 * n;
        break;
    default:
        return fail("ptx bench: unknown kernel %d (0 adamw, 1 gelu fwd, 2 gelu bwd, 3 layernorm fwd, "
                    "4 layernorm bwd, 5 copy, 6 cross-entropy)", kernel);
    }
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    if (kernel != 5) {
        for (int k = 0; k < 2; k++) CHECK(launch(k));
        CUDA_CHECK(cudaStreamSynchronize(s->stream));
        if (kernel == 0) {
            CHECK(pb_compare(bench, p[0], p[1], n, res));
            CHECK(pb_compare(bench, m[0], m[1], n, res));
            CHECK(pb_compare(bench, v[0], v[1], n, res));
            CHECK(pb_compare(bench, px[0], px[1], n, res));
        } else {
            CHECK(pb_compare(bench, y[0], y[1], nv, res));
            if (kernel == 3) {
                CHECK(pb_compare(bench, mean[0], mean[1], n, res));
                CHECK(pb_compare(bench, rstd[0], rstd[1], n, res));
            }
            if (kernel == 6) CHECK(pb_compare(bench, p[0], p[1], n, res));  // the losses
        }
    }
    CHECK(pb_time(bench, launch, iters, res));
    return 0;
}

// asm/gemm.ptx, the TMA + wgmma GEMM (for reading and measuring; training uses
// cuBLASLt): out (M,N) = A (M,K) @ B (N,K)^T in bf16, against matmul_forward.
#define GEMM_TILE 128                   // rows and columns of out per block
#define GEMM_SMEM (4 * 32768 + 1024)    // 4 stages of a 128x64 A tile and a 128x64 B tile, + alignment

// a tensor map over a row-major (rows, cols) bf16 matrix: boxes of 64 columns
// (128 bytes) x 128 rows, written to shared memory with the 128-byte swizzle
static int tensor_map_2d(CUtensorMap *map, const floatX *base, int64_t rows, int64_t cols) {
    static PFN_cuTensorMapEncodeTiled_v12000 encode;
    if (!encode) {
        void *fn = NULL;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) !=
                cudaSuccess || q != cudaDriverEntryPointSuccess || !fn) {
            cudaGetLastError();
            return fail("ptx gemm: the driver has no cuTensorMapEncodeTiled (CUDA 12.0 or newer needed)");
        }
        encode = (PFN_cuTensorMapEncodeTiled_v12000)fn;
    }
    cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows}, strides[1] = {(cuuint64_t)cols * sizeof(floatX)};
    cuuint32_t box[2] = {64, GEMM_TILE}, elem_strides[2] = {1, 1};
    CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)base, dims, strides, box, elem_strides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? 0
                             : fail("ptx gemm: cuTensorMapEncodeTiled failed (error %d) for a %lld x %lld matrix",
                                    (int)r, (long long)rows, (long long)cols);
}

static int ptx_gemm(Stage *s, floatX *out, const floatX *A, const floatX *B, int M, int N, int K) {
    if (M < 1 || N < 8 || K < 8 || N % 8 || K % 8)
        return fail("ptx gemm: needs M >= 1 and N, K multiples of 8 (M=%d N=%d K=%d)", M, N, K);
    CUtensorMap ta, tb;
    CHECK(tensor_map_2d(&ta, A, M, K));
    CHECK(tensor_map_2d(&tb, B, N, K));
    CUDA_CHECK(cudaKernelSetAttributeForDevice(g_ptx_kernels[PK_GEMM], cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               GEMM_SMEM, s->device));
    void *args[] = {&ta, &tb, &out, &M, &N, &K};
    dim3 grid((N + GEMM_TILE - 1) / GEMM_TILE, (M + GEMM_TILE - 1) / GEMM_TILE);
    CUDA_CHECK(cudaLaunchKernel((const void *)g_ptx_kernels[PK_GEMM], grid, dim3(256), args, GEMM_SMEM, s->stream));
    return 0;
}

// res[0], res[1]: ms per call of cuBLASLt and of the PTX GEMM (iters > 0);
// res[3] outputs whose bits differ, res[4] the largest difference / the largest |out|
static int gemm_bench_run(PtxBench *bench, int M, int N, int K, int iters, double *res) {
    Stage *s = bench->s;
    floatX *A = NULL, *B = NULL, *out[2] = {};
    size_t nout = (size_t)M * N;
    CHECK(pb_alloc(bench, &A, (size_t)M * K, 31, 1.0f, 0.0f));
    CHECK(pb_alloc(bench, &B, (size_t)N * K, 32, 1.0f, 0.0f));
    for (int k = 0; k < 2; k++) CHECK(pb_alloc(bench, &out[k], nout, 33, 0.0f, 0.0f));
    auto launch = [&](int k) -> int {
        if (k) return ptx_gemm(s, out[1], A, B, M, N, K);
        CHECK(must(matmul_forward(s, out[0], A, B, NULL, NULL, M, K, N, NULL)));
        return 0;
    };
    for (int k = 0; k < 2; k++) CHECK(launch(k));
    CUDA_CHECK(cudaStreamSynchronize(s->stream));
    CHECK(pb_compare(bench, out[0], out[1], nout, res));
    CHECK(pb_time(bench, launch, iters, res));
    res[2] = 2.0 * M * N * (double)K;  // flops
    return 0;
}

// a benchmark's scratch stage (a stream, cuBLASLt for the GEMM's reference),
// events and buffers, around body(&bench)
template <typename Body>
static int ptx_bench(Body body) {
    if (gpt_device_count() < 1) return fail("no CUDA device");
    CUDA_CHECK(cudaSetDevice(0));
    CHECK(ptx_load());
    PtxBench bench;
    memset(&bench, 0, sizeof bench);
    bench.s = (Stage *)calloc(1, sizeof(Stage));
    if (!bench.s) return fail("out of host memory");
    int rc = -1;
    if (cudaStreamCreate(&bench.s->stream) != cudaSuccess || cudaEventCreate(&bench.e0) != cudaSuccess ||
        cudaEventCreate(&bench.e1) != cudaSuccess || cudaMalloc((void **)&bench.d_st, 16) != cudaSuccess ||
        cudaMalloc(&bench.s->workspace, LT_WORKSPACE) != cudaSuccess)
        fail("CUDA setup failed: %s", cudaGetErrorString(cudaGetLastError()));
    else if (cublasLtCreate(&bench.s->lt) != CUBLAS_STATUS_SUCCESS)
        fail("cublasLtCreate failed");
    else
        rc = body(&bench);
    if (bench.s->stream) cudaStreamSynchronize(bench.s->stream);
    for (int i = 0; i < bench.nb; i++) cudaFree(bench.bufs[i]);
    for (int i = 0; i < bench.s->nplans; i++) gemm_plan_free(&bench.s->plans[i]);
    if (bench.s->lt) cublasLtDestroy(bench.s->lt);
    if (bench.s->workspace) cudaFree(bench.s->workspace);
    if (bench.d_st) cudaFree(bench.d_st);
    if (bench.e0) cudaEventDestroy(bench.e0);
    if (bench.e1) cudaEventDestroy(bench.e1);
    if (bench.s->stream) cudaStreamDestroy(bench.s->stream);
    free(bench.s);
    return rc;
}

extern "C" int gpt_cuda_ptx_bench(int kernel, long long n, int C, int iters, double *res) {
    for (int i = 0; i < 8; i++) res[i] = 0.0;
    if (n < 1) return fail("ptx bench: n must be positive");
    return ptx_bench([&](PtxBench *bench) { return ptx_bench_run(bench, kernel, (size_t)n, C, iters, res); });
}

extern "C" int gpt_cuda_gemm_bench(int M, int N, int K, int iters, double *res) {
    for (int i = 0; i < 8; i++) res[i] = 0.0;
    return ptx_bench([&](PtxBench *bench) { return gemm_bench_run(bench, M, N, K, iters, res); });
}
