// asm/sgemm.h: the fp32 GEMMs of the CPU trainer on the AVX-512 microkernel of
// asm/sgemm_avx512.S: packing, cache blocking and threading in C around the
// 8x48 register tile in assembly. A header of static functions, included by
// train_gpt.c (as common.h is) and by dev/test_sgemm.c; link
// build/sgemm_avx512.o with whatever includes it.
//
//   asm_sgemm_available()  1 when the CPU and OS run AVX-512 (F and VL) and
//                          GPT_NO_ASM is unset, empty or "0"; decided once per
//                          process, at the first call
//   asm_gemm_nt(out, A, W, bias, M, K, N)
//       out (M,N) = A (M,K) @ W^T + bias, W (N,K) row-major, bias may be NULL
//   asm_gemm_nn(out, A, sm, sk, Bm, M, K, N, accumulate)
//       out (M,N) (+)= A @ Bm, a(m,k) = A[m*sm + k*sk], Bm (K,N) row-major
//
// Both take the arguments of train_gpt.c's gemm_nt / gemm_nn.
//
// Blocking (GotoBLAS's five loops; sizes for this machine's 48 KiB L1d and
// 2 MiB L2 per core):
//
//   for jc in N step NC          B block: KC x NC, packed in 48-column panels
//     for pc in K step KC          (K blocks always in increasing order)
//       pack B[pc, jc]             1.1 MiB at KC = 384, NC = 768: L2
//       for ic in M step MC        A block: MC x KC, packed in 8-row slivers
//         pack A[ic, pc]           384 KiB at MC = 256: L2
//         for jr in NC step 48     one B panel, KC x 48 (72 KiB), reused by
//           for ir in MC step 8    every A sliver of the block
//             microkernel: C[ir, jr] (+)= sliver @ panel
//
// The microkernel runs as fast with its B panel streaming from L2 as with it
// in L1 (measured), so KC is large (fewer passes over C, fewer packings of
// A); see asm/README.md for the sweep. Packing reads its source in long
// contiguous runs where the layout allows (rows of the backward's operands,
// 16 rows of W at a time for the transposes): short pieces of many rows
// starve the hardware prefetchers.
//
// Threads split the output (columns when M <= N, else rows) into one
// contiguous rectangle each, in whole tiles, and run the five loops on their
// own rectangle with their own packing buffers.
//
// Determinism: every element of C is produced by the same sequence of
// floating-point operations whichever thread owns it and however the output
// is split: its products summed in k order inside one KC block (one vector
// lane of the microkernel), the blocks added to C in increasing k, the bias
// added after the first block. Partial tiles at the edges go through a
// scratch tile and repeat the kernel's epilogue (acc + C, then + bias) in C.
// So results are bitwise the same for any thread count. Accumulating, out
// becomes ((out + P1) + P2) + ... over the K blocks' partial products P1, P2,
// ...: one block (out + the whole product) whenever K <= KC, which covers dW
// at B*T <= 384 tokens per micro-batch.
#ifndef ASM_SGEMM_H
#define ASM_SGEMM_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__)
#define ASM_SGEMM_X86 1
#include <immintrin.h>

// asm/sgemm_avx512.S: one 8x48 tile, C = (flags&1 ? C : 0) + a @ b (+ bias)
void sgemm_avx512_8x48(long kc, const float *a, const float *b, float *c, long ldc,
                       long flags, const float *bias);

#define SG_MR 8     // tile rows: broadcasts from the A sliver
#define SG_NR 48    // tile columns: 3 zmm of the B panel
#ifndef SG_KC
#define SG_KC 384   // B panel KC x 48 x 4 B = 72 KiB, streams from L2
#endif
#ifndef SG_MC
#define SG_MC 256   // A block MC x KC x 4 B = 384 KiB of L2
#endif
#ifndef SG_NC
#define SG_NC 768   // B block KC x NC x 4 B = 1.1 MiB of L2
#endif

// A matrix seen through strides: element (i, j) is p[i*rs + j*cs]
typedef struct { const float *p; size_t rs, cs; } sg_mat;

static int asm_sgemm_available(void) {
    static int avail = -1;
    if (avail < 0) {
        const char *e = getenv("GPT_NO_ASM");
        int off = e && *e && strcmp(e, "0") != 0;
        __builtin_cpu_init();
        // the kernel needs AVX-512F; the packing code also uses VL's masked ymm loads
        avail = !off && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
    }
    return avail;
}

// One thread's packing buffers, kept between calls (the OpenMP threads live on)
static _Thread_local float *sg_buf;
static _Thread_local size_t sg_buf_n;

static float *sg_buffer(size_t n) {
    if (n > sg_buf_n) {
        free(sg_buf);
        size_t bytes = (n * sizeof(float) + 4095) & ~(size_t)4095;
        sg_buf = (float *)aligned_alloc(4096, bytes);
        if (!sg_buf) { fprintf(stderr, "asm sgemm: out of memory (%zu bytes)\n", bytes); abort(); }
        sg_buf_n = bytes / sizeof(float);
    }
    return sg_buf;
}

// 8 rows of 8 floats (one __m256 each) transposed in registers
__attribute__((target("avx2,fma")))
static inline void sg_transpose8(__m256 r[8]) {
    __m256 a[8], b[8];
    for (int i = 0; i < 8; i += 2) {
        a[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        a[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int q = 0; q < 8; q += 4) {
        b[q] = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a[q]), _mm256_castps_pd(a[q + 2])));
        b[q + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a[q]), _mm256_castps_pd(a[q + 2])));
        b[q + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a[q + 1]), _mm256_castps_pd(a[q + 3])));
        b[q + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a[q + 1]), _mm256_castps_pd(a[q + 3])));
    }
    // b[q + c] holds, in 128-bit lane L, column 4L + c of rows q..q+3
    for (int c = 0; c < 4; c++) {
        r[c] = _mm256_permute2f128_ps(b[c], b[4 + c], 0x20);
        r[4 + c] = _mm256_permute2f128_ps(b[c], b[4 + c], 0x31);
    }
}

// 16 rows of 16 floats (one __m512 each) transposed in registers
__attribute__((target("avx512f")))
static inline void sg_transpose16(__m512 r[16]) {
    __m512 a[16], b[16];
    for (int i = 0; i < 16; i += 2) {
        a[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        a[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int q = 0; q < 16; q += 4) {
        b[q] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[q]), _mm512_castps_pd(a[q + 2])));
        b[q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[q]), _mm512_castps_pd(a[q + 2])));
        b[q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a[q + 1]), _mm512_castps_pd(a[q + 3])));
        b[q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a[q + 1]), _mm512_castps_pd(a[q + 3])));
    }
    // b[q + c] holds, in 128-bit lane L, column 4L + c of rows q..q+3
    for (int c = 0; c < 4; c++) {
        __m512 u0 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0x88);
        __m512 u1 = _mm512_shuffle_f32x4(b[c], b[4 + c], 0xDD);
        __m512 v0 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0x88);
        __m512 v1 = _mm512_shuffle_f32x4(b[8 + c], b[12 + c], 0xDD);
        r[c] = _mm512_shuffle_f32x4(u0, v0, 0x88);
        r[4 + c] = _mm512_shuffle_f32x4(u1, v1, 0x88);
        r[8 + c] = _mm512_shuffle_f32x4(u0, v0, 0xDD);
        r[12 + c] = _mm512_shuffle_f32x4(u1, v1, 0xDD);
    }
}

// Pack an mr x kc block of A (mr <= 8) into a sliver: dst[k*8 + r] = A(r, k),
// rows mr..7 zero.
__attribute__((target("avx512f,avx512vl,avx2,fma")))
static void sg_pack_a(float *dst, sg_mat A, int mr, int kc) {
    if (A.cs == 1 && mr == 8) {
        // rows of A contiguous: 8x8 blocks transposed in registers
        int k = 0;
        for (; k + 8 <= kc; k += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(A.p + (size_t)i * A.rs + k);
            sg_transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_store_ps(dst + (size_t)(k + i) * 8, r[i]);
        }
        for (; k < kc; k++)
            for (int i = 0; i < 8; i++) dst[(size_t)k * 8 + i] = A.p[(size_t)i * A.rs + k];
    } else {
        for (int k = 0; k < kc; k++)
            for (int i = 0; i < 8; i++)
                dst[(size_t)k * 8 + i] = i < mr ? A.p[(size_t)i * A.rs + (size_t)k * A.cs] : 0.0f;
    }
}

// Pack an mc x kc block of A into slivers, sliver s at dst + s*8*kc.
__attribute__((target("avx512f,avx512vl,avx2,fma")))
static void sg_pack_a_block(float *dst, sg_mat A, int mc, int kc) {
    if (A.rs == 1 && A.cs != 1) {
        // columns of A contiguous (dW's dout^T): read each k's mc floats in
        // one run (a gather of short pieces of many rows starves the prefetchers)
        __mmask8 tail = (__mmask8)((1u << (mc % 8)) - 1);
        for (int k = 0; k < kc; k++) {
            const float *s = A.p + (size_t)k * A.cs;
            int ir = 0;
            for (; ir + 8 <= mc; ir += 8) _mm256_store_ps(dst + (size_t)ir * kc + (size_t)k * 8, _mm256_loadu_ps(s + ir));
            if (ir < mc) _mm256_store_ps(dst + (size_t)ir * kc + (size_t)k * 8, _mm256_maskz_loadu_ps(tail, s + ir));
        }
    } else {
        for (int ir = 0; ir < mc; ir += SG_MR) {
            sg_mat a = {A.p + (size_t)ir * A.rs, A.rs, A.cs};
            sg_pack_a(dst + (size_t)ir * kc, a, mc - ir < SG_MR ? mc - ir : SG_MR, kc);
        }
    }
}

// Pack a kc x nc block of B into 48-column panels, panel p at dst + p*pstride:
// dst[p*pstride + k*48 + j] = B(k, 48p + j), columns past nc zero.
__attribute__((target("avx512f")))
static void sg_pack_b_block(float *dst, size_t pstride, sg_mat B, int kc, int nc) {
    if (B.cs == 1) {
        // rows of B contiguous (the backward's Bm): each k's nc floats in one run
        int nfull = nc / SG_NR * SG_NR, nr = nc - nfull;
        __mmask16 m[3];
        for (int v = 0; v < 3; v++) {
            int n = nr - 16 * v;
            m[v] = (__mmask16)(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1);
        }
        for (int k = 0; k < kc; k++) {
            const float *s = B.p + (size_t)k * B.rs;
            float *d = dst + (size_t)k * SG_NR;
            int jr = 0;
            for (; jr < nfull; jr += SG_NR, d += pstride)
                for (int v = 0; v < 3; v++) _mm512_store_ps(d + 16 * v, _mm512_loadu_ps(s + jr + 16 * v));
            if (nr)
                for (int v = 0; v < 3; v++) _mm512_store_ps(d + 16 * v, _mm512_maskz_loadu_ps(m[v], s + jr + 16 * v));
        }
    } else if (B.rs == 1) {
        // columns of B contiguous (the forward's W rows): 16x16 blocks
        // transposed in registers, 16 rows of W at a time (few streams for
        // the prefetchers), missing columns read as zero
        for (int j0 = 0; j0 < nc; j0 += 16) {
            float *d = dst + (size_t)(j0 / SG_NR) * pstride + j0 % SG_NR;
            const float *s = B.p + (size_t)j0 * B.cs;
            int nr = nc - j0 < 16 ? nc - j0 : 16, k = 0;
            for (; k + 16 <= kc; k += 16) {
                __m512 r[16];
                for (int i = 0; i < 16; i++)
                    r[i] = i < nr ? _mm512_loadu_ps(s + (size_t)i * B.cs + k) : _mm512_setzero_ps();
                sg_transpose16(r);
                for (int i = 0; i < 16; i++) _mm512_store_ps(d + (size_t)(k + i) * SG_NR, r[i]);
            }
            for (; k < kc; k++)
                for (int i = 0; i < 16; i++) d[(size_t)k * SG_NR + i] = i < nr ? s[(size_t)i * B.cs + k] : 0.0f;
        }
        // zero the columns of the last panel past nc that no 16-group covered
        int jpad = (nc + 15) / 16 * 16, jend = (nc + SG_NR - 1) / SG_NR * SG_NR;
        for (int j = jpad; j < jend; j++) {
            float *d = dst + (size_t)(j / SG_NR) * pstride + j % SG_NR;
            for (int k = 0; k < kc; k++) d[(size_t)k * SG_NR] = 0.0f;
        }
    } else {
        for (int j = 0; j < (nc + SG_NR - 1) / SG_NR * SG_NR; j++) {
            float *d = dst + (size_t)(j / SG_NR) * pstride + j % SG_NR;
            for (int k = 0; k < kc; k++)
                d[(size_t)k * SG_NR] = j < nc ? B.p[(size_t)k * B.rs + (size_t)j * B.cs] : 0.0f;
        }
    }
}

// One thread's rectangle of C: rows [m0, m1), columns [n0, n1), all of K.
static void sg_gemm_block(float *C, size_t ldc, sg_mat A, sg_mat B, const float *bias,
                          int m0, int m1, int n0, int n1, int K, int accumulate) {
    if (m0 >= m1 || n0 >= n1) return;
    size_t nb_max = (size_t)(SG_NC / SG_NR);
    float *bp = sg_buffer((size_t)SG_KC * SG_NC + (size_t)SG_MC * SG_KC);
    float *ap = bp + (size_t)SG_KC * SG_NR * nb_max;
    for (int jc = n0; jc < n1; jc += SG_NC) {
        int nc = n1 - jc < SG_NC ? n1 - jc : SG_NC;
        for (int pc = 0; pc < K; pc += SG_KC) {
            int kc = K - pc < SG_KC ? K - pc : SG_KC;
            // the first K block writes (or adds into) C and adds the bias; the rest add
            long flags = (pc > 0 || accumulate) ? 1 : 0;
            sg_mat b = {B.p + (size_t)pc * B.rs + (size_t)jc * B.cs, B.rs, B.cs};
            sg_pack_b_block(bp, (size_t)SG_KC * SG_NR, b, kc, nc);
            for (int ic = m0; ic < m1; ic += SG_MC) {
                int mc = m1 - ic < SG_MC ? m1 - ic : SG_MC;
                sg_mat a = {A.p + (size_t)ic * A.rs + (size_t)pc * A.cs, A.rs, A.cs};
                sg_pack_a_block(ap, a, mc, kc);
                for (int jr = 0; jr < nc; jr += SG_NR) {
                    int nr = nc - jr < SG_NR ? nc - jr : SG_NR;
                    const float *bpan = bp + (size_t)(jr / SG_NR) * SG_KC * SG_NR;
                    const float *bb = (pc == 0 && bias) ? bias + jc + jr : NULL;
                    for (int ir = 0; ir < mc; ir += SG_MR) {
                        int mr = mc - ir < SG_MR ? mc - ir : SG_MR;
                        float *c = C + (size_t)(ic + ir) * ldc + jc + jr;
                        if (mr == SG_MR && nr == SG_NR) {
                            sgemm_avx512_8x48(kc, ap + (size_t)ir * kc, bpan, c, (long)ldc, flags, bb);
                        } else {
                            // a partial tile: compute it whole into scratch, then
                            // do the kernel's epilogue on the valid part
                            float t[SG_MR * SG_NR] __attribute__((aligned(64)));
                            float bz[SG_NR] = {0};
                            if (bb) memcpy(bz, bb, (size_t)nr * sizeof(float));
                            sgemm_avx512_8x48(kc, ap + (size_t)ir * kc, bpan, t, SG_NR, 0, NULL);
                            for (int r = 0; r < mr; r++)
                                for (int j = 0; j < nr; j++) {
                                    float v = t[r * SG_NR + j];
                                    if (flags) v = v + c[(size_t)r * ldc + j];
                                    if (bb) v = v + bz[j];
                                    c[(size_t)r * ldc + j] = v;
                                }
                        }
                    }
                }
            }
        }
    }
}

// Split C between the threads and run each one's rectangle.
static void sg_gemm(float *C, sg_mat A, sg_mat B, const float *bias, int M, int K, int N, int accumulate) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        // an empty sum: out = bias (or 0), or unchanged when accumulating
        if (!accumulate)
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) C[(size_t)m * N + n] = bias ? bias[n] : 0.0f;
        return;
    }
    int tiles_m = (M + SG_MR - 1) / SG_MR, tiles_n = (N + SG_NR - 1) / SG_NR;
    // split the dimension whose other operand is cheaper to pack twice
    int split_n = M <= N ? tiles_n >= 2 || tiles_m < 2 : tiles_m < 2;
    #pragma omp parallel
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        int units = split_n ? tiles_n : tiles_m;
        int u0 = (int)((long)units * t / nt), u1 = (int)((long)units * (t + 1) / nt);
        if (split_n) {
            int n0 = u0 * SG_NR, n1 = u1 * SG_NR < N ? u1 * SG_NR : N;
            sg_gemm_block(C, (size_t)N, A, B, bias, 0, M, n0, n1, K, accumulate);
        } else {
            int m0 = u0 * SG_MR, m1 = u1 * SG_MR < M ? u1 * SG_MR : M;
            sg_gemm_block(C, (size_t)N, A, B, bias, m0, m1, 0, N, K, accumulate);
        }
    }
}

static void asm_gemm_nt(float *out, const float *A, const float *W, const float *bias,
                        int M, int K, int N) {
    sg_mat a = {A, (size_t)K, 1}, b = {W, 1, (size_t)K};
    sg_gemm(out, a, b, bias, M, K, N, 0);
}

static void asm_gemm_nn(float *out, const float *A, size_t sm, size_t sk, const float *Bm,
                        int M, int K, int N, int accumulate) {
    sg_mat a = {A, sm, sk}, b = {Bm, (size_t)N, 1};
    sg_gemm(out, a, b, NULL, M, K, N, accumulate);
}

#else  // not x86-64 ELF with GCC-style builtins: the portable C path only

static int asm_sgemm_available(void) { return 0; }
static void asm_gemm_nt(float *out, const float *A, const float *W, const float *bias,
                        int M, int K, int N) {
    (void)out; (void)A; (void)W; (void)bias; (void)M; (void)K; (void)N;
    abort();
}
static void asm_gemm_nn(float *out, const float *A, size_t sm, size_t sk, const float *Bm,
                        int M, int K, int N, int accumulate) {
    (void)out; (void)A; (void)sm; (void)sk; (void)Bm; (void)M; (void)K; (void)N; (void)accumulate;
    abort();
}

#endif
#endif
