//! Timing of the fused attention op (ignored by default; run with
//! `cargo test -p lcasr-kernels --test attention_bench -- --ignored --nocapture`).

use std::time::Instant;

use candle_core::{Device, Result, Tensor, Var};
use lcasr_kernels::attention::{attention, AttentionOptions};
use lcasr_kernels::rotary::{inv_freq, rotary_tables};

/// Deterministic pseudo-random qkv values in [-1, 1).
fn input(b: usize, n: usize, c: usize) -> Result<Tensor> {
    let mut s = 0x1234_5678u32;
    let v: Vec<f32> = (0..b * n * c)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (b, n, c), &Device::Cpu)
}

/// A memory figure from /proc/self/status in MiB (`VmRSS` or `VmHWM`).
fn proc_mib(key: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Process CPU time (user + system, all threads) in milliseconds.
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    f.iter().sum::<f64>() * 10.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median forward and forward+backward milliseconds over `reps` runs after a warm-up.
fn time(
    b: usize,
    n: usize,
    h: usize,
    dh: usize,
    reps: usize,
    backward: bool,
) -> Result<(f64, f64, f64)> {
    let qkv = Var::from_tensor(&input(b, n, 3 * h * dh)?)?;
    let (cos, sin) = rotary_tables(&inv_freq(1.5e6, dh), n, 1.0);
    let opts = AttentionOptions {
        n_heads: h,
        head_dim: dh,
        rotary: Some((&cos, &sin)),
        ..Default::default()
    };
    let (mut fwd, mut both) = (Vec::new(), Vec::new());
    let mut cpu0 = 0.0;
    for rep in 0..reps + 1 {
        if rep == 1 {
            cpu0 = cpu_ms();
        }
        let t0 = Instant::now();
        let out = attention(qkv.as_tensor(), &opts)?;
        let t1 = Instant::now();
        if backward {
            let grads = out.sum_all()?.backward()?;
            assert!(grads.get(qkv.as_tensor()).is_some());
        }
        let t2 = Instant::now();
        fwd.push((t1 - t0).as_secs_f64() * 1e3);
        both.push((t2 - t0).as_secs_f64() * 1e3);
    }
    let cpu = (cpu_ms() - cpu0) / reps as f64;
    fwd.remove(0);
    both.remove(0);
    Ok((median(fwd), median(both), cpu))
}

#[test]
#[ignore = "timing"]
fn bench_attention() {
    println!("threads: {}", rayon::current_num_threads());
    for (b, n, h, dh) in [(1, 2048, 4, 64), (2, 2048, 8, 32)] {
        let (f, _, fcpu) = time(b, n, h, dh, 7, false).unwrap();
        let (_, fb, fbcpu) = time(b, n, h, dh, 7, true).unwrap();
        println!(
            "B={b} N={n} H={h} Dh={dh}: fwd {f:.1} ms (cpu {fcpu:.0} ms), fwd+bwd {fb:.1} ms (cpu {fbcpu:.0} ms)"
        );
    }
}

#[test]
#[ignore = "timing, long"]
fn bench_attention_long_forward() {
    let (b, n, h, dh) = (1, 45_000, 8, 32);
    let qkv = input(b, n, 3 * h * dh).unwrap();
    let (cos, sin) = rotary_tables(&inv_freq(1.5e6, dh), n, 1.0);
    let opts = AttentionOptions {
        n_heads: h,
        head_dim: dh,
        rotary: Some((&cos, &sin)),
        ..Default::default()
    };
    let rss0 = proc_mib("VmRSS");
    let t0 = Instant::now();
    let out = attention(&qkv, &opts).unwrap();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let peak = proc_mib("VmHWM");
    println!(
        "B={b} N={n} H={h} Dh={dh} forward: {ms:.0} ms, peak RSS growth {:.0} MiB (output {:.0} MiB)",
        peak - rss0,
        (out.elem_count() * 4) as f64 / 1048576.0
    );
}
