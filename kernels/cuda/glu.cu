// GLU over the last dimension of a contiguous (rows, 2n) f32 tensor:
// y = a * sigmoid(g) with a the first n values of a row and g the last n.
// Grid-stride loops over the (rows, n) outputs; lcasr-kernels' build script
// compiles this file to PTX with the `cuda` feature.

__device__ __forceinline__ float lcasr_sigmoid(float g) {
    return 1.0f / (1.0f + expf(-g));
}

extern "C" __global__ void lcasr_glu_fwd(const float* x, float* y, long long rows, long long n) {
    const long long total = rows * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / n;
        const long long c = i - r * n;
        const float a = x[r * 2 * n + c];
        const float g = x[r * 2 * n + n + c];
        y[i] = a * lcasr_sigmoid(g);
    }
}

// dx = [dy * s, dy * a * s * (1 - s)] with s = sigmoid(g).
extern "C" __global__ void lcasr_glu_bwd(const float* x, const float* dy, float* dx,
                                         long long rows, long long n) {
    const long long total = rows * n;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / n;
        const long long c = i - r * n;
        const float a = x[r * 2 * n + c];
        const float s = lcasr_sigmoid(x[r * 2 * n + n + c]);
        const float d = dy[i];
        dx[r * 2 * n + c] = d * s;
        dx[r * 2 * n + n + c] = d * a * s * (1.0f - s);
    }
}
