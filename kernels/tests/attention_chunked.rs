//! Chunked attention (query chunks of candle ops, each recomputed in the
//! backward) against the fused attention kernel: outputs and the gradient of
//! qkv, with rotary, padding, windows and dropout (the same mask), at chunk
//! sizes that do and do not divide the length.

mod ops_support;

use candle_core::{DType, Var};
use lcasr_kernels::attention::{attention, attention_chunked, AttentionOptions};
use lcasr_kernels::rotary::{inv_freq, rotary_tables};
use ops_support::{assert_close, grads, Rng};

#[test]
fn chunked_attention_matches_the_fused_kernel() {
    let mut rng = Rng::new(21);
    let (b, n, h, dh) = (2, 45, 3, 8);
    let (cos, sin) = rotary_tables(&inv_freq(10_000.0, dh), n, 1.0);
    let lengths = [45, 29];
    for (window, dropout) in [
        (None, None),
        (Some((5, 3)), None),
        (Some((0, 12)), None),
        (None, Some((0.2f32, 9u64))),
        (Some((7, 7)), Some((0.5, 3))),
    ] {
        let opts = AttentionOptions {
            n_heads: h,
            head_dim: dh,
            rotary: Some((&cos[..], &sin[..])),
            lengths: Some(&lengths),
            window_left: window.map(|w: (usize, usize)| w.0),
            window_right: window.map(|w| w.1),
            dropout,
            ..Default::default()
        };
        let qkv = rng.var(&[b, n, 3 * h * dh], -1.5, 1.5);
        let want = attention(qkv.as_tensor(), &opts).unwrap();
        let probe = rng.tensor(want.dims(), -1.0, 1.0);
        let want_grad = grads(&want, &probe, &[&qkv]).unwrap();
        for chunk in [1, 7, 16, 45, 64] {
            let what = format!("window {window:?} dropout {dropout:?} chunk {chunk}");
            let x = Var::from_tensor(qkv.as_tensor()).unwrap();
            let got = attention_chunked(x.as_tensor(), &opts, chunk).unwrap();
            assert_close(&format!("{what} output"), &got, &want, 1e-5);
            let got_grad = grads(&got, &probe, &[&x]).unwrap();
            assert_close(
                &format!("{what} gradient"),
                &got_grad[0],
                &want_grad[0],
                1e-5,
            );
        }
    }
    // In bf16 (the matmuls in bf16, the softmax in f32): close to the f32
    // kernel on the same rounded input, gradient included.
    let opts = AttentionOptions {
        n_heads: h,
        head_dim: dh,
        rotary: Some((&cos[..], &sin[..])),
        lengths: Some(&lengths),
        window_left: Some(6),
        window_right: None,
        dropout: Some((0.3, 5)),
        ..Default::default()
    };
    let rounded = rng
        .tensor(&[b, n, 3 * h * dh], -1.5, 1.5)
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let qkv = Var::from_tensor(&rounded).unwrap();
    let want = attention(qkv.as_tensor(), &opts).unwrap();
    let probe = rng.tensor(want.dims(), -1.0, 1.0);
    let want_grad = grads(&want, &probe, &[&qkv]).unwrap();
    let x = Var::from_tensor(&rounded).unwrap();
    let got = attention_chunked(&x.as_tensor().to_dtype(DType::BF16).unwrap(), &opts, 16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert_close("bf16 output", &got, &want, 3e-2);
    let got_grad = grads(&got, &probe, &[&x]).unwrap();
    assert_close("bf16 gradient", &got_grad[0], &want_grad[0], 3e-2);

    let bad = AttentionOptions {
        n_heads: h,
        head_dim: dh,
        dropout: Some((1.0, 1)),
        ..Default::default()
    };
    let qkv = rng.tensor(&[1, 4, 3 * h * dh], -1.0, 1.0);
    assert!(attention_chunked(&qkv, &bad, 2).is_err());
    assert!(attention_chunked(
        &qkv,
        &AttentionOptions {
            dropout: None,
            ..bad
        },
        0
    )
    .is_err());
}
