//! MirrorMADGRAD (reference-spec §6.2): a mirror-descent MADGRAD variant with a
//! decaying squared-gradient sum and momentum by iterate averaging.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde_json::{json, Value};

use super::optimizer::{
    check_saved_name, grad_of, rho_guarded, scalar_u64, Init, Optimizer, OptimizerConfig, Param,
    StateStore,
};

const BUFFERS: &[&str] = &["grad_sum_sq", "z"];

/// The MirrorMADGRAD optimizer. State per parameter: `grad_sum_sq` (ν) and `z`;
/// one global step counter `k`.
pub struct MirrorMadgrad {
    cfg: OptimizerConfig,
    k: u64,
    state: StateStore,
}

impl MirrorMadgrad {
    /// A fresh optimizer (k = 0, no state).
    pub fn new(cfg: OptimizerConfig) -> Self {
        Self {
            cfg,
            k: 0,
            state: StateStore::default(),
        }
    }
}

/// Per-step constants of one update, in f32 as the reference's tensor ops use them.
struct Consts {
    update_ratio: f32,
    /// `-lr' · λ`
    step: f32,
    eps: f32,
    /// Coupled decay factor (0 when off).
    wd_coupled: f32,
    /// `-lr' · wd` for the decoupled decay of z (0 when off).
    wd_decoupled: f32,
    momentum: f32,
    one_minus_momentum: f32,
}

impl Optimizer for MirrorMadgrad {
    fn name(&self) -> &str {
        "mirrormadgrad"
    }

    fn step(&mut self, params: &[Param], grads: &GradStore, lr: f64) -> Result<()> {
        let cfg = &self.cfg;
        let k = self.k as f64;
        let update_ratio = (k / (k + 1.0)).sqrt();
        let lamb = (k + 1.0).powf(1.0 / 3.0);
        for param in params {
            let Some(grad) = grad_of(param, grads) else {
                continue;
            };
            let lr = lr * param.lr_scale;
            let lr = if lr != 0.0 { lr + cfg.eps } else { 0.0 };
            let wd = if param.weight_decay {
                cfg.weight_decay
            } else {
                0.0
            };
            let c = Consts {
                update_ratio: update_ratio as f32,
                step: (-lr * lamb) as f32,
                eps: cfg.eps as f32,
                wd_coupled: if cfg.decouple_decay { 0.0 } else { wd as f32 },
                wd_decoupled: if cfg.decouple_decay {
                    (-lr * wd) as f32
                } else {
                    0.0
                },
                momentum: cfg.momentum as f32,
                one_minus_momentum: (1.0 - cfg.momentum) as f32,
            };
            self.state.update(
                cfg.update,
                param,
                grad,
                &[Init::Zeros, Init::Param],
                |p, g, bufs| mirror_kernel(&c, p, g, bufs),
                |p, g, bufs| mirror_tensors(&c, p, g, bufs),
            )?;
        }
        self.k += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.k
    }

    fn state_buffers(&self) -> usize {
        BUFFERS.len()
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.state.to_tensors(BUFFERS)
    }

    fn state_scalars(&self) -> Value {
        json!({
            "optimizer": "mirrormadgrad",
            "k": self.k,
            "lr": self.cfg.lr,
            "momentum": self.cfg.momentum,
            "weight_decay": self.cfg.weight_decay,
            "eps": self.cfg.eps,
            "decouple_decay": self.cfg.decouple_decay,
        })
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>, scalars: &Value) -> Result<()> {
        check_saved_name(scalars, "mirrormadgrad")?;
        self.state = StateStore::from_tensors(tensors, BUFFERS)?;
        self.k = scalar_u64(scalars, "k")?;
        Ok(())
    }
}

/// One MirrorMADGRAD update of a chunk: `bufs` = [ν, z].
fn mirror_kernel(c: &Consts, p: &mut [f32], g: &[f32], bufs: &mut [&mut [f32]]) {
    let (nu, z) = bufs.split_at_mut(1);
    let (nu, z) = (&mut *nu[0], &mut *z[0]);
    for i in 0..p.len() {
        let grad = if c.wd_coupled != 0.0 {
            g[i] + c.wd_coupled * p[i]
        } else {
            g[i]
        };
        if c.wd_decoupled != 0.0 {
            z[i] += c.wd_decoupled * z[i];
        }
        nu[i] = nu[i] * c.update_ratio + grad * grad;
        let mut rho = nu[i].cbrt() + c.eps;
        if c.eps == 0.0 && rho == 0.0 {
            rho = f32::INFINITY;
        }
        z[i] += c.step * grad / rho;
        p[i] = p[i] * c.momentum + z[i] * c.one_minus_momentum;
    }
}

/// [`mirror_kernel`] as tensor ops on the parameter's device: returns the new
/// parameter values and replaces `bufs` = [ν, z].
fn mirror_tensors(
    c: &Consts,
    p: &Tensor,
    g: &Tensor,
    bufs: &mut [Tensor],
) -> candle_core::Result<Tensor> {
    let grad = if c.wd_coupled != 0.0 {
        (g + p.affine(c.wd_coupled as f64, 0.0)?)?
    } else {
        g.clone()
    };
    let mut z = bufs[1].clone();
    if c.wd_decoupled != 0.0 {
        z = (&z + z.affine(c.wd_decoupled as f64, 0.0)?)?;
    }
    let nu = (bufs[0].affine(c.update_ratio as f64, 0.0)? + grad.sqr()?)?;
    let rho = rho_guarded(&nu, c.eps)?;
    let z = (z + (grad.affine(c.step as f64, 0.0)? / rho)?)?;
    let new = (p.affine(c.momentum as f64, 0.0)? + z.affine(c.one_minus_momentum as f64, 0.0)?)?;
    bufs[0] = nu;
    bufs[1] = z;
    Ok(new)
}
