// CTC loss with a fused log-softmax on the GPU, the CPU kernel's algorithm
// (kernels/src/ctc.rs) on the device: the forward-backward recursions in log
// space with f64 values (their exp and log in f32, see ctc_exp_le0),
// restricted to the band of lattice states that can still start and finish
// a valid alignment; the forward keeps the alpha rows of every K-th frame
// and the backward recomputes alpha one segment at a time.
//
// Four kernels per loss, in stream order:
// - lcasr_ctc_lse:     log-sum-exp of every valid frame (all rows in parallel);
// - lcasr_ctc_alpha:   the alpha recursion, one block per batch item, the
//                      threads over the lattice states, one frame at a time;
// - lcasr_ctc_softmax: the gradient's softmax part, scale * softmax(x), for
//                      every valid frame (all rows in parallel), 0 past an
//                      item's length, NaN (or 0 with zero_infinity) for an item
//                      whose loss is infinite;
// - lcasr_ctc_beta:    the beta recursion, one block per item, subtracting
//                      scale * posterior of each label from the gradient. The
//                      posteriors of the blank are summed by a block reduction
//                      and those of each other label over its positions in
//                      order (no atomics: deterministic).
//
// Item layout: ext holds each item's extended label sequence (blank, l1,
// blank, ..., blank) at ext_off[b], s_len[b] states long. lab_first[b] ..
// lab_first[b + 1] index the item's distinct labels: label lab_id[j] sits at
// the states lab_pos[lab_pos_off[j] .. lab_pos_off[j + 1]].

#define CTC_ROW_THREADS 256
#define CTC_ITEM_THREADS 1024

struct CtcShape {
    int batch, t, c, blank;
    int k;     // frames between stored alpha rows
    int w;     // row stride: the most states of any item + 2 (padding)
    int n_ck;  // stored alpha rows per item: ceil(t / k)
    int zero_infinity;
};

// Offsets of the item arrays in the one int buffer the host uploads.
struct CtcOffsets {
    int len, s_len, min_frames, ext_off, ext, lab_first, lab_id, lab_pos_off, lab_pos;
};

struct CtcItems {
    const int* len;         // valid frames per item
    const int* s_len;       // lattice states per item (2U + 1)
    const int* min_frames;  // frames the shortest alignment needs
    const int* ext_off;
    const int* ext;
    const int* lab_first;
    const int* lab_id;
    const int* lab_pos_off;
    const int* lab_pos;
};

__device__ __forceinline__ CtcItems ctc_items(const int* m, const CtcOffsets& o) {
    return CtcItems{m + o.len,       m + o.s_len,     m + o.min_frames,
                    m + o.ext_off,   m + o.ext,       m + o.lab_first,
                    m + o.lab_id,    m + o.lab_pos_off, m + o.lab_pos};
}

#define CTC_NEG_INF __longlong_as_double((long long)0xfff0000000000000ULL)
#define CTC_INF __longlong_as_double(0x7ff0000000000000LL)
#define CTC_NAN_F __int_as_float(0x7fffffff)

// exp(d) for d <= 0 (a log-probability difference, at most rounding above
// 0), in f32: the values the recursions carry stay f64, but exp and log in
// f64 are long instruction sequences on the FP64 units, and one item's
// recursion runs on one SM, one frame after another (at one hour, 45,000
// frames of 22,501 states each), so they set its speed. The difference is
// rounded to f32 (relative error 6e-8, which exp turns into a relative
// error of the result of 6e-8 times |d|). What ctc_lse3 rounds accumulates
// over the frames: tests/cuda_emu/ctc.cpp's 4,500-frame item ends within
// 6e-7 of the f64 gradient (1e-7 with f64 exp and log), far inside the f32
// gradient's use in training.
__device__ __forceinline__ double ctc_exp_le0(double d) { return (double)expf((float)d); }

// log(exp(a) + exp(b) + exp(c)) = m + log1p(r), m the maximum (f64) and r
// the other terms scaled by exp(-m), in [0, 2] (f32, see ctc_exp_le0). r
// leaves out the maximum's exact 1 so that its rounding is relative to r:
// where one path dominates, r is small and so is the error added per frame.
__device__ __forceinline__ double ctc_lse3(double a, double b, double c) {
    const double m = fmax(a, fmax(b, c));
    if (m == CTC_NEG_INF) return m;
    // Every term equal to m but the first counts 1.
    float r = (float)((a == m) + (b == m) + (c == m) - 1);
    if (a != m) r += expf((float)(a - m));
    if (b != m) r += expf((float)(b - m));
    if (c != m) r += expf((float)(c - m));
    return m + (double)log1pf(r);
}

// The band of states that lie on some valid alignment at frame t of tb.
__device__ __forceinline__ void ctc_band(int t, int tb, int s_len, int* lo, int* hi) {
    *lo = max(0, s_len - 2 * (tb - t));
    *hi = min(2 * t + 1, s_len - 1);
}

// 0 where the alpha transition s-2 -> s is allowed (a label differing from
// the one two states back), -inf elsewhere.
__device__ __forceinline__ double ctc_skip_in(const int* e, int s, int blank) {
    return (s >= 2 && e[s] != blank && e[s] != e[s - 2]) ? 0.0 : CTC_NEG_INF;
}

// Block-wide sum of a double (CTC_ITEM_THREADS threads), valid in thread 0.
__device__ double ctc_block_sum(double v, double* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0)
        for (int i = 0; i < CTC_ITEM_THREADS / 32; ++i) total += scratch[i];
    return total;
}

extern "C" __global__ void __launch_bounds__(CTC_ROW_THREADS) lcasr_ctc_lse(const float* x, double* lse, const int* meta, CtcOffsets offs, CtcShape sh) {
    const CtcItems items = ctc_items(meta, offs);
    __shared__ float red[CTC_ROW_THREADS / 32];
    __shared__ double red_d[CTC_ROW_THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (long long row = blockIdx.x; row < (long long)sh.batch * sh.t; row += gridDim.x) {
        const int b = (int)(row / sh.t), t = (int)(row % sh.t);
        if (t >= items.len[b]) continue;  // uniform across the block
        const float* xr = x + row * sh.c;
        float m = -__int_as_float(0x7f800000);
        bool nan = false;
        for (int i = threadIdx.x; i < sh.c; i += blockDim.x) {
            m = fmaxf(m, xr[i]);
            nan |= isnan(xr[i]);
        }
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        nan = __any_sync(0xffffffffu, nan);
        if (lane == 0) red[warp] = nan ? CTC_NAN_F : m;
        __syncthreads();
        float mx = -__int_as_float(0x7f800000);
        bool any_nan = false;
        for (int i = 0; i < CTC_ROW_THREADS / 32; ++i) {
            any_nan |= isnan(red[i]);
            mx = fmaxf(mx, red[i]);
        }
        double s = 0.0;
        if (isfinite(mx)) {
            float acc = 0.0f;
            for (int i = threadIdx.x; i < sh.c; i += blockDim.x) acc += expf(xr[i] - mx);
            s = acc;
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) red_d[warp] = s;
        __syncthreads();
        if (threadIdx.x == 0) {
            double total = 0.0;
            for (int i = 0; i < CTC_ROW_THREADS / 32; ++i) total += red_d[i];
            // All -inf, or a +inf / NaN entry: not a number (or that infinity).
            lse[row] = any_nan ? (double)CTC_NAN_F
                       : isfinite(mx) ? (double)mx + log(total)
                                      : (double)mx;
        }
        __syncthreads();
    }
}

// The emission log-probability of state s (label e[s]) at frame t of item b.
__device__ __forceinline__ double ctc_emit(const float* x, const double* lse, const int* e,
                                          const CtcShape& sh, int b, int t, int s) {
    const long long row = (long long)b * sh.t + t;
    return (double)x[row * sh.c + e[s]] - lse[row];
}

// Alpha row t (states shifted by 2: row[s + 2]) from row t - 1.
__device__ __forceinline__ void ctc_alpha_step(const float* x, const double* lse, const int* e,
                                               const CtcShape& sh, int b, int t, int tb,
                                               int s_len, const double* prev, double* cur) {
    int lo, hi;
    ctc_band(t, tb, s_len, &lo, &hi);
    for (int i = threadIdx.x; i < s_len + 2; i += blockDim.x) {
        const int s = i - 2;
        double v = CTC_NEG_INF;
        if (s >= lo && s <= hi)
            v = ctc_emit(x, lse, e, sh, b, t, s) +
                ctc_lse3(prev[i], prev[i - 1], prev[i - 2] + ctc_skip_in(e, s, sh.blank));
        cur[i] = v;
    }
}

// nll[b] (f64) and loss[b] (f32, 0 for an infinite loss with zero_infinity);
// rows: 2 * w doubles per item; ckpt: n_ck * w doubles per item.
extern "C" __global__ void __launch_bounds__(CTC_ITEM_THREADS) lcasr_ctc_alpha(const float* x, const double* lse, double* rows,
                                           double* ckpt, double* nll, float* loss,
                                           const int* meta, CtcOffsets offs, CtcShape sh) {
    const CtcItems items = ctc_items(meta, offs);
    const int b = blockIdx.x;
    const int tb = items.len[b], s_len = items.s_len[b];
    const int* e = items.ext + items.ext_off[b];
    if (tb == 0 || tb < items.min_frames[b]) {
        if (threadIdx.x == 0) {
            const double v = (tb == 0 && s_len == 1) ? 0.0 : CTC_INF;
            nll[b] = v;
            loss[b] = (sh.zero_infinity && isinf(v)) ? 0.0f : (float)v;
        }
        return;
    }
    double* prev = rows + (long long)b * 2 * sh.w;
    double* cur = prev + sh.w;
    double* ck = ckpt + (long long)b * sh.n_ck * sh.w;
    for (int i = threadIdx.x; i < s_len + 2; i += blockDim.x) {
        double v = CTC_NEG_INF;
        if (i == 2 || (i == 3 && s_len > 1)) v = ctc_emit(x, lse, e, sh, b, 0, i - 2);
        prev[i] = v;
        ck[i] = v;
    }
    __syncthreads();
    for (int t = 1; t < tb; ++t) {
        ctc_alpha_step(x, lse, e, sh, b, t, tb, s_len, prev, cur);
        __syncthreads();
        double* tmp = prev;
        prev = cur;
        cur = tmp;
        if (t % sh.k == 0) {
            double* row = ck + (long long)(t / sh.k) * sh.w;
            for (int i = threadIdx.x; i < s_len + 2; i += blockDim.x) row[i] = prev[i];
        }
    }
    if (threadIdx.x == 0) {
        const double last = prev[s_len + 1];
        const double before = s_len > 1 ? prev[s_len] : CTC_NEG_INF;
        const double v = -ctc_lse3(last, before, CTC_NEG_INF);
        nll[b] = v;
        loss[b] = (sh.zero_infinity && isinf(v)) ? 0.0f : (float)v;
    }
}

// grad[b, t, :] = scale[b] * softmax(x[b, t, :]) for t < len[b], else 0; an
// item with a non-finite loss gets NaN rows (0 with zero_infinity).
extern "C" __global__ void lcasr_ctc_softmax(const float* x, const double* lse, const double* nll,
                                             const double* scale, float* grad, const int* meta,
                                             CtcOffsets offs, CtcShape sh) {
    const CtcItems items = ctc_items(meta, offs);
    const long long total = (long long)sh.batch * sh.t * sh.c;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / sh.c;
        const int b = (int)(row / sh.t), t = (int)(row % sh.t);
        float v = 0.0f;
        if (t < items.len[b]) {
            if (isfinite(nll[b]))
                v = (float)scale[b] * expf(x[i] - (float)lse[row]);
            else if (!(sh.zero_infinity && isinf(nll[b])))
                v = CTC_NAN_F;
        }
        grad[i] = v;
    }
}

// Subtracts scale * posterior of each label from the gradient rows of item b
// (after lcasr_ctc_softmax). rows: 2 * w doubles per item (beta); seg: k * w
// per item (the recomputed alpha rows of a segment); occ: w per item.
// One block per SM is declared: without it ptxas aims at two resident blocks,
// caps the kernel at 32 registers and spills (24 bytes per thread at sm_90);
// with it the kernel takes 64 registers and spills nothing.
extern "C" __global__ void __launch_bounds__(CTC_ITEM_THREADS, 1) lcasr_ctc_beta(const float* x, const double* lse, const double* ckpt,
                                          double* rows, double* seg, double* occ,
                                          const double* nll, const double* scale, float* grad,
                                          const int* meta, CtcOffsets offs, CtcShape sh) {
    __shared__ double scratch[CTC_ITEM_THREADS / 32];
    const CtcItems items = ctc_items(meta, offs);
    const int b = blockIdx.x;
    const int tb = items.len[b], s_len = items.s_len[b];
    if (tb == 0 || !isfinite(nll[b])) return;
    const int* e = items.ext + items.ext_off[b];
    const double logz = -nll[b], sc = scale[b];
    double* next = rows + (long long)b * 2 * sh.w;
    double* cur = next + sh.w;
    double* al = seg + (long long)b * sh.k * sh.w;
    double* oc = occ + (long long)b * sh.w;
    const double* ck = ckpt + (long long)b * sh.n_ck * sh.w;
    float* g = grad + (long long)b * sh.t * sh.c;
    const int n_seg = (tb + sh.k - 1) / sh.k;
    for (int sg = n_seg - 1; sg >= 0; --sg) {
        const int t0 = sg * sh.k, t1 = min(t0 + sh.k, tb);
        for (int i = threadIdx.x; i < s_len + 2; i += blockDim.x)
            al[i] = ck[(long long)sg * sh.w + i];
        __syncthreads();
        for (int t = t0 + 1; t < t1; ++t) {
            ctc_alpha_step(x, lse, e, sh, b, t, tb, s_len, al + (long long)(t - t0 - 1) * sh.w,
                           al + (long long)(t - t0) * sh.w);
            __syncthreads();
        }
        for (int t = t1 - 1; t >= t0; --t) {
            int lo, hi;
            ctc_band(t, tb, s_len, &lo, &hi);
            // Beta row t (unshifted, two trailing -inf) and the posteriors.
            const double* alpha = al + (long long)(t - t0) * sh.w;
            for (int s = threadIdx.x; s < s_len + 2; s += blockDim.x) {
                double v = CTC_NEG_INF;
                double post = 0.0;
                if (s >= lo && s <= hi) {
                    const double em = ctc_emit(x, lse, e, sh, b, t, s);
                    if (t + 1 == tb) {
                        if (s >= s_len - 2) v = em;
                    } else {
                        const double skip =
                            s + 2 < s_len ? ctc_skip_in(e, s + 2, sh.blank) : CTC_NEG_INF;
                        v = em + ctc_lse3(next[s], next[s + 1], next[s + 2] + skip);
                    }
                    post = ctc_exp_le0(alpha[s + 2] + v - em - logz);
                }
                cur[s] = v;
                if (s < s_len) oc[s] = post;
            }
            __syncthreads();
            float* row = g + (long long)t * sh.c;
            // The blank: every even state.
            double blank_sum = 0.0;
            for (int s = 2 * threadIdx.x; s < s_len; s += 2 * blockDim.x) blank_sum += oc[s];
            blank_sum = ctc_block_sum(blank_sum, scratch);
            if (threadIdx.x == 0) row[sh.blank] -= (float)(sc * blank_sum);
            // Every other label: its states in order.
            for (int j = items.lab_first[b] + threadIdx.x; j < items.lab_first[b + 1];
                 j += blockDim.x) {
                double sum = 0.0;
                for (int p = items.lab_pos_off[j]; p < items.lab_pos_off[j + 1]; ++p)
                    sum += oc[items.lab_pos[p]];
                row[items.lab_id[j]] -= (float)(sc * sum);
            }
            __syncthreads();
            double* tmp = next;
            next = cur;
            cur = tmp;
        }
    }
}
