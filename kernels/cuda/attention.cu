// Memory-linear multi-head attention on (B*H, N, Dh) f32 heads: tiled
// online softmax in the forward, which keeps only each row's log-sum-exp;
// the backward recomputes the probabilities tile by tile. Masking (item
// lengths, a local window) and the counter-based dropout mask are those of
// the CPU kernel (src/attention*.rs), bit for bit, so both devices drop the
// same entries.
//
// Layout of the work: a key tile is 32 keys, one per lane of a warp. For
// each query row a warp owns, lane l computes the score against key l of the
// tile; the softmax statistics are warp reductions; the output row is split
// over the lanes, DPL = ceil(Dh / 32) values each. The key-side backward is
// the same with the roles of queries and keys swapped. Tiles live in shared
// memory, rows padded by one float so that lanes reading one column of 32
// rows hit 32 banks. Dh <= 128 (DPL <= 4); the host falls back to the
// composed path beyond.

#define ATT_WARPS 4
#define ATT_TILE 32

#include "attention_mask.cuh"

// The block's dynamic shared memory (the launch's shared_mem_bytes) as
// `T name[]`; kernels/tests/cuda_emu/cuda_emu.h defines its own.
#ifndef DYNAMIC_SHARED
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Copies rows [r0, r0 + count) of a (N, Dh) head into a padded shared tile
// (stride Dh + 1), zero past row `limit`.
__device__ __forceinline__ void att_load_tile(float* dst, const float* src, long long r0,
                                              int count, long long limit, int dh) {
    const int stride = dh + 1;
    for (int e = threadIdx.x; e < count * dh; e += blockDim.x) {
        const int r = e / dh;
        const int d = e - r * dh;
        const long long row = r0 + r;
        dst[r * stride + d] = row < limit ? src[row * dh + d] : 0.0f;
    }
}

// Dot product of two padded shared rows of length dh.
__device__ __forceinline__ float att_dot(const float* a, const float* b, int dh) {
    float acc = 0.0f;
    for (int d = 0; d < dh; ++d) acc = fmaf(a[d], b[d], acc);
    return acc;
}

// acc[c] += sum over the tile's rows t of w_t * tile[t][lane + 32 c], where
// w_t is lane t's `w`: a (1 x 32) by (32 x Dh) product, the row split over
// the lanes.
template <int DPL>
__device__ __forceinline__ void att_accumulate(float (&acc)[DPL], float w, const float* tile,
                                               int stride, int lane, int dh) {
    for (int t = 0; t < ATT_TILE; ++t) {
        const float wt = __shfl_sync(0xffffffffu, w, t);
#pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < dh) acc[c] = fmaf(wt, tile[t * stride + d], acc[c]);
        }
    }
}

// ---- forward ----
// Grid (ceil(N / (ATT_WARPS * RPW)), B*H), ATT_WARPS warps. Shared memory:
// K and V tiles (ATT_TILE x (Dh+1) each) and the block's query rows.
template <int DPL, int RPW>
__device__ void att_fwd(const float* q, const float* k, const float* v, const int* lengths,
                        float* out, float* lse, AttShape s) {
    DYNAMIC_SHARED(float, smem);
    const int stride = s.dh + 1;
    float* ks = smem;
    float* vs = ks + ATT_TILE * stride;
    float* qs = vs + ATT_TILE * stride;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long bh = blockIdx.y;
    const long long b = bh / s.heads;
    const long long h = bh - b * s.heads;
    const long long len = lengths[b];
    const int rows = ATT_WARPS * RPW;
    const long long i0 = (long long)blockIdx.x * rows;
    const long long base = bh * s.n * s.dh;

    att_load_tile(qs, q + base, i0, rows, len, s.dh);

    float m[RPW], l[RPW], acc[RPW][DPL];
    uint32_t rk[RPW];
    #pragma unroll
    for (int r = 0; r < RPW; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        #pragma unroll
        for (int c = 0; c < DPL; ++c) acc[r][c] = 0.0f;
        rk[r] = s.threshold ? att_row_key(s.seed, b, h, i0 + warp * RPW + r) : 0u;
    }

    long long j_lo, j_hi;  // keys any of the block's live rows can see
    att_span(s.left, s.right, len, i0, rows, ATT_TILE, &j_lo, &j_hi);
    for (long long j0 = j_lo; j0 < j_hi; j0 += ATT_TILE) {
        __syncthreads();
        att_load_tile(ks, k + base, j0, ATT_TILE, len, s.dh);
        att_load_tile(vs, v + base, j0, ATT_TILE, len, s.dh);
        __syncthreads();
        const long long j = j0 + lane;
        #pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int row = warp * RPW + r;
            const long long i = i0 + row;
            const bool vis = att_visible(s, len, i, j);
            const float sc = vis ? s.scale * att_dot(qs + row * stride, ks + lane * stride, s.dh)
                                 : -INFINITY;
            const float m_new = fmaxf(m[r], warp_max(sc));
            if (m_new == -INFINITY) continue;  // nothing visible yet (warp-uniform)
            const float p = vis ? expf(sc - m_new) : 0.0f;
            const float corr = expf(m[r] - m_new);
            l[r] = l[r] * corr + warp_sum(p);
            m[r] = m_new;
            const float pd = p * att_keep(rk[r], j, s.threshold, s.keep_scale);
            #pragma unroll
            for (int c = 0; c < DPL; ++c) acc[r][c] *= corr;
            att_accumulate<DPL>(acc[r], pd, vs, stride, lane, s.dh);
        }
    }
    #pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const long long i = i0 + warp * RPW + r;
        if (i >= s.n) continue;
        const bool live = i < len && l[r] > 0.0f;
        const float inv = live ? 1.0f / l[r] : 0.0f;
        #pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < s.dh) out[base + i * s.dh + d] = acc[r][c] * inv;
        }
        if (lane == 0) lse[bh * s.n + i] = live ? m[r] + logf(l[r]) : 0.0f;
    }
}

// ---- backward, step 1: delta[i] = sum_d dO[i, d] * O[i, d] (one warp per row) ----
extern "C" __global__ void lcasr_attention_delta(const float* out, const float* dout,
                                                 float* delta, long long rows, int dh) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    for (long long r = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5); r < rows;
         r += warps) {
        float acc = 0.0f;
        for (int d = lane; d < dh; d += 32) acc = fmaf(out[r * dh + d], dout[r * dh + d], acc);
        acc = warp_sum(acc);
        if (lane == 0) delta[r] = acc;
    }
}

// ---- backward, step 2: dQ (query rows per block, as the forward) ----
// Shared: K and V tiles, the block's q rows and dO rows.
template <int DPL, int RPW>
__device__ void att_bwd_dq(const float* q, const float* k, const float* v, const float* dout,
                           const float* lse, const float* delta, const int* lengths, float* dq,
                           AttShape s) {
    DYNAMIC_SHARED(float, smem);
    const int stride = s.dh + 1;
    const int rows = ATT_WARPS * RPW;
    float* ks = smem;
    float* vs = ks + ATT_TILE * stride;
    float* qs = vs + ATT_TILE * stride;
    float* dos = qs + rows * stride;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long bh = blockIdx.y;
    const long long b = bh / s.heads;
    const long long h = bh - b * s.heads;
    const long long len = lengths[b];
    const long long i0 = (long long)blockIdx.x * rows;
    const long long base = bh * s.n * s.dh;

    att_load_tile(qs, q + base, i0, rows, len, s.dh);
    att_load_tile(dos, dout + base, i0, rows, len, s.dh);

    float acc[RPW][DPL], row_lse[RPW], row_delta[RPW];
    uint32_t rk[RPW];
    #pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const long long i = i0 + warp * RPW + r;
        #pragma unroll
        for (int c = 0; c < DPL; ++c) acc[r][c] = 0.0f;
        row_lse[r] = i < len ? lse[bh * s.n + i] : 0.0f;
        row_delta[r] = i < len ? delta[bh * s.n + i] : 0.0f;
        rk[r] = s.threshold ? att_row_key(s.seed, b, h, i) : 0u;
    }
    long long j_lo, j_hi;
    att_span(s.left, s.right, len, i0, rows, ATT_TILE, &j_lo, &j_hi);
    for (long long j0 = j_lo; j0 < j_hi; j0 += ATT_TILE) {
        __syncthreads();
        att_load_tile(ks, k + base, j0, ATT_TILE, len, s.dh);
        att_load_tile(vs, v + base, j0, ATT_TILE, len, s.dh);
        __syncthreads();
        const long long j = j0 + lane;
        #pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int row = warp * RPW + r;
            const long long i = i0 + row;
            float ds = 0.0f;
            if (att_visible(s, len, i, j)) {
                const float p = expf(s.scale * att_dot(qs + row * stride, ks + lane * stride, s.dh) -
                                       row_lse[r]);
                const float dp = att_dot(dos + row * stride, vs + lane * stride, s.dh);
                const float z = att_keep(rk[r], j, s.threshold, s.keep_scale);
                ds = p * (dp * z - row_delta[r]);
            }
            att_accumulate<DPL>(acc[r], ds, ks, stride, lane, s.dh);
        }
    }
    #pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const long long i = i0 + warp * RPW + r;
        if (i >= s.n) continue;
        #pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < s.dh) dq[base + i * s.dh + d] = acc[r][c] * s.scale;
        }
    }
}

// ---- backward, step 3: dK and dV (key rows per block, query tiles streamed) ----
// Shared: Q and dO tiles (ATT_TILE x (Dh+1)), the tile's lse, delta and
// dropout row keys, the block's k rows and v rows.
template <int DPL, int RPW>
__device__ void att_bwd_dkv(const float* q, const float* k, const float* v, const float* dout,
                            const float* lse, const float* delta, const int* lengths, float* dk,
                            float* dv, AttShape s) {
    DYNAMIC_SHARED(float, smem);
    const int stride = s.dh + 1;
    const int rows = ATT_WARPS * RPW;
    float* qs = smem;
    float* dos = qs + ATT_TILE * stride;
    float* kr = dos + ATT_TILE * stride;
    float* vr = kr + rows * stride;
    float* tile_lse = vr + rows * stride;
    float* tile_delta = tile_lse + ATT_TILE;
    uint32_t* tile_rk = (uint32_t*)(tile_delta + ATT_TILE);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const long long bh = blockIdx.y;
    const long long b = bh / s.heads;
    const long long h = bh - b * s.heads;
    const long long len = lengths[b];
    const long long j0 = (long long)blockIdx.x * rows;
    const long long base = bh * s.n * s.dh;

    att_load_tile(kr, k + base, j0, rows, len, s.dh);
    att_load_tile(vr, v + base, j0, rows, len, s.dh);

    float gk[RPW][DPL], gv[RPW][DPL];
    #pragma unroll
    for (int r = 0; r < RPW; ++r)
        #pragma unroll
        for (int c = 0; c < DPL; ++c) gk[r][c] = gv[r][c] = 0.0f;

    long long i_lo, i_hi;  // queries that see any of the block's live keys
    att_span(s.right, s.left, len, j0, rows, ATT_TILE, &i_lo, &i_hi);
    for (long long q0 = i_lo; q0 < i_hi; q0 += ATT_TILE) {
        __syncthreads();
        att_load_tile(qs, q + base, q0, ATT_TILE, len, s.dh);
        att_load_tile(dos, dout + base, q0, ATT_TILE, len, s.dh);
        if (threadIdx.x < ATT_TILE) {
            const long long i = q0 + threadIdx.x;
            tile_lse[threadIdx.x] = i < len ? lse[bh * s.n + i] : 0.0f;
            tile_delta[threadIdx.x] = i < len ? delta[bh * s.n + i] : 0.0f;
            tile_rk[threadIdx.x] = s.threshold ? att_row_key(s.seed, b, h, i) : 0u;
        }
        __syncthreads();
        const long long i = q0 + lane;
        #pragma unroll
        for (int r = 0; r < RPW; ++r) {
            const int row = warp * RPW + r;
            const long long j = j0 + row;
            float pz = 0.0f, ds = 0.0f;
            if (att_visible(s, len, i, j)) {
                const float p = expf(s.scale * att_dot(qs + lane * stride, kr + row * stride, s.dh) -
                                       tile_lse[lane]);
                const float dp = att_dot(dos + lane * stride, vr + row * stride, s.dh);
                const float z = att_keep(tile_rk[lane], j, s.threshold, s.keep_scale);
                pz = p * z;
                ds = p * (dp * z - tile_delta[lane]);
            }
            att_accumulate<DPL>(gv[r], pz, dos, stride, lane, s.dh);
            att_accumulate<DPL>(gk[r], ds, qs, stride, lane, s.dh);
        }
    }
    #pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const long long j = j0 + warp * RPW + r;
        if (j >= s.n) continue;
        #pragma unroll
        for (int c = 0; c < DPL; ++c) {
            const int d = lane + 32 * c;
            if (d < s.dh) {
                dk[base + j * s.dh + d] = gk[r][c] * s.scale;
                dv[base + j * s.dh + d] = gv[r][c];
            }
        }
    }
}

// ---- entry points: one per DPL (Dh <= 32, 64, 96, 128) ----
// Rows per warp: 4 in the forward, 2 in both backward kernels (the host's
// ATT_FWD_RPW / ATT_BWD_RPW must agree).

#define ATT_ENTRIES(DPL)                                                                       \
    extern "C" __global__ void lcasr_attention_fwd_##DPL(                                      \
        const float* q, const float* k, const float* v, const int* lengths, float* out,       \
        float* lse, AttShape s) {                                                              \
        att_fwd<DPL, 4>(q, k, v, lengths, out, lse, s);                                        \
    }                                                                                          \
    extern "C" __global__ void lcasr_attention_bwd_dq_##DPL(                                   \
        const float* q, const float* k, const float* v, const float* dout, const float* lse,  \
        const float* delta, const int* lengths, float* dq, AttShape s) {                       \
        att_bwd_dq<DPL, 2>(q, k, v, dout, lse, delta, lengths, dq, s);                         \
    }                                                                                          \
    extern "C" __global__ void lcasr_attention_bwd_dkv_##DPL(                                  \
        const float* q, const float* k, const float* v, const float* dout, const float* lse,  \
        const float* delta, const int* lengths, float* dk, float* dv, AttShape s) {            \
        att_bwd_dkv<DPL, 2>(q, k, v, dout, lse, delta, lengths, dk, dv, s);                    \
    }

ATT_ENTRIES(1)
ATT_ENTRIES(2)
ATT_ENTRIES(3)
ATT_ENTRIES(4)

// The dropout factors (0 or 1/(1-p)) of query rows [i0, i0 + rows) against
// every key, (B, H, rows, N), for the chunked attention path: the same hash
// as the kernels above.
extern "C" __global__ void lcasr_attention_dropout_mask(float* out, long long items, int heads,
                                                        long long i0, long long rows, long long n,
                                                        uint64_t seed, uint32_t threshold,
                                                        float keep_scale) {
    const long long total = items * heads * rows * n;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long j = e % n;
        const long long r = (e / n) % rows;
        const long long bh = e / (n * rows);
        const long long b = bh / heads;
        const long long h = bh - b * heads;
        out[e] = att_keep(att_row_key(seed, b, h, i0 + r), j, threshold, keep_scale);
    }
}
