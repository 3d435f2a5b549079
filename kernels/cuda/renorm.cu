// BatchRenorm + affine + SiLU on channels-last (rows = B*T, C) f32, the CUDA
// side of src/batch_renorm.rs. The host computes every per-channel
// coefficient (mean, the r and d corrections, the gradient terms that flow
// through the batch statistics) exactly as for the CPU kernel; these kernels
// do the per-element work and the per-block partial sums over rows, which the
// host adds up in block order (deterministic). Row r = b*T + t counts for the
// statistics iff t < lengths[b].

__device__ __forceinline__ bool renorm_valid(const int* lengths, long long row, long long t_len) {
    return row % t_len < lengths[row / t_len];
}

__device__ __forceinline__ float renorm_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// part[p, ch] = sum over the counted rows of block p's range of x[r, ch], or
// of (x[r, ch] - mean[ch])^2 when mean is given.
extern "C" __global__ void lcasr_renorm_sums(const float* x, const int* lengths, const float* mean,
                                             float* part, long long rows, long long t_len, int c,
                                             long long rows_per_part, int squared) {
    const long long r0 = blockIdx.x * rows_per_part;
    const long long r1 = min(rows, r0 + rows_per_part);
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        const float m = squared ? mean[ch] : 0.0f;
        float acc = 0.0f;
        for (long long r = r0; r < r1; ++r) {
            if (!renorm_valid(lengths, r, t_len)) continue;
            const float v = x[r * c + ch] - m;
            acc += squared ? v * v : v;
        }
        part[blockIdx.x * (long long)c + ch] = acc;
    }
}

// y = silu((x - m) * a + b); coefs = [m | a | b], C each.
extern "C" __global__ void lcasr_renorm_fwd(const float* x, const float* coefs, float* y,
                                            long long rows, int c) {
    const long long total = rows * c;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const int ch = (int)(e % c);
        const float z = (x[e] - coefs[ch]) * coefs[c + ch] + coefs[2 * c + ch];
        y[e] = z * renorm_sigmoid(z);
    }
}

// The direct part of dx (dz * a) and block p's partial sums of dweight
// (dz * ((x - m) * u + v)) and dbias (dz) into part[p, 0..C] and
// part[p, C..2C]; coefs = [m | a | b | u | v].
extern "C" __global__ void lcasr_renorm_bwd(const float* x, const float* dy, const float* coefs,
                                            float* dx, float* part, long long rows, int c,
                                            long long rows_per_part) {
    const long long r0 = blockIdx.x * rows_per_part;
    const long long r1 = min(rows, r0 + rows_per_part);
    for (int ch = threadIdx.x; ch < c; ch += blockDim.x) {
        const float m = coefs[ch], a = coefs[c + ch], b = coefs[2 * c + ch];
        const float u = coefs[3 * c + ch], v = coefs[4 * c + ch];
        float dw = 0.0f, db = 0.0f;
        for (long long r = r0; r < r1; ++r) {
            const long long e = r * c + ch;
            const float xc = x[e] - m;
            const float z = xc * a + b;
            const float s = renorm_sigmoid(z);
            const float dz = dy[e] * s * (1.0f + z * (1.0f - s));
            dw = fmaf(dz, xc * u + v, dw);
            db += dz;
            dx[e] = dz * a;
        }
        part[blockIdx.x * 2ll * c + ch] = dw;
        part[blockIdx.x * 2ll * c + c + ch] = db;
    }
}

// out = dx + k1 + k2 * (x - mean) on the counted rows, dx elsewhere;
// k = [k1 | k2 | mean].
extern "C" __global__ void lcasr_renorm_stats_grad(const float* x, const float* dx,
                                                   const int* lengths, const float* k, float* out,
                                                   long long rows, long long t_len, int c) {
    const long long total = rows * c;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)gridDim.x * blockDim.x) {
        const long long r = e / c;
        const int ch = (int)(e - r * c);
        float g = dx[e];
        if (renorm_valid(lengths, r, t_len)) g += k[ch] + k[c + ch] * (x[e] - k[2 * c + ch]);
        out[e] = g;
    }
}
