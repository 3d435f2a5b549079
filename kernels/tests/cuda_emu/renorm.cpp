// Runs the BatchRenorm kernels of cuda/renorm.cu under cuda_emu.h, launched
// as batch_renorm_cuda.rs launches them, against their contracts in double
// precision: the per-block partial sums of x and of its squared deviations
// over the counted rows, the forward y = silu((x - m) a + b), the backward's
// direct input gradient with the partial sums of the weight and bias
// gradients, and the gradient through the batch statistics on the counted
// rows. The host computes every coefficient with the CPU kernel's code, so
// the coefficients here are arbitrary. Prints one line per case; exits 1 if
// any is out of tolerance. Built and run by kernels/tests/cuda_emulated.rs.

#include "../../cuda/renorm.cu"

#include "harness.h"

namespace {

using namespace harness;

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Partial sums of a (parts, width) buffer, added up per column.
std::vector<double> fold(const std::vector<float>& part, size_t parts, size_t width) {
    std::vector<double> total(width, 0.0);
    for (size_t p = 0; p < parts; ++p)
        for (size_t i = 0; i < width; ++i) total[i] += part[p * width + i];
    return total;
}

bool renorm(int b, int t_len, int c, const std::vector<int>& lengths, Rng& rng) {
    const long long rows = (long long)b * t_len;
    const size_t n = (size_t)rows * c;
    // row_parts: at most 256 partial sums.
    const long long per = std::max<long long>(1, (rows + 255) / 256);
    const long long parts = (rows + per - 1) / per;
    const std::vector<float> x = floats(n, rng, -2.0, 3.0), dy = floats(n, rng, -1.0, 1.0);
    const std::vector<float> dx_in = floats(n, rng, -1.0, 1.0);
    const std::vector<float> mean = floats(c, rng, -0.5, 0.5);
    std::vector<float> coefs = floats(5 * (size_t)c, rng, -1.0, 1.0);  // [m | a | b | u | v]
    std::vector<float> k = floats(3 * (size_t)c, rng, -0.5, 0.5);      // [k1 | k2 | mean]
    auto valid = [&](long long r) { return r % t_len < lengths[r / t_len]; };

    std::vector<float> sums(parts * c, NAN), squares(parts * c, NAN), y(n, NAN), dx(n, NAN);
    std::vector<float> wb(parts * 2 * c, NAN), out(n, NAN);
    const emu_dim3 block{256, 1, 1}, part_grid{(unsigned)parts, 1, 1};
    const emu_dim3 elems{(unsigned)std::clamp<size_t>((n + 255) / 256, 1, 65535), 1, 1};
    emu::launch(part_grid, block, [&] {
        lcasr_renorm_sums(x.data(), lengths.data(), mean.data(), sums.data(), rows, t_len, c, per, 0);
    });
    emu::launch(part_grid, block, [&] {
        lcasr_renorm_sums(x.data(), lengths.data(), mean.data(), squares.data(), rows, t_len, c,
                          per, 1);
    });
    emu::launch(elems, block, [&] { lcasr_renorm_fwd(x.data(), coefs.data(), y.data(), rows, c); });
    emu::launch(part_grid, block, [&] {
        lcasr_renorm_bwd(x.data(), dy.data(), coefs.data(), dx.data(), wb.data(), rows, c, per);
    });
    emu::launch(elems, block, [&] {
        lcasr_renorm_stats_grad(x.data(), dx_in.data(), lengths.data(), k.data(), out.data(), rows,
                                t_len, c);
    });

    std::vector<double> want_sums(c, 0.0), want_sq(c, 0.0), want_y(n), want_dx(n), want_wb(2 * c, 0.0);
    std::vector<double> want_out(n);
    for (long long r = 0; r < rows; ++r)
        for (int ch = 0; ch < c; ++ch) {
            const size_t e = (size_t)r * c + ch;
            if (valid(r)) {
                want_sums[ch] += x[e];
                want_sq[ch] += (x[e] - (double)mean[ch]) * (x[e] - (double)mean[ch]);
            }
            const double m = coefs[ch], a = coefs[c + ch], bb = coefs[2 * c + ch];
            const double u = coefs[3 * c + ch], v = coefs[4 * c + ch];
            const double z = (x[e] - m) * a + bb, s = sigmoid(z);
            want_y[e] = z * s;
            const double dz = dy[e] * s * (1.0 + z * (1.0 - s));
            want_dx[e] = dz * a;
            want_wb[ch] += dz * ((x[e] - m) * u + v);
            want_wb[c + ch] += dz;
            want_out[e] = dx_in[e] + (valid(r) ? k[ch] + k[c + ch] * (x[e] - k[2 * c + ch]) : 0.0);
        }
    return verdict("renorm " + std::to_string(b) + "x" + std::to_string(t_len) + "x" +
                       std::to_string(c),
                   {{"sums", rel_error(fold(sums, parts, c), want_sums)},
                    {"squares", rel_error(fold(squares, parts, c), want_sq)},
                    {"y", rel_error(y, want_y)},
                    {"dx", rel_error(dx, want_dx)},
                    {"dw|db", rel_error(fold(wb, parts, 2 * c), want_wb)},
                    {"stats", rel_error(out, want_out)}},
                   Type<float>::tol);
}

}  // namespace

int main() {
    Rng rng{17};
    // Padded items, several rows per partial sum, more channels than threads.
    bool ok = renorm(3, 19, 12, {19, 7, 1}, rng);
    ok = renorm(2, 700, 300, {700, 411}, rng) && ok;
    std::printf(ok ? "all cases within tolerance\n" : "FAILED\n");
    return ok ? 0 : 1;
}
