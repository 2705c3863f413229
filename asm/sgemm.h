// asm/sgemm.h: the fp32 GEMMs of the CPU trainer on the assembly microkernels
// of asm/: sgemm_avx512.S (an 8x48 register tile, AVX-512) and sgemm_avx2.S
// (4x24, AVX2 + FMA). Packing, cache blocking and threading in C, written once
// for any tile. A header of static functions, included by train_gpt.c (as
// common.h is) and by dev/test_sgemm.c; link the Makefile's $(ASM_OBJS) with
// whatever includes it. Off x86-64 it compiles to the stubs at the end and
// the trainer's portable C GEMMs are all there is.
//
//   asm_sgemm_kernel()     the kernel the GEMMs run on (NULL: the C path),
//                          chosen once per process: GPT_NO_ASM=1 forces C,
//                          GPT_ASM=avx512|avx2 a kernel, else the best the
//                          CPU runs
//   asm_sgemm_error()      NULL, or the one-line reason a GPT_ASM cannot be had
//   asm_sgemm_available()  asm_sgemm_kernel() != NULL
//   asm_gemm_nt(out, A, W, bias, M, K, N)
//       out (M,N) = A (M,K) @ W^T + bias, W (N,K) row-major, bias may be NULL
//   asm_gemm_nn(out, A, sm, sk, Bm, M, K, N, accumulate)
//       out (M,N) (+)= A @ Bm, a(m,k) = A[m*sm + k*sk], Bm (K,N) row-major
//
// Both take the arguments of train_gpt.c's gemm_nt / gemm_nn.
//
// Blocking (GotoBLAS's five loops; MR x NR is the kernel's tile, KC its
// measured K block, MC from the L2 size read at run time, NC = 768):
//
//   for jc in N step NC          B block: KC x NC, packed in NR-column panels
//     for pc in K step KC          (K blocks always in increasing order)
//       pack B[pc, jc]             NC = 768
//       for ic in M step MC        A block: MC x KC, packed in MR-row slivers
//         pack A[ic, pc]           3/8 of L2, MC <= 256
//         for jr in NC step NR     one B panel, KC x NR, reused by
//           for ir in MC step MR   every A sliver of the block
//             microkernel: C[ir, jr] (+)= sliver @ panel
//
// The microkernels run as fast with their B panel streaming from L2 as with
// it in L1 (measured), so KC is large (fewer passes over C, fewer packings of
// A); see asm/README.md for the sweeps. Packing reads its source in long
// contiguous runs where the layout allows (rows of the backward's operands,
// 8 rows of W at a time for the transposes): short pieces of many rows
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
// So results are bitwise the same for any thread count (for one kernel on
// one machine: the two kernels' KC differ, and so may the L2). Accumulating,
// out becomes ((out + P1) + P2) + ... over the K blocks' partial products P1,
// P2, ...: one block (out + the whole product) whenever K <= KC, which covers
// dW at B*T <= 384 tokens per micro-batch on the AVX-512 kernel, 256 on AVX2.
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
#include <unistd.h>

// A microkernel: one MR x NR tile of C from an A sliver and a B panel,
//     C = (flags & 1 ? C : 0) + a @ b (+ bias)
typedef void sg_microkernel(long kc, const float *a, const float *b, float *c, long ldc,
                            long flags, const float *bias);
sg_microkernel sgemm_avx512_8x48;  // asm/sgemm_avx512.S
sg_microkernel sgemm_avx2_4x24;    // asm/sgemm_avx2.S

// A matrix seen through strides: element (i, j) is p[i*rs + j*cs]
typedef struct { const float *p; size_t rs, cs; } sg_mat;

// The cache blocks: K block, rows of the A block, columns of the B block
typedef struct { int kc, mc, nc; } sg_blocking;

// One thread's rectangle of C: rows [m0, m1), columns [n0, n1), all of K
typedef void sg_block_fn(const sg_blocking *bl, float *C, size_t ldc, sg_mat A, sg_mat B,
                         const float *bias, int m0, int m1, int n0, int n1, int K, int accumulate);

typedef struct {
    const char *name;     // the value of GPT_ASM that asks for it
    const char *needs;    // the CPU features it runs on, for messages
    int mr, nr;           // its register tile
    int kc;               // K block (measured, asm/README.md)
    sg_block_fn *block;   // the driver below, specialised for the tile
} sg_kernel;

#define SG_TILE_MAX (8 * 48)  // floats in the largest tile (the edge scratch)

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

// The packing and the five loops are written once, for any tile with MR 4 or
// 8 and NR a multiple of 8 (the 8x8 transposes then stay whole), and
// compiled once per kernel with its MR and NR as constants (always_inline into
// sg_block_8x48 / sg_block_4x24 below), so the copy loops vectorise to the
// tile's width.

// Pack an mc x kc block of A into MR-row slivers, sliver s at dst + s*MR*kc:
// dst[s*MR*kc + k*MR + r] = A(s*MR + r, k), rows past mc zero.
__attribute__((always_inline, target("avx2,fma")))
static inline void sg_pack_a_block(float *dst, sg_mat A, int mc, int kc, const int MR) {
    if (A.rs == 1 && A.cs != 1) {
        // columns of A contiguous (dW's dout^T): each k's mc floats in one run
        // (a gather of short pieces of many rows starves the prefetchers)
        for (int k = 0; k < kc; k++) {
            const float *s = A.p + (size_t)k * A.cs;
            for (int ir = 0; ir < mc; ir += MR) {
                float *d = dst + (size_t)ir * kc + (size_t)k * MR;
                if (ir + MR <= mc)  // one vector move (a loop here stays scalar: d and s might overlap)
                    memcpy(d, s + ir, MR * sizeof(float));
                else
                    for (int r = 0; r < MR; r++) d[r] = ir + r < mc ? s[ir + r] : 0.0f;
            }
        }
    } else if (A.cs == 1) {
        // rows of A contiguous (inp, dout): 8 rows at a time, 8x8 blocks
        // transposed in registers; missing rows read as zero. Row r0 + h of a
        // group lands in sliver (r0 + h) / MR.
        for (int r0 = 0; r0 < mc; r0 += 8) {
            int nr = mc - r0 < 8 ? mc - r0 : 8, k = 0;
            float *d = dst + (size_t)r0 * kc;  // r0 is a multiple of MR
            for (; k + 8 <= kc; k += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++)
                    r[i] = i < nr ? _mm256_loadu_ps(A.p + (size_t)(r0 + i) * A.rs + k) : _mm256_setzero_ps();
                sg_transpose8(r);
                for (int i = 0; i < 8; i++) {
                    if (MR == 8) {
                        _mm256_storeu_ps(d + (size_t)(k + i) * 8, r[i]);
                    } else {  // MR == 4: rows 0-3 and 4-7 of the group go to two slivers
                        _mm_storeu_ps(d + (size_t)(k + i) * 4, _mm256_castps256_ps128(r[i]));
                        if (nr > 4) _mm_storeu_ps(d + (size_t)4 * kc + (size_t)(k + i) * 4, _mm256_extractf128_ps(r[i], 1));
                    }
                }
            }
            for (; k < kc; k++)
                for (int i = 0; i < (nr + MR - 1) / MR * MR && i < 8; i++)
                    d[(size_t)(i / MR) * MR * kc + (size_t)k * MR + i % MR] =
                        i < nr ? A.p[(size_t)(r0 + i) * A.rs + k] : 0.0f;
        }
    } else {
        for (int i = 0; i < (mc + MR - 1) / MR * MR; i++)
            for (int k = 0; k < kc; k++)
                dst[(size_t)(i / MR) * MR * kc + (size_t)k * MR + i % MR] =
                    i < mc ? A.p[(size_t)i * A.rs + (size_t)k * A.cs] : 0.0f;
    }
}

// Pack a kc x nc block of B into NR-column panels, panel p at dst + p*kc*NR:
// dst[p*kc*NR + k*NR + j] = B(k, p*NR + j), columns past nc zero.
__attribute__((always_inline, target("avx2,fma")))
static inline void sg_pack_b_block(float *dst, sg_mat B, int kc, int nc, const int NR) {
    size_t pstride = (size_t)kc * NR;
    if (B.cs == 1) {
        // rows of B contiguous (the backward's Bm): each k's nc floats in one run
        for (int k = 0; k < kc; k++) {
            const float *s = B.p + (size_t)k * B.rs;
            float *d = dst + (size_t)k * NR;
            for (int jr = 0; jr < nc; jr += NR, d += pstride) {
                if (jr + NR <= nc)
                    memcpy(d, s + jr, NR * sizeof(float));
                else
                    for (int j = 0; j < NR; j++) d[j] = jr + j < nc ? s[jr + j] : 0.0f;
            }
        }
    } else if (B.rs == 1) {
        // columns of B contiguous (the forward's W rows): 8 rows of W at a
        // time (few streams for the prefetchers), 8x8 blocks transposed in
        // registers, missing columns read as zero
        for (int j0 = 0; j0 < nc; j0 += 8) {
            float *d = dst + (size_t)(j0 / NR) * pstride + j0 % NR;
            const float *s = B.p + (size_t)j0 * B.cs;
            int nj = nc - j0 < 8 ? nc - j0 : 8, k = 0;
            for (; k + 8 <= kc; k += 8) {
                __m256 r[8];
                for (int i = 0; i < 8; i++)
                    r[i] = i < nj ? _mm256_loadu_ps(s + (size_t)i * B.cs + k) : _mm256_setzero_ps();
                sg_transpose8(r);
                for (int i = 0; i < 8; i++) _mm256_storeu_ps(d + (size_t)(k + i) * NR, r[i]);
            }
            for (; k < kc; k++)
                for (int i = 0; i < 8; i++) d[(size_t)k * NR + i] = i < nj ? s[(size_t)i * B.cs + k] : 0.0f;
        }
        // zero the columns of the last panel past nc that no 8-group covered
        int jpad = (nc + 7) / 8 * 8, jend = (nc + NR - 1) / NR * NR;
        for (int j = jpad; j < jend; j++) {
            float *d = dst + (size_t)(j / NR) * pstride + j % NR;
            for (int k = 0; k < kc; k++) d[(size_t)k * NR] = 0.0f;
        }
    } else {
        for (int j = 0; j < (nc + NR - 1) / NR * NR; j++) {
            float *d = dst + (size_t)(j / NR) * pstride + j % NR;
            for (int k = 0; k < kc; k++)
                d[(size_t)k * NR] = j < nc ? B.p[(size_t)k * B.rs + (size_t)j * B.cs] : 0.0f;
        }
    }
}

// GotoBLAS's five loops on one thread's rectangle of C, for the MR x NR tile
// of the microkernel `micro`.
__attribute__((always_inline, target("avx2,fma")))
static inline void sg_block_tile(const sg_blocking *bl, float *C, size_t ldc, sg_mat A, sg_mat B,
                                 const float *bias, int m0, int m1, int n0, int n1, int K,
                                 int accumulate, const int MR, const int NR, sg_microkernel *micro) {
    if (m0 >= m1 || n0 >= n1) return;
    const int KC = bl->kc, MC = bl->mc, NC = bl->nc;  // MC a multiple of MR, NC of NR
    float *bp = sg_buffer((size_t)KC * NC + (size_t)MC * KC);
    float *ap = bp + (size_t)KC * NC;
    for (int jc = n0; jc < n1; jc += NC) {
        int nc = n1 - jc < NC ? n1 - jc : NC;
        for (int pc = 0; pc < K; pc += KC) {
            int kc = K - pc < KC ? K - pc : KC;
            // the first K block writes (or adds into) C and adds the bias; the rest add
            long flags = (pc > 0 || accumulate) ? 1 : 0;
            sg_mat b = {B.p + (size_t)pc * B.rs + (size_t)jc * B.cs, B.rs, B.cs};
            sg_pack_b_block(bp, b, kc, nc, NR);
            for (int ic = m0; ic < m1; ic += MC) {
                int mc = m1 - ic < MC ? m1 - ic : MC;
                sg_mat a = {A.p + (size_t)ic * A.rs + (size_t)pc * A.cs, A.rs, A.cs};
                sg_pack_a_block(ap, a, mc, kc, MR);
                for (int jr = 0; jr < nc; jr += NR) {
                    int nr = nc - jr < NR ? nc - jr : NR;
                    const float *bpan = bp + (size_t)(jr / NR) * kc * NR;
                    const float *bb = (pc == 0 && bias) ? bias + jc + jr : NULL;
                    for (int ir = 0; ir < mc; ir += MR) {
                        int mr = mc - ir < MR ? mc - ir : MR;
                        float *c = C + (size_t)(ic + ir) * ldc + jc + jr;
                        if (mr == MR && nr == NR) {
                            micro(kc, ap + (size_t)ir * kc, bpan, c, (long)ldc, flags, bb);
                        } else {
                            // a partial tile: compute it whole into scratch, then
                            // do the kernel's epilogue on the valid part
                            float t[SG_TILE_MAX] __attribute__((aligned(64)));
                            micro(kc, ap + (size_t)ir * kc, bpan, t, NR, 0, NULL);
                            for (int r = 0; r < mr; r++)
                                for (int j = 0; j < nr; j++) {
                                    float v = t[r * NR + j];
                                    if (flags) v = v + c[(size_t)r * ldc + j];
                                    if (bb) v = v + bb[j];
                                    c[(size_t)r * ldc + j] = v;
                                }
                        }
                    }
                }
            }
        }
    }
}

__attribute__((target("avx512f,avx2,fma")))
static void sg_block_8x48(const sg_blocking *bl, float *C, size_t ldc, sg_mat A, sg_mat B,
                          const float *bias, int m0, int m1, int n0, int n1, int K, int accumulate) {
    sg_block_tile(bl, C, ldc, A, B, bias, m0, m1, n0, n1, K, accumulate, 8, 48, sgemm_avx512_8x48);
}

__attribute__((target("avx2,fma")))
static void sg_block_4x24(const sg_blocking *bl, float *C, size_t ldc, sg_mat A, sg_mat B,
                          const float *bias, int m0, int m1, int n0, int n1, int K, int accumulate) {
    sg_block_tile(bl, C, ldc, A, B, bias, m0, m1, n0, n1, K, accumulate, 4, 24, sgemm_avx2_4x24);
}

// In order of preference: the first one the CPU runs is the default
static const sg_kernel sg_kernels[] = {
    {"avx512", "AVX-512 F", 8, 48, 384, sg_block_8x48},
    {"avx2", "AVX2 and FMA", 4, 24, 256, sg_block_4x24},
};
#define SG_NKERNELS (int)(sizeof sg_kernels / sizeof sg_kernels[0])

// whether this CPU (and OS: gcc's check includes the saved register state) runs kernel i
static int sg_cpu_runs(int i) {
    __builtin_cpu_init();
    if (i == 0) return !!__builtin_cpu_supports("avx512f");
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// Per-core L2 in bytes, as the C library reads it from the CPU; 1 MiB when
// unknown (Zen 4; Zen 2 has 512 KiB, recent Xeons 2 MiB)
static size_t sg_l2_bytes(void) {
    long l2 = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return l2 >= 64 * 1024 && l2 <= 64L * 1024 * 1024 ? (size_t)l2 : (size_t)1 << 20;
}

// The blocks for a kernel on this L2. KC is the kernel's (asm/README.md).
// The A block (MC x KC), which every B panel of the block sweeps, gets 3/8
// of L2, up to MC = 256: 384 KiB at KC = 384, where the sweeps on the Xeon
// (2 MiB L2) and on Zen 4 (1 MiB) found nothing faster; Zen 2's 512 KiB gets
// MC = 192 with the AVX2 kernel's KC = 256. NC = 768: the B block is read
// panel by panel, once per A block, so it need not fit in L2; smaller blocks
// measured slower (the A block is repacked for each), larger no faster.
static sg_blocking sg_blocking_for(const sg_kernel *kn, size_t l2) {
    sg_blocking bl = {kn->kc, 0, 768 / kn->nr * kn->nr};
    bl.mc = (int)(l2 * 3 / 8 / ((size_t)kn->kc * sizeof(float))) / kn->mr * kn->mr;
    if (bl.mc > 256) bl.mc = 256;
    if (bl.mc < 4 * kn->mr) bl.mc = 4 * kn->mr;
    return bl;
}

// The choice, made once per process (asm_sgemm_kernel)
static struct { int decided; const sg_kernel *kernel; sg_blocking bl; char error[160]; } sg_choice;

// The kernel every GEMM runs on, or NULL for the portable C path:
// GPT_NO_ASM set (not empty, not "0") means C; GPT_ASM=avx512 or avx2
// forces that kernel; otherwise the first of sg_kernels the CPU runs. A
// GPT_ASM that names no kernel, or one this CPU cannot run, leaves NULL and
// a one-line message for asm_sgemm_error().
static const sg_kernel *asm_sgemm_kernel(void) {
    if (sg_choice.decided) return sg_choice.kernel;
    sg_choice.decided = 1;
    const char *off = getenv("GPT_NO_ASM"), *want = getenv("GPT_ASM");
    if (off && *off && strcmp(off, "0") != 0) return NULL;
    for (int i = 0; i < SG_NKERNELS; i++) {
        const sg_kernel *kn = &sg_kernels[i];
        if (want && *want && strcmp(want, kn->name) != 0) continue;
        if (sg_cpu_runs(i)) {
            sg_choice.kernel = kn;
            sg_choice.bl = sg_blocking_for(kn, sg_l2_bytes());
            return kn;
        }
        if (want && *want) {
            snprintf(sg_choice.error, sizeof sg_choice.error,
                     "GPT_ASM=%s: this CPU lacks %s (unset GPT_ASM for the best kernel it runs)", want, kn->needs);
            return NULL;
        }
    }
    if (want && *want)
        snprintf(sg_choice.error, sizeof sg_choice.error,
                 "GPT_ASM=%.40s: no such kernel (expected avx512 or avx2, or unset)", want);
    return NULL;
}

// NULL, or why the GPT_ASM asked for cannot be had (checked before a run starts)
static const char *asm_sgemm_error(void) {
    asm_sgemm_kernel();
    return sg_choice.error[0] ? sg_choice.error : NULL;
}

static int asm_sgemm_available(void) { return asm_sgemm_kernel() != NULL; }

// "avx512 8x48", "avx2 4x24" or "none (portable C)": what the GEMMs run on
static inline const char *asm_sgemm_name(void) {
    static char name[32];
    const sg_kernel *kn = asm_sgemm_kernel();
    if (!kn) return "none (portable C)";
    snprintf(name, sizeof name, "%s %dx%d", kn->name, kn->mr, kn->nr);
    return name;
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
    const sg_kernel *kn = asm_sgemm_kernel();
    const sg_blocking *bl = &sg_choice.bl;
    int MR = kn->mr, NR = kn->nr;
    int tiles_m = (M + MR - 1) / MR, tiles_n = (N + NR - 1) / NR;
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
            int n0 = u0 * NR, n1 = u1 * NR < N ? u1 * NR : N;
            kn->block(bl, C, (size_t)N, A, B, bias, 0, M, n0, n1, K, accumulate);
        } else {
            int m0 = u0 * MR, m1 = u1 * MR < M ? u1 * MR : M;
            kn->block(bl, C, (size_t)N, A, B, bias, m0, m1, 0, N, K, accumulate);
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
static inline const char *asm_sgemm_name(void) { return "none (portable C)"; }
static const char *asm_sgemm_error(void) {
    const char *want = getenv("GPT_ASM");
    return want && *want ? "GPT_ASM: this build has no assembly kernels (they are x86-64 only)" : NULL;
}
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
