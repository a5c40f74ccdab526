"""
dynamic_mask_attention.py -- the API document's DynamicMaskAttention module, trained for a few steps.

DynamicMaskAttention (Doge-style dynamic mask attention) computes, per layer,
    q, k, v = q_norm(W_q x), k_norm(W_k x), W_v x            (B, H, S, D), (B, Hkv, S, D)   with RoPE on q, k
    dt      = exp(A * softplus(dt_proj(v)))                   (B, Hkv, Sk): one bias value per key and kv head
    out     = flash_dmattn attention with attn_bias = dt broadcast over the query rows (a stride-0 view, never
              materialised), causal, and per query row only the keep_window_size keys with the largest bias
              (the dynamic mask, SPEC section 6) when Sk > keep_window_size
through flash_dynamic_mask_attention_forward (flash_dmattn.integrations), which returns (B, S, H, D).

The script builds a tiny decoder (embedding, N x [RMSNorm, DynamicMaskAttention, RMSNorm, MLP], head), trains
it with AdamW on a fixed batch of random token sequences (next-token prediction) and prints the loss, which
decreases as the model memorises the batch. CPU tensors run flash_dmattn's C CPU backend in float32 (about
30 s on 2 cores); on a GPU the model runs under bfloat16 autocast on the best GPU backend (cuda > triton > flex).

    python examples/dynamic_mask_attention.py [--steps 30] [--device cpu|cuda] [--eager]

--eager swaps in eager_dynamic_mask_attention_forward (the same semantics in plain PyTorch, materialising the
(B, H, S, S) scores) for comparison. Needs flash_dmattn importable (pip install ., or PYTHONPATH=python with
FDMA_LIBRARY pointing at libflashdma.so).
"""
import argparse
import math
import time
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

from flash_dmattn.integrations.flash_dynamic_mask_attention import flash_dynamic_mask_attention_forward


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps) in float32 (as DogeRMSNorm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary(S, D, device, base=10000.0):
    """cos, sin (S, D) for RoPE with rotate-half pairing."""
    inv = 1.0 / (base ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    f = torch.outer(torch.arange(S, device=device, dtype=torch.float32), inv)
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary_pos_emb(q, k, cos, sin):
    """q (B, H, S, D), k (B, Hkv, S, D); cos/sin (S, D)."""
    def rot(x):
        x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
        return torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def eager_dynamic_mask_attention_forward(module, query, key, value, attention_mask=None, attention_bias=None,
                                         scale=None, **kwargs):
    """Reference: the same computation in PyTorch. query (B, H, Sq, D), key/value (B, Hkv, Sk, D),
    attention_mask bool broadcastable to (B, Hkv, Sq, Sk) or None, attention_bias (B, Hkv, Sq, Sk).
    Returns ((B, Sq, H, D), None). Causal is bottom-right; a fully masked row gives 0."""
    B, H, Sq, D = query.shape
    Hkv, Sk = key.shape[1], key.shape[2]
    g = H // Hkv
    scale = module.scaling if scale is None else scale
    visible = torch.ones(1, 1, Sq, Sk, dtype=torch.bool, device=query.device)
    if attention_mask is not None:
        visible = visible & attention_mask.bool()
    i = torch.arange(Sq, device=query.device).view(Sq, 1)
    visible = visible & (torch.arange(Sk, device=query.device).view(1, Sk) <= i + Sk - Sq)
    bias = attention_bias.expand(B, Hkv, Sq, Sk)
    visible = visible.expand(B, Hkv, Sq, Sk)
    if Sk > module.keep_window_size:
        # Top-k of (bias, j) among the visible keys per row; flipping first sends ties to the more recent key.
        keyf = torch.where(visible, bias.detach().float(), torch.full((), -math.inf, device=query.device)).flip(-1)
        order = torch.argsort(keyf, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(Sk, device=query.device).expand_as(order).contiguous())
        visible = visible & (rank < module.keep_window_size).flip(-1)
    s = torch.matmul(query.float(), key.float().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    s = s + bias.float().repeat_interleave(g, 1)
    vis = visible.repeat_interleave(g, 1)
    s = s.masked_fill(~vis, -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = torch.matmul(p.to(value.dtype), value.repeat_interleave(g, 1))
    return out.transpose(1, 2).contiguous(), None


class DynamicMaskAttention(nn.Module):
    """The API document's module. config: hidden_size, num_attention_heads, num_key_value_heads, head_dim,
    attention_dropout, keep_window_size, attention_bias, rms_norm_eps."""

    def __init__(self, config, layer_idx=None, attention_function=flash_dynamic_mask_attention_forward):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.keep_window_size = config.keep_window_size
        self.is_causal = True
        self.attention_function = attention_function

        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim,
                                bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim,
                                bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim,
                                bias=config.attention_bias)
        # Dynamic mask for the QK^T attention weights matrix
        self.A = nn.Parameter(torch.zeros(config.num_key_value_heads))
        self.dt_proj = nn.Linear(config.num_key_value_heads * self.head_dim, config.num_key_value_heads,
                                 bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                bias=config.attention_bias)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_value=None,
                cache_position=None, **kwargs):
        """hidden_states (B, S, hidden); position_embeddings (cos, sin) (S, D); attention_mask bool
        broadcastable to (B, 1, Sq, Sk) or None; past_key_value: a transformers Cache or None."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key_states = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if past_key_value is not None:
            cache_kwargs = {"sin": sin, "cos": cos, "cache_position": cache_position}
            key_states, value_states = past_key_value.update(key_states, value_states, self.layer_idx, cache_kwargs)

        # Sampling dt_states from value_states to generate the attention bias: one value per key and kv head,
        # broadcast over the query rows as a stride-0 view (B, Hkv, Sq, Sk).
        dt_states = self.dt_proj(
            value_states.transpose(1, 2).reshape(value_states.shape[0], value_states.shape[-2], -1)
        )
        dt_states = torch.exp(self.A * F.softplus(dt_states)).transpose(-1, -2)
        attn_bias = dt_states[:, :, None, :].expand(-1, -1, hidden_states.shape[1], -1).to(query_states.dtype)

        if attention_mask is not None:
            attention_mask = attention_mask.expand(-1, attn_bias.shape[1], -1, -1)

        attn_output, attn_weights = self.attention_function(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask=attention_mask,
            attention_bias=attn_bias,
            scale=self.scaling,
        )

        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class Block(nn.Module):
    def __init__(self, config, layer_idx, attention_function):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = DynamicMaskAttention(config, layer_idx, attention_function)
        self.norm2 = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, 4 * config.hidden_size), nn.GELU(),
                                 nn.Linear(4 * config.hidden_size, config.hidden_size))

    def forward(self, x, pos, attention_mask=None):
        x = x + self.attn(self.norm1(x), pos, attention_mask)[0]
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    """ids (B, S) -> logits (B, S, vocab)."""

    def __init__(self, config, attention_function=flash_dynamic_mask_attention_forward):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i, attention_function) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, ids, attention_mask=None):
        x = self.embed(ids)
        pos = rotary(ids.shape[1], self.config.head_dim, ids.device)
        for blk in self.blocks:
            x = blk(x, pos, attention_mask)
        return self.head(self.norm(x))


def small_config(**over):
    cfg = dict(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               num_hidden_layers=2, attention_dropout=0.0, keep_window_size=16, attention_bias=False,
               rms_norm_eps=1e-6)
    cfg.update(over)
    return SimpleNamespace(**cfg)


def train(steps=30, device="cpu", seed=0, batch=4, seqlen=48, lr=3e-3, eager=False, log=print):
    """Train TinyDecoder on a fixed random batch; returns the list of losses (one per step)."""
    torch.manual_seed(seed)
    config = small_config()
    attn_fn = eager_dynamic_mask_attention_forward if eager else flash_dynamic_mask_attention_forward
    model = TinyDecoder(config, attn_fn).to(device)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.A.normal_()              # non-zero A: a bias that differs between keys
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ids = torch.randint(0, config.vocab_size, (batch, seqlen + 1), device=device)
    use_amp = device.startswith("cuda")
    losses = []
    for step in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log is not None and (step % 5 == 0 or step == steps - 1):
            log(f"step {step:3d}  loss {loss.item():.4f}")
    return losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eager", action="store_true", help="use the plain PyTorch attention function")
    args = ap.parse_args()
    t0 = time.time()
    losses = train(args.steps, args.device, eager=args.eager)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps, {time.time() - t0:.1f} s "
          f"on {args.device}")


if __name__ == "__main__":
    main()
