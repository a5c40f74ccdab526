"""kprof.py -- per-kernel GPU time of one fdma call under torch.profiler (dev tool, not a test).

    python dev/prof/kprof.py                   W1c, W1 and dense at Sk = 16K, forward + backward
    python dev/prof/kprof.py w2@4096 w2nb@16384  cases as NAME[@Sk]: w1c, w1 (non-causal), w1k (W1 causal: bench.py's
                                               W1), dense, w2 (full bias (B, Hkv, Sq, Sk)
                                               with its dbias and the per-row causal top-w mask), w2nb (the same,
                                               the bias without grad)
B=1, H=16, Hkv=4, D=128, bf16, w=1024.
"""
import os
import sys
import torch
from torch.profiler import profile, ProfilerActivity
import flash_dmattn as fd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
from bench import make_w2  # noqa: E402

dev, dt = "cuda", torch.bfloat16
B, H, Hkv, D, W = 1, 16, 4, 128, 1024


def case(name, Sk):
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, Sk, H, D, device=dev, dtype=dt, generator=g).requires_grad_()
    k = torch.randn(B, Sk, Hkv, D, device=dev, dtype=dt, generator=g).requires_grad_()
    v = torch.randn(B, Sk, Hkv, D, device=dev, dtype=dt, generator=g).requires_grad_()
    b = m = w = None
    if name in ("w1c", "w1", "w1k"):
        b = torch.randn(B, Hkv, 1, Sk, device=dev, dtype=dt, generator=g).requires_grad_()
    if name == "w1c":
        w = W
    if name in ("w1", "w1k"):
        sel = torch.randn(B, Hkv, 1, Sk, device=dev, generator=g).topk(W, dim=-1).indices
        m = torch.zeros(B, Hkv, 1, Sk, device=dev, dtype=torch.bool).scatter_(-1, sel, True)
    if name in ("w2", "w2nb"):
        torch.manual_seed(0)
        b, m = make_w2(B, Hkv, Sk, Sk, W, dev, dt)
        b.requires_grad_(name == "w2")
    do = torch.randn(B, Sk, H, D, device=dev, dtype=dt, generator=g)

    def step():
        o = fd.flash_dmattn_func(q, k, v, attn_mask=m, attn_bias=b, is_causal=name != "w1", keep_window_size=w)
        o.backward(do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(f"==== {name} Sk={Sk}: per-call kernel time (us, 5 calls averaged)")
    rows = []
    for e in p.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0:
            t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            if t > 0:
                rows.append((t / 5, e.count // 5, e.key[:110]))
    for t, n, k_ in sorted(rows, reverse=True)[:20]:
        print(f"  {t:9.1f} us  x{n:<3d} {k_}")
    print(f"  total {sum(r[0] for r in rows):9.1f} us")


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["w1c", "w1", "dense"]:
        nm, _, sk = arg.partition("@")
        case(nm, int(sk or 16384))
