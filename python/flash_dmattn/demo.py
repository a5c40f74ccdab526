"""
demo.py -- `python -m flash_dmattn.demo [--quick]`: the two API documents' usage examples, then a short
comparison of the backends available on this machine.

  1. flash_dma.fwd basic usage (first document): q/k/v, ZOH states, a top-k active mask, one forward call;
     then the same selection done inside the kernel (active_mask=None, keep_window_size), which needs no
     (Sq, Sk) mask at all.
  2. flash_dmattn high-level interface (second document): get_available_backends, flash_dmattn_func_auto with
     automatic and forced backends, the debugging snippet.
  3. Backends: for each available backend, max |error| of out (and of dq, dk, dv, dbias where the backend has
     a backward) against a float64 reference, and the median time of a forward and a forward+backward.

Runs on the GPU when there is one (the documents' sizes: batch 2, seqlen 4096, 12 heads, head dim 128);
on CPU with smaller sizes so that it finishes in about a minute on 2 cores (--quick: smaller still).
"""
import argparse
import math
import statistics
import time

import torch

import flash_dma
import flash_dmattn
from flash_dmattn import flash_dmattn_func_auto, get_available_backends


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeat):
    times = []
    for _ in range(repeat):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def example_flash_dma(device, dtype, batch_size, seq_len, num_heads, head_dim, keep_window_size):
    print(f"\n== 1. flash_dma.fwd (first API document), device={device.type}, dtype={dtype}, "
          f"(B, S, H, D) = ({batch_size}, {seq_len}, {num_heads}, {head_dim}), keep_window_size={keep_window_size}")
    query = torch.randn(batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
    key = torch.randn(batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
    value = torch.randn(batch_size, seq_len, num_heads, head_dim, device=device, dtype=dtype)
    zoh_states = torch.randn(batch_size, num_heads, seq_len, seq_len, device=device, dtype=dtype)
    active_mask = torch.zeros(batch_size, num_heads, seq_len, seq_len, device=device, dtype=dtype)
    if seq_len > keep_window_size:
        topk_indices = torch.topk(zoh_states, keep_window_size, dim=-1, largest=True, sorted=False).indices
        # the document writes active_mask.scatter(...), which returns a new tensor and leaves active_mask all
        # zeros (every key masked, output 0); scatter_ fills the mask as intended
        active_mask.scatter_(-1, topk_indices, 1.0)
    else:
        active_mask.fill_(1.0)
    output = flash_dma.fwd(q=query, k=key, v=value, zoh=zoh_states, active_mask=active_mask,
                           softmax_scale=1.0 / math.sqrt(head_dim), keep_window_size=keep_window_size)[0]
    print(f"Output shape: {output.shape}")

    fused = flash_dma.fwd(query, key, value, zoh_states, None, keep_window_size=keep_window_size)[0]
    keep = flash_dmattn.create_mask(zoh_states, keep_window_size=keep_window_size)
    exact = flash_dma.fwd(query, key, value, zoh_states, keep, keep_window_size=keep_window_size)[0]
    d_topk = (fused.float() - output.float()).abs().max().item()
    d_exact = (fused.float() - exact.float()).abs().max().item()
    print(f"active_mask=None (top-k selected inside the kernel): max |difference| to the torch.topk mask = "
          f"{d_topk:.3e} (torch.topk breaks ties among equal {dtype} ZOH values arbitrarily; the library keeps "
          f"the more recent key), to a create_mask mask = {d_exact:.3e}")

    output, softmax_lse, attn_weights, _ = flash_dma.fwd(query, key, value, zoh_states, active_mask,
                                                         return_softmax=True)
    print(f"Attention weights range: [{attn_weights.min().item():.4f}, {attn_weights.max().item():.4f}]")
    print(f"LSE stats: mean={softmax_lse.mean().item():.4f}, std={softmax_lse.std().item():.4f}")


def example_flash_dmattn(device, dtype, B, S, H, D):
    print(f"\n== 2. flash_dmattn high-level interface (second API document), device={device.type}")
    q = torch.randn(B, S, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S, H, D, device=device, dtype=dtype)
    v = torch.randn(B, S, H, D, device=device, dtype=dtype)
    attention_mask = torch.rand(B, H, S, S, device=device) > 0.2
    attention_bias = torch.randn(B, H, S, S, device=device, dtype=dtype)
    backends = get_available_backends()
    print(f"Available backends: {backends}")
    print(f"CUDA_AVAILABLE={flash_dmattn.CUDA_AVAILABLE} TRITON_AVAILABLE={flash_dmattn.TRITON_AVAILABLE} "
          f"FLEX_AVAILABLE={flash_dmattn.FLEX_AVAILABLE} CPU_AVAILABLE={flash_dmattn.CPU_AVAILABLE}")
    dmattn_func = flash_dmattn_func_auto()
    output = dmattn_func(q, k, v, attn_mask=attention_mask, attn_bias=attention_bias, is_causal=True, scale=None)
    print(f"auto: output {tuple(output.shape)} {output.dtype}, NaN: {torch.isnan(output).any().item()}")
    forced = "cuda" if "cuda" in backends else "cpu"
    dmattn_func = flash_dmattn_func_auto(backend=forced)
    output2 = dmattn_func(q, k, v, attn_mask=attention_mask, attn_bias=attention_bias, is_causal=True, scale=None)
    print(f"backend={forced!r}: max |difference| to auto = {(output2.float() - output.float()).abs().max().item():.3e}")


def _reference(q, k, v, mask, bias, dout):
    """float64 reference with autograd (SPEC section 3): s = q k^T / sqrt(D) + bias, masked, causal."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    qd, kd, vd, bd = (t.detach().double().requires_grad_() for t in (q, k, v, bias))
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) / math.sqrt(D) + bd
    causal = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device).tril(Sk - Sq)
    s = s.masked_fill(~(mask & causal), -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vd)
    out.backward(dout.double())
    return out.detach(), [t.grad for t in (qd, kd, vd, bd)]


def compare_backends(device, dtype, B, S, H, D, repeat):
    print(f"\n== 3. backends on {device.type}: (B, S, H, D) = ({B}, {S}, {H}, {D}), {dtype}, causal, "
          f"bias (B, H, S, S), bool mask (B, 1, S, S); errors against float64, median of {repeat} runs")
    q = torch.randn(B, S, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S, H, D, device=device, dtype=dtype)
    v = torch.randn(B, S, H, D, device=device, dtype=dtype)
    bias = torch.randn(B, H, S, S, device=device, dtype=dtype)
    mask = torch.rand(B, 1, S, S, device=device) > 0.1
    dout = torch.randn(B, S, H, D, device=device, dtype=dtype)
    ref_out, ref_grads = _reference(q, k, v, mask, bias, dout)
    names = [b for b in get_available_backends() if (b == "cpu") == (device.type == "cpu") or b == "flex"]
    print(f"{'backend':8s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'max|out err|':>13s} {'max|grad err|':>14s}")
    for name in names:
        fn = flash_dmattn_func_auto(backend=name)
        leaves = [t.clone().requires_grad_() for t in (q, k, v, bias)]

        def fwd():
            with torch.no_grad():
                return fn(q, k, v, attn_mask=mask, attn_bias=bias, is_causal=True)

        def fwd_bwd():
            for t in leaves:
                t.grad = None
            out = fn(*leaves[:3], attn_mask=mask, attn_bias=leaves[3], is_causal=True)
            out.backward(dout)
            return out

        try:
            out = fwd_bwd()
            t_f = _timed(fwd, device, repeat) * 1e3
            t_fb = _timed(fwd_bwd, device, repeat) * 1e3
        except (RuntimeError, ValueError, TypeError) as e:
            print(f"{name:8s} failed: {e}")
            continue
        err = (out.double() - ref_out).abs().max().item()
        gerr = max((t.grad.double() - g).abs().max().item() for t, g in zip(leaves, ref_grads))
        print(f"{name:8s} {t_f:9.2f} {t_fb:11.2f} {err:13.3e} {gerr:14.3e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16
    torch.manual_seed(0)
    from flash_dmattn import _lib
    print(f"flash_dmattn {flash_dmattn.__version__}: library {_lib.LIBRARY_PATH or _lib.LOAD_ERROR}")
    print(f"device {device} ({torch.cuda.get_device_name() if gpu else 'CPU, %d threads' % torch.get_num_threads()})")
    if args.quick:
        sizes1, sizes2, sizes3, repeat = (1, 128, 2, 32, 32), (1, 64, 2, 32), (1, 64, 2, 32), 1
    elif gpu:
        sizes1, sizes2, sizes3, repeat = (2, 4096, 12, 128, 1024), (2, 1024, 8, 64), (2, 2048, 8, 128), 5
    else:
        sizes1, sizes2, sizes3, repeat = (1, 512, 4, 64, 128), (1, 256, 4, 64), (1, 256, 4, 64), 2
    example_flash_dma(device, dtype, *sizes1)
    example_flash_dmattn(device, dtype, *sizes2)
    compare_backends(device, dtype, *sizes3, repeat)


if __name__ == "__main__":
    main()
