// Runs the softmax kernels of cuda/softmax.cu under cuda_emu.h in f32, bf16
// and f16, launched as softmax_cuda.rs launches them (one block per row),
// against double-precision references on the same rounded inputs: the
// forward (with large values and -inf entries in a row), the backward from
// the output, and the self-conditioning head's gradient from f32 logits.
// Rows shorter and longer than a block, and a vocabulary-sized row. Prints
// one line per case; exits 1 if any is out of tolerance. Built and run by
// kernels/tests/cuda_emulated.rs.

#include "../../cuda/softmax.cu"

#include "harness.h"

namespace {

using namespace harness;

template <typename T>
struct Kernels;

#define SOFTMAX_KERNELS(T, SFX)                                                \
    template <>                                                                \
    struct Kernels<T> {                                                        \
        static constexpr auto fwd = lcasr_softmax_fwd_##SFX;                   \
        static constexpr auto bwd = lcasr_softmax_bwd_##SFX;                   \
        static constexpr auto grad_logits = lcasr_softmax_grad_logits_##SFX;   \
    };
SOFTMAX_KERNELS(float, f32)
SOFTMAX_KERNELS(__nv_bfloat16, bf16)
SOFTMAX_KERNELS(__half, f16)

// Softmax of each row of `x` (rows, c) in double.
std::vector<double> softmax_rows(const std::vector<double>& x, size_t rows, size_t c) {
    std::vector<double> p(x.size());
    for (size_t r = 0; r < rows; ++r) {
        double m = -INFINITY, s = 0.0;
        for (size_t i = 0; i < c; ++i) m = std::max(m, x[r * c + i]);
        for (size_t i = 0; i < c; ++i) s += std::exp(x[r * c + i] - m);
        for (size_t i = 0; i < c; ++i) p[r * c + i] = std::exp(x[r * c + i] - m) / s;
    }
    return p;
}

// g (g - rowsum(g p)) p, in double.
std::vector<double> softmax_grad(const std::vector<double>& p, const std::vector<double>& g,
                                 size_t rows, size_t c) {
    std::vector<double> d(p.size());
    for (size_t r = 0; r < rows; ++r) {
        double dot = 0.0;
        for (size_t i = 0; i < c; ++i) dot += g[r * c + i] * p[r * c + i];
        for (size_t i = 0; i < c; ++i) d[r * c + i] = p[r * c + i] * (g[r * c + i] - dot);
    }
    return d;
}

template <typename T>
bool softmax(size_t rows, size_t c, Rng& rng) {
    using K = Kernels<T>;
    const size_t n = rows * c;
    Values<T> x = values<T>(n, rng, -30.0, 30.0);
    // A masked entry in every third row (never the whole row).
    for (size_t r = 0; r < rows; r += 3) {
        st(&x.t[r * c + (r % c)], -INFINITY);
        x.d[r * c + (r % c)] = -INFINITY;
    }
    const Values<T> g = values<T>(n, rng, -1.0, 1.0);
    const std::vector<double> want_y = softmax_rows(x.d, rows, c);
    // The backward reads a rounded output, as it would the forward's.
    Values<T> y;
    for (double v : want_y) {
        T t;
        st(&t, (float)v);
        y.t.push_back(t);
        y.d.push_back(ld(t));
    }
    std::vector<float> logits(n);
    std::vector<double> logits_d(n);
    for (size_t i = 0; i < n; ++i) logits_d[i] = logits[i] = (float)rng.next(-8.0, 8.0);

    std::vector<T> got_y(n), got_dx(n);
    std::vector<float> got_dl(n, NAN);
    const emu_dim3 grid{(unsigned)std::clamp<size_t>(rows, 1, 65535), 1, 1};
    const emu_dim3 block{SOFTMAX_THREADS, 1, 1};
    const long long r = (long long)rows, cc = (long long)c;
    emu::launch(grid, block, [&] { K::fwd(x.t.data(), got_y.data(), r, cc); });
    emu::launch(grid, block, [&] { K::bwd(y.t.data(), g.t.data(), got_dx.data(), r, cc); });
    emu::launch(grid, block, [&] {
        K::grad_logits(logits.data(), g.t.data(), got_dl.data(), r, cc);
    });
    const std::vector<double> want_dl =
        softmax_grad(softmax_rows(logits_d, rows, c), g.d, rows, c);
    return verdict(std::string(Type<T>::name) + " softmax " + std::to_string(rows) + " x " +
                       std::to_string(c),
                   {{"y", rel_error(got_y, want_y)},
                    {"dx", rel_error(got_dx, softmax_grad(y.d, g.d, rows, c))},
                    {"dlogits", rel_error(got_dl, want_dl)}},
                   Type<T>::tol);
}

template <typename T>
bool all(Rng& rng) {
    bool ok = softmax<T>(21, 10, rng);          // shorter than a block
    ok = softmax<T>(7, 4097, rng) && ok;        // a vocabulary-sized row
    ok = softmax<T>(300, 333, rng) && ok;       // many rows, longer than a block
    return ok;
}

}  // namespace

int main() {
    Rng rng{5};
    bool ok = all<float>(rng);
    ok = all<__nv_bfloat16>(rng) && ok;
    ok = all<__half>(rng) && ok;
    std::printf(ok ? "all cases within tolerance\n" : "FAILED\n");
    return ok ? 0 : 1;
}
