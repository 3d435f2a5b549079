// What the attention kernels share (attention.cu, attention_tc.cu): the
// dropout mask of src/attention_dropout.rs, bit for bit, the shape argument
// and the visibility of key j to query i (item lengths, a local window).
#pragma once

#include <stdint.h>

// ---- the dropout mask of src/attention_dropout.rs ----

__device__ __forceinline__ uint64_t att_mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

__device__ __forceinline__ uint32_t att_mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

__device__ __forceinline__ uint32_t att_row_key(uint64_t seed, long long b, long long h,
                                                long long i) {
    uint64_t k = att_mix64(seed);
    k = att_mix64(k ^ (uint64_t)b);
    k = att_mix64(k ^ (uint64_t)h);
    k = att_mix64(k ^ (uint64_t)i);
    return (uint32_t)(k ^ (k >> 32));
}

// The factor applied to probability (row with key rk, column j): 0 or 1/(1-p);
// 1 without dropout (threshold 0 keeps everything).
__device__ __forceinline__ float att_keep(uint32_t rk, long long j, uint32_t threshold,
                                          float keep_scale) {
    if (threshold == 0u) return 1.0f;
    const uint32_t hash = att_mix32(rk ^ ((uint32_t)j * 0x9E3779B9u));
    return hash >= threshold ? keep_scale : 0.0f;
}

// ---- masking: the Problem of src/attention.rs ----

struct AttShape {
    long long n;         // sequence length N
    long long left;      // window left, < 0: unbounded
    long long right;     // window right, < 0: unbounded
    uint64_t seed;       // dropout seed
    int heads;           // H
    int dh;              // head dimension
    uint32_t threshold;  // dropout: keep iff hash >= threshold (0: no dropout)
    float scale;         // 1 / sqrt(Dh)
    float keep_scale;    // 1 / (1 - p)
    uint32_t pad;        // explicit tail padding (the host struct mirrors this one)
};

__device__ __forceinline__ bool att_visible(const AttShape& s, long long len, long long i,
                                            long long j) {
    if (i >= len || j >= len) return false;
    if (s.left >= 0 && j + s.left < i) return false;
    if (s.right >= 0 && j > i + s.right) return false;
    return true;
}

// Whether every query of [i0, i0 + rows) sees every key of [j0, j0 + cols)
// and no dropout applies: a tile the kernels can take without a per-score
// mask (inside the item, inside the window).
__device__ __forceinline__ bool att_tile_plain(const AttShape& s, long long len, long long i0,
                                               int rows, long long j0, int cols) {
    if (s.threshold != 0u || i0 + rows > len || j0 + cols > len) return false;
    if (s.left >= 0 && j0 + s.left < i0 + rows - 1) return false;
    if (s.right >= 0 && j0 + cols - 1 > i0 + s.right) return false;
    return true;
}

// The positions [*lo, *hi) within `back` behind and `ahead` in front (< 0:
// unbounded) of any of the live rows [r0, r0 + rows) of an item of length
// len, *lo rounded down to a multiple of `tile`; empty when no row is live.
__device__ __forceinline__ void att_span(long long back, long long ahead, long long len,
                                         long long r0, int rows, int tile, long long* lo,
                                         long long* hi) {
    *lo = 0;
    *hi = 0;
    if (r0 >= len) return;
    const long long last = min(r0 + rows, len) - 1;
    *lo = back >= 0 ? max(0ll, r0 - back) : 0;
    *hi = ahead >= 0 ? min(len, last + ahead + 1) : len;
    *lo -= *lo % tile;
}

