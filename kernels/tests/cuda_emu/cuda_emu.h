// A CPU emulation of the part of CUDA that this crate's kernels use, so that
// a machine without a GPU (CI, most sessions) can run a `.cu` file's kernels
// and check them against a reference before a GPU ever sees them.
//
// Force-included (g++ -include cuda_emu.h) ahead of a `.cu` file, with
// `stub/` on the include path for <cuda_bf16.h> and <cuda_fp16.h>. Each
// block's threads run as fibers (a stack each, switched by a few lines of
// assembly on x86-64, by ucontext elsewhere) on one OS thread, switching only
// at the synchronisation points: __syncthreads() is a block barrier, warp
// shuffles and mma.sync are warp barriers with a data exchange. Blocks run
// one after another, so `__shared__` arrays become function-local statics
// (`__shared__` is `static`; TC_SHARED in attention_tc.cu): one copy, seen
// by every thread of the running block. Deterministic; a barrier that some thread never reaches is
// reported as a deadlock instead of hanging.
//
// Dynamic shared memory is DYNAMIC_SHARED(T, name) in the kernels (an
// `extern __shared__ T name[]` on a GPU), the launch's `shared_bytes` here.
// What it does not model: timing, memory coalescing, bank conflicts, warp
// divergence within a shuffle (all lanes must take part, as the kernels
// ensure), atomics. mma.m16n8k16 follows the
// fragment layouts the PTX ISA documents, accumulating in f32.
//
// Written by hand: no maintained crate or package emulates CUDA C++ on a CPU
// (GPGPU-Sim and the like need the CUDA toolkit and run PTX, not the source).

#pragma once

#define LCASR_CUDA_EMU 1

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

using std::isfinite;
using std::isinf;
using std::isnan;
using std::max;
using std::min;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

struct emu_dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// ---- 16-bit float types: bits only, converted with round-to-nearest-even ----

struct __nv_bfloat16 {
    uint16_t x;
};
struct __half {
    uint16_t x;
};

inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = (uint32_t)b.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline __nv_bfloat16 __ushort_as_bfloat16(uint16_t b) { return {b}; }
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }

inline float __half2float(__half h) {
    _Float16 v;
    std::memcpy(&v, &h.x, 2);
    return (float)v;
}
inline __half __float2half(float f) {
    const _Float16 v = (_Float16)f;
    __half h;
    std::memcpy(&h.x, &v, 2);
    return h;
}
inline __half __ushort_as_half(uint16_t b) { return {b}; }
inline uint16_t __half_as_ushort(__half h) { return h.x; }

namespace emu {

constexpr size_t kStack = 64 * 1024;

// An execution context: a fiber's stack pointer, or the scheduler's.
#if defined(__x86_64__)
// On x86-64 the switch saves the callee-saved registers and the FP control
// words on the old stack and loads the new one: swapcontext would also make
// a signal-mask system call per switch, which at millions of barrier waits
// dominated the run time.
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

struct Context {
    void* sp = nullptr;
};

// Prepares `c` to start `entry` (which must never return) on `stack`: the
// frame emu_switch pops, with `entry` as its return address.
inline void start(Context& c, char* stack, size_t size, void (*entry)()) {
    auto top = reinterpret_cast<uintptr_t>(stack + size) & ~(uintptr_t)15;
    auto* w = reinterpret_cast<uint64_t*>(top);
    w[-1] = 0;                                  // entry's (absent) return address
    w[-2] = reinterpret_cast<uint64_t>(entry);  // where emu_switch returns to
    for (int r = 3; r <= 8; ++r) w[-r] = 0;     // rbp, rbx, r12 to r15
    w[-9] = 0x1F80ull | (0x037Full << 32);      // default MXCSR and x87 control word
    c.sp = &w[-9];
}

inline void switch_to(Context& from, const Context& to) { emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};

inline void start(Context& c, char* stack, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

inline void switch_to(Context& from, const Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Fiber {
    Context ctx;
    unsigned tid = 0;
    bool done = false;
};

// One running block: its fibers, the barrier state, the exchange slots.
struct Block {
    std::vector<Fiber> fibers;
    Context sched;
    const std::function<void()>* body = nullptr;
    int current = -1;
    unsigned long long events = 0;  // barrier arrivals and finished fibers
    unsigned block_arrived = 0, block_gen = 0;
    std::vector<unsigned> warp_arrived, warp_gen;
    std::vector<uint64_t> slot;  // 6 words per thread for exchanges
};

inline Block* cur = nullptr;

// The running launch's dynamic shared memory.
inline std::vector<uint64_t> dynamic;

template <typename T>
inline T* dynamic_shared() {
    return reinterpret_cast<T*>(dynamic.data());
}

inline void yield() { switch_to(cur->fibers[cur->current].ctx, cur->sched); }

inline void wait_gen(unsigned* arrived, unsigned* gen, unsigned count) {
    const unsigned g = *gen;
    ++cur->events;
    if (++*arrived == count) {
        *arrived = 0;
        ++*gen;
    }
    while (*gen == g) yield();
}

inline unsigned tid() { return cur->fibers[cur->current].tid; }

inline void warp_barrier() {
    const unsigned w = tid() / 32;
    const unsigned size = std::min(32u, (unsigned)cur->fibers.size() - w * 32);
    wait_gen(&cur->warp_arrived[w], &cur->warp_gen[w], size);
}

// A fiber's entry: runs the kernel, then hands back to the scheduler for
// good (a finished fiber is never resumed).
[[noreturn]] inline void trampoline() {
    Block* b = cur;
    const int i = b->current;
    (*b->body)();
    b->fibers[i].done = true;
    ++b->events;
    switch_to(b->fibers[i].ctx, b->sched);
    std::abort();
}

// Runs `body` as every thread of every block of the grid, with
// `shared_bytes` of dynamic shared memory.
inline void launch(emu_dim3 grid, emu_dim3 block, const std::function<void()>& body,
                   size_t shared_bytes = 0) {
    const unsigned n = block.x * block.y * block.z;
    dynamic.assign((shared_bytes + 7) / 8 + 1, 0);
    static std::vector<std::vector<char>> stacks;
    while (stacks.size() < n) stacks.emplace_back(kStack);
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                blockIdx = {bx, by, bz};
                Block b;
                b.fibers.resize(n);
                b.body = &body;
                b.warp_arrived.assign((n + 31) / 32, 0);
                b.warp_gen.assign((n + 31) / 32, 0);
                b.slot.assign(n * 6, 0);
                cur = &b;
                for (unsigned t = 0; t < n; ++t) {
                    Fiber& f = b.fibers[t];
                    f.tid = t;
                    start(f.ctx, stacks[t].data(), kStack, trampoline);
                }
                for (;;) {
                    const unsigned long long before = b.events;
                    bool all_done = true;
                    for (unsigned t = 0; t < n; ++t) {
                        if (b.fibers[t].done) continue;
                        all_done = false;
                        b.current = (int)t;
                        threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        switch_to(b.sched, b.fibers[t].ctx);
                    }
                    if (all_done) break;
                    if (b.events == before) {
                        std::fprintf(stderr,
                                     "cuda_emu: deadlock in block (%u, %u, %u): a barrier is "
                                     "not reached by every thread\n",
                                     bx, by, bz);
                        std::abort();
                    }
                }
                cur = nullptr;
            }
}

template <typename V>
inline uint64_t to_word(V v) {
    uint64_t w = 0;
    std::memcpy(&w, &v, sizeof(V));
    return w;
}

template <typename V>
inline V of_word(uint64_t w) {
    V v;
    std::memcpy(&v, &w, sizeof(V));
    return v;
}

// Every lane of the calling thread's warp offers `v`; returns lane `src`'s.
template <typename V>
inline V exchange(V v, unsigned (*src)(unsigned lane, unsigned arg), unsigned arg) {
    const unsigned t = tid();
    const unsigned w0 = t / 32 * 32;
    cur->slot[t * 6] = to_word(v);
    warp_barrier();
    const V r = of_word<V>(cur->slot[(w0 + src(t % 32, arg)) * 6]);
    warp_barrier();
    return r;
}

inline unsigned lane_xor(unsigned lane, unsigned mask) { return (lane ^ mask) & 31u; }
inline unsigned lane_src(unsigned, unsigned src) { return src & 31u; }
// __shfl_down_sync: lanes past the warp's end read their own value.
inline unsigned lane_down(unsigned lane, unsigned delta) {
    return lane + delta < 32 ? lane + delta : lane;
}

}  // namespace emu

#define DYNAMIC_SHARED(T, name) T* name = emu::dynamic_shared<T>()

inline void __syncthreads() {
    emu::wait_gen(&emu::cur->block_arrived, &emu::cur->block_gen,
                  (unsigned)emu::cur->fibers.size());
}
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }

template <typename V>
inline V __shfl_xor_sync(unsigned, V v, int mask) {
    return emu::exchange(v, emu::lane_xor, (unsigned)mask);
}
template <typename V>
inline V __shfl_sync(unsigned, V v, int src) {
    return emu::exchange(v, emu::lane_src, (unsigned)src);
}
template <typename V>
inline V __shfl_down_sync(unsigned, V v, unsigned delta) {
    return emu::exchange(v, emu::lane_down, delta);
}

inline bool __any_sync(unsigned, bool pred) {
    bool any = false;
    for (unsigned l = 0; l < 32; ++l)
        any |= __shfl_sync(0xffffffffu, pred, (int)l);
    return any;
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline double __longlong_as_double(long long v) {
    double d;
    std::memcpy(&d, &v, 8);
    return d;
}
inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}

// d += A B for one m16n8k16 tile held by the calling warp, in the PTX ISA's
// fragment layouts (see attention_tc.cu's header); `to_f` decodes a 16-bit
// input value.
inline void emu_mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             float (*to_f)(uint16_t)) {
    const unsigned t = emu::tid();
    const unsigned w0 = t / 32 * 32;
    uint64_t* s = &emu::cur->slot[t * 6];
    for (int r = 0; r < 4; ++r) s[r] = a[r];
    s[4] = b[0];
    s[5] = b[1];
    emu::warp_barrier();
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const uint64_t* o = &emu::cur->slot[(w0 + l) * 6];
        const unsigned g = l >> 2, q = l & 3;
        auto lo = [&](uint64_t x) { return to_f((uint16_t)(x & 0xffffu)); };
        auto hi = [&](uint64_t x) { return to_f((uint16_t)((x >> 16) & 0xffffu)); };
        A[g][2 * q] = lo(o[0]);
        A[g][2 * q + 1] = hi(o[0]);
        A[g + 8][2 * q] = lo(o[1]);
        A[g + 8][2 * q + 1] = hi(o[1]);
        A[g][2 * q + 8] = lo(o[2]);
        A[g][2 * q + 9] = hi(o[2]);
        A[g + 8][2 * q + 8] = lo(o[3]);
        A[g + 8][2 * q + 9] = hi(o[3]);
        B[2 * q][g] = lo(o[4]);
        B[2 * q + 1][g] = hi(o[4]);
        B[2 * q + 8][g] = lo(o[5]);
        B[2 * q + 9][g] = hi(o[5]);
    }
    emu::warp_barrier();
    const unsigned lane = t % 32, g = lane >> 2, q = lane & 3;
    for (int v = 0; v < 4; ++v) {
        const unsigned row = g + 8 * (v >> 1), col = 2 * q + (v & 1);
        float acc = d[v];
        for (int k = 0; k < 16; ++k) acc = std::fma(A[row][k], B[k][col], acc);
        d[v] = acc;
    }
}
