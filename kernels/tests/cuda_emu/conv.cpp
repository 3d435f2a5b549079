// Runs the convolution kernels of cuda/conv.cu under cuda_emu.h in f32, bf16
// and f16, launched as conv_cuda.rs launches them, against double-precision
// references on the same rounded inputs: the Conformer's depthwise conv1d
// (channels-last, "same" padding), the subsampling's depthwise conv2d k3 s2
// and conv2d k3 s2 with and without the fused SiLU; outputs, input
// gradients, and the weight and bias gradients summed over the per-block
// partial sums. Prints one line per case; exits 1 if any is out of
// tolerance. Built and run by kernels/tests/cuda_emulated.rs.

#include "../../cuda/conv.cu"

#include "harness.h"

namespace {

using namespace harness;

// A grid-stride launch over `n` items, as cuda.rs's `grid`.
emu_dim3 grid_for(size_t n) {
    return {(unsigned)std::clamp<size_t>((n + 255) / 256, 1, 65535), 1, 1};
}
const emu_dim3 kBlock{CONV_THREADS, 1, 1};

int out_len(int n) { return (n - 1) / 2 + 1; }

template <typename T>
struct Kernels;

#define CONV_KERNELS(T, SFX)                                             \
    template <>                                                          \
    struct Kernels<T> {                                                  \
        static constexpr auto dw1_fwd = lcasr_dwconv1d_fwd_##SFX;        \
        static constexpr auto dw1_dx = lcasr_dwconv1d_dx_##SFX;          \
        static constexpr auto dw1_dw = lcasr_dwconv1d_dw_##SFX;          \
        static constexpr auto dw2_fwd = lcasr_dwconv2d_fwd_##SFX;        \
        static constexpr auto dw2_dx = lcasr_dwconv2d_dx_##SFX;          \
        static constexpr auto dw2_dw = lcasr_dwconv2d_dw_##SFX;          \
        static constexpr auto c2_fwd = lcasr_conv2d_fwd_##SFX;           \
        static constexpr auto c2_dx = lcasr_conv2d_dx_##SFX;             \
        static constexpr auto c2_dw = lcasr_conv2d_dw_##SFX;             \
    };
CONV_KERNELS(float, f32)
CONV_KERNELS(__nv_bfloat16, bf16)
CONV_KERNELS(__half, f16)

// Depthwise conv1d over (B, T, C), weight (C, K), bias (C).
template <typename T>
bool depthwise1d(int b, int t_len, int c, int k, Rng& rng) {
    using K = Kernels<T>;
    const size_t n = (size_t)b * t_len * c;
    const Values<T> x = values<T>(n, rng, -2, 2), dy = values<T>(n, rng, -2, 2);
    const std::vector<float> w = floats((size_t)c * k, rng, -0.5, 0.5), bias = floats(c, rng, -0.5, 0.5);
    const long long rows = (long long)b * t_len;
    // row_parts: at most 256 partial sums.
    const long long per = std::max<long long>(1, (rows + 255) / 256);
    const long long parts = (rows + per - 1) / per;
    std::vector<T> y(n), dx(n);
    std::vector<float> part((size_t)parts * (k + 1) * c, NAN);
    emu::launch(grid_for(n), kBlock, [&] {
        K::dw1_fwd(x.t.data(), w.data(), bias.data(), y.data(), rows, t_len, c, k);
    });
    emu::launch(grid_for(n), kBlock, [&] { K::dw1_dx(dy.t.data(), w.data(), dx.data(), rows, t_len, c, k); });
    emu::launch({(unsigned)parts, 1, 1}, kBlock, [&] {
        K::dw1_dw(x.t.data(), dy.t.data(), part.data(), rows, t_len, c, k, per);
    });
    const int pad = (k - 1) / 2;
    std::vector<double> wy(n, 0.0), wdx(n, 0.0), wdw((size_t)(k + 1) * c, 0.0);
    for (int bi = 0; bi < b; ++bi)
        for (int t = 0; t < t_len; ++t)
            for (int ch = 0; ch < c; ++ch) {
                const size_t at = ((size_t)bi * t_len + t) * c + ch;
                wy[at] = bias[ch];
                wdw[(size_t)k * c + ch] += dy.d[at];
                for (int kk = 0; kk < k; ++kk) {
                    const int tt = t + kk - pad;
                    if (tt < 0 || tt >= t_len) continue;
                    const size_t src = ((size_t)bi * t_len + tt) * c + ch;
                    wy[at] += w[ch * k + kk] * x.d[src];
                    wdx[src] += w[ch * k + kk] * dy.d[at];
                    wdw[(size_t)kk * c + ch] += dy.d[at] * x.d[src];
                }
            }
    std::vector<double> dw((size_t)(k + 1) * c, 0.0);
    for (long long p = 0; p < parts; ++p)
        for (size_t e = 0; e < dw.size(); ++e) dw[e] += part[p * dw.size() + e];
    return verdict(std::string(Type<T>::name) + " depthwise conv1d " + std::to_string(b) + "x" +
                       std::to_string(t_len) + "x" + std::to_string(c) + " k" + std::to_string(k),
                   {{"y", rel_error(y, wy)}, {"dx", rel_error(dx, wdx)}, {"dw", rel_error(dw, wdw)}},
                   Type<T>::tol);
}

// Depthwise conv2d k3 s2 p1 over (B, C, H, W), weight (C, 1, 3, 3).
template <typename T>
bool depthwise2d(int b, int c, int h, int wd, Rng& rng) {
    using K = Kernels<T>;
    const int ho = out_len(h), wo = out_len(wd);
    const long long planes = (long long)b * c;
    const size_t nx = (size_t)planes * h * wd, ny = (size_t)planes * ho * wo;
    const Values<T> x = values<T>(nx, rng, -2, 2), dy = values<T>(ny, rng, -2, 2);
    const std::vector<float> w = floats((size_t)c * 9, rng, -0.5, 0.5), bias = floats(c, rng, -0.5, 0.5);
    std::vector<T> y(ny), dx(nx);
    std::vector<float> part((size_t)planes * 10, NAN);
    emu::launch(grid_for(ny), kBlock, [&] {
        K::dw2_fwd(x.t.data(), w.data(), bias.data(), y.data(), planes, c, h, wd, ho, wo);
    });
    emu::launch(grid_for(nx), kBlock, [&] {
        K::dw2_dx(dy.t.data(), w.data(), dx.data(), planes, c, h, wd, ho, wo);
    });
    emu::launch({(unsigned)planes, 1, 1}, kBlock, [&] {
        K::dw2_dw(x.t.data(), dy.t.data(), part.data(), h, wd, ho, wo);
    });
    std::vector<double> wy(ny, 0.0), wdx(nx, 0.0), wdw((size_t)c * 10, 0.0);
    for (long long p = 0; p < planes; ++p) {
        const int ch = (int)(p % c);
        for (int i = 0; i < ho; ++i)
            for (int j = 0; j < wo; ++j) {
                const size_t at = ((size_t)p * ho + i) * wo + j;
                wy[at] = bias[ch];
                wdw[(size_t)ch * 10 + 9] += dy.d[at];
                for (int kh = 0; kh < 3; ++kh)
                    for (int kw = 0; kw < 3; ++kw) {
                        const int r = 2 * i + kh - 1, s = 2 * j + kw - 1;
                        if (r < 0 || r >= h || s < 0 || s >= wd) continue;
                        const size_t src = ((size_t)p * h + r) * wd + s;
                        wy[at] += w[ch * 9 + kh * 3 + kw] * x.d[src];
                        wdx[src] += w[ch * 9 + kh * 3 + kw] * dy.d[at];
                        wdw[(size_t)ch * 10 + kh * 3 + kw] += dy.d[at] * x.d[src];
                    }
            }
    }
    std::vector<double> dw((size_t)c * 10, 0.0);
    for (long long p = 0; p < planes; ++p)
        for (int e = 0; e < 10; ++e) dw[(size_t)(p % c) * 10 + e] += part[p * 10 + e];
    return verdict(std::string(Type<T>::name) + " depthwise conv2d " + std::to_string(b) + "x" +
                       std::to_string(c) + "x" + std::to_string(h) + "x" + std::to_string(wd),
                   {{"y", rel_error(y, wy)}, {"dx", rel_error(dx, wdx)}, {"dw", rel_error(dw, wdw)}},
                   Type<T>::tol);
}

// conv2d k3 s2 p1 over (B, Cin, H, W), weight (Cout, Cin, 3, 3), optional SiLU.
template <typename T>
bool full2d(int b, int cin, int cout, int h, int wd, bool silu, Rng& rng) {
    using K = Kernels<T>;
    ConvShape s{};
    s.batch = b;
    s.cin = cin;
    s.cout = cout;
    s.h = h;
    s.wd = wd;
    s.ho = out_len(h);
    s.wo = out_len(wd);
    s.silu = silu;
    const size_t nx = (size_t)b * cin * h * wd, ny = (size_t)b * cout * s.ho * s.wo;
    const Values<T> x = values<T>(nx, rng, -2, 2), dy = values<T>(ny, rng, -2, 2);
    const std::vector<float> w = floats((size_t)cout * cin * 9, rng, -0.5, 0.5), bias = floats(cout, rng, -0.5, 0.5);
    const size_t entries = (size_t)cin * 9 + 1;
    std::vector<T> y(ny), dx(nx);
    std::vector<float> part((size_t)b * cout * entries, NAN);
    emu::launch(grid_for(ny), kBlock, [&] { K::c2_fwd(x.t.data(), w.data(), bias.data(), y.data(), s); });
    emu::launch(grid_for(nx), kBlock, [&] {
        K::c2_dx(x.t.data(), w.data(), bias.data(), dy.t.data(), dx.data(), s);
    });
    emu::launch({(unsigned)(b * cout), 1, 1}, kBlock, [&] {
        K::c2_dw(x.t.data(), w.data(), bias.data(), dy.t.data(), part.data(), s);
    });
    std::vector<double> wy(ny), wdx(nx, 0.0), wdw((size_t)cout * entries, 0.0);
    for (int bi = 0; bi < b; ++bi)
        for (int co = 0; co < cout; ++co)
            for (int i = 0; i < s.ho; ++i)
                for (int j = 0; j < s.wo; ++j) {
                    auto each_tap = [&](auto f) {
                        for (int ci = 0; ci < cin; ++ci)
                            for (int kh = 0; kh < 3; ++kh)
                                for (int kw = 0; kw < 3; ++kw) {
                                    const int r = 2 * i + kh - 1, c = 2 * j + kw - 1;
                                    if (r < 0 || r >= h || c < 0 || c >= wd) continue;
                                    f(((size_t)(bi * cin + ci) * h + r) * wd + c,
                                      ((size_t)co * cin + ci) * 9 + kh * 3 + kw,
                                      (size_t)ci * 9 + kh * 3 + kw);
                                }
                    };
                    double z = bias[co];
                    each_tap([&](size_t src, size_t wk, size_t) { z += w[wk] * x.d[src]; });
                    const double sg = 1.0 / (1.0 + std::exp(-z));
                    const size_t at = ((size_t)(bi * cout + co) * s.ho + i) * s.wo + j;
                    wy[at] = silu ? z * sg : z;
                    const double gz = silu ? dy.d[at] * sg * (1.0 + z * (1.0 - sg)) : dy.d[at];
                    wdw[(size_t)co * entries + entries - 1] += gz;
                    each_tap([&](size_t src, size_t wk, size_t e) {
                        wdx[src] += w[wk] * gz;
                        wdw[(size_t)co * entries + e] += gz * x.d[src];
                    });
                }
    std::vector<double> dw((size_t)cout * entries, 0.0);
    for (int p = 0; p < b * cout; ++p)
        for (size_t e = 0; e < entries; ++e) dw[(size_t)(p % cout) * entries + e] += part[p * entries + e];
    return verdict(std::string(Type<T>::name) + " conv2d " + std::to_string(cin) + "->" +
                       std::to_string(cout) + (silu ? " silu " : " ") + std::to_string(h) + "x" +
                       std::to_string(wd),
                   {{"y", rel_error(y, wy)}, {"dx", rel_error(dx, wdx)}, {"dw", rel_error(dw, wdw)}},
                   Type<T>::tol);
}

template <typename T>
bool all(Rng& rng) {
    bool ok = depthwise1d<T>(2, 37, 20, 31, rng);   // the kernel wider than the sequence
    ok = depthwise1d<T>(3, 300, 8, 7, rng) && ok;   // 900 rows: partial sums of 4 rows
    ok = depthwise2d<T>(2, 3, 17, 12, rng) && ok;   // odd and even sides
    ok = full2d<T>(2, 1, 4, 15, 10, true, rng) && ok;
    ok = full2d<T>(1, 3, 5, 8, 13, false, rng) && ok;
    return ok;
}

}  // namespace

int main() {
    Rng rng{11};
    bool ok = all<float>(rng);
    ok = all<__nv_bfloat16>(rng) && ok;
    ok = all<__half>(rng) && ok;
    std::printf(ok ? "all cases within tolerance\n" : "FAILED\n");
    return ok ? 0 : 1;
}
