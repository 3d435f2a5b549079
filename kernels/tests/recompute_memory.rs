//! What the recompute node is for: an op on its composed path keeps only its
//! inputs and output for the backward, not the composition's intermediates;
//! chunked attention keeps memory linear in the sequence length, in the
//! forward and in the backward. Bytes still allocated after the forward (the
//! graph alive, before the backward) and the most allocated during the
//! backward are counted with a counting allocator; one test in this binary,
//! so nothing else allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{Device, Result, Tensor, Var};
use lcasr_kernels::attention::{attention_chunked, AttentionOptions};
use lcasr_kernels::batch_renorm::{batch_renorm_silu, RenormMode};
use lcasr_kernels::composed;
use lcasr_kernels::softmax::linear_softmax;
use lcasr_kernels::with_composed_ops;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; the counter has no effect on it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Bytes the forward of `f` on `inputs` (as variables) leaves allocated
/// while its output, and so its graph, is alive.
fn retained(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> usize {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    // A first call, dropped: what it allocates and keeps for later calls (the
    // CPU matmul's per-thread packing buffers, on whichever worker threads
    // take part) is no part of the graph.
    drop(with_composed_ops(|| f(&tensors)).unwrap());
    let before = LIVE.load(Ordering::Relaxed);
    let out = with_composed_ops(|| f(&tensors)).unwrap();
    let after = LIVE.load(Ordering::Relaxed);
    drop(out);
    after - before
}

/// Most bytes allocated at once during the backward pass of a loss on
/// `f(inputs)`, beyond what was allocated when it started.
fn backward_peak(inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> usize {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let loss = with_composed_ops(|| f(&tensors))
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let grads = loss.backward().unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    drop(grads);
    peak
}

fn ramp(dims: &[usize], scale: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * scale)
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

#[test]
fn composed_ops_keep_only_inputs_and_output() {
    let c = 64;
    let x = ramp(&[16, 256, c], 2.0);
    let (w, b) = (ramp(&[c], 0.5).affine(1.0, 1.0).unwrap(), ramp(&[c], 0.3));
    let (rm, rs) = (vec![0.1f32; c], vec![1.2f32; c]);
    let mode = RenormMode::Train {
        running_mean: &rm,
        running_std: &rs,
        rmax: 1.5,
        dmax: 0.5,
        eps: 1e-3,
        lengths: None,
    };
    let output_bytes = x.elem_count() * 4;
    let inputs = [x.clone(), w.clone(), b.clone()];
    let node = retained(&inputs, |t| {
        Ok(batch_renorm_silu(&t[0], &t[1], &t[2], mode)?.0)
    });
    let plain = retained(&inputs, |t| {
        Ok(composed::batch_renorm_silu(&t[0], &t[1], &t[2], mode)?.0)
    });
    assert!(
        node <= output_bytes + output_bytes / 4 && plain > 4 * node,
        "BatchRenorm: the node keeps {node} bytes, the composition {plain} (output {output_bytes})"
    );

    let classes = 512;
    let head = [x, ramp(&[classes, c], 0.1), ramp(&[classes], 0.1)];
    let probs_bytes = 16 * 256 * classes * 4;
    let node = retained(&head, |t| linear_softmax(&t[0], &t[1], &t[2]));
    let plain = retained(&head, |t| composed::linear_softmax(&t[0], &t[1], &t[2]));
    assert!(
        node <= probs_bytes + probs_bytes / 4 && plain > 2 * node,
        "softmax head: the node keeps {node} bytes, the composition {plain} (output {probs_bytes})"
    );

    // Chunked attention keeps the heads and the output: doubling N doubles
    // what it keeps. The composition keeps (H, N, N) scores: 4x.
    let (h, dh) = (2, 16);
    let opts = AttentionOptions {
        n_heads: h,
        head_dim: dh,
        ..Default::default()
    };
    let at = |n: usize| {
        let qkv = [ramp(&[1, n, 3 * h * dh], 1.0)];
        let chunked = retained(&qkv, |t| attention_chunked(&t[0], &opts, 64));
        let plain = retained(&qkv, |t| composed::attention(&t[0], &opts));
        (chunked as f64, plain as f64)
    };
    let ((c1, p1), (c2, p2)) = (at(512), at(1024));
    assert!(
        c2 / c1 < 2.2 && p2 / p1 > 3.5 && p2 > 10.0 * c2,
        "attention at N 512 -> 1024: chunked keeps {c1} -> {c2} bytes, the composition {p1} -> {p2}"
    );
    // Its backward too: each chunk's gradients come back detached, so the
    // chunks' recomputed scores do not pile up until the backward ends
    // (they did: 3.7x per doubling of N).
    let bwd = |n: usize| {
        let qkv = [ramp(&[1, n, 3 * h * dh], 1.0)];
        backward_peak(&qkv, |t| attention_chunked(&t[0], &opts, 64)) as f64
    };
    let (b1, b2) = (bwd(1024), bwd(2048));
    assert!(
        b2 / b1 < 2.4,
        "chunked attention's backward at N 1024 -> 2048: peak {b1} -> {b2} bytes"
    );
    // The written-out backward holds a few of a chunk's f32 score tensors
    // at a time (about 4.5; autograd through the composition held 17).
    let scores = (2048 * 64 * h * 4) as f64;
    assert!(
        b2 < 8.0 * scores,
        "chunked attention's backward peak {b2} bytes is {:.1} chunk score tensors",
        b2 / scores
    );
}
