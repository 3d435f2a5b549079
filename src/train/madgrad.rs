//! MADGRAD (reference-spec §6.1): dual averaging with a cube-root denominator and
//! momentum by iterate averaging, one global step counter `k` for all parameters.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde_json::{json, Value};

use super::optimizer::{
    check_saved_name, grad_of, rho_guarded, scalar_u64, Init, Optimizer, OptimizerConfig, Param,
    StateStore,
};

/// The MADGRAD optimizer. State per parameter: `grad_sum_sq` (ν), `s` and, when
/// momentum ≠ 0, `x0`.
pub struct Madgrad {
    cfg: OptimizerConfig,
    k: u64,
    state: StateStore,
}

impl Madgrad {
    /// A fresh optimizer (k = 0, no state).
    pub fn new(cfg: OptimizerConfig) -> Self {
        Self {
            cfg,
            k: 0,
            state: StateStore::default(),
        }
    }

    fn buffer_names(&self) -> &'static [&'static str] {
        if self.cfg.momentum != 0.0 {
            &["grad_sum_sq", "s", "x0"]
        } else {
            &["grad_sum_sq", "s"]
        }
    }
}

/// The per-step constants of one update, as f32 the way the reference's tensor
/// ops see them.
struct Consts {
    lamb: f32,
    eps: f32,
    wd: f32,
    coupled: bool,
    decoupled_factor: f32,
    momentum: f32,
    ck: f32,
}

impl Optimizer for Madgrad {
    fn name(&self) -> &str {
        "madgrad"
    }

    fn step(&mut self, params: &[Param], grads: &GradStore, lr: f64) -> Result<()> {
        let cfg = &self.cfg;
        let momentum = cfg.momentum != 0.0;
        for param in params {
            let Some(grad) = grad_of(param, grads) else {
                continue;
            };
            let lr = lr * param.lr_scale;
            let lr = if lr != 0.0 { lr + cfg.eps } else { 0.0 };
            let lamb = lr * ((self.k + 1) as f64).sqrt();
            let wd = if param.weight_decay {
                cfg.weight_decay
            } else {
                0.0
            };
            let c = Consts {
                lamb: lamb as f32,
                eps: cfg.eps as f32,
                wd: wd as f32,
                coupled: wd != 0.0 && !cfg.decouple_decay,
                decoupled_factor: if wd != 0.0 && cfg.decouple_decay {
                    (-lr * wd) as f32
                } else {
                    0.0
                },
                momentum: cfg.momentum as f32,
                ck: (1.0 - cfg.momentum) as f32,
            };
            let inits: &[Init] = if momentum {
                &[Init::Zeros, Init::Zeros, Init::Param]
            } else {
                &[Init::Zeros, Init::Zeros]
            };
            self.state.update(
                cfg.update,
                param,
                grad,
                inits,
                |p, g, bufs| madgrad_kernel(&c, p, g, bufs),
                |p, g, bufs| madgrad_tensors(&c, p, g, bufs),
            )?;
        }
        self.k += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.k
    }

    fn state_buffers(&self) -> usize {
        self.buffer_names().len()
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.state.to_tensors(self.buffer_names())
    }

    fn state_scalars(&self) -> Value {
        json!({
            "optimizer": "madgrad",
            "k": self.k,
            "lr": self.cfg.lr,
            "momentum": self.cfg.momentum,
            "weight_decay": self.cfg.weight_decay,
            "eps": self.cfg.eps,
            "decouple_decay": self.cfg.decouple_decay,
        })
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>, scalars: &Value) -> Result<()> {
        check_saved_name(scalars, "madgrad")?;
        self.state = StateStore::from_tensors(tensors, self.buffer_names())?;
        self.k = scalar_u64(scalars, "k")?;
        Ok(())
    }
}

/// One MADGRAD update of a chunk: `bufs` = [ν, s, (x0)].
fn madgrad_kernel(c: &Consts, p: &mut [f32], g: &[f32], bufs: &mut [&mut [f32]]) {
    let (nu, rest) = bufs.split_at_mut(1);
    let (s, rest) = rest.split_at_mut(1);
    let (nu, s) = (&mut *nu[0], &mut *s[0]);
    let x0 = rest.first_mut().map(|b| &mut **b);
    let guard = |rho: f32| {
        if rho == 0.0 && c.eps == 0.0 {
            f32::INFINITY
        } else {
            rho
        }
    };
    for i in 0..p.len() {
        let p_old = p[i];
        let grad = if c.coupled { g[i] + c.wd * p_old } else { g[i] };
        let x0_i = match &x0 {
            Some(x0) => x0[i],
            None => p_old + s[i] / guard(nu[i].cbrt() + c.eps),
        };
        nu[i] += c.lamb * grad * grad;
        let rho = guard(nu[i].cbrt() + c.eps);
        s[i] += c.lamb * grad;
        let z = x0_i - s[i] / rho;
        let mut new = if x0.is_some() {
            p_old * c.momentum + z * c.ck
        } else {
            z
        };
        if c.decoupled_factor != 0.0 {
            new += c.decoupled_factor * p_old;
        }
        p[i] = new;
    }
}

/// [`madgrad_kernel`] as tensor ops on the parameter's device: returns the new
/// parameter values and replaces `bufs` = [ν, s, (x0)].
fn madgrad_tensors(
    c: &Consts,
    p: &Tensor,
    g: &Tensor,
    bufs: &mut [Tensor],
) -> candle_core::Result<Tensor> {
    let grad = if c.coupled {
        (g + p.affine(c.wd as f64, 0.0)?)?
    } else {
        g.clone()
    };
    let (nu, s) = (&bufs[0], &bufs[1]);
    let x0 = match bufs.get(2) {
        Some(x0) => x0.clone(),
        None => (p + (s / rho_guarded(nu, c.eps)?)?)?,
    };
    let nu = (nu + (grad.affine(c.lamb as f64, 0.0)? * &grad)?)?;
    let rho = rho_guarded(&nu, c.eps)?;
    let s = (s + grad.affine(c.lamb as f64, 0.0)?)?;
    let z = (&x0 - (&s / &rho)?)?;
    let mut new = if bufs.len() == 3 {
        (p.affine(c.momentum as f64, 0.0)? + z.affine(c.ck as f64, 0.0)?)?
    } else {
        z
    };
    if c.decoupled_factor != 0.0 {
        new = (new + p.affine(c.decoupled_factor as f64, 0.0)?)?;
    }
    bufs[0] = nu;
    bufs[1] = s;
    Ok(new)
}
