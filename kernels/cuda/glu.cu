// GLU over the last dimension of a contiguous (rows, 2n) tensor of f32,
// bf16 or f16 activations (computed in f32): y = a * sigmoid(g) with a the
// first n values of a row and g the last n. Grid-stride loops over the
// (rows, n) outputs; one entry point per type (_f32, _bf16, _f16).
// lcasr-kernels' build script compiles this file to PTX with the `cuda`
// feature.

#include "act.cuh"

__device__ __forceinline__ float lcasr_sigmoid(float g) {
    return 1.0f / (1.0f + expf(-g));
}

template <typename T>
__device__ void glu_fwd(const T* x, T* y, long long rows, long long n) {
    const long long total = rows * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / n;
        const long long c = i - r * n;
        const float a = ld(x[r * 2 * n + c]);
        const float g = ld(x[r * 2 * n + n + c]);
        st(y + i, a * lcasr_sigmoid(g));
    }
}

// dx = [dy * s, dy * a * s * (1 - s)] with s = sigmoid(g).
template <typename T>
__device__ void glu_bwd(const T* x, const T* dy, T* dx, long long rows, long long n) {
    const long long total = rows * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / n;
        const long long c = i - r * n;
        const float a = ld(x[r * 2 * n + c]);
        const float s = lcasr_sigmoid(ld(x[r * 2 * n + n + c]));
        const float d = ld(dy[i]);
        st(dx + r * 2 * n + c, d * s);
        st(dx + r * 2 * n + n + c, d * a * s * (1.0f - s));
    }
}

#define GLU_ENTRY_POINTS(T, SFX)                                                        \
    extern "C" __global__ void lcasr_glu_fwd_##SFX(const T* x, T* y, long long rows,     \
                                                   long long n) {                        \
        glu_fwd(x, y, rows, n);                                                          \
    }                                                                                    \
    extern "C" __global__ void lcasr_glu_bwd_##SFX(const T* x, const T* dy, T* dx,       \
                                                   long long rows, long long n) {        \
        glu_bwd(x, dy, dx, rows, n);                                                     \
    }

GLU_ENTRY_POINTS(float, f32)
GLU_ENTRY_POINTS(__nv_bfloat16, bf16)
GLU_ENTRY_POINTS(__half, f16)
