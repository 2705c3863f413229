// sgemm_avx512.S: the fp32 GEMM microkernel of the CPU trainer, AVX-512, GNU as
// (AT&T syntax), System V x86-64 ABI.
//
// What it computes. One 8x48 tile of C from packed panels:
//
//     C[r][j] = (flags & 1 ? C[r][j] : 0) + sum_{k<kc} a[k][r] * b[k][j]  (+ bias[j])
//
// for r < 8, j < 48, where a is an A sliver packed k-major (8 floats per k,
// 32 bytes) and b a B panel packed k-major (48 floats per k, 192 bytes), both
// written by the packing code in asm/sgemm.h. Each C[r][j] sums its products in
// k order in one vector lane, then adds the old C, then the bias: the result
// depends only on the operands, never on where the tile sits or which thread
// runs it, which is what makes the whole GEMM bitwise thread-count independent.
//
//     void sgemm_avx512_8x48(long kc, const float *a, const float *b,
//                            float *c, long ldc, long flags, const float *bias);
//     rdi = kc, rsi = a, rdx = b, rcx = c, r8 = ldc (floats between C rows),
//     r9 = flags (bit 0: add into C), 8(%rsp) = bias (48 floats) or NULL.
//
// Register plan (all 32 zmm, no spills, no callee-saved registers touched):
//     zmm0-2    one k-row of the B panel: 48 columns as 3 vectors of 16
//     zmm3-7    a[k][r] broadcast to 16 lanes (rotated; renaming makes reuse free)
//     zmm8-31   the 8x48 accumulator tile: row r, vector j lives in zmm(8+3r+j)
// Per k: 3 vector loads + 8 broadcasts (11 load uops, 2 load ports) feed 24
// FMAs (12 cycles on the 2 FMA ports): FMA-bound with load slots to spare. 24
// independent accumulators hide the 4-cycle FMA latency 6 times over.
//
// Memory plan. The caller (asm/sgemm.h) reuses one B panel (kc x 48 x 4 bytes,
// 72 KiB at kc = 384) across the 8-row A slivers of a 256-row block: the panel
// streams from L2 at 192 bytes per k, which L2 sustains (kc = 128, panel in L1,
// measured no faster), while the A sliver (32 bytes per k) is prefetched 16
// k-steps ahead. The 8 C rows are prefetched for writing before the loop, so
// the epilogue's read-modify-write finds them in L1.
//
// Measured (asm/README.md has the tables and how). On 2 cores of an Intel
// Xeon (2 zmm FMA ports): in L1/L2 with kc = 384, one core, 205-221 GFLOP/s
// against 232 for a bare loop of independent FMAs (88-95% of the core's
// peak); whole GEMMs, the nine GPT-2 products at B*T = 256: 314-401 GFLOP/s,
// 1.12-1.37x numpy's OpenBLAS and 2.3-18.5x its C twin (the register-tiled
// loops of train_gpt.c's gemm_nt / gemm_nn). On an AMD EPYC Zen 4 (a zmm FMA
// is two 256-bit halves): the kernel alone 117-122 against 109-114 for the
// bare FMA loop (the clock varies), whole GEMMs on the nine GPT-2 products
// 89-100 GFLOP/s on one core, 0.93-1.15x numpy's OpenBLAS and 1.6-10.7x the
// C twin.

#if defined(__x86_64__) && defined(__ELF__)

// Epilogue steps on the three accumulators z0-z2 of one tile row:
// ADDC adds the C row at rax and steps rax to the next row, ADDB adds the
// bias (in zmm0-2), STOREC stores to the C row at rcx and steps rcx.
.macro ADDC z0, z1, z2
    vaddps  (%rax), %zmm\z0, %zmm\z0
    vaddps  64(%rax), %zmm\z1, %zmm\z1
    vaddps  128(%rax), %zmm\z2, %zmm\z2
    add     %r8, %rax
.endm
.macro ADDB z0, z1, z2
    vaddps  %zmm0, %zmm\z0, %zmm\z0
    vaddps  %zmm1, %zmm\z1, %zmm\z1
    vaddps  %zmm2, %zmm\z2, %zmm\z2
.endm
.macro STOREC z0, z1, z2
    vmovups %zmm\z0, (%rcx)
    vmovups %zmm\z1, 64(%rcx)
    vmovups %zmm\z2, 128(%rcx)
    add     %r8, %rcx
.endm

// One k-step: row r of the tile gets a[k][r] * b[k][0:48]. offa/offb are the
// byte offsets of this k-step inside the unrolled block.
.macro KSTEP offa, offb
    vmovups     \offb(%rdx), %zmm0
    vmovups     \offb+64(%rdx), %zmm1
    vmovups     \offb+128(%rdx), %zmm2
    vbroadcastss \offa(%rsi), %zmm3
    vfmadd231ps %zmm0, %zmm3, %zmm8
    vfmadd231ps %zmm1, %zmm3, %zmm9
    vfmadd231ps %zmm2, %zmm3, %zmm10
    vbroadcastss \offa+4(%rsi), %zmm4
    vfmadd231ps %zmm0, %zmm4, %zmm11
    vfmadd231ps %zmm1, %zmm4, %zmm12
    vfmadd231ps %zmm2, %zmm4, %zmm13
    vbroadcastss \offa+8(%rsi), %zmm5
    vfmadd231ps %zmm0, %zmm5, %zmm14
    vfmadd231ps %zmm1, %zmm5, %zmm15
    vfmadd231ps %zmm2, %zmm5, %zmm16
    vbroadcastss \offa+12(%rsi), %zmm6
    vfmadd231ps %zmm0, %zmm6, %zmm17
    vfmadd231ps %zmm1, %zmm6, %zmm18
    vfmadd231ps %zmm2, %zmm6, %zmm19
    vbroadcastss \offa+16(%rsi), %zmm7
    vfmadd231ps %zmm0, %zmm7, %zmm20
    vfmadd231ps %zmm1, %zmm7, %zmm21
    vfmadd231ps %zmm2, %zmm7, %zmm22
    vbroadcastss \offa+20(%rsi), %zmm3
    vfmadd231ps %zmm0, %zmm3, %zmm23
    vfmadd231ps %zmm1, %zmm3, %zmm24
    vfmadd231ps %zmm2, %zmm3, %zmm25
    vbroadcastss \offa+24(%rsi), %zmm4
    vfmadd231ps %zmm0, %zmm4, %zmm26
    vfmadd231ps %zmm1, %zmm4, %zmm27
    vfmadd231ps %zmm2, %zmm4, %zmm28
    vbroadcastss \offa+28(%rsi), %zmm5
    vfmadd231ps %zmm0, %zmm5, %zmm29
    vfmadd231ps %zmm1, %zmm5, %zmm30
    vfmadd231ps %zmm2, %zmm5, %zmm31
.endm

    .text
    .p2align 5
    .globl sgemm_avx512_8x48
    .type sgemm_avx512_8x48, @function
sgemm_avx512_8x48:
    .cfi_startproc
    // prefetch the 8 C rows (192 bytes each, up to 4 cache lines when
    // unaligned) for writing; the loads complete while the loop runs
    lea     (,%r8,4), %r8               // ldc in bytes
    lea     (%r8,%r8,2), %r10           // 3 * ldc
    mov     %rcx, %rax
    .rept 2                             // rows 0-3, then rows 4-7
    prefetchw   (%rax)
    prefetchw   64(%rax)
    prefetchw   128(%rax)
    prefetchw   191(%rax)
    prefetchw   (%rax,%r8)
    prefetchw   64(%rax,%r8)
    prefetchw   128(%rax,%r8)
    prefetchw   191(%rax,%r8)
    prefetchw   (%rax,%r8,2)
    prefetchw   64(%rax,%r8,2)
    prefetchw   128(%rax,%r8,2)
    prefetchw   191(%rax,%r8,2)
    prefetchw   (%rax,%r10)
    prefetchw   64(%rax,%r10)
    prefetchw   128(%rax,%r10)
    prefetchw   191(%rax,%r10)
    lea     (%rax,%r8,4), %rax
    .endr

    // zero the accumulators
    .irp z, 8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    vpxord  %zmm\z, %zmm\z, %zmm\z
    .endr

    // main loop: 4 k-steps per trip (128 bytes of a, 768 bytes of b)
    mov     %rdi, %r11
    shr     $2, %r11
    jz      2f
    .p2align 4
1:
    prefetcht0  512(%rsi)               // a, 16 k-steps ahead: 2 lines per trip
    prefetcht0  576(%rsi)
    KSTEP   0, 0
    KSTEP   32, 192
    KSTEP   64, 384
    KSTEP   96, 576
    add     $128, %rsi
    add     $768, %rdx
    dec     %r11
    jnz     1b
2:
    // the remaining kc % 4 k-steps
    and     $3, %rdi
    jz      4f
3:
    KSTEP   0, 0
    add     $32, %rsi
    add     $192, %rdx
    dec     %rdi
    jnz     3b
4:
    // epilogue: acc (+ C) (+ bias), row by row; rax walks the rows
    mov     8(%rsp), %rdx               // bias
    test    $1, %r9
    jz      5f
    mov     %rcx, %rax
    ADDC    8, 9, 10
    ADDC    11, 12, 13
    ADDC    14, 15, 16
    ADDC    17, 18, 19
    ADDC    20, 21, 22
    ADDC    23, 24, 25
    ADDC    26, 27, 28
    ADDC    29, 30, 31
5:
    test    %rdx, %rdx
    jz      6f
    vmovups (%rdx), %zmm0
    vmovups 64(%rdx), %zmm1
    vmovups 128(%rdx), %zmm2
    ADDB    8, 9, 10
    ADDB    11, 12, 13
    ADDB    14, 15, 16
    ADDB    17, 18, 19
    ADDB    20, 21, 22
    ADDB    23, 24, 25
    ADDB    26, 27, 28
    ADDB    29, 30, 31
6:
    STOREC  8, 9, 10
    STOREC  11, 12, 13
    STOREC  14, 15, 16
    STOREC  17, 18, 19
    STOREC  20, 21, 22
    STOREC  23, 24, 25
    STOREC  26, 27, 28
    STOREC  29, 30, 31
    vzeroupper
    ret
    .cfi_endproc
    .size sgemm_avx512_8x48, .-sgemm_avx512_8x48

#endif

    .section .note.GNU-stack,"",@progbits
