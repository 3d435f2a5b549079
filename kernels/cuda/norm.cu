// LayerNorm and RMSNorm over the last dimension of a contiguous (rows, d)
// f32 tensor, forward and backward. One block of NORM_THREADS threads per row
// (grid-stride over rows); row sums are block reductions in a fixed order, so
// results do not depend on scheduling. The backward writes each block's
// partial weight (and bias) gradient sums into its own row of `dw_part`
// (`db_part`), (gridDim.x, d), which the caller sums over blocks: no atomics,
// deterministic.

#define NORM_THREADS 256

// Sum of `v` over the block; every thread receives it. `shared` holds one
// float per warp.
__device__ float lcasr_block_sum(float v, float* shared) {
    const unsigned lane = threadIdx.x % 32;
    const unsigned warp = threadIdx.x / 32;
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_down_sync(0xffffffffu, v, o);
    }
    __syncthreads();  // `shared` may still be read by a previous reduction
    if (lane == 0) {
        shared[warp] = v;
    }
    __syncthreads();
    float total = 0.0f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) {
        total += shared[w];
    }
    return total;
}

// Mean and 1/sqrt(var + eps) of one row (two passes, as the CPU kernel).
__device__ void lcasr_mean_rstd(const float* x, long long d, float eps, float* shared,
                                float* mean, float* rstd) {
    float s = 0.0f;
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        s += x[c];
    }
    const float m = lcasr_block_sum(s, shared) / (float)d;
    float q = 0.0f;
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        const float v = x[c] - m;
        q += v * v;
    }
    const float var = lcasr_block_sum(q, shared) / (float)d;
    *mean = m;
    *rstd = rsqrtf(var + eps);
}

extern "C" __global__ void lcasr_ln_fwd(const float* x, const float* w, const float* b, float* y,
                                        long long rows, long long d, float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * d;
        float mean, rstd;
        lcasr_mean_rstd(xr, d, eps, shared, &mean, &rstd);
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            y[r * d + c] = (xr[c] - mean) * rstd * w[c] + b[c];
        }
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w;
// dw += dy * xhat, db += dy (per block, into dw_part / db_part).
extern "C" __global__ void lcasr_ln_bwd(const float* x, const float* w, const float* dy,
                                        float* dx, float* dw_part, float* db_part,
                                        long long rows, long long d, float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    float* dw_row = dw_part + blockIdx.x * d;
    float* db_row = db_part + blockIdx.x * d;
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        dw_row[c] = 0.0f;
        db_row[c] = 0.0f;
    }
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * d;
        const float* dyr = dy + r * d;
        float mean, rstd;
        lcasr_mean_rstd(xr, d, eps, shared, &mean, &rstd);
        float sg = 0.0f, sgx = 0.0f;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            const float xh = (xr[c] - mean) * rstd;
            const float g = dyr[c] * w[c];
            sg += g;
            sgx += g * xh;
            dw_row[c] += dyr[c] * xh;
            db_row[c] += dyr[c];
        }
        const float mean_g = lcasr_block_sum(sg, shared) / (float)d;
        const float mean_gx = lcasr_block_sum(sgx, shared) / (float)d;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            const float xh = (xr[c] - mean) * rstd;
            const float g = dyr[c] * w[c];
            dx[r * d + c] = rstd * (g - mean_g - xh * mean_gx);
        }
    }
}

extern "C" __global__ void lcasr_rms_fwd(const float* x, const float* w, float* y,
                                         long long rows, long long d, float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * d;
        float q = 0.0f;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            q += xr[c] * xr[c];
        }
        const float rinv = rsqrtf(lcasr_block_sum(q, shared) / (float)d + eps);
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            y[r * d + c] = xr[c] * rinv * w[c];
        }
    }
}

// dx = rinv * (g - x * rinv * mean(g * x) * rinv), g = dy * w; dw += dy * x * rinv.
extern "C" __global__ void lcasr_rms_bwd(const float* x, const float* w, const float* dy,
                                         float* dx, float* dw_part, long long rows, long long d,
                                         float eps) {
    __shared__ float shared[NORM_THREADS / 32];
    float* dw_row = dw_part + blockIdx.x * d;
    for (long long c = threadIdx.x; c < d; c += blockDim.x) {
        dw_row[c] = 0.0f;
    }
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * d;
        const float* dyr = dy + r * d;
        float q = 0.0f;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            q += xr[c] * xr[c];
        }
        const float rinv = rsqrtf(lcasr_block_sum(q, shared) / (float)d + eps);
        float sgx = 0.0f;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            sgx += dyr[c] * w[c] * xr[c];
            dw_row[c] += dyr[c] * xr[c] * rinv;
        }
        const float mean_gx = lcasr_block_sum(sgx, shared) * rinv / (float)d;
        for (long long c = threadIdx.x; c < d; c += blockDim.x) {
            dx[r * d + c] = rinv * (dyr[c] * w[c] - xr[c] * rinv * mean_gx);
        }
    }
}
