"""kprof.py -- per-kernel GPU time of one fdma call under torch.profiler (dev tool, not a test).

    python dev/prof/kprof.py            W1c 16K fwd+bwd, W1 16K fwd+bwd, dense 16K fwd+bwd (B=1 H=16 Hkv=4 D=128)
"""
import sys
import torch
from torch.profiler import profile, ProfilerActivity
import flash_dmattn as fd

dev, dt = "cuda", torch.bfloat16
B, H, Hkv, D = 1, 16, 4, 128


def case(name, Sk, bias=None, mask=None, w=None):
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, Sk, H, D, device=dev, dtype=dt, generator=g).requires_grad_()
    k = torch.randn(B, Sk, Hkv, D, device=dev, dtype=dt, generator=g).requires_grad_()
    v = torch.randn(B, Sk, Hkv, D, device=dev, dtype=dt, generator=g).requires_grad_()
    b = None
    if bias:
        b = torch.randn(B, Hkv, 1, Sk, device=dev, dtype=dt, generator=g).requires_grad_()
    m = None
    if mask:
        sel = torch.randn(B, Hkv, 1, Sk, device=dev, generator=g).topk(1024, dim=-1).indices
        m = torch.zeros(B, Hkv, 1, Sk, device=dev, dtype=torch.bool).scatter_(-1, sel, True)
    do = torch.randn(B, Sk, H, D, device=dev, dtype=dt, generator=g)

    def step():
        o = fd.flash_dmattn_func(q, k, v, attn_mask=m, attn_bias=b, is_causal=mask is None, keep_window_size=w)
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
    for t, n, k_ in sorted(rows, reverse=True)[:14]:
        print(f"  {t:9.1f} us  x{n:<3d} {k_}")
    print(f"  total {sum(r[0] for r in rows):9.1f} us")


if __name__ == "__main__":
    which = sys.argv[1:] or ["w1c", "w1", "dense"]
    for Sk in (16384,):
        if "w1c" in which:
            case("W1c", Sk, bias=True, w=1024)
        if "w1" in which:
            case("W1", Sk, mask=True)
        if "dense" in which:
            case("dense", Sk)
