// Runs the CTC kernels of cuda/ctc.cu under cuda_emu.h, in the order and
// with the buffers kernels/src/ctc_cuda.rs launches them with, and compares
// the loss and the gradient of scale * loss with a direct forward-backward
// over the whole lattice in double precision: repeated labels, an empty
// target, an item without frames, an impossible item with and without
// zero_infinity, a blank other than 0, rows wider than a block, many alpha
// segments, a long item. Prints one line per case; exits 1 if any is out of tolerance.
// Built and run by kernels/tests/cuda_emulated.rs.

#include "../../cuda/ctc.cu"

namespace {

struct Item {
    int len;
    std::vector<int> labels;
};

struct Case {
    const char* name;
    int t, c, blank;
    bool zero_infinity;
    std::vector<Item> items;
};

struct Rng {
    uint64_t s;
    double next() {  // in [0, 1)
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return (double)(s >> 11) / 9007199254740992.0;
    }
};

std::vector<int> extended(const Item& it, int blank) {
    std::vector<int> e{blank};
    for (int l : it.labels) {
        e.push_back(l);
        e.push_back(blank);
    }
    return e;
}

int min_frames(const Item& it) {
    int n = (int)it.labels.size();
    for (size_t i = 1; i < it.labels.size(); ++i) n += it.labels[i] == it.labels[i - 1];
    return n;
}

// The item arrays in one int buffer, as ctc_cuda.rs's `pack`.
std::vector<int> pack(const std::vector<Item>& items, int blank, CtcOffsets* o) {
    std::vector<int> len, s_len, minf, ext_off, ext, lab_first{0}, lab_id, lab_pos_off{0},
        lab_pos;
    for (const Item& it : items) {
        const std::vector<int> e = extended(it, blank);
        len.push_back(it.len);
        s_len.push_back((int)e.size());
        minf.push_back(min_frames(it));
        ext_off.push_back((int)ext.size());
        ext.insert(ext.end(), e.begin(), e.end());
        std::vector<int> distinct(it.labels);
        std::sort(distinct.begin(), distinct.end());
        distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
        for (int label : distinct) {
            lab_id.push_back(label);
            for (size_t s = 0; s < e.size(); ++s)
                if (e[s] == label) lab_pos.push_back((int)s);
            lab_pos_off.push_back((int)lab_pos.size());
        }
        lab_first.push_back((int)lab_id.size());
    }
    std::vector<int> meta;
    auto place = [&](const std::vector<int>& part) {
        const int at = (int)meta.size();
        meta.insert(meta.end(), part.begin(), part.end());
        return at;
    };
    o->len = place(len);
    o->s_len = place(s_len);
    o->min_frames = place(minf);
    o->ext_off = place(ext_off);
    o->ext = place(ext);
    o->lab_first = place(lab_first);
    o->lab_id = place(lab_id);
    o->lab_pos_off = place(lab_pos_off);
    o->lab_pos = place(lab_pos);
    return meta;
}

double lse_of(const std::vector<double>& v) {
    double m = -INFINITY;
    for (double x : v) m = std::max(m, x);
    if (m == -INFINITY) return m;
    double s = 0.0;
    for (double x : v) s += std::exp(x - m);
    return m + std::log(s);
}

// nll of one item and the gradient of scale * nll for its (T, C) logits.
double reference(const Case& c, const Item& it, const float* x, double scale, double* grad) {
    const int tb = it.len, C = c.c;
    const std::vector<int> e = extended(it, c.blank);
    const int S = (int)e.size();
    std::vector<double> lp((size_t)tb * C);
    for (int t = 0; t < tb; ++t) {
        std::vector<double> row(x + (size_t)t * C, x + (size_t)(t + 1) * C);
        const double z = lse_of(row);
        for (int k = 0; k < C; ++k) lp[(size_t)t * C + k] = row[k] - z;
    }
    for (size_t i = 0; i < (size_t)c.t * C; ++i) grad[i] = 0.0;
    if (tb == 0) return S == 1 ? 0.0 : INFINITY;
    const double ninf = -INFINITY;
    std::vector<std::vector<double>> a(tb, std::vector<double>(S, ninf)), b = a;
    auto emit = [&](int t, int s) { return lp[(size_t)t * C + e[s]]; };
    auto skip = [&](int s) { return s >= 2 && e[s] != c.blank && e[s] != e[s - 2]; };
    a[0][0] = emit(0, 0);
    if (S > 1) a[0][1] = emit(0, 1);
    for (int t = 1; t < tb; ++t)
        for (int s = 0; s < S; ++s) {
            std::vector<double> in{a[t - 1][s]};
            if (s >= 1) in.push_back(a[t - 1][s - 1]);
            if (skip(s)) in.push_back(a[t - 1][s - 2]);
            a[t][s] = lse_of(in) + emit(t, s);
        }
    b[tb - 1][S - 1] = emit(tb - 1, S - 1);
    if (S > 1) b[tb - 1][S - 2] = emit(tb - 1, S - 2);
    for (int t = tb - 2; t >= 0; --t)
        for (int s = 0; s < S; ++s) {
            std::vector<double> in{b[t + 1][s]};
            if (s + 1 < S) in.push_back(b[t + 1][s + 1]);
            if (s + 2 < S && skip(s + 2)) in.push_back(b[t + 1][s + 2]);
            b[t][s] = lse_of(in) + emit(t, s);
        }
    const double logz = lse_of(S > 1 ? std::vector<double>{a[tb - 1][S - 1], a[tb - 1][S - 2]}
                                     : std::vector<double>{a[tb - 1][S - 1]});
    if (logz == -INFINITY) return INFINITY;
    for (int t = 0; t < tb; ++t) {
        for (int k = 0; k < C; ++k) grad[(size_t)t * C + k] = scale * std::exp(lp[(size_t)t * C + k]);
        for (int s = 0; s < S; ++s)
            grad[(size_t)t * C + e[s]] -= scale * std::exp(a[t][s] + b[t][s] - emit(t, s) - logz);
    }
    return -logz;
}

bool run_case(const Case& c, uint64_t seed) {
    const int B = (int)c.items.size(), T = c.t, C = c.c;
    Rng rng{seed};
    std::vector<float> x((size_t)B * T * C);
    for (float& v : x) v = (float)(rng.next() * 8.0 - 4.0);
    std::vector<double> scale(B);
    for (double& v : scale) v = 0.5 + rng.next();

    CtcShape sh{};
    sh.batch = B;
    sh.t = T;
    sh.c = C;
    sh.blank = c.blank;
    sh.k = std::max(1, (int)std::ceil(std::sqrt((double)T)));
    int widest = 1;
    for (const Item& it : c.items) widest = std::max(widest, 2 * (int)it.labels.size() + 1);
    sh.w = widest + 2;
    sh.n_ck = std::max(1, (T + sh.k - 1) / sh.k);
    sh.zero_infinity = c.zero_infinity;
    CtcOffsets offs{};
    const std::vector<int> meta = pack(c.items, c.blank, &offs);

    std::vector<double> lse((size_t)B * T, NAN), ckpt((size_t)B * sh.n_ck * sh.w, NAN);
    std::vector<double> rows((size_t)B * 2 * sh.w, NAN), nll(B, NAN);
    std::vector<float> loss(B, NAN), grad((size_t)B * T * C, NAN);
    std::vector<double> seg((size_t)B * sh.k * sh.w, NAN), occ((size_t)B * sh.w, NAN);
    const float* xp = x.data();
    emu::launch({(unsigned)std::min(B * T, 65535), 1, 1}, {CTC_ROW_THREADS, 1, 1},
                [&] { lcasr_ctc_lse(xp, lse.data(), meta.data(), offs, sh); });
    emu::launch({(unsigned)B, 1, 1}, {CTC_ITEM_THREADS, 1, 1}, [&] {
        lcasr_ctc_alpha(xp, lse.data(), rows.data(), ckpt.data(), nll.data(), loss.data(),
                        meta.data(), offs, sh);
    });
    const size_t total = (size_t)B * T * C;
    emu::launch({(unsigned)std::min<size_t>((total + 255) / 256, 65535), 1, 1}, {256, 1, 1}, [&] {
        lcasr_ctc_softmax(xp, lse.data(), nll.data(), scale.data(), grad.data(), meta.data(),
                          offs, sh);
    });
    emu::launch({(unsigned)B, 1, 1}, {CTC_ITEM_THREADS, 1, 1}, [&] {
        lcasr_ctc_beta(xp, lse.data(), ckpt.data(), rows.data(), seg.data(), occ.data(),
                       nll.data(), scale.data(), grad.data(), meta.data(), offs, sh);
    });

    bool ok = true;
    double loss_err = 0.0, grad_err = 0.0;
    std::vector<double> want((size_t)T * C);
    for (int b = 0; b < B; ++b) {
        const Item& it = c.items[b];
        const double n = reference(c, it, xp + (size_t)b * T * C, scale[b], want.data());
        const float* got = grad.data() + (size_t)b * T * C;
        if (std::isinf(n)) {
            // Infinite loss: inf (or 0 with zero_infinity); NaN gradient rows
            // (0 with zero_infinity) over the valid frames, 0 past them.
            const bool loss_ok = c.zero_infinity ? loss[b] == 0.0f : std::isinf(loss[b]);
            ok = ok && loss_ok;
            for (int t = 0; t < T; ++t)
                for (int k = 0; k < C; ++k) {
                    const float g = got[(size_t)t * C + k];
                    const bool want_nan = t < it.len && !c.zero_infinity;
                    ok = ok && (want_nan ? std::isnan(g) : g == 0.0f);
                }
            continue;
        }
        loss_err = std::max(loss_err, std::fabs(loss[b] - n) / std::max(1.0, std::fabs(n)));
        for (size_t i = 0; i < (size_t)T * C; ++i) {
            if (!std::isfinite(got[i])) grad_err = INFINITY;
            grad_err = std::max(grad_err, std::fabs(got[i] - want[i]));
        }
    }
    const bool pass = ok && loss_err <= 1e-6 && grad_err <= 1e-5;
    std::printf("%-52s loss %.2e grad %.2e%s%s\n", c.name, loss_err, grad_err,
                ok ? "" : " (infinite items wrong)", pass ? "" : " (FAIL)");
    return pass;
}

}  // namespace

int main() {
    std::vector<Item> mixed = {
        {50, {3, 3, 5, 7, 7, 7, 2}},          // repeats need blanks between them
        {31, {}},                             // empty target
        {0, {}},                              // no frames, empty target: loss 0
        {20, std::vector<int>(25, 4)},        // more labels than frames: impossible
        {0, {9}},                             // no frames, a label: impossible
        {44, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}},
    };
    // A long item: the recursions' f32 exp/log rounding accumulates over its
    // frames (ctc.cu, ctc_exp_le0) and must stay inside the tolerance; its
    // 4,201 states give each thread several.
    std::vector<int> long_labels(2100);
    for (size_t i = 0; i < long_labels.size(); ++i) long_labels[i] = 1 + (int)(i * 37 % 59);
    const std::vector<Case> cases = {
        {"mixed items, blank 0", 50, 37, 0, false, mixed},
        {"mixed items, blank 0, zero_infinity", 50, 37, 0, true, mixed},
        {"130 frames (12 segments), 300 classes, blank 299", 130, 300, 299, false,
         {{130, {5, 17, 17, 250, 3, 3, 3, 41, 0, 298, 7, 7, 120, 64, 64, 1, 2, 3, 4, 5, 6, 7, 8,
                 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25}},
          {97, {100, 200, 100}}}},
        {"an alignment with no slack (len = min frames)", 9, 6, 0, false,
         {{8, {1, 1, 2, 3, 3, 4}}}},
        {"4,500 frames, 2,100 labels (rounding over many frames)", 4500, 60, 0, false,
         {{4500, long_labels}}},
    };
    bool ok = true;
    uint64_t seed = 42;
    for (const Case& c : cases) ok = run_case(c, seed++) && ok;
    std::printf(ok ? "all cases within tolerance\n" : "FAILED\n");
    return ok ? 0 : 1;
}
