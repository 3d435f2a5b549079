// Softmax over the last dimension of a contiguous (rows, c) tensor of f32,
// bf16 or f16 values (all arithmetic in f32), the CUDA side of
// src/softmax.rs. One block of SOFTMAX_THREADS threads per row (grid-stride
// over rows); row maxima and sums are block reductions in a fixed order.
// - lcasr_softmax_fwd:         y = softmax(x);
// - lcasr_softmax_bwd:         dx = y (g - rowsum(g y)), from the output;
// - lcasr_softmax_grad_logits: dlogits (f32) = p (g - rowsum(g p)) with p the
//   softmax of f32 logits, recomputed (the self-conditioning head's backward,
//   which keeps no probabilities).
// One entry point per type of x / y / g (_f32, _bf16, _f16).

#include "act.cuh"
#include "reduce.cuh"

#define SOFTMAX_THREADS 256

// The maximum and 1 / sum(exp(v - max)) of row `v` (length c).
template <typename T>
__device__ __forceinline__ void softmax_stats(const T* v, long long c, float* shared, float* max,
                                              float* inv_sum) {
    float m = -INFINITY;
    for (long long i = threadIdx.x; i < c; i += blockDim.x) m = fmaxf(m, ld(v[i]));
    m = lcasr_block_max(m, shared);
    float s = 0.0f;
    for (long long i = threadIdx.x; i < c; i += blockDim.x) s += expf(ld(v[i]) - m);
    *max = m;
    *inv_sum = 1.0f / lcasr_block_sum(s, shared);
}

template <typename T>
__device__ void softmax_fwd(const T* x, T* y, long long rows, long long c) {
    __shared__ float shared[SOFTMAX_THREADS / 32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * c;
        float m, inv;
        softmax_stats(xr, c, shared, &m, &inv);
        for (long long i = threadIdx.x; i < c; i += blockDim.x)
            st(y + r * c + i, expf(ld(xr[i]) - m) * inv);
    }
}

template <typename T>
__device__ void softmax_bwd(const T* y, const T* g, T* dx, long long rows, long long c) {
    __shared__ float shared[SOFTMAX_THREADS / 32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* yr = y + r * c;
        const T* gr = g + r * c;
        float dot = 0.0f;
        for (long long i = threadIdx.x; i < c; i += blockDim.x) dot += ld(gr[i]) * ld(yr[i]);
        dot = lcasr_block_sum(dot, shared);
        for (long long i = threadIdx.x; i < c; i += blockDim.x)
            st(dx + r * c + i, ld(yr[i]) * (ld(gr[i]) - dot));
    }
}

template <typename T>
__device__ void softmax_grad_logits(const float* logits, const T* g, float* dlogits,
                                    long long rows, long long c) {
    __shared__ float shared[SOFTMAX_THREADS / 32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* lr = logits + r * c;
        const T* gr = g + r * c;
        float m, inv;
        softmax_stats(lr, c, shared, &m, &inv);
        float dot = 0.0f;
        for (long long i = threadIdx.x; i < c; i += blockDim.x)
            dot += ld(gr[i]) * expf(lr[i] - m) * inv;
        dot = lcasr_block_sum(dot, shared);
        for (long long i = threadIdx.x; i < c; i += blockDim.x)
            dlogits[r * c + i] = expf(lr[i] - m) * inv * (ld(gr[i]) - dot);
    }
}

#define SOFTMAX_ENTRY_POINTS(T, SFX)                                                            \
    extern "C" __global__ void lcasr_softmax_fwd_##SFX(const T* x, T* y, long long rows,        \
                                                       long long c) {                           \
        softmax_fwd(x, y, rows, c);                                                             \
    }                                                                                           \
    extern "C" __global__ void lcasr_softmax_bwd_##SFX(const T* y, const T* g, T* dx,           \
                                                       long long rows, long long c) {           \
        softmax_bwd(y, g, dx, rows, c);                                                         \
    }                                                                                           \
    extern "C" __global__ void lcasr_softmax_grad_logits_##SFX(                                 \
        const float* logits, const T* g, float* dlogits, long long rows, long long c) {         \
        softmax_grad_logits(logits, g, dlogits, rows, c);                                       \
    }

SOFTMAX_ENTRY_POINTS(float, f32)
SOFTMAX_ENTRY_POINTS(__nv_bfloat16, bf16)
SOFTMAX_ENTRY_POINTS(__half, f16)
