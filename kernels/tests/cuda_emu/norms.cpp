// Runs the LayerNorm, RMSNorm (cuda/norm.cu) and GLU (cuda/glu.cu) kernels
// under cuda_emu.h in f32, bf16 and f16, launched as norm_cuda.rs and glu.rs
// launch them, against double-precision references on the same rounded
// inputs: outputs, input gradients and the weight/bias gradients summed over
// the per-block partial rows. Rows shorter and longer than a block, and more
// rows than the backward's 512 blocks. Prints one line per case; exits 1 if
// any is out of tolerance. Built and run by kernels/tests/cuda_emulated.rs.

#include "../../cuda/glu.cu"
#include "../../cuda/norm.cu"

#include "harness.h"

namespace {

using namespace harness;

// Each block's partial row of a (blocks, d) buffer, summed.
std::vector<double> sum_parts(const std::vector<float>& parts, size_t blocks, size_t d) {
    std::vector<double> s(d, 0.0);
    for (size_t b = 0; b < blocks; ++b)
        for (size_t c = 0; c < d; ++c) s[c] += parts[b * d + c];
    return s;
}

// The kernels of one type.
template <typename T>
struct Kernels;

#define NORM_KERNELS(T, SFX)                                                               \
    template <>                                                                            \
    struct Kernels<T> {                                                                    \
        static constexpr auto ln_fwd = lcasr_ln_fwd_##SFX;                                 \
        static constexpr auto ln_dx = lcasr_ln_bwd_dx_##SFX;                               \
        static constexpr auto ln_params = lcasr_ln_bwd_params_##SFX;                       \
        static constexpr auto rms_fwd = lcasr_rms_fwd_##SFX;                               \
        static constexpr auto rms_dx = lcasr_rms_bwd_dx_##SFX;                             \
        static constexpr auto rms_params = lcasr_rms_bwd_params_##SFX;                     \
        static constexpr auto glu_fwd = lcasr_glu_fwd_##SFX;                               \
        static constexpr auto glu_bwd = lcasr_glu_bwd_##SFX;                               \
    };
NORM_KERNELS(float, f32)
NORM_KERNELS(__nv_bfloat16, bf16)
NORM_KERNELS(__half, f16)

emu_dim3 rows_grid(size_t rows, size_t most) {
    return {(unsigned)std::clamp<size_t>(rows, 1, most), 1, 1};
}

template <typename T>
bool norms(size_t rows, size_t d, Rng& rng) {
    using K = Kernels<T>;
    const float eps = 1e-5f;
    const Values<T> x = values<T>(rows * d, rng, -3.0, 3.0), dy = values<T>(rows * d, rng, -1, 1);
    const std::vector<float> w = floats(d, rng, 0.5, 1.5), b = floats(d, rng, -0.5, 0.5);
    const emu_dim3 block{NORM_THREADS, 1, 1};
    const emu_dim3 fwd_grid = rows_grid(rows, 65535), bwd_grid = rows_grid(rows, 512);
    const size_t parts = bwd_grid.x;
    const long long r = (long long)rows, dd = (long long)d;

    std::vector<T> y(rows * d), dx(rows * d), ry(rows * d), rdx(rows * d);
    std::vector<float> dw(parts * d, NAN), db(parts * d, NAN), rdw(parts * d, NAN);
    emu::launch(fwd_grid, block, [&] { K::ln_fwd(x.t.data(), w.data(), b.data(), y.data(), r, dd, eps); });
    emu::launch(fwd_grid, block, [&] { K::ln_dx(x.t.data(), w.data(), dy.t.data(), dx.data(), r, dd, eps); });
    emu::launch(bwd_grid, block, [&] { K::ln_params(x.t.data(), dy.t.data(), dw.data(), db.data(), r, dd, eps); });
    emu::launch(fwd_grid, block, [&] { K::rms_fwd(x.t.data(), w.data(), ry.data(), r, dd, eps); });
    emu::launch(fwd_grid, block, [&] { K::rms_dx(x.t.data(), w.data(), dy.t.data(), rdx.data(), r, dd, eps); });
    emu::launch(bwd_grid, block, [&] { K::rms_params(x.t.data(), dy.t.data(), rdw.data(), r, dd, eps); });

    std::vector<double> want_y(rows * d), want_dx(rows * d), want_dw(d, 0.0), want_db(d, 0.0);
    std::vector<double> want_ry(rows * d), want_rdx(rows * d), want_rdw(d, 0.0);
    for (size_t i = 0; i < rows; ++i) {
        const double* xr = &x.d[i * d];
        const double* gr = &dy.d[i * d];
        double mean = 0.0, var = 0.0, sq = 0.0;
        for (size_t c = 0; c < d; ++c) mean += xr[c] / d;
        for (size_t c = 0; c < d; ++c) {
            var += (xr[c] - mean) * (xr[c] - mean) / d;
            sq += xr[c] * xr[c] / d;
        }
        const double rstd = 1.0 / std::sqrt(var + eps), rinv = 1.0 / std::sqrt(sq + eps);
        double mg = 0.0, mgx = 0.0, mgr = 0.0;
        for (size_t c = 0; c < d; ++c) {
            const double xh = (xr[c] - mean) * rstd, g = gr[c] * w[c];
            mg += g / d;
            mgx += g * xh / d;
            mgr += g * xr[c] / d;
        }
        for (size_t c = 0; c < d; ++c) {
            const double xh = (xr[c] - mean) * rstd, g = gr[c] * w[c];
            want_y[i * d + c] = xh * w[c] + b[c];
            want_dx[i * d + c] = rstd * (g - mg - xh * mgx);
            want_dw[c] += gr[c] * xh;
            want_db[c] += gr[c];
            want_ry[i * d + c] = xr[c] * rinv * w[c];
            want_rdx[i * d + c] = rinv * (g - xr[c] * rinv * rinv * mgr);
            want_rdw[c] += gr[c] * xr[c] * rinv;
        }
    }
    // Weight gradients sum over rows: compare relative to their size.
    const std::string shape = std::to_string(rows) + " x " + std::to_string(d);
    const bool ln = verdict(std::string(Type<T>::name) + " layer_norm " + shape,
                            {{"y", rel_error(y, want_y)},
                             {"dx", rel_error(dx, want_dx)},
                             {"dw", rel_error(sum_parts(dw, parts, d), want_dw)},
                             {"db", rel_error(sum_parts(db, parts, d), want_db)}},
                            Type<T>::tol);
    const bool rms = verdict(std::string(Type<T>::name) + " rms_norm " + shape,
                             {{"y", rel_error(ry, want_ry)},
                              {"dx", rel_error(rdx, want_rdx)},
                              {"dw", rel_error(sum_parts(rdw, parts, d), want_rdw)}},
                             Type<T>::tol);
    return ln && rms;
}

template <typename T>
bool glu(size_t rows, size_t n, Rng& rng) {
    using K = Kernels<T>;
    const Values<T> x = values<T>(rows * 2 * n, rng, -3.0, 3.0), dy = values<T>(rows * n, rng, -1, 1);
    std::vector<T> y(rows * n), dx(rows * 2 * n);
    const size_t total = rows * n;
    const emu_dim3 grid{(unsigned)std::clamp<size_t>((total + 255) / 256, 1, 65535), 1, 1};
    emu::launch(grid, {256, 1, 1}, [&] { K::glu_fwd(x.t.data(), y.data(), (long long)rows, (long long)n); });
    emu::launch(grid, {256, 1, 1}, [&] {
        K::glu_bwd(x.t.data(), dy.t.data(), dx.data(), (long long)rows, (long long)n);
    });
    std::vector<double> want_y(rows * n), want_dx(rows * 2 * n);
    for (size_t r = 0; r < rows; ++r)
        for (size_t c = 0; c < n; ++c) {
            const double a = x.d[r * 2 * n + c], g = x.d[r * 2 * n + n + c];
            const double s = 1.0 / (1.0 + std::exp(-g)), d = dy.d[r * n + c];
            want_y[r * n + c] = a * s;
            want_dx[r * 2 * n + c] = d * s;
            want_dx[r * 2 * n + n + c] = d * a * s * (1.0 - s);
        }
    return verdict(std::string(Type<T>::name) + " glu " + std::to_string(rows) + " x " +
                       std::to_string(2 * n),
                   {{"y", rel_error(y, want_y)}, {"dx", rel_error(dx, want_dx)}}, Type<T>::tol);
}

template <typename T>
bool all(Rng& rng) {
    bool ok = true;
    // A row shorter than a block; rows longer than a block and more rows
    // than the backward's 512 blocks.
    for (auto [rows, d] : {std::pair<size_t, size_t>{21, 10}, {600, 300}}) {
        ok = norms<T>(rows, d, rng) && ok;
        ok = glu<T>(rows, d / 2, rng) && ok;
    }
    return ok;
}

}  // namespace

int main() {
    Rng rng{7};
    bool ok = all<float>(rng);
    ok = all<__nv_bfloat16>(rng) && ok;
    ok = all<__half>(rng) && ok;
    std::printf(ok ? "all cases within tolerance\n" : "FAILED\n");
    return ok ? 0 : 1;
}
