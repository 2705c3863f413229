// sgemm_avx2.S: the fp32 GEMM microkernel of the CPU trainer for CPUs with
// AVX2 and FMA but no AVX-512 (AMD Zen 1-3, Intel Haswell to Raptor Lake),
// GNU as (AT&T syntax), System V x86-64 ABI. The twin of sgemm_avx512.S at
// half the vector width; the same packing and blocking in asm/sgemm.h drive
// both.
//
// What it computes. One 4x24 tile of C from packed panels:
//
//     C[r][j] = (flags & 1 ? C[r][j] : 0) + sum_{k<kc} a[k][r] * b[k][j]  (+ bias[j])
//
// for r < 4, j < 24, where a is an A sliver packed k-major (4 floats per k,
// 16 bytes) and b a B panel packed k-major (24 floats per k, 96 bytes). Each
// C[r][j] sums its products in k order in one vector lane, then adds the old
// C, then the bias: the result depends only on the operands, never on where
// the tile sits or which thread runs it.
//
//     void sgemm_avx2_4x24(long kc, const float *a, const float *b,
//                          float *c, long ldc, long flags, const float *bias);
//     rdi = kc, rsi = a, rdx = b, rcx = c, r8 = ldc (floats between C rows),
//     r9 = flags (bit 0: add into C), 8(%rsp) = bias (24 floats) or NULL.
//
// Register plan (all 16 ymm, no spills, no callee-saved registers touched):
//     ymm0-2    one k-row of the B panel: 24 columns as 3 vectors of 8
//     ymm3      a[k][r] broadcast to 8 lanes (reused by every row: renaming
//               gives each broadcast its own physical register)
//     ymm4-15   the 4x24 accumulator tile: row r, vector j lives in ymm(4+3r+j)
// Per k: 3 vector loads + 4 broadcasts (7 load uops, 2 load ports: 3.5
// cycles) feed 12 FMAs (6 cycles on the 2 FMA pipes): FMA-bound. The usual
// AVX2 tile, 6x16, needs 8 loads for the same 12 FMAs, and 6 does not divide
// B*T (a power of two here), the row count of the forward and input-gradient
// products; 4 divides every row count (B*T, 768, 2304, 3072, 50304) and 24
// every column count (768, 2304, 3072, 50304) of GPT-2 124M (d12), so none of
// its products has an edge tile, and 4 and 24 keep the packing's 8x8 transposes whole. 12
// independent accumulators cover the FMA latency (4-5 cycles) at 2 a cycle.
//
// Memory plan. The caller reuses one B panel (kc x 24 x 4 bytes, 24 KiB at
// kc = 256: L1) across the 4-row A slivers of an A block in L2; the A sliver
// (16 bytes per k) is prefetched 16 k-steps ahead. The 4 C rows are
// prefetched for writing before the loop, so the epilogue finds them in L1.
//
// Measured (asm/README.md has the tables and how), on an AMD EPYC Zen 4,
// which runs AVX-512 too, so this is a proxy for an AVX2-only machine (Zen 4
// has the two 256-bit FMA pipes of Zen 2 and 3, at a higher clock; its zmm
// FMAs are two halves, so here the AVX2 kernel loses nothing to the AVX-512
// one): the kernel alone, one core, packed operands hot, kc = 256, one panel
// against 64 slivers, 115 GFLOP/s against 109-114 for a bare loop of 12
// independent ymm FMAs (the clock varies: at the limit); whole GEMMs on the
// nine GPT-2 products at B*T = 256, one core: 93-105 GFLOP/s, 1.00-1.13x
// numpy's OpenBLAS and 1.7-10.3x the C twin (train_gpt.c's gemm_nt /
// gemm_nn, auto-vectorised for AVX-512 here). On a real AVX2-only chip, an
// AMD EPYC Zen 1 (128-bit FMA pipes): whole GEMMs 28-34 GFLOP/s on one
// core, 76-92% of its 36.9-38.8 FMA limit, 1.00x numpy on the nine
// products; d12 end to end 4.3x the portable C path.

#if defined(__x86_64__) && defined(__ELF__)

// One k-step: row r of the tile gets a[k][r] * b[k][0:24]. offa/offb are the
// byte offsets of this k-step inside the unrolled block.
.macro KSTEP offa, offb
    vmovups      \offb(%rdx), %ymm0
    vmovups      \offb+32(%rdx), %ymm1
    vmovups      \offb+64(%rdx), %ymm2
    vbroadcastss \offa(%rsi), %ymm3
    vfmadd231ps  %ymm0, %ymm3, %ymm4
    vfmadd231ps  %ymm1, %ymm3, %ymm5
    vfmadd231ps  %ymm2, %ymm3, %ymm6
    vbroadcastss \offa+4(%rsi), %ymm3
    vfmadd231ps  %ymm0, %ymm3, %ymm7
    vfmadd231ps  %ymm1, %ymm3, %ymm8
    vfmadd231ps  %ymm2, %ymm3, %ymm9
    vbroadcastss \offa+8(%rsi), %ymm3
    vfmadd231ps  %ymm0, %ymm3, %ymm10
    vfmadd231ps  %ymm1, %ymm3, %ymm11
    vfmadd231ps  %ymm2, %ymm3, %ymm12
    vbroadcastss \offa+12(%rsi), %ymm3
    vfmadd231ps  %ymm0, %ymm3, %ymm13
    vfmadd231ps  %ymm1, %ymm3, %ymm14
    vfmadd231ps  %ymm2, %ymm3, %ymm15
.endm

// Epilogue steps on the three accumulators z0-z2 of one tile row, whose C
// row is at (%rcx,idx,scale): ADDROWC adds the C row, STOREROW stores it.
.macro ADDROWC z0, z1, z2, idx, scale
    vaddps  0(%rcx,\idx,\scale), %ymm\z0, %ymm\z0
    vaddps  32(%rcx,\idx,\scale), %ymm\z1, %ymm\z1
    vaddps  64(%rcx,\idx,\scale), %ymm\z2, %ymm\z2
.endm
.macro STOREROW z0, z1, z2, idx, scale
    vmovups %ymm\z0, 0(%rcx,\idx,\scale)
    vmovups %ymm\z1, 32(%rcx,\idx,\scale)
    vmovups %ymm\z2, 64(%rcx,\idx,\scale)
.endm

    .text
    .p2align 5
    .globl sgemm_avx2_4x24
    .type sgemm_avx2_4x24, @function
sgemm_avx2_4x24:
    .cfi_startproc
    // prefetch the 4 C rows (96 bytes each, up to 3 cache lines when
    // unaligned) for writing; the loads complete while the loop runs
    lea     (,%r8,4), %r8               // ldc in bytes
    lea     (%r8,%r8,2), %r10           // 3 * ldc
    xor     %eax, %eax                  // row 0 as (%rcx,%rax,1)
    prefetchw   (%rcx)
    prefetchw   64(%rcx)
    prefetchw   95(%rcx)
    prefetchw   (%rcx,%r8)
    prefetchw   64(%rcx,%r8)
    prefetchw   95(%rcx,%r8)
    prefetchw   (%rcx,%r8,2)
    prefetchw   64(%rcx,%r8,2)
    prefetchw   95(%rcx,%r8,2)
    prefetchw   (%rcx,%r10)
    prefetchw   64(%rcx,%r10)
    prefetchw   95(%rcx,%r10)

    // zero the accumulators (a VEX xmm write clears the upper half too)
    .irp z, 4,5,6,7,8,9,10,11,12,13,14,15
    vxorps  %xmm\z, %xmm\z, %xmm\z
    .endr

    // main loop: 4 k-steps per trip (64 bytes of a, 384 bytes of b)
    mov     %rdi, %r11
    shr     $2, %r11
    jz      2f
    .p2align 4
1:
    prefetcht0  256(%rsi)               // a, 16 k-steps ahead: 1 line per trip
    KSTEP   0, 0
    KSTEP   16, 96
    KSTEP   32, 192
    KSTEP   48, 288
    add     $64, %rsi
    add     $384, %rdx
    dec     %r11
    jnz     1b
2:
    // the remaining kc % 4 k-steps
    and     $3, %rdi
    jz      4f
3:
    KSTEP   0, 0
    add     $16, %rsi
    add     $96, %rdx
    dec     %rdi
    jnz     3b
4:
    // epilogue: acc (+ C) (+ bias), then store, row by row
    mov     8(%rsp), %rdx               // bias
    test    $1, %r9
    jz      5f
    ADDROWC 4, 5, 6, %rax, 1
    ADDROWC 7, 8, 9, %r8, 1
    ADDROWC 10, 11, 12, %r8, 2
    ADDROWC 13, 14, 15, %r10, 1
5:
    test    %rdx, %rdx
    jz      6f
    vmovups (%rdx), %ymm0
    vmovups 32(%rdx), %ymm1
    vmovups 64(%rdx), %ymm2
    .irp z, 4,7,10,13
    vaddps  %ymm0, %ymm\z, %ymm\z
    .endr
    .irp z, 5,8,11,14
    vaddps  %ymm1, %ymm\z, %ymm\z
    .endr
    .irp z, 6,9,12,15
    vaddps  %ymm2, %ymm\z, %ymm\z
    .endr
6:
    STOREROW 4, 5, 6, %rax, 1
    STOREROW 7, 8, 9, %r8, 1
    STOREROW 10, 11, 12, %r8, 2
    STOREROW 13, 14, 15, %r10, 1
    vzeroupper
    ret
    .cfi_endproc
    .size sgemm_avx2_4x24, .-sgemm_avx2_4x24

#endif

    .section .note.GNU-stack,"",@progbits
