// Runs the attention kernels under cuda_emu.h and compares them with
// attention in double precision on the same (rounded) inputs: output,
// log-sum-exp and the three gradients, over item lengths, local windows,
// dropout and head sizes. Two kernels: the tensor-core one of
// cuda/attention_tc.cu in bf16 and f16, and the CUDA-core f32 one of
// cuda/attention.cu, which has passed gpu_parity on an H100 and so also
// checks the emulation itself. Prints one line per case and kernel; exits 1
// if any is out of tolerance. Built and run by kernels/tests/cuda_emulated.rs.

#include "../../cuda/attention.cu"
#include "../../cuda/attention_tc.cu"

#include <string>

namespace {

struct Case {
    const char* name;
    int b, h, n, dh;
    std::vector<int> lengths;
    long long left, right;  // < 0: unbounded
    float dropout;          // 0: none
};

// A reproducible value in [-1, 1).
struct Rng {
    uint64_t s;
    float next() {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return (float)((s >> 40) & 0xffffff) / 8388608.0f - 1.0f;
    }
};

struct Heads {
    std::vector<uint16_t> bits;  // 16-bit inputs (empty for f32)
    std::vector<double> val;     // the values the kernels see
};

template <typename T>
Heads random_heads(size_t count, Rng& rng, float scale) {
    Heads x;
    for (size_t e = 0; e < count; ++e) {
        const uint16_t b = T::of(rng.next() * scale);
        x.bits.push_back(b);
        x.val.push_back(T::to_f(b));
    }
    return x;
}

AttShape shape_of(const Case& c) {
    AttShape s{};
    s.n = c.n;
    s.left = c.left;
    s.right = c.right;
    s.seed = 0x5eedull + (uint64_t)c.n;
    s.heads = c.h;
    s.dh = c.dh;
    s.scale = 1.0f / std::sqrt((float)c.dh);
    if (c.dropout > 0.0f) {
        // As src/attention_dropout.rs: keep iff hash >= p * 2^32.
        s.threshold = (uint32_t)((double)c.dropout * 4294967296.0);
        s.keep_scale = 1.0f / (1.0f - c.dropout);
    } else {
        s.threshold = 0;
        s.keep_scale = 1.0f;
    }
    return s;
}

struct Result {
    std::vector<double> out, lse, dq, dk, dv;
};

// Attention and its gradients in double precision, masks and dropout as the
// kernels define them.
Result reference(const Case& c, const AttShape& s, const Heads& q, const Heads& k, const Heads& v,
                 const Heads& dout) {
    const size_t n = c.n, dh = c.dh, size = (size_t)c.b * c.h * n * dh;
    Result r;
    r.out.assign(size, 0.0);
    r.lse.assign((size_t)c.b * c.h * n, 0.0);
    r.dq.assign(size, 0.0);
    r.dk.assign(size, 0.0);
    r.dv.assign(size, 0.0);
    std::vector<double> p(n), dp(n), z(n);
    for (int b = 0; b < c.b; ++b)
        for (int h = 0; h < c.h; ++h) {
            const size_t base = ((size_t)b * c.h + h) * n * dh;
            const long long len = c.lengths[b];
            for (long long i = 0; i < len; ++i) {
                const uint32_t rk = s.threshold ? att_row_key(s.seed, b, h, i) : 0u;
                double m = -INFINITY;
                for (size_t j = 0; j < n; ++j) {
                    if (!att_visible(s, len, i, (long long)j)) {
                        p[j] = -INFINITY;
                        continue;
                    }
                    double dot = 0.0;
                    for (size_t d = 0; d < dh; ++d)
                        dot += q.val[base + i * dh + d] * k.val[base + j * dh + d];
                    p[j] = dot * s.scale;
                    m = std::max(m, p[j]);
                }
                double sum = 0.0;
                for (size_t j = 0; j < n; ++j) {
                    p[j] = p[j] == -INFINITY ? 0.0 : std::exp(p[j] - m);
                    sum += p[j];
                    z[j] = att_keep(rk, (long long)j, s.threshold, s.keep_scale);
                }
                r.lse[(base / dh) + i] = m + std::log(sum);
                for (size_t j = 0; j < n; ++j) p[j] /= sum;
                double delta = 0.0;
                for (size_t j = 0; j < n; ++j) {
                    double acc = 0.0;
                    for (size_t d = 0; d < dh; ++d) {
                        r.out[base + i * dh + d] += p[j] * z[j] * v.val[base + j * dh + d];
                        acc += dout.val[base + i * dh + d] * v.val[base + j * dh + d];
                    }
                    dp[j] = acc;
                    delta += p[j] * z[j] * acc;
                }
                for (size_t j = 0; j < n; ++j) {
                    if (p[j] == 0.0) continue;
                    const double ds = p[j] * (dp[j] * z[j] - delta);
                    for (size_t d = 0; d < dh; ++d) {
                        r.dv[base + j * dh + d] += p[j] * z[j] * dout.val[base + i * dh + d];
                        r.dq[base + i * dh + d] += s.scale * ds * k.val[base + j * dh + d];
                        r.dk[base + j * dh + d] += s.scale * ds * q.val[base + i * dh + d];
                    }
                }
            }
        }
    return r;
}

// Largest |got - want| over the largest |want| (over 1 where that is below 1).
template <typename G>
double rel_error(const std::vector<G>& got, const std::vector<double>& want) {
    double err = 0.0, top = 1.0;
    for (size_t e = 0; e < want.size(); ++e) {
        const double g = (double)got[e];
        if (!std::isfinite(g)) return INFINITY;
        err = std::max(err, std::fabs(g - want[e]));
        top = std::max(top, std::fabs(want[e]));
    }
    return err / top;
}

// Prints one case's errors (out, lse, dq, dk, dv); true if all are within
// `tol` (lse: 1e-4).
bool report(const char* type, const Case& c, const std::vector<double>& errs, double tol) {
    const char* names[5] = {"out", "lse", "dq", "dk", "dv"};
    bool ok = true;
    std::string line;
    for (int e = 0; e < 5; ++e) {
        const double limit = e == 1 ? 1e-4 : tol;
        const bool pass = errs[e] <= limit;
        ok = ok && pass;
        char buf[64];
        std::snprintf(buf, sizeof buf, " %s %.2e%s", names[e], errs[e], pass ? "" : " (FAIL)");
        line += buf;
    }
    std::printf("%-4s %-34s%s\n", type, c.name, line.c_str());
    return ok;
}

using FwdKernel = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, const int*,
                           uint16_t*, float*, AttShape);
using DqKernel = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*,
                          const float*, const float*, const int*, float*, AttShape);
using DkvKernel = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, const uint16_t*,
                           const float*, const float*, const int*, float*, float*, AttShape);
using DeltaKernel = void (*)(const uint16_t*, const uint16_t*, float*, long long, int);

struct Kernels {
    FwdKernel fwd;
    DqKernel dq;
    DkvKernel dkv;
    DeltaKernel delta;
};

#define TC_KERNELS(NAME, DH)                                                             \
    Kernels{lcasr_attention_tc_fwd_##NAME##_##DH, lcasr_attention_tc_bwd_dq_##NAME##_##DH, \
            lcasr_attention_tc_bwd_dkv_##NAME##_##DH, lcasr_attention_tc_delta_##NAME}

template <typename T>
Kernels kernels_for(int dh);

template <>
Kernels kernels_for<TcBf16>(int dh) {
    switch (dh) {
        case 32: return TC_KERNELS(bf16, 32);
        case 64: return TC_KERNELS(bf16, 64);
        case 96: return TC_KERNELS(bf16, 96);
        default: return TC_KERNELS(bf16, 128);
    }
}

template <>
Kernels kernels_for<TcF16>(int dh) {
    switch (dh) {
        case 32: return TC_KERNELS(f16, 32);
        case 64: return TC_KERNELS(f16, 64);
        case 96: return TC_KERNELS(f16, 96);
        default: return TC_KERNELS(f16, 128);
    }
}

// Runs one case through the kernels; true if within `tol`.
template <typename T>
bool run_case(const Case& c, const char* type, double tol) {
    const size_t n = c.n, size = (size_t)c.b * c.h * n * c.dh, rows = (size_t)c.b * c.h * n;
    Rng rng{0x1234u + (uint64_t)c.n * 7 + (uint64_t)c.dh};
    const Heads q = random_heads<T>(size, rng, 2.0f), k = random_heads<T>(size, rng, 2.0f);
    const Heads v = random_heads<T>(size, rng, 1.0f), dout = random_heads<T>(size, rng, 1.0f);
    const AttShape s = shape_of(c);
    const Kernels kn = kernels_for<T>(c.dh);
    const int* lengths = c.lengths.data();

    std::vector<uint16_t> out(size, 0xffffu);
    std::vector<float> lse(rows, NAN), delta(rows, NAN);
    std::vector<float> dq(size, NAN), dk(size, NAN), dv(size, NAN);
    const emu_dim3 tiles{(unsigned)((n + 63) / 64), (unsigned)(c.b * c.h), 1};
    const emu_dim3 block{128, 1, 1};
    emu::launch(tiles, block, [&] {
        kn.fwd(q.bits.data(), k.bits.data(), v.bits.data(), lengths, out.data(), lse.data(), s);
    });
    emu::launch({(unsigned)((rows + 3) / 4), 1, 1}, block, [&] {
        kn.delta(out.data(), dout.bits.data(), delta.data(), (long long)rows, c.dh);
    });
    emu::launch(tiles, block, [&] {
        kn.dq(q.bits.data(), k.bits.data(), v.bits.data(), dout.bits.data(), lse.data(),
              delta.data(), lengths, dq.data(), s);
    });
    emu::launch(tiles, block, [&] {
        kn.dkv(q.bits.data(), k.bits.data(), v.bits.data(), dout.bits.data(), lse.data(),
               delta.data(), lengths, dk.data(), dv.data(), s);
    });

    const Result want = reference(c, s, q, k, v, dout);
    std::vector<double> out_f(size);
    for (size_t e = 0; e < size; ++e) out_f[e] = T::to_f(out[e]);
    return report(type, c, {rel_error(out_f, want.out), rel_error(lse, want.lse),
                             rel_error(dq, want.dq), rel_error(dk, want.dk),
                             rel_error(dv, want.dv)}, tol);
}

/// The f32 CUDA-core kernels of attention.cu, launched as attention_cuda.rs
/// does (4 warps; 4 query rows per warp forward, 2 backward).
bool run_f32_case(const Case& c, double tol) {
    const size_t n = c.n, dh = c.dh, size = (size_t)c.b * c.h * n * dh;
    const size_t rows = (size_t)c.b * c.h * n;
    Rng rng{0x1234u + (uint64_t)c.n * 7 + (uint64_t)c.dh};
    auto heads = [&](float scale) {
        Heads x;
        for (size_t e = 0; e < size; ++e) x.val.push_back(rng.next() * scale);
        return x;
    };
    const Heads q = heads(2.0f), k = heads(2.0f), v = heads(1.0f), dout = heads(1.0f);
    auto floats = [](const Heads& x) { return std::vector<float>(x.val.begin(), x.val.end()); };
    const std::vector<float> qf = floats(q), kf = floats(k), vf = floats(v), df = floats(dout);
    const AttShape s = shape_of(c);
    const int* lengths = c.lengths.data();
    std::vector<float> out(size, NAN), lse(rows, NAN), delta(rows, NAN);
    std::vector<float> dq(size, NAN), dk(size, NAN), dv(size, NAN);
    const emu_dim3 block{128, 1, 1};
    const unsigned bh = (unsigned)(c.b * c.h);
    const size_t fwd_shared = (2 * 32 + 4 * 4) * (dh + 1) * 4;
    const size_t bwd_shared = (2 * 32 + 2 * 4 * 2) * (dh + 1) * 4;
    using Fwd = void (*)(const float*, const float*, const float*, const int*, float*, float*,
                         AttShape);
    using Dq = void (*)(const float*, const float*, const float*, const float*, const float*,
                        const float*, const int*, float*, AttShape);
    using Dkv = void (*)(const float*, const float*, const float*, const float*, const float*,
                         const float*, const int*, float*, float*, AttShape);
    const int dpl = (int)((dh + 31) / 32);
    const Fwd fwds[4] = {lcasr_attention_fwd_1, lcasr_attention_fwd_2, lcasr_attention_fwd_3,
                         lcasr_attention_fwd_4};
    const Dq dqs[4] = {lcasr_attention_bwd_dq_1, lcasr_attention_bwd_dq_2,
                       lcasr_attention_bwd_dq_3, lcasr_attention_bwd_dq_4};
    const Dkv dkvs[4] = {lcasr_attention_bwd_dkv_1, lcasr_attention_bwd_dkv_2,
                         lcasr_attention_bwd_dkv_3, lcasr_attention_bwd_dkv_4};
    emu::launch({(unsigned)((n + 15) / 16), bh, 1}, block, [&] {
        fwds[dpl - 1](qf.data(), kf.data(), vf.data(), lengths, out.data(), lse.data(), s);
    }, fwd_shared);
    emu::launch({(unsigned)std::min<size_t>((rows * 32 + 255) / 256, 65535), 1, 1}, {256, 1, 1},
                [&] {
                    lcasr_attention_delta(out.data(), df.data(), delta.data(), (long long)rows,
                                          (int)dh);
                });
    emu::launch({(unsigned)((n + 7) / 8), bh, 1}, block, [&] {
        dqs[dpl - 1](qf.data(), kf.data(), vf.data(), df.data(), lse.data(), delta.data(),
                     lengths, dq.data(), s);
    }, bwd_shared);
    emu::launch({(unsigned)((n + 7) / 8), bh, 1}, block, [&] {
        dkvs[dpl - 1](qf.data(), kf.data(), vf.data(), df.data(), lse.data(), delta.data(),
                      lengths, dk.data(), dv.data(), s);
    }, bwd_shared + 3 * 32 * 4);
    const Result want = reference(c, s, q, k, v, dout);
    return report("f32", c, {rel_error(out, want.out), rel_error(lse, want.lse),
                             rel_error(dq, want.dq), rel_error(dk, want.dk),
                             rel_error(dv, want.dv)}, tol);
}

}  // namespace

int main() {
    const std::vector<Case> cases = {
        {"dh64 two items, padded", 2, 2, 100, 64, {100, 61}, -1, -1, 0.0f},
        {"dh32 an empty item", 2, 1, 70, 32, {70, 0}, -1, -1, 0.0f},
        {"dh128 window 17/5, dropout 0.1", 1, 3, 130, 128, {130}, 17, 5, 0.1f},
        {"dh96 left-only window, padded", 2, 2, 90, 96, {90, 33}, 40, 0, 0.0f},
        {"dh64 dropout 0.3, 3 key tiles", 1, 2, 200, 64, {187}, -1, -1, 0.3f},
        // Tiles wholly inside a window take the unmasked path, next to ones it cuts.
        {"dh32 window 90/60, unmasked tiles", 1, 1, 260, 32, {250}, 90, 60, 0.0f},
    };
    bool ok = true;
    for (const Case& c : cases) {
        ok = run_case<TcBf16>(c, "bf16", 1e-2) && ok;
        ok = run_case<TcF16>(c, "f16", 1.5e-3) && ok;
        ok = run_f32_case(c, 1e-5) && ok;
    }
    std::printf(ok ? "all cases within tolerance\n" : "FAILED\n");
    return ok ? 0 : 1;
}
