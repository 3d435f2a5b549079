//! MADGRAD (reference-spec §6.1): dual averaging with a cube-root denominator and
//! momentum by iterate averaging, one global step counter `k` for all parameters.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde_json::{json, Value};

use super::optimizer::{
    check_saved_name, fused_update, grad_of, scalar_u64, Optimizer, OptimizerConfig, Param,
    ParamState, StateStore,
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
        let names = self.buffer_names();
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
            let state = match self.state.get_mut(&param.name) {
                Some(s) => s,
                None => {
                    let n = param.var.elem_count();
                    let mut buffers = vec![vec![0f32; n]; 2];
                    if names.len() == 3 {
                        buffers.push(param.var.flatten_all()?.to_vec1::<f32>()?);
                    }
                    self.state.insert(
                        &param.name,
                        ParamState {
                            shape: param.var.shape().clone(),
                            buffers,
                        },
                    )
                }
            };
            fused_update(param, grad, state, |p, g, bufs| {
                madgrad_kernel(&c, p, g, bufs)
            })?;
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
