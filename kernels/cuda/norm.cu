// LayerNorm and RMSNorm over the last dimension of a contiguous (rows, d)
// tensor of f32, bf16 or f16 activations (weights, statistics and all
// arithmetic in f32), forward and backward. One block of NORM_THREADS threads
// per row (grid-stride over rows); row sums are block reductions in a fixed
// order, so results do not depend on scheduling. The backward is two kernels:
// the input gradient, row by row, and the per-block partial sums of the
// weight (and bias) gradients, each block's into its own row of `dw_part`
// (`db_part`), (gridDim.x, d), which the caller sums over blocks: no atomics,
// deterministic. Each kernel has one entry point per type (_f32, _bf16, _f16).

#include "act.cuh"
#include "reduce.cuh"

#define NORM_THREADS 256

// Mean and 1/sqrt(var + eps) of one row (two passes, as the CPU kernel).
template <typename T>
__device__ void lcasr_mean_rstd(const T* x, long long d, float eps, float* shared, float* mean,
                                float* rstd) {
    float s = 0.0f;
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        s += ld(x[c]);
    }
    const float m = lcasr_block_sum(s, shared) / (float)d;
    float q = 0.0f;
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = ld(x[c]) - m;
        q += v * v;
    }
    const float var = lcasr_block_sum(q, shared) / (float)d;
    *mean = m;
    *rstd = rsqrtf(var + eps);
}

// 1/sqrt(mean(x^2) + eps) of one row.
template <typename T>
__device__ float lcasr_rms_rinv(const T* x, long long d, float eps, float* shared) {
    float q = 0.0f;
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = ld(x[c]);
        q += v * v;
    }
    return rsqrtf(lcasr_block_sum(q, shared) / (float)d + eps);
}

template <typename T>
__device__ void ln_fwd(const T* x, const float* w, const float* b, T* y, long long rows,
                       long long d, float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        float mean, rstd;
        lcasr_mean_rstd(xr, d, eps, shared, &mean, &rstd);
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            st(y + r * d + c, (ld(xr[c]) - mean) * rstd * w[c] + b[c]);
        }
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w.
template <typename T>
__device__ void ln_bwd_dx(const T* x, const float* w, const T* dy, T* dx, long long rows,
                          long long d, float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        const T* dyr = dy + r * d;
        float mean, rstd;
        lcasr_mean_rstd(xr, d, eps, shared, &mean, &rstd);
        float sg = 0.0f, sgx = 0.0f;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            const float xh = (ld(xr[c]) - mean) * rstd;
            const float g = ld(dyr[c]) * w[c];
            sg += g;
            sgx += g * xh;
        }
        const float mean_g = lcasr_block_sum(sg, shared) / (float)d;
        const float mean_gx = lcasr_block_sum(sgx, shared) / (float)d;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            const float xh = (ld(xr[c]) - mean) * rstd;
            const float g = ld(dyr[c]) * w[c];
            st(dx + r * d + c, rstd * (g - mean_g - xh * mean_gx));
        }
    }
}

// dw += dy * xhat, db += dy over this block's rows (into dw_part / db_part).
template <typename T>
__device__ void ln_bwd_params(const T* x, const T* dy, float* dw_part, float* db_part,
                              long long rows, long long d, float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    float* dw_row = dw_part + blockIdx.x * d;
    float* db_row = db_part + blockIdx.x * d;
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        dw_row[c] = 0.0f;
        db_row[c] = 0.0f;
    }
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        const T* dyr = dy + r * d;
        float mean, rstd;
        lcasr_mean_rstd(xr, d, eps, shared, &mean, &rstd);
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            const float g = ld(dyr[c]);
            dw_row[c] += g * (ld(xr[c]) - mean) * rstd;
            db_row[c] += g;
        }
    }
}

template <typename T>
__device__ void rms_fwd(const T* x, const float* w, T* y, long long rows, long long d,
                        float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        const float rinv = lcasr_rms_rinv(xr, d, eps, shared);
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            st(y + r * d + c, ld(xr[c]) * rinv * w[c]);
        }
    }
}

// dx = rinv * (g - x * rinv * mean(g * x) * rinv), g = dy * w.
template <typename T>
__device__ void rms_bwd_dx(const T* x, const float* w, const T* dy, T* dx, long long rows,
                           long long d, float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        const T* dyr = dy + r * d;
        const float rinv = lcasr_rms_rinv(xr, d, eps, shared);
        float sgx = 0.0f;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            sgx += ld(dyr[c]) * w[c] * ld(xr[c]);
        }
        const float mean_gx = lcasr_block_sum(sgx, shared) * rinv / (float)d;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            st(dx + r * d + c, rinv * (ld(dyr[c]) * w[c] - ld(xr[c]) * rinv * mean_gx));
        }
    }
}

// dw += dy * x * rinv over this block's rows (into dw_part).
template <typename T>
__device__ void rms_bwd_params(const T* x, const T* dy, float* dw_part, long long rows,
                               long long d, float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    float* dw_row = dw_part + blockIdx.x * d;
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        dw_row[c] = 0.0f;
    }
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const T* xr = x + r * d;
        const T* dyr = dy + r * d;
        const float rinv = lcasr_rms_rinv(xr, d, eps, shared);
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            dw_row[c] += ld(dyr[c]) * ld(xr[c]) * rinv;
        }
    }
}

#define NORM_ENTRY_POINTS(T, SFX)                                                               \
    extern "C" __global__ void lcasr_ln_fwd_##SFX(const T* x, const float* w, const float* b,  \
                                                  T* y, long long rows, long long d,            \
                                                  float eps) {                                  \
        ln_fwd(x, w, b, y, rows, d, eps);                                                       \
    }                                                                                           \
    extern "C" __global__ void lcasr_ln_bwd_dx_##SFX(const T* x, const float* w, const T* dy,  \
                                                     T* dx, long long rows, long long d,        \
                                                     float eps) {                               \
        ln_bwd_dx(x, w, dy, dx, rows, d, eps);                                                  \
    }                                                                                           \
    extern "C" __global__ void lcasr_ln_bwd_params_##SFX(const T* x, const T* dy,              \
                                                         float* dw_part, float* db_part,        \
                                                         long long rows, long long d,           \
                                                         float eps) {                           \
        ln_bwd_params(x, dy, dw_part, db_part, rows, d, eps);                                   \
    }                                                                                           \
    extern "C" __global__ void lcasr_rms_fwd_##SFX(const T* x, const float* w, T* y,           \
                                                   long long rows, long long d, float eps) {    \
        rms_fwd(x, w, y, rows, d, eps);                                                         \
    }                                                                                           \
    extern "C" __global__ void lcasr_rms_bwd_dx_##SFX(const T* x, const float* w, const T* dy, \
                                                      T* dx, long long rows, long long d,       \
                                                      float eps) {                              \
        rms_bwd_dx(x, w, dy, dx, rows, d, eps);                                                 \
    }                                                                                           \
    extern "C" __global__ void lcasr_rms_bwd_params_##SFX(const T* x, const T* dy,             \
                                                          float* dw_part, long long rows,       \
                                                          long long d, float eps) {             \
        rms_bwd_params(x, dy, dw_part, rows, d, eps);                                           \
    }

NORM_ENTRY_POINTS(float, f32)
NORM_ENTRY_POINTS(__nv_bfloat16, bf16)
NORM_ENTRY_POINTS(__half, f16)
