// What the row and elementwise harnesses (norms.cpp, conv.cpp, softmax.cpp,
// renorm.cpp) share: a reproducible generator, per-type names and
// tolerances, inputs rounded to the kernels' type, the error measure and the
// report line.
#pragma once

#include "../../cuda/act.cuh"  // ld / st for the activation types

#include <string>
#include <utility>
#include <vector>

namespace harness {

struct Rng {
    uint64_t s;
    double next(double lo, double hi) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return lo + (hi - lo) * (double)(s >> 11) / 9007199254740992.0;
    }
};

// Name and tolerance (largest error over the largest reference value) per
// activation type: a few units in the last place of the type's rounding.
template <typename T>
struct Type;
template <>
struct Type<float> {
    static constexpr const char* name = "f32";
    static constexpr double tol = 2e-5;
};
template <>
struct Type<__nv_bfloat16> {
    static constexpr const char* name = "bf16";
    static constexpr double tol = 8e-3;
};
template <>
struct Type<__half> {
    static constexpr const char* name = "f16";
    static constexpr double tol = 1e-3;
};

// Values in T and as the doubles the kernels read.
template <typename T>
struct Values {
    std::vector<T> t;
    std::vector<double> d;
};

template <typename T>
Values<T> values(size_t n, Rng& rng, double lo, double hi) {
    Values<T> v;
    for (size_t i = 0; i < n; ++i) {
        T x;
        st(&x, (float)rng.next(lo, hi));
        v.t.push_back(x);
        v.d.push_back(ld(x));
    }
    return v;
}

inline std::vector<float> floats(size_t n, Rng& rng, double lo, double hi) {
    std::vector<float> v;
    for (size_t i = 0; i < n; ++i) v.push_back((float)rng.next(lo, hi));
    return v;
}

inline double value(double v) { return v; }
template <typename T>
double value(T v) {
    return ld(v);
}

// Largest |got - want| over the largest |want| (at least 1).
template <typename G>
double rel_error(const std::vector<G>& got, const std::vector<double>& want) {
    double err = 0.0, top = 1.0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double g = value(got[i]);
        if (!std::isfinite(g)) return INFINITY;
        err = std::max(err, std::fabs(g - want[i]));
        top = std::max(top, std::fabs(want[i]));
    }
    return err / top;
}

// Prints one case's errors; true if all are within `tol`.
inline bool verdict(const std::string& what,
                    const std::vector<std::pair<const char*, double>>& errs, double tol) {
    bool ok = true;
    std::string line;
    for (const auto& [name, e] : errs) {
        const bool pass = e <= tol;
        ok = ok && pass;
        char buf[64];
        std::snprintf(buf, sizeof buf, " %s %.2e%s", name, e, pass ? "" : " (FAIL)");
        line += buf;
    }
    std::printf("%-34s%s\n", what.c_str(), line.c_str());
    return ok;
}

}  // namespace harness
