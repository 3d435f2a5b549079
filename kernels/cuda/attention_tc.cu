// Memory-linear attention on tensor cores, for bf16 and f16 heads
// (B*H, N, Dh) with Dh in {32, 64, 96, 128}: the algorithm of attention.cu
// (tiled online softmax keeping each row's log-sum-exp; the backward
// recomputes the probabilities, then dQ per query tile and dK, dV per key
// tile, no atomics), with every product on `mma.sync.m16n8k16` (half inputs,
// f32 accumulation). Masks and the dropout mask are attention_mask.cuh's,
// the same as the CPU kernel's. Needs compute capability 8.0 or newer.
//
// Each warp owns 16 rows (one m16 tile): query rows in the forward and in
// dQ, key rows in dK/dV. Scores of the warp's rows against a tile of columns
// are accumulator fragments; as in FlashAttention-2, the accumulator layout
// of 16 x 16 columns is the A-operand layout of the next product, so the
// probabilities go from one mma to the next in registers (rounded to the
// input type). The other operand streams through shared memory, stored as
// rows of 16-bit values (padded by 8 so that the fragment loads hit distinct
// banks), transposed where the product needs its other side.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16/.f16 inputs), with
// g = lane / 4 and t = lane % 4:
//   A (16 x 16, 4 registers of 2 values): reg 0 (row g, cols 2t, 2t+1),
//     reg 1 (row g+8, cols 2t, 2t+1), reg 2 (row g, cols 2t+8, 2t+9),
//     reg 3 (row g+8, cols 2t+8, 2t+9);
//   B (16 x 8, 2 registers): reg 0 (rows 2t, 2t+1, col g), reg 1 (rows
//     2t+8, 2t+9, col g);
//   C/D (16 x 8 f32): c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, same).
// The lower-indexed value of a pair sits in the register's low 16 bits.
//
// tests/cuda_emu runs these kernels on the CPU under an emulation of the
// above, against a double-precision reference (kernels/tests/cuda_emulated.rs).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention_mask.cuh"

#define TC_WARPS 4
#define TC_ROWS 16       // rows per warp
#define TC_FWD_KEYS 64   // keys per tile in the forward
#define TC_BWD_TILE 32   // keys (dQ) or queries (dK, dV) per tile in the backward
#define TC_PAD 8         // 16-bit values of padding per shared row
#define TC_LOG2E 1.4426950408889634f
#define TC_LN2 0.6931471805599453f

#ifdef LCASR_CUDA_EMU
#define TC_SHARED alignas(16) static
#else
#define TC_SHARED __shared__ __align__(16)
#endif

// ---- the two input types, as raw 16-bit values ----

struct TcBf16 {
    static __device__ __forceinline__ float to_f(uint16_t b) {
        return __bfloat162float(__ushort_as_bfloat16(b));
    }
    static __device__ __forceinline__ uint16_t of(float f) {
        return __bfloat16_as_ushort(__float2bfloat16(f));
    }
};

struct TcF16 {
    static __device__ __forceinline__ float to_f(uint16_t b) {
        return __half2float(__ushort_as_half(b));
    }
    static __device__ __forceinline__ uint16_t of(float f) {
        return __half_as_ushort(__float2half(f));
    }
};

// d += a * b on one m16n8k16 tile.
template <typename T>
__device__ __forceinline__ void tc_mma(float (&d)[4], const uint32_t (&a)[4],
                                       const uint32_t (&b)[2]);

#ifdef LCASR_CUDA_EMU
#define TC_MMA(T, PTX_TYPE)                                                                    \
    template <>                                                                                \
    __device__ __forceinline__ void tc_mma<T>(float (&d)[4], const uint32_t (&a)[4],           \
                                              const uint32_t (&b)[2]) {                        \
        emu_mma_m16n8k16(d, a, b, T::to_f);                                                    \
    }
#elif __CUDA_ARCH__ >= 800
#define TC_MMA(T, PTX_TYPE)                                                                    \
    template <>                                                                                \
    __device__ __forceinline__ void tc_mma<T>(float (&d)[4], const uint32_t (&a)[4],           \
                                              const uint32_t (&b)[2]) {                        \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE            \
                     ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"             \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                          \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));      \
    }
#else
#define TC_MMA(T, PTX_TYPE)                                                                    \
    template <>                                                                                \
    __device__ __forceinline__ void tc_mma<T>(float (&)[4], const uint32_t (&)[4],             \
                                              const uint32_t (&)[2]) {                         \
        __trap();                                                                              \
    }
#endif
TC_MMA(TcBf16, "bf16")
TC_MMA(TcF16, "f16")

// ---- fragments ----

__device__ __forceinline__ uint32_t tc_pack(uint16_t lo, uint16_t hi) {
    return (uint32_t)lo | ((uint32_t)hi << 16);
}

// Values (row, col) and (row, col + 1) of a shared row-major matrix with
// row stride `ld`, as one register (col even).
__device__ __forceinline__ uint32_t tc_pair(const uint16_t* m, int row, int col, int ld) {
    return *reinterpret_cast<const uint32_t*>(m + row * ld + col);
}

// The same from a (rows, DH) head in global memory, zero from row `limit` on.
template <int DH>
__device__ __forceinline__ uint32_t tc_pair_global(const uint16_t* m, long long row, int col,
                                                   long long limit) {
    if (row >= limit) return 0u;
    const uint16_t* p = m + row * DH + col;
    return tc_pack(p[0], p[1]);
}

// The A fragments of the 16 rows [r0, r0 + 16) of a (rows, DH) head, one per
// 16 columns, zero from row `limit` on.
template <int DH>
__device__ __forceinline__ void tc_rows_a(uint32_t (&a)[DH / 16][4], const uint16_t* m,
                                          long long r0, long long limit) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < DH / 16; ++kk) {
        const int c = kk * 16 + 2 * t;
        a[kk][0] = tc_pair_global<DH>(m, r0 + g, c, limit);
        a[kk][1] = tc_pair_global<DH>(m, r0 + g + 8, c, limit);
        a[kk][2] = tc_pair_global<DH>(m, r0 + g, c + 8, limit);
        a[kk][3] = tc_pair_global<DH>(m, r0 + g + 8, c + 8, limit);
    }
}

// f(nb, e) for value e of each of N accumulator fragments (n-tiles), fully
// unrolled so that the fragments stay in registers.
template <int N, typename F>
__device__ __forceinline__ void tc_each(F&& f) {
#pragma unroll
    for (int nb = 0; nb < N; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) f(nb, e);
}

// Zeroes N accumulator fragments.
template <int N>
__device__ __forceinline__ void tc_zero(float (&acc)[N][4]) {
    tc_each<N>([&](int nb, int e) { acc[nb][e] = 0.0f; });
}

// acc[nb] = A * B^T for the NB n-tiles of a shared row-major matrix `m`
// (rows = the n side, columns = the DH contraction): the scores of the
// warp's rows (fragments `a`) against rows n0 + [0, 8 * NB) of `m`.
template <typename T, int DH, int NB>
__device__ __forceinline__ void tc_rows_times(float (&acc)[NB][4], const uint32_t (&a)[DH / 16][4],
                                              const uint16_t* m, int ld) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    tc_zero(acc);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
            const uint32_t b[2] = {tc_pair(m, nb * 8 + g, kk * 16 + 2 * t, ld),
                                   tc_pair(m, nb * 8 + g, kk * 16 + 8 + 2 * t, ld)};
            tc_mma<T>(acc[nb], a[kk], b);
        }
    }
}

// out[nb] += W * M for W the warp's 16 x (16 * KK) weights held as
// accumulator fragments w[2 KK] (rounded to T here) and M the (16 KK, DH)
// matrix whose transpose `mt` (DH rows of stride ld) is in shared memory.
template <typename T, int DH, int KK>
__device__ __forceinline__ void tc_weights_times(float (&out)[DH / 8][4], const float (&w)[2 * KK][4],
                                                 const uint16_t* mt, int ld) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < KK; ++kk) {
        const uint32_t a[4] = {tc_pack(T::of(w[2 * kk][0]), T::of(w[2 * kk][1])),
                               tc_pack(T::of(w[2 * kk][2]), T::of(w[2 * kk][3])),
                               tc_pack(T::of(w[2 * kk + 1][0]), T::of(w[2 * kk + 1][1])),
                               tc_pack(T::of(w[2 * kk + 1][2]), T::of(w[2 * kk + 1][3]))};
#pragma unroll
        for (int nb = 0; nb < DH / 8; ++nb) {
            const uint32_t b[2] = {tc_pair(mt, nb * 8 + g, kk * 16 + 2 * t, ld),
                                   tc_pair(mt, nb * 8 + g, kk * 16 + 8 + 2 * t, ld)};
            tc_mma<T>(out[nb], a, b);
        }
    }
}

// Copies rows [r0, r0 + ROWS) of a (N, DH) head into shared memory, zero
// from row `limit` on: row-major with stride DH + TC_PAD into `rows` and/or
// transposed (DH rows of stride ROWS + TC_PAD) into `cols` (either may be
// null). Each thread moves 8 values (16 bytes) at a time: the heads start
// 16-byte aligned (the host checks) and DH, DH + TC_PAD are multiples of 8.
// Without `cols`, consecutive threads take consecutive chunks of a row
// (coalesced reads). With `cols`, consecutive threads take the same chunk of
// consecutive rows: their transposed 16-bit stores then fall in one or two
// words of a `cols` row instead of 16 threads hitting one bank, and their
// row stores (stride DH + 8 values, 4 banks apart) stay conflict-free.
template <int DH, int ROWS>
__device__ __forceinline__ void tc_load_tile(uint16_t* rows, uint16_t* cols, const uint16_t* src,
                                             long long r0, long long limit) {
    constexpr int CHUNKS = DH / 8;
    for (int e = threadIdx.x; e < ROWS * CHUNKS; e += blockDim.x) {
        const int r = cols ? e % ROWS : e / CHUNKS;
        const int d0 = (cols ? e / ROWS : e % CHUNKS) * 8;
        const long long row = r0 + r;
        const uint4 x = row < limit ? *reinterpret_cast<const uint4*>(src + row * DH + d0)
                                    : make_uint4(0u, 0u, 0u, 0u);
        if (rows) *reinterpret_cast<uint4*>(rows + r * (DH + TC_PAD) + d0) = x;
        if (cols) {
            const uint32_t w[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int j = 0; j < 8; ++j)
                cols[(d0 + j) * (ROWS + TC_PAD) + r] = (uint16_t)(w[j >> 1] >> (16 * (j & 1)));
        }
    }
}

// Row r (0: g, 1: g + 8) and column (2t + e) of accumulator value v of an
// n-tile: v = 2 r + e.
__device__ __forceinline__ int tc_row_of(int v) { return v >> 1; }
__device__ __forceinline__ int tc_col_of(int v, int t) { return 2 * t + (v & 1); }

// The maximum and the sum over the four lanes that share a row.
__device__ __forceinline__ float tc_quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float tc_quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Where a thread of a 4-warp block works: its lane's fragment coordinates,
// the (item, head) of the block, the item's length, the block's first row
// (r0: queries in the forward and dQ, keys in dK/dV) and its warp's (rw),
// and the head's offset in the (B*H, N, DH) inputs.
struct TcPlace {
    int g, t;
    long long bh, b, h, len, r0, rw, base;
};

template <int DH>
__device__ __forceinline__ TcPlace tc_place(const int* lengths, const AttShape& s) {
    TcPlace w;
    const int lane = threadIdx.x & 31;
    w.g = lane >> 2;
    w.t = lane & 3;
    w.bh = blockIdx.y;
    w.b = w.bh / s.heads;
    w.h = w.bh - w.b * s.heads;
    w.len = lengths[w.b];
    w.r0 = (long long)blockIdx.x * (TC_WARPS * TC_ROWS);
    w.rw = w.r0 + (threadIdx.x >> 5) * TC_ROWS;
    w.base = w.bh * s.n * DH;
    return w;
}

// ---- forward ----
// Grid (ceil(N / 64), B*H), 4 warps of 16 query rows. Writes out (T) and
// each row's log-sum-exp of the scaled scores (0 for padded rows).
template <typename T, int DH>
__device__ void tc_fwd(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                       const int* lengths, uint16_t* out, float* lse, AttShape s) {
    constexpr int KT = TC_FWD_KEYS;
    constexpr int KS = DH + TC_PAD;
    constexpr int VS = KT + TC_PAD;
    TC_SHARED uint16_t ks[KT * KS];
    TC_SHARED uint16_t vt[DH * VS];
    const TcPlace w = tc_place<DH>(lengths, s);
    const int g = w.g, t = w.t;
    const long long b = w.b, h = w.h, bh = w.bh, len = w.len, base = w.base;
    const long long i0 = w.r0, iw = w.rw;
    // Scores in base 2 (exp2 is one instruction): m, the running maxima,
    // too; the log-sum-exp is written in base e.
    const float scale2 = s.scale * TC_LOG2E;

    uint32_t qa[DH / 16][4];
    tc_rows_a<DH>(qa, q + base, iw, len);
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.0f, 0.0f};  // this lane's part of the row sums
    float o[DH / 8][4];
    tc_zero(o);
    uint32_t rk[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) rk[r] = s.threshold ? att_row_key(s.seed, b, h, iw + g + 8 * r) : 0u;

    long long j_lo, j_hi;
    att_span(s.left, s.right, len, i0, TC_WARPS * TC_ROWS, KT, &j_lo, &j_hi);
    for (long long j0 = j_lo; j0 < j_hi; j0 += KT) {
        __syncthreads();
        tc_load_tile<DH, KT>(ks, nullptr, k + base, j0, len);
        tc_load_tile<DH, KT>(nullptr, vt, v + base, j0, len);
        __syncthreads();
        float sc[KT / 8][4];
        tc_rows_times<T, DH, KT / 8>(sc, qa, ks, KS);
        // Warp-uniform: a tile with nothing masked and no dropout skips the
        // per-score index arithmetic (most tiles of a long item).
        const bool plain = att_tile_plain(s, len, iw, TC_ROWS, j0, KT);
        float mx[2] = {-INFINITY, -INFINITY};
        tc_each<KT / 8>([&](int nb, int e) {
            const int r = tc_row_of(e);
            if (plain) {
                sc[nb][e] *= scale2;
            } else {
                const long long i = iw + g + 8 * r;
                const long long j = j0 + nb * 8 + tc_col_of(e, t);
                sc[nb][e] = att_visible(s, len, i, j) ? sc[nb][e] * scale2 : -INFINITY;
            }
            mx[r] = fmaxf(mx[r], sc[nb][e]);
        });
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float m_new = fmaxf(m[r], tc_quad_max(mx[r]));
            corr[r] = m_new == -INFINITY ? 1.0f : exp2f(m[r] - m_new);
            m[r] = m_new;
            l[r] *= corr[r];
        }
        if (plain) {
            tc_each<KT / 8>([&](int nb, int e) {
                const float p = exp2f(sc[nb][e] - m[tc_row_of(e)]);
                l[tc_row_of(e)] += p;
                sc[nb][e] = p;
            });
        } else {
            tc_each<KT / 8>([&](int nb, int e) {
                const int r = tc_row_of(e);
                const long long j = j0 + nb * 8 + tc_col_of(e, t);
                const float p = sc[nb][e] == -INFINITY ? 0.0f : exp2f(sc[nb][e] - m[r]);
                l[r] += p;
                sc[nb][e] = p * att_keep(rk[r], j, s.threshold, s.keep_scale);
            });
        }
        tc_each<DH / 8>([&](int nb, int e) { o[nb][e] *= corr[tc_row_of(e)]; });
        tc_weights_times<T, DH, KT / 16>(o, sc, vt, VS);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float sum = tc_quad_sum(l[r]);
        const long long i = iw + g + 8 * r;
        if (i >= s.n) continue;
        const bool live = i < len && sum > 0.0f;
        const float inv = live ? 1.0f / sum : 0.0f;
#pragma unroll
        for (int nb = 0; nb < DH / 8; ++nb)
            *reinterpret_cast<uint32_t*>(out + base + i * DH + nb * 8 + 2 * t) =
                tc_pack(T::of(o[nb][2 * r] * inv), T::of(o[nb][2 * r + 1] * inv));
        if (t == 0) lse[bh * s.n + i] = live ? (m[r] + log2f(sum)) * TC_LN2 : 0.0f;
    }
}

// ---- backward, step 1: delta[i] = sum_d dO[i, d] * O[i, d], one warp per row ----
template <typename T>
__device__ void tc_delta(const uint16_t* out, const uint16_t* dout, float* delta, long long rows,
                         int dh) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
         r += warps) {
        float acc = 0.0f;
        for (int d = lane; d < dh; d += 32)
            acc = fmaf(T::to_f(out[r * dh + d]), T::to_f(dout[r * dh + d]), acc);
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) delta[r] = acc;
    }
}

// ---- backward, step 2: dQ (f32), 4 warps of 16 query rows, key tiles streamed ----
template <typename T, int DH>
__device__ void tc_bwd_dq(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                          const uint16_t* dout, const float* lse, const float* delta,
                          const int* lengths, float* dq, AttShape s) {
    constexpr int KT = TC_BWD_TILE;
    constexpr int RS = DH + TC_PAD;
    constexpr int CS = KT + TC_PAD;
    TC_SHARED uint16_t ks[KT * RS];
    TC_SHARED uint16_t kt[DH * CS];
    TC_SHARED uint16_t vs[KT * RS];
    const TcPlace w = tc_place<DH>(lengths, s);
    const int g = w.g, t = w.t;
    const long long b = w.b, h = w.h, bh = w.bh, len = w.len, base = w.base;
    const long long i0 = w.r0, iw = w.rw;

    uint32_t qa[DH / 16][4], da[DH / 16][4];
    tc_rows_a<DH>(qa, q + base, iw, len);
    tc_rows_a<DH>(da, dout + base, iw, len);
    float acc[DH / 8][4];
    tc_zero(acc);
    // Probabilities as exp2(score * scale2 - lse2), the log-sum-exp in base 2.
    const float scale2 = s.scale * TC_LOG2E;
    float row_lse[2], row_delta[2];
    uint32_t rk[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const long long i = iw + g + 8 * r;
        row_lse[r] = i < len ? lse[bh * s.n + i] * TC_LOG2E : 0.0f;
        row_delta[r] = i < len ? delta[bh * s.n + i] : 0.0f;
        rk[r] = s.threshold ? att_row_key(s.seed, b, h, i) : 0u;
    }
    long long j_lo, j_hi;
    att_span(s.left, s.right, len, i0, TC_WARPS * TC_ROWS, KT, &j_lo, &j_hi);
    for (long long j0 = j_lo; j0 < j_hi; j0 += KT) {
        __syncthreads();
        tc_load_tile<DH, KT>(ks, kt, k + base, j0, len);
        tc_load_tile<DH, KT>(vs, nullptr, v + base, j0, len);
        __syncthreads();
        float ds[KT / 8][4], dp[KT / 8][4];
        tc_rows_times<T, DH, KT / 8>(ds, qa, ks, RS);  // scores, then dS in place
        tc_rows_times<T, DH, KT / 8>(dp, da, vs, RS);
        if (att_tile_plain(s, len, iw, TC_ROWS, j0, KT)) {  // warp-uniform, as in the forward
            tc_each<KT / 8>([&](int nb, int e) {
                const int r = tc_row_of(e);
                const float p = exp2f(ds[nb][e] * scale2 - row_lse[r]);
                ds[nb][e] = p * (dp[nb][e] - row_delta[r]);
            });
        } else {
            tc_each<KT / 8>([&](int nb, int e) {
                const int r = tc_row_of(e);
                const long long i = iw + g + 8 * r;
                const long long j = j0 + nb * 8 + tc_col_of(e, t);
                float d = 0.0f;
                if (att_visible(s, len, i, j)) {
                    const float p = exp2f(ds[nb][e] * scale2 - row_lse[r]);
                    const float z = att_keep(rk[r], j, s.threshold, s.keep_scale);
                    d = p * (dp[nb][e] * z - row_delta[r]);
                }
                ds[nb][e] = d;
            });
        }
        tc_weights_times<T, DH, KT / 16>(acc, ds, kt, CS);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const long long i = iw + g + 8 * r;
        if (i >= s.n) continue;
#pragma unroll
        for (int nb = 0; nb < DH / 8; ++nb)
            *reinterpret_cast<float2*>(dq + base + i * DH + nb * 8 + 2 * t) =
                make_float2(acc[nb][2 * r] * s.scale, acc[nb][2 * r + 1] * s.scale);
    }
}

// ---- backward, step 3: dK and dV (f32), 4 warps of 16 key rows, query tiles streamed ----
template <typename T, int DH>
__device__ void tc_bwd_dkv(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                           const uint16_t* dout, const float* lse, const float* delta,
                           const int* lengths, float* dk, float* dv, AttShape s) {
    constexpr int QT = TC_BWD_TILE;
    constexpr int RS = DH + TC_PAD;
    constexpr int CS = QT + TC_PAD;
    TC_SHARED uint16_t qs[QT * RS];
    TC_SHARED uint16_t qt[DH * CS];
    TC_SHARED uint16_t dos[QT * RS];
    TC_SHARED uint16_t dot[DH * CS];
    TC_SHARED float tile_lse[QT];  // in base 2
    TC_SHARED float tile_delta[QT];
    TC_SHARED uint32_t tile_rk[QT];
    const TcPlace w = tc_place<DH>(lengths, s);
    const int g = w.g, t = w.t;
    const long long b = w.b, h = w.h, bh = w.bh, len = w.len, base = w.base;
    const long long j0 = w.r0, jw = w.rw;
    // Probabilities as exp2(score * scale2 - lse2), the log-sum-exp in base 2.
    const float scale2 = s.scale * TC_LOG2E;

    uint32_t ka[DH / 16][4], va[DH / 16][4];
    tc_rows_a<DH>(ka, k + base, jw, len);
    tc_rows_a<DH>(va, v + base, jw, len);
    float gk[DH / 8][4], gv[DH / 8][4];
    tc_zero(gk);
    tc_zero(gv);

    long long i_lo, i_hi;  // queries that see any of the block's live keys
    att_span(s.right, s.left, len, j0, TC_WARPS * TC_ROWS, QT, &i_lo, &i_hi);
    for (long long q0 = i_lo; q0 < i_hi; q0 += QT) {
        __syncthreads();
        tc_load_tile<DH, QT>(qs, qt, q + base, q0, len);
        tc_load_tile<DH, QT>(dos, dot, dout + base, q0, len);
        if (threadIdx.x < QT) {
            const long long i = q0 + threadIdx.x;
            tile_lse[threadIdx.x] = i < len ? lse[bh * s.n + i] * TC_LOG2E : 0.0f;
            tile_delta[threadIdx.x] = i < len ? delta[bh * s.n + i] : 0.0f;
            tile_rk[threadIdx.x] = s.threshold ? att_row_key(s.seed, b, h, i) : 0u;
        }
        __syncthreads();
        float pz[QT / 8][4], ds[QT / 8][4];
        tc_rows_times<T, DH, QT / 8>(ds, ka, qs, RS);  // transposed scores, then dS^T
        tc_rows_times<T, DH, QT / 8>(pz, va, dos, RS);  // dP^T, then (P o Z)^T
        // Warp-uniform: the warp's 16 keys against the tile's queries.
        if (att_tile_plain(s, len, q0, QT, jw, TC_ROWS)) {
            tc_each<QT / 8>([&](int nb, int e) {
                const int c = nb * 8 + tc_col_of(e, t);
                const float p = exp2f(ds[nb][e] * scale2 - tile_lse[c]);
                ds[nb][e] = p * (pz[nb][e] - tile_delta[c]);
                pz[nb][e] = p;
            });
        } else {
            tc_each<QT / 8>([&](int nb, int e) {
                const long long j = jw + g + 8 * tc_row_of(e);
                const int c = nb * 8 + tc_col_of(e, t);
                const long long i = q0 + c;
                float p_z = 0.0f, d = 0.0f;
                if (att_visible(s, len, i, j)) {
                    const float p = exp2f(ds[nb][e] * scale2 - tile_lse[c]);
                    const float z = att_keep(tile_rk[c], j, s.threshold, s.keep_scale);
                    p_z = p * z;
                    d = p * (pz[nb][e] * z - tile_delta[c]);
                }
                pz[nb][e] = p_z;
                ds[nb][e] = d;
            });
        }
        tc_weights_times<T, DH, QT / 16>(gv, pz, dot, CS);
        tc_weights_times<T, DH, QT / 16>(gk, ds, qt, CS);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const long long j = jw + g + 8 * r;
        if (j >= s.n) continue;
#pragma unroll
        for (int nb = 0; nb < DH / 8; ++nb) {
            const long long at = base + j * DH + nb * 8 + 2 * t;
            *reinterpret_cast<float2*>(dk + at) =
                make_float2(gk[nb][2 * r] * s.scale, gk[nb][2 * r + 1] * s.scale);
            *reinterpret_cast<float2*>(dv + at) = make_float2(gv[nb][2 * r], gv[nb][2 * r + 1]);
        }
    }
}

// ---- entry points: lcasr_attention_tc_{fwd,bwd_dq,bwd_dkv}_{bf16,f16}_{DH} ----

#define TC_ENTRIES(NAME, T, DH)                                                                \
    extern "C" __global__ void lcasr_attention_tc_fwd_##NAME##_##DH(                           \
        const uint16_t* q, const uint16_t* k, const uint16_t* v, const int* lengths,          \
        uint16_t* out, float* lse, AttShape s) {                                               \
        tc_fwd<T, DH>(q, k, v, lengths, out, lse, s);                                          \
    }                                                                                          \
    extern "C" __global__ void lcasr_attention_tc_bwd_dq_##NAME##_##DH(                        \
        const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* dout,        \
        const float* lse, const float* delta, const int* lengths, float* dq, AttShape s) {     \
        tc_bwd_dq<T, DH>(q, k, v, dout, lse, delta, lengths, dq, s);                           \
    }                                                                                          \
    extern "C" __global__ void lcasr_attention_tc_bwd_dkv_##NAME##_##DH(                       \
        const uint16_t* q, const uint16_t* k, const uint16_t* v, const uint16_t* dout,        \
        const float* lse, const float* delta, const int* lengths, float* dk, float* dv,       \
        AttShape s) {                                                                          \
        tc_bwd_dkv<T, DH>(q, k, v, dout, lse, delta, lengths, dk, dv, s);                      \
    }

#define TC_TYPE(NAME, T)                                                                       \
    extern "C" __global__ void lcasr_attention_tc_delta_##NAME(                                \
        const uint16_t* out, const uint16_t* dout, float* delta, long long rows, int dh) {    \
        tc_delta<T>(out, dout, delta, rows, dh);                                               \
    }                                                                                          \
    TC_ENTRIES(NAME, T, 32)                                                                    \
    TC_ENTRIES(NAME, T, 64)                                                                    \
    TC_ENTRIES(NAME, T, 96)                                                                    \
    TC_ENTRIES(NAME, T, 128)

TC_TYPE(bf16, TcBf16)
TC_TYPE(f16, TcF16)
