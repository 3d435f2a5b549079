// Block-wide reductions of a float for the row kernels (norm.cu, softmax.cu):
// warp shuffles, then one value per warp in `shared` (blockDim.x / 32
// floats), summed or maximised in warp order, so the result does not depend
// on scheduling. Every thread of the block receives it.
#pragma once

__device__ __forceinline__ float lcasr_block_sum(float v, float* shared) {
    const unsigned lane = threadIdx.x % 32;
    const unsigned warp = threadIdx.x / 32;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    __syncthreads();  // `shared` may still be read by a previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += shared[w];
    return total;
}

__device__ __forceinline__ float lcasr_block_max(float v, float* shared) {
    const unsigned lane = threadIdx.x % 32;
    const unsigned warp = threadIdx.x / 32;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float m = shared[0];
    for (unsigned w = 1; w < blockDim.x / 32; ++w) m = fmaxf(m, shared[w]);
    return m;
}
