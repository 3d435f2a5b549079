//! CTC loss against the reference fixture (`ctc.safetensors`), against a
//! brute-force sum over all alignments with finite-difference gradients, and
//! the `zero_infinity` behaviour. `ctc_loss_benchmark` (ignored) times a
//! training-sized call.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use lcasr_kernels::ctc::ctc_loss;

fn fixture(name: &str) -> PathBuf {
    match std::env::var_os("LCASR_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"),
    }
    .join(name)
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

struct CtcCase {
    /// (B, T, C)
    logits_btc: Tensor,
    log_probs_btc: Tensor,
    /// (B, T, C), transposed from the fixture's time-major layout.
    grad_btc: Vec<f32>,
    targets: Vec<Vec<u32>>,
    input_lengths: Vec<usize>,
    blank: u32,
    loss: Vec<f32>,
}

fn load_case() -> CtcCase {
    let path = fixture("ctc.safetensors");
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let btc = |name: &str| t[name].transpose(0, 1).unwrap().contiguous().unwrap();
    let target_lengths = ints(&t["target_lengths"]);
    let padded = &t["targets"];
    let width = padded.dim(1).unwrap();
    let flat = ints(padded);
    let targets = target_lengths
        .iter()
        .enumerate()
        .map(|(b, &len)| {
            flat[b * width..b * width + len as usize]
                .iter()
                .map(|&v| v as u32)
                .collect()
        })
        .collect();
    CtcCase {
        logits_btc: btc("logits"),
        log_probs_btc: btc("log_probs"),
        grad_btc: floats(&btc("grad_logits")),
        targets,
        input_lengths: ints(&t["input_lengths"])
            .iter()
            .map(|&v| v as usize)
            .collect(),
        blank: t["blank"].to_scalar::<i64>().unwrap() as u32,
        loss: floats(&t["loss"]),
    }
}

fn loss_and_grad(
    x: &Tensor,
    targets: &[Vec<u32>],
    lengths: &[usize],
    blank: u32,
    zero_inf: bool,
) -> (Vec<f32>, Vec<f32>) {
    let var = Var::from_tensor(x).unwrap();
    let loss = ctc_loss(var.as_tensor(), targets, lengths, blank, zero_inf).unwrap();
    let grads = loss.sum_all().unwrap().backward().unwrap();
    (floats(&loss), floats(grads.get(var.as_tensor()).unwrap()))
}

#[test]
fn matches_reference_fixture() {
    let case = load_case();
    let (b, t, c) = case.logits_btc.dims3().unwrap();
    for input in [&case.logits_btc, &case.log_probs_btc] {
        let (loss, grad) =
            loss_and_grad(input, &case.targets, &case.input_lengths, case.blank, false);
        for (got, want) in loss.iter().zip(&case.loss) {
            assert!(
                (got - want).abs() <= 1e-5 * want.abs(),
                "loss {got} vs {want}"
            );
        }
        let max_diff = grad
            .iter()
            .zip(&case.grad_btc)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("ctc fixture: grad max |diff| {max_diff:e}");
        assert!(max_diff <= 2e-4, "grad max |diff| {max_diff}");
        for (i, &len) in case.input_lengths.iter().enumerate() {
            let item = &grad[i * t * c..(i + 1) * t * c];
            assert!(
                item[len * c..].iter().all(|&g| g == 0.0),
                "padding frames of item {i}"
            );
        }
    }
    assert_eq!(case.loss.len(), b);
}

/// Sum over every path of length T whose collapse is `target`, in f64.
fn brute_force_nll(logits: &[f64], t: usize, c: usize, target: &[u32], blank: u32) -> f64 {
    let log_probs: Vec<f64> = (0..t)
        .flat_map(|i| {
            let row = &logits[i * c..(i + 1) * c];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            row.iter().map(move |v| v - lse).collect::<Vec<_>>()
        })
        .collect();
    let mut total = 0.0;
    for code in 0..c.pow(t as u32) {
        let mut path = Vec::with_capacity(t);
        let mut rest = code;
        for _ in 0..t {
            path.push((rest % c) as u32);
            rest /= c;
        }
        let mut collapsed = Vec::new();
        for (i, &l) in path.iter().enumerate() {
            if l != blank && (i == 0 || path[i - 1] != l) {
                collapsed.push(l);
            }
        }
        if collapsed == target {
            total += path
                .iter()
                .enumerate()
                .map(|(i, &l)| log_probs[i * c + l as usize])
                .sum::<f64>()
                .exp();
        }
    }
    -total.ln()
}

#[test]
fn matches_brute_force_and_finite_differences() {
    let (t, c) = (5usize, 3usize);
    let blank = 2u32;
    // Items: a repeated label, a single label with a shorter input, an empty target.
    let targets = vec![vec![0u32, 0], vec![1u32], vec![]];
    let lengths = vec![5usize, 3, 4];
    let b = targets.len();
    let logits: Vec<f64> = (0..b * t * c)
        .map(|i| (i as f64 * 0.7631).sin() * 1.7 + (i % 4) as f64 * 0.3)
        .collect();
    let x = Tensor::from_vec(
        logits.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (b, t, c),
        &Device::Cpu,
    )
    .unwrap();
    let (loss, grad) = loss_and_grad(&x, &targets, &lengths, blank, false);
    let h = 1e-5;
    for i in 0..b {
        let item: Vec<f64> = logits[i * t * c..i * t * c + lengths[i] * c]
            .iter()
            .map(|&v| v as f32 as f64)
            .collect();
        let nll = brute_force_nll(&item, lengths[i], c, &targets[i], blank);
        assert!(
            (loss[i] as f64 - nll).abs() <= 1e-5 * nll.abs().max(1.0),
            "item {i}"
        );
        for j in 0..item.len() {
            let mut plus = item.clone();
            plus[j] += h;
            let mut minus = item.clone();
            minus[j] -= h;
            let fd = (brute_force_nll(&plus, lengths[i], c, &targets[i], blank)
                - brute_force_nll(&minus, lengths[i], c, &targets[i], blank))
                / (2.0 * h);
            let got = grad[i * t * c + j] as f64;
            assert!((got - fd).abs() <= 2e-5, "item {i} elem {j}: {got} vs {fd}");
        }
    }
}

#[test]
fn zero_infinity_zeroes_impossible_items() {
    let (b, t, c) = (2usize, 6usize, 4usize);
    let x = Tensor::from_vec(
        (0..b * t * c)
            .map(|i| (i as f32 * 0.37).cos())
            .collect::<Vec<_>>(),
        (b, t, c),
        &Device::Cpu,
    )
    .unwrap();
    // Item 1 needs 4 frames (three labels, one adjacent repeat) but has 3.
    let targets = vec![vec![0u32, 1], vec![2u32, 2, 1]];
    let lengths = vec![6usize, 3];
    let (loss, grad) = loss_and_grad(&x, &targets, &lengths, 3, false);
    assert!(loss[0].is_finite() && loss[1] == f32::INFINITY);
    assert!(grad[t * c..t * c + 3 * c].iter().all(|g| g.is_nan()));
    let (loss_z, grad_z) = loss_and_grad(&x, &targets, &lengths, 3, true);
    assert_eq!(loss_z[0], loss[0]);
    assert_eq!(loss_z[1], 0.0);
    assert_eq!(grad_z[..t * c], grad[..t * c]);
    assert!(grad_z[t * c..].iter().all(|&g| g == 0.0));
    // Exactly enough frames is feasible.
    let (loss_ok, _) = loss_and_grad(&x, &targets, &[6, 4], 3, false);
    assert!(loss_ok[1].is_finite());
}

#[test]
fn gradient_follows_the_upstream_scale() {
    let case = load_case();
    let var = Var::from_tensor(&case.logits_btc).unwrap();
    let loss = ctc_loss(
        var.as_tensor(),
        &case.targets,
        &case.input_lengths,
        case.blank,
        false,
    )
    .unwrap();
    let weights = Tensor::arange(1f32, loss.dim(0).unwrap() as f32 + 1.0, &Device::Cpu).unwrap();
    let grads = (loss * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grad = floats(grads.get(var.as_tensor()).unwrap());
    let (_, t, c) = case.logits_btc.dims3().unwrap();
    for (i, (got, want)) in grad
        .chunks(t * c)
        .zip(case.grad_btc.chunks(t * c))
        .enumerate()
    {
        let w = (i + 1) as f32;
        let diff = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - w * b).abs())
            .fold(0f32, f32::max);
        assert!(diff <= 2e-4 * w, "item {i}: {diff}");
    }
}

#[test]
fn rejects_bad_arguments() {
    let x = Tensor::zeros((1, 4, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(
        ctc_loss(&x, &[vec![2]], &[4], 2, false).is_err(),
        "blank in target"
    );
    assert!(
        ctc_loss(&x, &[vec![3]], &[4], 2, false).is_err(),
        "label out of range"
    );
    assert!(
        ctc_loss(&x, &[vec![0]], &[5], 2, false).is_err(),
        "length > T"
    );
    assert!(
        ctc_loss(&x, &[vec![0], vec![1]], &[4], 2, false).is_err(),
        "batch mismatch"
    );
}

/// B 8, T 2048, C 4096, ~400 labels: forward + backward wall time.
/// `cargo test -p lcasr-kernels --release --test ctc -- --ignored --nocapture`
#[test]
#[ignore]
fn ctc_loss_benchmark() {
    let (b, t, c, u) = (8usize, 2048usize, 4096usize, 400usize);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let data: Vec<f32> = (0..b * t * c)
        .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0)
        .collect();
    let targets: Vec<Vec<u32>> = (0..b)
        .map(|_| (0..u).map(|_| (next() % (c as u64 - 1)) as u32).collect())
        .collect();
    let lengths: Vec<usize> = (0..b).map(|i| t - 16 * i).collect();
    let x = Var::from_tensor(&Tensor::from_vec(data, (b, t, c), &Device::Cpu).unwrap()).unwrap();
    for run in 0..3 {
        let start = std::time::Instant::now();
        let loss = ctc_loss(x.as_tensor(), &targets, &lengths, c as u32 - 1, false).unwrap();
        let mid = start.elapsed();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        let total = start.elapsed();
        assert!(grads.get(x.as_tensor()).is_some());
        println!(
            "run {run}: forward {:.1} ms, forward+backward {:.1} ms, loss[0] {}",
            mid.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            loss.get(0).unwrap().to_scalar::<f32>().unwrap()
        );
    }
}
