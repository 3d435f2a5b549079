"""PyTorch side of the long-form inference benchmark (benches/inference_long.rs).

An eval-mode PyTorch implementation of lcasr's encoder, written for this
benchmark, whose module names equal lcasr's state-dict names, so that it loads
the weights `inference_long export` writes. Attention is
F.scaled_dot_product_attention (PyTorch's fused CPU kernel, memory linear in
the sequence length); windows are merged like lcasr's averaged moving window.

    inference_torch.py check <dir>                      compare with lcasr's log-probs
    inference_torch.py run <dir> <full|seconds> <minutes>

One row per process: the printed peak RSS (VmHWM) is that row's alone.
Features are the same synthetic hash pattern as the Rust side; not timed.
"""
import json
import math
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(2)
FRAMES_PER_SECOND = 100
DEFAULT_OVERLAP = 0.875
DTYPES = {"F32": torch.float32, "I64": torch.int64}


def load_safetensors(path):
    """name -> tensor of a safetensors file (F32 and I64 only)."""
    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            f.seek(base + start)
            buf = bytearray(f.read(end - start))
            out[name] = torch.frombuffer(buf, dtype=DTYPES[meta["dtype"]]).reshape(meta["shape"])
    return out


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def out_len(n):
    return (max(n, 1) - 1) // 2 + 1


def check_supported(cfg):
    want = {
        "subsampling": "dw_striding", "subsampling_act": "silu", "subsampling_norm_out": False,
        "self_condition_subsampling": False, "self_conditioning": True, "gated_sc": False,
        "decoder_norm": True, "legasee_double_norm": True, "use_rotary": True,
        "default_norm": "layer_norm", "sandwich_norm": False, "bias_in_ff": False,
        "qkv_bias": False, "fourier_pos_enc": False, "transformer": False, "causal": False,
        "conv_type": "standard", "conv_norm": "batch_renorm", "conv_expansion_factor": 1.0,
        "attention_window_size": -1, "attention_window_size_left": -1,
        "attention_window_size_right": -1,
    }
    bad = {k: cfg[k] for k, v in want.items() if cfg[k] != v}
    if bad:
        sys.exit(f"inference_torch.py does not implement these model settings: {bad}")


class Subsampling(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c = cfg["subsampling_conv_channels"]
        c = cfg["d_model"] if c < 0 else c
        stages = int(math.log2(cfg["subsampling_factor"]))
        mods = [nn.Conv2d(1, c, 3, 2, 1), nn.SiLU()]
        for _ in range(1, stages):
            mods += [nn.Conv2d(c, c, 3, 2, 1, groups=c), nn.Conv2d(c, c, 1), nn.SiLU()]
        self.conv = nn.Sequential(*mods)
        f = cfg["feat_in"]
        for _ in range(stages):
            f = out_len(f)
        self.out = nn.Linear(c * f, cfg["d_model"], bias=False)

    def forward(self, x):  # (B, T, F)
        h = self.conv(x.unsqueeze(1))
        b, c, t, f = h.shape
        return self.out(h.transpose(1, 2).reshape(b, t, c * f))


class PreNorm(nn.Module):
    def __init__(self, d, fn):
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(d), fn

    def forward(self, x, *args):
        return self.fn(self.norm(x), *args)


class Wrapped(nn.Module):
    """Holds a PreNorm under `.fn`, as the state dict's `ff1.fn.norm` names it."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class FeedForward(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden, bias=False), nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


class Attention(nn.Module):
    def __init__(self, d, heads, head_dim):
        super().__init__()
        self.h, self.dh = heads, head_dim
        self.qkv_proj = nn.Linear(d, 3 * heads * head_dim, bias=False)
        self.out_proj = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, x, cos, sin):
        b, n, _ = x.shape
        qkv = self.qkv_proj(x).view(b, n, self.h, self.dh, 3).permute(4, 0, 2, 1, 3)
        # v must be contiguous in its last dimension (the interleaved layout
        # strides it by 3), else SDPA falls back to the dense math kernel.
        q, k, v = rotate(qkv[0], cos, sin), rotate(qkv[1], cos, sin), qkv[2].contiguous()
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, self.h * self.dh))


class BatchRenorm(nn.Module):
    """Eval mode only: (x - running_mean) / running_std * weight + bias."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_std", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):  # (B, C, N)
        y = (x - self.running_mean[:, None]) / self.running_std[:, None]
        return y * self.weight[:, None] + self.bias[:, None]


class ConvModule(nn.Module):
    def __init__(self, d, k):
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(d, 2 * d, 1)
        self.depthwise_conv = nn.Conv1d(d, d, k, padding=k // 2, groups=d)
        self.batch_norm = BatchRenorm(d)
        self.pointwise_conv2 = nn.Conv1d(d, d, 1)

    def forward(self, x):  # (B, N, d)
        h = F.glu(self.pointwise_conv1(x.transpose(1, 2)), dim=1)
        return self.pointwise_conv2(F.silu(self.batch_norm(self.depthwise_conv(h)))).transpose(1, 2)


class Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        hidden = cfg["expansion_factor"] * d
        self.ff1 = Wrapped(PreNorm(d, FeedForward(d, hidden)))
        self.attend = PreNorm(d, Attention(d, cfg["n_heads"], cfg["head_dim"]))
        self.conv = PreNorm(d, ConvModule(d, cfg["conv_kernel_size"]))
        self.ff2 = Wrapped(PreNorm(d, FeedForward(d, hidden)))
        self.norm_out = nn.LayerNorm(d)

    def forward(self, x, cos, sin):
        x = x + 0.5 * self.ff1(x)
        x = x + self.attend(x, cos, sin)
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.norm_out(x)


class Decoder(nn.Module):
    def __init__(self, d, classes):
        super().__init__()
        self.norm, self.ff, self.reprojection = nn.LayerNorm(d), nn.Linear(d, classes), nn.Linear(classes, d)

    def self_condition(self, x):
        return x + self.reprojection(self.ff(self.norm(x)).softmax(-1))

    def log_probs(self, x):
        return self.ff(self.norm(self.norm(x))).log_softmax(-1)


class Rotary(nn.Module):
    def __init__(self, head_dim):
        super().__init__()
        self.register_buffer("inv_freq", torch.zeros(head_dim // 2))
        self.register_buffer("rotary_interpolation_factor", torch.tensor(1.0))

    def forward(self, n):
        t = torch.arange(n, dtype=torch.float32) / self.rotary_interpolation_factor
        ang = t[:, None] * self.inv_freq[None]
        ang = torch.cat((ang, ang), -1)
        return ang.cos(), ang.sin()


class Encoder(nn.Module):
    def __init__(self, cfg, classes):
        super().__init__()
        self.subsampling = Subsampling(cfg)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg["n_layers"]))
        self.decoder = Decoder(cfg["d_model"], classes)
        self.rotary_pos_emb = Rotary(cfg["head_dim"])

    def forward(self, feats):  # (B, F, T) -> (B, N, classes) log-probs
        x = self.subsampling(feats.transpose(1, 2))
        cos, sin = self.rotary_pos_emb(x.shape[1])
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin)
            if i < len(self.layers) - 1:
                x = self.decoder.self_condition(x)
        return self.decoder.log_probs(x)


def load(dir_):
    with open(f"{dir_}/config.json") as f:
        cfg = json.load(f)
    check_supported(cfg)
    weights = load_safetensors(f"{dir_}/weights.safetensors")
    model = Encoder(cfg, weights["decoder.ff.weight"].shape[0])
    model.load_state_dict(weights, strict=True)
    return model.eval(), cfg


def window_starts(total, seq_len, overlap):
    """lcasr's decode::window::window_starts."""
    if seq_len > total:
        seq_len, overlap = total, 0
    step, out, previous, start = seq_len - overlap, [], None, 0
    while start < total:
        end = min(start + seq_len, total)
        out.append((start, end))
        if previous is not None and end - start < previous:
            break
        previous, start = end - start, start + step
    return out


def log_probs(model, cfg, feats, window):
    """(T', C) log-posteriors of (F, T) features: one forward, or averaged
    moving windows of `window` frames (lcasr's infer::longform::log_probs)."""
    total = feats.shape[1]
    if window is None or window >= total:
        return model(feats[None])[0]
    factor = cfg["subsampling_factor"]
    overlap = int(DEFAULT_OVERLAP * window) // factor * factor
    windows = window_starts(total, window, overlap)
    stages = int(math.log2(factor))
    placed, position = [], 0
    for i, (s, e) in enumerate(windows):
        n = e - s
        for _ in range(stages):
            n = out_len(n)
        if i > 0:
            position = max(position - int(overlap / ((e - s) / n)), 0)
        placed.append((s, e, position, n))
        position += n
    frames = max(p + n for _, _, p, n in placed)
    total_p = torch.zeros(frames, model.decoder.ff.out_features)
    count = torch.zeros(frames)
    for s, e, p, n in placed:
        total_p[p:p + n] += model(feats[None, :, s:e].contiguous())[0].exp()
        count[p:p + n] += 1
    keep = count > 0
    return (total_p[keep] / count[keep, None]).log()


def features(t):
    i = torch.arange(80 * t, dtype=torch.int64)
    return (((i * 2654435761) % 2001).float() / 1000.0 - 1.0).view(80, t)


def check(dir_):
    model, cfg = load(dir_)
    ref = load_safetensors(f"{dir_}/check.safetensors")
    with torch.inference_mode():
        feats = ref["features"]
        assert torch.equal(feats, features(feats.shape[1])), "synthetic features differ"
        for key, window in (("log_probs_full", None), ("log_probs_window", int(ref["window"]))):
            ours = log_probs(model, cfg, feats, window)
            theirs = ref[key]
            if ours.shape != theirs.shape:
                sys.exit(f"{key}: shape {tuple(ours.shape)} vs lcasr's {tuple(theirs.shape)}")
            diff = (ours - theirs).abs().max().item()
            agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
            print(f"torch check {dir_} {key}: {tuple(ours.shape)}, max |diff| {diff:.2e}, "
                  f"argmax agreement {agree:.4f}")
            if diff > 1e-2:
                sys.exit(f"{key}: PyTorch and lcasr disagree (max |diff| {diff})")


def run(dir_, ctx, minutes):
    model, cfg = load(dir_)
    window = None if ctx == "full" else int(ctx) * FRAMES_PER_SECOND
    frames = round(minutes * 60 * FRAMES_PER_SECOND)
    feats = features(frames)
    audio_s = frames / FRAMES_PER_SECOND
    with torch.inference_mode():
        t0 = time.perf_counter()
        lp = log_probs(model, cfg, feats, window)
        wall = time.perf_counter() - t0
    print(f"torch row model={dir_.rstrip('/').split('/')[-1]} context={ctx} audio_s={audio_s:.0f} "
          f"out={lp.shape[0]}x{lp.shape[1]} wall_s={wall:.1f} x_realtime={audio_s / wall:.1f} "
          f"peak_rss_mib={peak_rss_mib():.0f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "check":
        check(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        sys.exit(__doc__)
