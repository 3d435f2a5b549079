//! The fused attention op against its composition of differentiable candle ops
//! (`composed::attention`),
//! forward and gradient with respect to qkv; rotary tables against the spec's values.

use candle_core::{DType, Device, Result, Tensor, Var};
use lcasr_kernels::attention::{attention, AttentionOptions};
use lcasr_kernels::composed;
use lcasr_kernels::rotary::{inv_freq, rotary_tables};

/// SplitMix64 stream of uniform values in [-1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn tensor(&mut self, shape: &[usize], scale: f32) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.next() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }
}

/// One test configuration.
#[derive(Clone, Default)]
struct Case {
    b: usize,
    n: usize,
    h: usize,
    dh: usize,
    rotary: bool,
    lengths: Option<Vec<usize>>,
    left: Option<usize>,
    right: Option<usize>,
    dropout: Option<(f32, u64)>,
}

fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Relative max error of `a` against `b`.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(max_abs(&(a - b)?)? / max_abs(b)?.max(1e-12))
}

/// Runs the op and the reference on the same seeded inputs, returning the
/// relative errors of the output and of the qkv gradient.
fn compare(c: &Case, seed: u64) -> Result<(f32, f32)> {
    let mut rng = Rng(seed);
    let qkv = Var::from_tensor(&rng.tensor(&[c.b, c.n, 3 * c.h * c.dh], 1.5)?)?;
    let w = rng.tensor(&[c.b, c.n, c.h * c.dh], 1.0)?;
    let (cos, sin) = rotary_tables(&inv_freq(10_000.0, c.dh), c.n + 3, 1.0);
    let opts = AttentionOptions {
        n_heads: c.h,
        head_dim: c.dh,
        rotary: c.rotary.then_some((&cos[..], &sin[..])),
        lengths: c.lengths.as_deref(),
        window_left: c.left,
        window_right: c.right,
        dropout: c.dropout,
        ..Default::default()
    };
    let out = attention(qkv.as_tensor(), &opts)?;
    let grad = (&out * &w)?.sum_all()?.backward()?;
    let g_op = grad.get(qkv.as_tensor()).expect("op gradient").clone();

    let out_ref = composed::attention(qkv.as_tensor(), &opts)?;
    let grad = (&out_ref * &w)?.sum_all()?.backward()?;
    let g_ref = grad
        .get(qkv.as_tensor())
        .expect("reference gradient")
        .clone();

    // Padded query rows are exactly zero, and padded positions get exactly zero gradient.
    if let Some(lengths) = &c.lengths {
        for (bi, &len) in lengths.iter().enumerate() {
            if len < c.n {
                let pad_out = out.get(bi)?.narrow(0, len, c.n - len)?;
                assert_eq!(max_abs(&pad_out)?, 0.0);
                let pad_grad = g_op.get(bi)?.narrow(0, len, c.n - len)?;
                assert_eq!(max_abs(&pad_grad)?, 0.0);
            }
        }
    }
    Ok((rel_err(&out, &out_ref)?, rel_err(&g_op, &g_ref)?))
}

fn check(c: Case, seed: u64) {
    let (fe, ge) = compare(&c, seed).unwrap();
    eprintln!("forward rel err {fe:.2e}, gradient rel err {ge:.2e}");
    assert!(fe < 1e-4, "forward relative error {fe}");
    assert!(ge < 1e-4, "gradient relative error {ge}");
}

#[test]
fn matches_reference_without_mask() {
    check(
        Case {
            b: 2,
            n: 160,
            h: 2,
            dh: 16,
            rotary: true,
            ..Default::default()
        },
        1,
    );
    // No rotary, a single short sequence.
    check(
        Case {
            b: 1,
            n: 5,
            h: 1,
            dh: 4,
            ..Default::default()
        },
        2,
    );
}

#[test]
fn matches_reference_with_padding() {
    check(
        Case {
            b: 3,
            n: 150,
            h: 2,
            dh: 8,
            rotary: true,
            lengths: Some(vec![150, 97, 1]),
            ..Default::default()
        },
        3,
    );
    check(
        Case {
            b: 2,
            n: 70,
            h: 1,
            dh: 8,
            lengths: Some(vec![0, 65]),
            ..Default::default()
        },
        4,
    );
}

#[test]
fn matches_reference_with_windows() {
    let base = Case {
        b: 2,
        n: 200,
        h: 2,
        dh: 8,
        rotary: true,
        lengths: Some(vec![200, 131]),
        ..Default::default()
    };
    for (left, right) in [
        (Some(5), Some(3)),
        (Some(0), Some(0)),
        (Some(70), None),
        (None, Some(90)),
        (Some(130), Some(1)),
    ] {
        check(
            Case {
                left,
                right,
                ..base.clone()
            },
            5,
        );
    }
}

#[test]
fn matches_reference_odd_length_and_odd_heads() {
    // N = 203 is not a multiple of any tile size; H * Dh = 30 is not a power of two.
    check(
        Case {
            b: 1,
            n: 203,
            h: 3,
            dh: 10,
            rotary: true,
            lengths: Some(vec![199]),
            left: Some(100),
            right: Some(40),
            ..Default::default()
        },
        6,
    );
}

#[test]
fn dropout_is_deterministic_and_differentiable() {
    let c = Case {
        b: 2,
        n: 90,
        h: 2,
        dh: 8,
        rotary: true,
        lengths: Some(vec![90, 77]),
        left: Some(40),
        dropout: Some((0.25, 99)),
        ..Default::default()
    };
    check(c.clone(), 7);

    let mut rng = Rng(8);
    let qkv = rng.tensor(&[c.b, c.n, 3 * c.h * c.dh], 1.0).unwrap();
    let run = |dropout: Option<(f32, u64)>| {
        let opts = AttentionOptions {
            n_heads: c.h,
            head_dim: c.dh,
            lengths: c.lengths.as_deref(),
            window_left: c.left,
            dropout,
            ..Default::default()
        };
        attention(&qkv, &opts).unwrap()
    };
    let diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap()).unwrap();
    let plain = run(None);
    assert_eq!(diff(&run(Some((0.0, 5))), &plain), 0.0);
    let d1 = run(Some((0.25, 99)));
    assert_eq!(diff(&run(Some((0.25, 99))), &d1), 0.0);
    assert!(diff(&run(Some((0.25, 100))), &d1) > 1e-3);
    assert!(diff(&d1, &plain) > 1e-3);
}

#[test]
fn rejects_bad_inputs() {
    let qkv = Tensor::zeros((1, 4, 12), DType::F32, &Device::Cpu).unwrap();
    let opts = |h, dh| AttentionOptions {
        n_heads: h,
        head_dim: dh,
        ..Default::default()
    };
    assert!(attention(&qkv, &opts(2, 2)).is_ok());
    assert!(attention(&qkv, &opts(2, 3)).is_err());
    let lengths = [5usize];
    let bad_len = AttentionOptions {
        lengths: Some(&lengths),
        ..opts(2, 2)
    };
    assert!(attention(&qkv, &bad_len).is_err());
    let short = [0f32; 6];
    let bad_rot = AttentionOptions {
        rotary: Some((&short, &short)),
        ..opts(2, 2)
    };
    assert!(attention(&qkv, &bad_rot).is_err());
    let bad_p = AttentionOptions {
        dropout: Some((1.0, 0)),
        ..opts(2, 2)
    };
    assert!(attention(&qkv, &bad_p).is_err());
}

#[test]
fn rotary_matches_spec_values() {
    // Spec values are given to more digits than f32 holds, so compare in f64.
    let close = |a: f32, b: f64, tol: f64| (f64::from(a) - b).abs() <= tol * b.abs();
    let f = inv_freq(1.5e6, 128);
    assert_eq!(f.len(), 64);
    assert_eq!(f[0], 1.0);
    assert!(close(f[1], 0.800_752_94, 1e-6), "{}", f[1]);
    assert!(close(f[2], 0.641_205_37, 1e-6), "{}", f[2]);
    assert!(close(f[63], 8.325_496_9e-7, 1e-6), "{}", f[63]);
    let g = inv_freq(1e4, 128);
    assert!(close(g[1], 0.865_964_35, 1e-6), "{}", g[1]);
    assert!(close(g[63], 1.154_781_9e-4, 1e-6), "{}", g[63]);

    let (cos, sin) = rotary_tables(&f, 1001, 1.0);
    let row = 1000 * 128;
    assert!(
        (f64::from(cos[row]) - 0.562_379_06).abs() < 2e-6,
        "{}",
        cos[row]
    );
    assert!(
        (f64::from(sin[row]) - 0.826_879_56).abs() < 2e-6,
        "{}",
        sin[row]
    );
    assert!(
        (f64::from(cos[row + 1]) + 0.938_271_7).abs() < 2e-6,
        "{}",
        cos[row + 1]
    );
    assert!(
        (f64::from(sin[row + 1]) - 0.345_899_19).abs() < 2e-6,
        "{}",
        sin[row + 1]
    );
    // The second half duplicates the first; position 0 is the identity.
    assert_eq!(cos[row + 65], cos[row + 1]);
    assert_eq!(sin[row + 64], sin[row]);
    assert!(cos[..128].iter().all(|&c| c == 1.0) && sin[..128].iter().all(|&s| s == 0.0));
    // Interpolation divides the position.
    let (c2, _) = rotary_tables(&f, 2001, 2.0);
    assert_eq!(c2[2000 * 128 + 1], cos[row + 1]);
}
