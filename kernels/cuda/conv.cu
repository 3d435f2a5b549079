// The convolutions of lcasr-kernels, forward and backward, on f32, bf16 or
// f16 activations T (the input, the output and their gradients; weights,
// biases, partial sums and all arithmetic in f32). The kernels are templates;
// each has one entry point per type, named with _f32, _bf16 or _f16 (end of
// file):
// - depthwise conv1d over time, channels-last (B, T, C), weight (C, K), "same"
//   zero padding (K-1)/2, with bias (the Conformer conv module);
// - depthwise conv2d, kernel 3, stride 2, padding 1, NCHW, weight (C, 1, 3, 3);
// - conv2d (groups = 1), kernel 3, stride 2, padding 1, NCHW, weight
//   (Cout, Cin, 3, 3), optionally followed by SiLU, which the backward
//   recomputes (the pre-activation is never stored) (the subsampling).
// The input gradients are gathers (one thread per input element, no atomics);
// the weight and bias gradients are per-block partial sums that the host adds
// up, so every result is deterministic.

#include "act.cuh"

#define CONV_THREADS 256

__device__ __forceinline__ float conv_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// Sum of v over the block (CONV_THREADS threads), valid in thread 0.
__device__ __forceinline__ float conv_block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    if (threadIdx.x == 0)
        for (int w = 0; w < CONV_THREADS / 32; ++w) total += scratch[w];
    return total;
}

#define GRID_STRIDE(i, total)                                                   \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (total); \
         i += (long long)gridDim.x * blockDim.x)

// ---- depthwise conv1d ----

template <typename T>
__device__ void dwconv1d_fwd(const T* x, const float* w, const float* bias, T* y, long long rows,
                             long long t_len, int c, int k) {
    const int pad = (k - 1) / 2;
    GRID_STRIDE(e, rows * c) {
        const long long row = e / c;
        const int ch = (int)(e - row * c);
        const long long t = row % t_len;
        float acc = bias[ch];
        for (int kk = 0; kk < k; ++kk) {
            const long long tt = t + kk - pad;
            if (tt >= 0 && tt < t_len)
                acc = fmaf(w[ch * k + kk], ld(x[(row + kk - pad) * c + ch]), acc);
        }
        st(y + e, acc);
    }
}

// dx[b, t, c] = sum_k w[c, k] dy[b, t - k + pad, c].
template <typename T>
__device__ void dwconv1d_dx(const T* dy, const float* w, T* dx, long long rows, long long t_len,
                            int c, int k) {
    const int pad = (k - 1) / 2;
    GRID_STRIDE(e, rows * c) {
        const long long row = e / c;
        const int ch = (int)(e - row * c);
        const long long t = row % t_len;
        float acc = 0.0f;
        for (int kk = 0; kk < k; ++kk) {
            const long long tt = t - kk + pad;
            if (tt >= 0 && tt < t_len)
                acc = fmaf(w[ch * k + kk], ld(dy[(row - kk + pad) * c + ch]), acc);
        }
        st(dx + e, acc);
    }
}

// Block p sums rows [p * rows_per_part, ...) into part[p, :]: (K, C) weight
// gradient entries (tap-major, so neighbouring threads read neighbouring
// channels), then C bias entries.
template <typename T>
__device__ void dwconv1d_dw(const T* x, const T* dy, float* part, long long rows, long long t_len,
                            int c, int k, long long rows_per_part) {
    const int pad = (k - 1) / 2;
    const long long r0 = blockIdx.x * rows_per_part;
    const long long r1 = min(rows, r0 + rows_per_part);
    const int entries = (k + 1) * c;
    for (int e = threadIdx.x; e < entries; e += blockDim.x) {
        const int kk = e / c;
        const int ch = e - kk * c;
        float acc = 0.0f;
        for (long long row = r0; row < r1; ++row) {
            const float g = ld(dy[row * c + ch]);
            if (kk == k) {
                acc += g;
            } else {
                const long long tt = row % t_len + kk - pad;
                if (tt >= 0 && tt < t_len) acc = fmaf(g, ld(x[(row + kk - pad) * c + ch]), acc);
            }
        }
        part[blockIdx.x * (long long)entries + e] = acc;
    }
}

// ---- depthwise conv2d, k3 s2 p1 ----

template <typename T>
__device__ void dwconv2d_fwd(const T* x, const float* w, const float* bias, T* y,
                             long long planes, int c, int h, int wd, int ho, int wo) {
    GRID_STRIDE(e, planes * ho * wo) {
        const long long p = e / ((long long)ho * wo);
        const int rem = (int)(e - p * ho * wo);
        const int i = rem / wo, j = rem - (rem / wo) * wo;
        const int ch = (int)(p % c);
        const T* xp = x + p * h * wd;
        float acc = bias[ch];
        for (int kh = 0; kh < 3; ++kh) {
            const int r = 2 * i + kh - 1;
            if (r < 0 || r >= h) continue;
            for (int kw = 0; kw < 3; ++kw) {
                const int s = 2 * j + kw - 1;
                if (s >= 0 && s < wd) acc = fmaf(w[ch * 9 + kh * 3 + kw], ld(xp[r * wd + s]), acc);
            }
        }
        st(y + e, acc);
    }
}

// Output rows i with 2i + kh - 1 = r for some tap kh: at most two.
__device__ __forceinline__ int conv_taps(int r, int n_out, int* outs, int* taps) {
    int count = 0;
    for (int kh = 0; kh < 3; ++kh) {
        const int twice = r + 1 - kh;
        if (twice >= 0 && (twice & 1) == 0 && twice / 2 < n_out) {
            outs[count] = twice / 2;
            taps[count] = kh;
            ++count;
        }
    }
    return count;
}

template <typename T>
__device__ void dwconv2d_dx(const T* dy, const float* w, T* dx, long long planes, int c, int h,
                            int wd, int ho, int wo) {
    GRID_STRIDE(e, planes * h * wd) {
        const long long p = e / ((long long)h * wd);
        const int rem = (int)(e - p * h * wd);
        const int r = rem / wd, s = rem - (rem / wd) * wd;
        const int ch = (int)(p % c);
        int is[3], khs[3], js[3], kws[3];
        const int ni = conv_taps(r, ho, is, khs);
        const int nj = conv_taps(s, wo, js, kws);
        const T* g = dy + p * ho * wo;
        float acc = 0.0f;
        for (int a = 0; a < ni; ++a)
            for (int bb = 0; bb < nj; ++bb)
                acc = fmaf(w[ch * 9 + khs[a] * 3 + kws[bb]], ld(g[is[a] * wo + js[bb]]), acc);
        st(dx + e, acc);
    }
}

// One block per (b, c) plane: part[plane, 0..9] the weight taps' gradient,
// part[plane, 9] the bias gradient.
template <typename T>
__device__ void dwconv2d_dw(const T* x, const T* dy, float* part, int h, int wd, int ho, int wo) {
    __shared__ float scratch[CONV_THREADS / 32];
    const long long p = blockIdx.x;
    const T* xp = x + p * h * wd;
    const T* g = dy + p * ho * wo;
    float acc[10];
    for (int t = 0; t < 10; ++t) acc[t] = 0.0f;
    for (int o = threadIdx.x; o < ho * wo; o += blockDim.x) {
        const int i = o / wo, j = o - (o / wo) * wo;
        const float gv = ld(g[o]);
        acc[9] += gv;
#pragma unroll
        for (int kh = 0; kh < 3; ++kh) {
            const int r = 2 * i + kh - 1;
#pragma unroll
            for (int kw = 0; kw < 3; ++kw) {
                const int s = 2 * j + kw - 1;
                if (r >= 0 && r < h && s >= 0 && s < wd)
                    acc[kh * 3 + kw] = fmaf(gv, ld(xp[r * wd + s]), acc[kh * 3 + kw]);
            }
        }
    }
#pragma unroll
    for (int t = 0; t < 10; ++t) {
        const float total = conv_block_sum(acc[t], scratch);
        if (threadIdx.x == 0) part[p * 10 + t] = total;
    }
}

// ---- conv2d (groups = 1), k3 s2 p1, optional SiLU ----

struct ConvShape {
    long long batch;
    int cin, cout, h, wd, ho, wo;
    int silu;  // 1: y = silu(conv)
};

// The convolution (before any activation) at output (b, co, i, j).
template <typename T>
__device__ __forceinline__ float conv_pre(const T* x, const float* w, const float* bias,
                                          const ConvShape& s, long long b, int co, int i, int j) {
    float acc = bias[co];
    for (int ci = 0; ci < s.cin; ++ci) {
        const T* xp = x + (b * s.cin + ci) * s.h * s.wd;
        const float* wk = w + (co * s.cin + ci) * 9;
        for (int kh = 0; kh < 3; ++kh) {
            const int r = 2 * i + kh - 1;
            if (r < 0 || r >= s.h) continue;
            for (int kw = 0; kw < 3; ++kw) {
                const int c = 2 * j + kw - 1;
                if (c >= 0 && c < s.wd) acc = fmaf(wk[kh * 3 + kw], ld(xp[r * s.wd + c]), acc);
            }
        }
    }
    return acc;
}

// The gradient at the convolution's output (before the activation).
template <typename T>
__device__ __forceinline__ float conv_grad_pre(const T* x, const float* w, const float* bias,
                                               const T* dy, const ConvShape& s, long long b,
                                               int co, int i, int j) {
    const float g = ld(dy[((b * s.cout + co) * s.ho + i) * s.wo + j]);
    if (!s.silu) return g;
    const float z = conv_pre(x, w, bias, s, b, co, i, j);
    const float sg = conv_sigmoid(z);
    return g * sg * (1.0f + z * (1.0f - sg));
}

template <typename T>
__device__ void conv2d_fwd(const T* x, const float* w, const float* bias, T* y, ConvShape s) {
    GRID_STRIDE(e, s.batch * s.cout * s.ho * s.wo) {
        const long long p = e / ((long long)s.ho * s.wo);
        const int rem = (int)(e - p * s.ho * s.wo);
        const int i = rem / s.wo, j = rem - (rem / s.wo) * s.wo;
        const float z = conv_pre(x, w, bias, s, p / s.cout, (int)(p % s.cout), i, j);
        st(y + e, s.silu ? z * conv_sigmoid(z) : z);
    }
}

template <typename T>
__device__ void conv2d_dx(const T* x, const float* w, const float* bias, const T* dy, T* dx,
                          ConvShape s) {
    GRID_STRIDE(e, s.batch * s.cin * s.h * s.wd) {
        const long long p = e / ((long long)s.h * s.wd);
        const int rem = (int)(e - p * s.h * s.wd);
        const int r = rem / s.wd, c = rem - (rem / s.wd) * s.wd;
        const long long b = p / s.cin;
        const int ci = (int)(p % s.cin);
        int is[3], khs[3], js[3], kws[3];
        const int ni = conv_taps(r, s.ho, is, khs);
        const int nj = conv_taps(c, s.wo, js, kws);
        float acc = 0.0f;
        for (int co = 0; co < s.cout; ++co) {
            const float* wk = w + (co * s.cin + ci) * 9;
            for (int a = 0; a < ni; ++a)
                for (int bb = 0; bb < nj; ++bb)
                    acc = fmaf(wk[khs[a] * 3 + kws[bb]],
                               conv_grad_pre(x, w, bias, dy, s, b, co, is[a], js[bb]), acc);
        }
        st(dx + e, acc);
    }
}

// One block per (b, co) plane: part[plane, ci * 9 + tap] the weight gradient,
// part[plane, cin * 9] the bias gradient. One pass per input channel.
template <typename T>
__device__ void conv2d_dw(const T* x, const float* w, const float* bias, const T* dy, float* part,
                          ConvShape s) {
    __shared__ float scratch[CONV_THREADS / 32];
    const long long p = blockIdx.x;
    const long long b = p / s.cout;
    const int co = (int)(p % s.cout);
    const long long entries = (long long)s.cin * 9 + 1;
    for (int ci = 0; ci < s.cin; ++ci) {
        const T* xp = x + (b * s.cin + ci) * s.h * s.wd;
        float acc[10];
        for (int t = 0; t < 10; ++t) acc[t] = 0.0f;
        for (int o = threadIdx.x; o < s.ho * s.wo; o += blockDim.x) {
            const int i = o / s.wo, j = o - (o / s.wo) * s.wo;
            const float g = conv_grad_pre(x, w, bias, dy, s, b, co, i, j);
            acc[9] += g;
#pragma unroll
            for (int kh = 0; kh < 3; ++kh) {
                const int r = 2 * i + kh - 1;
#pragma unroll
                for (int kw = 0; kw < 3; ++kw) {
                    const int c = 2 * j + kw - 1;
                    if (r >= 0 && r < s.h && c >= 0 && c < s.wd)
                        acc[kh * 3 + kw] = fmaf(g, ld(xp[r * s.wd + c]), acc[kh * 3 + kw]);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < 9; ++t) {
            const float total = conv_block_sum(acc[t], scratch);
            if (threadIdx.x == 0) part[p * entries + ci * 9 + t] = total;
        }
        if (ci == 0) {
            const float total = conv_block_sum(acc[9], scratch);
            if (threadIdx.x == 0) part[p * entries + s.cin * 9] = total;
        }
    }
}

// ---- entry points, one per kernel and activation type ----

#define CONV_ENTRY_POINTS(T, SFX)                                                              \
    extern "C" __global__ void lcasr_dwconv1d_fwd_##SFX(const T* x, const float* w,           \
                                                        const float* bias, T* y,               \
                                                        long long rows, long long t_len,       \
                                                        int c, int k) {                        \
        dwconv1d_fwd(x, w, bias, y, rows, t_len, c, k);                                        \
    }                                                                                          \
    extern "C" __global__ void lcasr_dwconv1d_dx_##SFX(const T* dy, const float* w, T* dx,    \
                                                       long long rows, long long t_len, int c, \
                                                       int k) {                                \
        dwconv1d_dx(dy, w, dx, rows, t_len, c, k);                                             \
    }                                                                                          \
    extern "C" __global__ void lcasr_dwconv1d_dw_##SFX(const T* x, const T* dy, float* part,  \
                                                       long long rows, long long t_len, int c, \
                                                       int k, long long rows_per_part) {       \
        dwconv1d_dw(x, dy, part, rows, t_len, c, k, rows_per_part);                            \
    }                                                                                          \
    extern "C" __global__ void lcasr_dwconv2d_fwd_##SFX(const T* x, const float* w,           \
                                                        const float* bias, T* y,               \
                                                        long long planes, int c, int h,        \
                                                        int wd, int ho, int wo) {              \
        dwconv2d_fwd(x, w, bias, y, planes, c, h, wd, ho, wo);                                 \
    }                                                                                          \
    extern "C" __global__ void lcasr_dwconv2d_dx_##SFX(const T* dy, const float* w, T* dx,    \
                                                       long long planes, int c, int h, int wd, \
                                                       int ho, int wo) {                       \
        dwconv2d_dx(dy, w, dx, planes, c, h, wd, ho, wo);                                      \
    }                                                                                          \
    extern "C" __global__ void lcasr_dwconv2d_dw_##SFX(const T* x, const T* dy, float* part,  \
                                                       int h, int wd, int ho, int wo) {        \
        dwconv2d_dw(x, dy, part, h, wd, ho, wo);                                               \
    }                                                                                          \
    extern "C" __global__ void lcasr_conv2d_fwd_##SFX(const T* x, const float* w,             \
                                                      const float* bias, T* y, ConvShape s) {  \
        conv2d_fwd(x, w, bias, y, s);                                                          \
    }                                                                                          \
    extern "C" __global__ void lcasr_conv2d_dx_##SFX(const T* x, const float* w,              \
                                                     const float* bias, const T* dy, T* dx,    \
                                                     ConvShape s) {                            \
        conv2d_dx(x, w, bias, dy, dx, s);                                                      \
    }                                                                                          \
    extern "C" __global__ void lcasr_conv2d_dw_##SFX(const T* x, const float* w,              \
                                                     const float* bias, const T* dy,           \
                                                     float* part, ConvShape s) {               \
        conv2d_dw(x, w, bias, dy, part, s);                                                    \
    }

CONV_ENTRY_POINTS(float, f32)
CONV_ENTRY_POINTS(__nv_bfloat16, bf16)
CONV_ENTRY_POINTS(__half, f16)
