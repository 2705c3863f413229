// dev/test_sgemm.c: drives asm/sgemm.h for the tests and the benchmark, on
// the kernel asm/sgemm.h chooses (GPT_ASM=avx512|avx2 forces one).
//
//   build/test_sgemm kernels
//       one line per kernel: its name and 1 if this CPU runs it, else 0
//   build/test_sgemm avail
//       "kernel NAME MRxNR" or "kernel none (portable C)": what the GEMMs run
//       on here (asm_sgemm_name()), exit status 2 with the reason when
//       GPT_ASM asks for a kernel that cannot be had
//   build/test_sgemm nt M K N BIAS SEED
//   build/test_sgemm nn M K N LAYOUT ACCUMULATE SEED
//       one product on random data against a float64 triple loop; prints
//       "maxerr E tol T hash H": the largest |out - ref| over (sum of |terms|)
//       and the bound it must stay under, and an FNV-1a hash of the output's
//       bytes (for bitwise comparisons across thread counts).
//       LAYOUT is how A (M,K) is strided, a(m,k) = A[m*sm + k*sk]:
//         row  sm=K, sk=1      (dinp = dout @ W)
//         col  sm=1, sk=M      (dW += dout^T @ inp)
//         rowpad sm=K+5, sk=1  colpad sm=1, sk=M+3   gen sm=2, sk=2*M+1
//   build/test_sgemm bench [--blocks KC,MC,NC] [M K N VARIANT]...
//       GFLOP/s of asm_gemm_nt / asm_gemm_nn, best of several runs; VARIANT is
//       fwd (nt, with bias), bwdin (nn, row), bwdw (nn, col, accumulate).
//       With no shapes, the GPT-2 shapes at M = B*T = 256 and 2048^3. The
//       first line, "# kernel ...", names the kernel and its blocks;
//       --blocks replaces the blocks read from the cache sizes (for sweeps).
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "../asm/sgemm.h"

static uint64_t rng_state;
static float frand(void) {  // uniform in [-1, 1), from a 64-bit LCG
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((double)(rng_state >> 40) / (double)(1ULL << 24) * 2.0 - 1.0);
}

static float *alloc_rand(size_t n) {
    float *p = malloc((n ? n : 1) * sizeof(float));
    if (!p) { fprintf(stderr, "out of memory\n"); exit(1); }
    for (size_t i = 0; i < n; i++) p[i] = frand();
    return p;
}

static uint64_t fnv1a(const void *p, size_t n) {
    const unsigned char *b = p;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ULL;
    return h;
}

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

// out and its float64 reference, for an A read through (sm, sk) and a B read
// through (bs_k, bs_n); init is C before the call (accumulate), bias may be NULL
static void report(const float *out, const float *A, size_t sm, size_t sk, const float *B,
                   size_t bk, size_t bn, const float *bias, const float *init, int M, int K, int N) {
    double maxerr = 0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0, mag = 0;
            for (int k = 0; k < K; k++) {
                double t = (double)A[m * sm + k * sk] * B[k * bk + n * bn];
                s += t;
                mag += fabs(t);
            }
            if (bias) { s += bias[n]; mag += fabs(bias[n]); }
            if (init) { s += init[(size_t)m * N + n]; mag += fabs(init[(size_t)m * N + n]); }
            double e = fabs(out[(size_t)m * N + n] - s) / (mag > 0 ? mag : 1.0);
            if (!(e <= maxerr)) maxerr = e;  // NaN sticks
        }
    // fp32 summation of K + 2 terms: a rigorous bound is (K + 2) * 2^-24;
    // rounding errors add up like a random walk, so this is far from tight
    double tol = (K + 2) * ldexp(1.0, -24);
    printf("maxerr %.3g tol %.3g hash %016llx\n", maxerr, tol,
           (unsigned long long)fnv1a(out, (size_t)M * N * sizeof(float)));
}

static int check_nt(int M, int K, int N, int with_bias) {
    float *A = alloc_rand((size_t)M * K), *W = alloc_rand((size_t)N * K);
    float *bias = with_bias ? alloc_rand(N) : NULL;
    float *out = alloc_rand((size_t)M * N);  // garbage the call must overwrite
    asm_gemm_nt(out, A, W, bias, M, K, N);
    report(out, A, K, 1, W, 1, K, bias, NULL, M, K, N);
    free(A); free(W); free(bias); free(out);
    return 0;
}

static int check_nn(int M, int K, int N, const char *layout, int accumulate) {
    size_t sm, sk, n;
    if (!strcmp(layout, "row")) sm = K, sk = 1, n = (size_t)M * K;
    else if (!strcmp(layout, "col")) sm = 1, sk = M, n = (size_t)K * M;
    else if (!strcmp(layout, "rowpad")) sm = K + 5, sk = 1, n = (size_t)M * (K + 5);
    else if (!strcmp(layout, "colpad")) sm = 1, sk = M + 3, n = (size_t)K * (M + 3);
    else if (!strcmp(layout, "gen")) sm = 2, sk = 2 * (size_t)M + 1, n = (size_t)K * (2 * M + 1);
    else { fprintf(stderr, "unknown layout %s\n", layout); return 2; }
    float *A = alloc_rand(n), *B = alloc_rand((size_t)K * N), *out = alloc_rand((size_t)M * N);
    float *init = NULL;
    if (accumulate) {
        init = malloc((size_t)M * N * sizeof(float) + 1);
        memcpy(init, out, (size_t)M * N * sizeof(float));
    }
    asm_gemm_nn(out, A, sm, sk, B, M, K, N, accumulate);
    report(out, A, sm, sk, B, N, 1, NULL, init, M, K, N);
    free(A); free(B); free(out); free(init);
    return 0;
}

// GFLOP/s of one variant at one shape, best of enough runs to fill ~0.3 s
static double bench_one(int M, int K, int N, const char *variant) {
    int fwd = !strcmp(variant, "fwd"), bwdin = !strcmp(variant, "bwdin");
    float *A = alloc_rand((size_t)M * K), *B = alloc_rand((size_t)K * N), *out = alloc_rand((size_t)M * N);
    float *bias = alloc_rand(N);
    double best = 1e30, total = 0;
    for (int it = 0; it < 200 && (it < 3 || total < 0.3); it++) {
        double t0 = seconds();
        if (fwd) asm_gemm_nt(out, A, B, bias, M, K, N);
        else if (bwdin) asm_gemm_nn(out, A, K, 1, B, M, K, N, 0);
        else asm_gemm_nn(out, A, 1, M, B, M, K, N, 1);
        double t = seconds() - t0;
        if (it > 0 && t < best) best = t;  // the first run warms buffers and caches
        total += t;
    }
    free(A); free(B); free(out); free(bias);
    return 2.0 * M * K * N / best * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: test_sgemm kernels | avail | nt M K N BIAS SEED | nn M K N LAYOUT ACC SEED | bench [--blocks KC,MC,NC] [M K N VARIANT]...\n");
        return 2;
    }
    if (!strcmp(argv[1], "kernels")) {
#ifdef SG_NKERNELS  // x86-64: the kernels this build has, and whether this CPU runs each
        for (int i = 0; i < SG_NKERNELS; i++) printf("%s %d\n", sg_kernels[i].name, sg_cpu_runs(i));
#endif
        return 0;
    }
    if (asm_sgemm_error()) {
        fprintf(stderr, "test_sgemm: %s\n", asm_sgemm_error());
        return 2;
    }
    if (!strcmp(argv[1], "avail")) {
        printf("kernel %s\n", asm_sgemm_name());
        return 0;
    }
    if (!asm_sgemm_available()) {
        fprintf(stderr, "test_sgemm: no assembly kernel runs here (%s)\n",
                getenv("GPT_NO_ASM") ? "GPT_NO_ASM is set" : "the CPU has neither AVX-512 nor AVX2 with FMA");
        return 3;
    }
    if (!strcmp(argv[1], "nt") && argc == 7) {
        rng_state = strtoull(argv[6], NULL, 10);
        return check_nt(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    }
    if (!strcmp(argv[1], "nn") && argc == 8) {
        rng_state = strtoull(argv[7], NULL, 10);
        return check_nn(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), argv[5], atoi(argv[6]));
    }
#ifdef SG_NKERNELS  // the blocking it sweeps exists only where there are kernels
    if (!strcmp(argv[1], "bench")) {
        static const char *dflt[] = {
            "256", "768", "3072", "fwd",    "256", "3072", "768", "fwd",    "256", "768", "50304", "fwd",
            "256", "3072", "768", "bwdin",  "256", "768", "3072", "bwdin",  "256", "50304", "768", "bwdin",
            "3072", "256", "768", "bwdw",   "768", "256", "3072", "bwdw",   "50304", "256", "768", "bwdw",
            "2048", "2048", "2048", "fwd",  "2048", "2048", "2048", "bwdin",
        };
        const char **args = (const char **)argv + 2;
        int n = argc - 2;
        if (n >= 2 && !strcmp(args[0], "--blocks")) {
            sg_blocking *bl = &sg_choice.bl;
            if (sscanf(args[1], "%d,%d,%d", &bl->kc, &bl->mc, &bl->nc) != 3 || bl->kc < 1 ||
                bl->mc < 1 || bl->mc % sg_choice.kernel->mr || bl->nc < 1 || bl->nc % sg_choice.kernel->nr) {
                fprintf(stderr, "test_sgemm: --blocks %s: expected KC,MC,NC with MC a multiple of %d, NC of %d\n",
                        args[1], sg_choice.kernel->mr, sg_choice.kernel->nr);
                return 2;
            }
            args += 2, n -= 2;
        }
        if (n == 0) args = dflt, n = (int)(sizeof dflt / sizeof *dflt);
        if (n % 4) { fprintf(stderr, "bench takes M K N VARIANT groups\n"); return 2; }
        printf("# kernel %s, KC %d MC %d NC %d\n", asm_sgemm_name(), sg_choice.bl.kc, sg_choice.bl.mc,
               sg_choice.bl.nc);
        for (int i = 0; i < n; i += 4) {
            int M = atoi(args[i]), K = atoi(args[i + 1]), N = atoi(args[i + 2]);
            printf("%s %d %d %d %.1f\n", args[i + 3], M, K, N, bench_one(M, K, N, args[i + 3]));
            fflush(stdout);
        }
        return 0;
    }
#endif
    fprintf(stderr, "test_sgemm: bad arguments\n");
    return 2;
}
