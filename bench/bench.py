"""
bench.py -- forward and backward benchmark of flash-dmattn against its peers (/work/shared/BENCHMARKS.md).

Workloads (bf16, causal; B=1, H=16, Hkv=4, D=128 unless named; Sk from --sizes, default 4096,16384):
  Dense   no mask, no bias
  W1      bias (B, Hkv, 1, Sk), keep mask (B, Hkv, 1, Sk) = top-w keys by bias (w=1024), causal in the kernel
  W1c     bias (B, Hkv, 1, Sk), keep = per-row causal top-w (SPEC section 6, issue 8), selected by the call
          itself: ours is flash_dmattn_func(q, k, v, attn_bias=bias, keep_window_size=w, is_causal=True), the
          selection inside the timed call. At each --sizes Sk (w=1024) right after W1, and at --w1c-long
          (default 65536 with w=1024, 131072 with w=2048) after every other workload; above --fdma-only-above
          (default 65536) ours alone, with peak memory
  W2      bias (B, Hkv, Sq, Sk), keep mask (B, Hkv, Sq, Sk) = per-row causal top-w (SPEC section 6)
  W1 B2 H16 D64   W1 with B=2, H=Hkv=16, D=64, Sk=8192, w=2048
  Decode  Sq=1, W1 bias and mask with w=1024, Sk from --decode-sizes (default 16384,131072); forward only
Peers, all in this process on the same inputs (columns; a peer that cannot run a workload records its error):
  fdma         ours: flash_dmattn.flash_dmattn_func (CUDA kernels through the C library); its bias requires grad,
               so its backward computes dbias too
  fdma_nodb    W1, W2: ours with a bias that does not require grad (dq, dk, dv only: the work of sdpa_bias)
  fdma_triton  ours: flash_dmattn.triton_dmattn_func        fdma_flex  ours: flash_dmattn.flex_dmattn_func
  sdpa_flash   SDPA FLASH backend, no mask (the dense reference on every workload)
  sdpa_cudnn   SDPA CUDNN backend, no mask
  sdpa_bias    SDPA EFFICIENT backend with the equivalent float mask where(keep & causal, bias, -inf),
               materialised (B, H, Sq, Sk) as a user has to (a plain tensor: its gradient is not asked for)
  sdpa_bias_db W1, W2: sdpa_bias with that float mask a leaf requiring grad, so that its backward also computes
               the bias gradient (the work of fdma); (B, H, Sq, Sk) mask + gradient (16 GiB at 16K), only at
               Sk <= --materialise-max
  sdpa_gather  Decode only: gather the kept keys/values/bias (torch.gather), then SDPA over the w keys
  flex         FlexAttention (torch.compile'd): score_mod adds the bias, block_mask from keep & causal (built
               once, outside the timing)
  mask         flash_dmattn.create_mask alone (top-k, timed separately);  fdma+mask  both, as a user runs it
W1c peers that need the (B, Hkv, Sq, Sk) selection materialised (by flash_dmattn.create_mask, outside the timing
except in mask / fdma+mask): sdpa_bias, flex, mask, fdma+mask, and fdma_triton / fdma_flex (which build it inside
the call); all of them only at Sk <= --materialise-max (default 16384). The dense peers (SDPA flash / cuDNN, no
mask) run at every W1c size up to --fdma-only-above.
GQA: SDPA peers use enable_gqa=True where the backend takes it (probed at start), else K/V pre-repeated to H
heads outside the timing (the backward then returns dK/dV per query head; summed per group for the checks).

Method: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"). Forward is timed under no_grad
(flex and fdma_flex: with grad enabled, so that one compiled graph serves forward and backward); backward alone
as do_bench(lambda: out.backward(dout, retain_graph=True), grad_to_none=leaves). ours' inputs q, k, v and bias
require grad (fdma_nodb: q, k, v). TFLOP/s: forward 4*B*H*Sq*Sk*D (halved when causal with Sq == Sk), backward
2.5x; "useful" counts only the kept (query, key) pairs. Ratios (peer ms / ours ms) only within this run.
Checks: max |out - ref| (finite entries) and max |dX - dX_ref| / max |dX_ref| for ours against the reference
peer (sdpa_bias with a bias, else sdpa_flash; pass 3 backends against fdma). dbias of ours (pass 1) against
sdpa_bias_db's gradient of the float mask put into the bias's shape (mask_grad_as_bias: kept and causally visible
elements only, summed over the query heads of a group, and over query rows for W1's per-key bias; ours' dbias
elsewhere must be 0, SPEC section 4). Peak memory (W1 rows):
torch.cuda.max_memory_allocated over ours' forward+backward, W1 vs the same call without mask/bias; W1c: the
fused call, vs dense up to Sk=65536, and against the bytes of its own tensors (q k v bias out dout lse grads).
The report ends with issue 8's bars: W1c t(4 Sk)/t(Sk) at fixed w (<= 5), W1 / W1c vs SDPA cuDNN's dense
causal forward and backward (>= 5x at 16K), W1c peak memory; then the equal-work ratios of W1 and W2: backward
sdpa_bias / fdma_nodb and sdpa_bias_db / fdma, forward flex / fdma.

Passes (so that a time budget keeps the cheap, essential numbers): 1. SDPA peers, fdma, mask; 2. flex;
3. fdma_triton, fdma_flex. Each pass walks the workloads in priority order; --budget-s skips what no longer
fits (printed). bench.json is rewritten after every workload; SIGTERM writes the results so far.

  python bench/bench.py [--sizes 4096,16384] [--decode-sizes 16384,131072] [--out DIR] [--quick]
                        [--budget-s S] [--skip PEER,...] [--no-bwd]
                        [--w1c-long 65536,131072:2048] [--materialise-max 16384] [--fdma-only-above 65536]
  python bench/bench.py --report DIR/bench.json     table and bench.png from a saved run (no GPU)
  python bench/bench.py --smoke                     tiny sizes on the CPU (control flow only, no timings)
Needs FDMA_LIBRARY (a built libflashdma.so) or the installed package. Writes bench.json and bench.png to --out.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import signal
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # very old torch: SDPA peers record the error
    SDPBackend = sdpa_kernel = None

DT = torch.bfloat16
PASSES = [["sdpa_flash", "sdpa_cudnn", "sdpa_bias", "sdpa_bias_db", "sdpa_gather", "fdma", "fdma_nodb", "mask",
           "fdma+mask"],
          ["flex"],
          ["fdma_triton", "fdma_flex"]]
OURS = ("fdma", "fdma_nodb", "fdma_triton", "fdma_flex")
HEAVY_NEED_S = {"flex": 45.0, "fdma_flex": 45.0, "fdma_triton": 25.0}   # compile time to expect
TABLE_PEERS = ["fdma", "fdma_nodb", "fdma_triton", "fdma_flex", "sdpa_flash", "sdpa_cudnn", "sdpa_bias", "sdpa_bias_db",
               "flex", "sdpa_gather", "mask"]
SHORT = {"fdma": "fdma", "fdma_nodb": "fdma_nodb", "fdma_triton": "triton", "fdma_flex": "flex_bk",
         "sdpa_flash": "sdpa_flash", "sdpa_cudnn": "sdpa_cudnn", "sdpa_bias": "sdpa_bias",
         "sdpa_bias_db": "sdpa_bias_db", "flex": "flex", "sdpa_gather": "gather", "mask": "mask",
         "fdma+mask": "fdma+mask"}


class Interrupted(BaseException):
    """SIGTERM (the caller's timeout): stop and write what we have."""


class PeerTimeout(BaseException):
    """One peer ran past its time slot (a BaseException so that library code does not swallow it)."""


def _on_term(signum, frame):
    raise Interrupted()


def _on_alarm(signum, frame):
    raise PeerTimeout()


# ---------------------------------------------------------------------------------------------------------------
# inputs and counts (device independent; the CPU smoke test runs them)

def make_w1(B, Hkv, Sq, Sk, w, dev, dt):
    """Per-key bias (B, Hkv, 1, Sk) and keep mask = its top-w keys."""
    bias = torch.randn(B, Hkv, 1, Sk, device=dev, dtype=dt)
    keep = torch.zeros(B, Hkv, 1, Sk, device=dev, dtype=torch.bool)
    idx = bias.float().topk(min(w, Sk), dim=-1).indices
    keep.scatter_(-1, idx, True)
    return bias, keep


def make_w2(B, Hkv, Sq, Sk, w, dev, dt):
    """Full bias (B, Hkv, Sq, Sk) and keep mask = per-row causal top-w (bottom-right aligned)."""
    bias = torch.randn(B, Hkv, Sq, Sk, device=dev, dtype=dt)
    keep = torch.zeros(B, Hkv, Sq, Sk, device=dev, dtype=torch.bool)
    j = torch.arange(Sk, device=dev)
    for i0 in range(0, Sq, 1024):  # row blocks bound the scratch
        i = torch.arange(i0, min(Sq, i0 + 1024), device=dev)
        vis = j[None, :] <= (i[:, None] + Sk - Sq)
        sc = bias[:, :, i0:i0 + len(i)].float().masked_fill(~vis, -math.inf)
        idx = sc.topk(min(w, Sk), dim=-1).indices
        blk = torch.zeros_like(keep[:, :, i0:i0 + len(i)])
        blk.scatter_(-1, idx, True)
        keep[:, :, i0:i0 + len(i)] = blk & vis
    return bias, keep


def w1c_pairs(B, H, Sq, Sk, w):
    """Kept (b, h, i, j) of W1c: row i has i + Sk - Sq + 1 causal candidates (bias finite, no base mask) and
    keeps min(w, that) of them."""
    total = 0
    for i in range(Sq):
        total += min(w, max(0, i + Sk - Sq + 1))
    return total * B * H


def w1c_selection(X, ctx):
    """The W1c keep mask (B, Hkv, Sq, Sk) bool (SPEC section 6, by flash_dmattn.create_mask), made once per
    workload for the peers that need it; a string saying why not above --materialise-max."""
    if X["Sk"] > ctx.args.materialise_max:
        return (f"needs the ({X['Sq']}, {X['Sk']}) selection materialised; skipped above "
                f"--materialise-max {ctx.args.materialise_max}")
    if "sel" not in X:
        X["sel"] = ctx.fd.create_mask(X["bias"], is_causal=True, keep_window_size=X["w"], query_len=X["Sq"])
    return X["sel"]


def visible_pairs(keep, B, H, Hkv, Sq, Sk, dev):
    """Number of (b, h, i, j) with keep & causal (bottom-right); keep None = causal only."""
    j = torch.arange(Sk, device=dev)
    total = 0
    for i0 in range(0, Sq, 2048):
        i = torch.arange(i0, min(Sq, i0 + 2048), device=dev)
        vis = j[None, :] <= (i[:, None] + Sk - Sq)
        if keep is None:
            total += int(vis.sum()) * B * H
        else:
            k = keep if keep.shape[2] == 1 else keep[:, :, i0:i0 + len(i)]
            total += int((k & vis).sum()) * (H // keep.shape[1])
    return total


def float_mask(keep, bias, H, Sq, Sk):
    """where(keep & causal, bias, -inf) as a contiguous (B, H, Sq, Sk) tensor (what SDPA needs)."""
    dev = bias.device
    i = torch.arange(Sq, device=dev)[:, None]
    j = torch.arange(Sk, device=dev)[None, :]
    vis = j <= i + (Sk - Sq)
    fm = torch.where(keep & vis, bias, torch.tensor(-math.inf, device=dev, dtype=bias.dtype))
    B, Hx = fm.shape[0], fm.shape[1]
    fm = fm.expand(B, Hx, Sq, Sk)
    return fm.repeat_interleave(H // Hx, dim=1).contiguous() if Hx != H else fm.contiguous()


def mask_grad_as_bias(gm, keep, bias_shape, Sq, Sk):
    """SDPA's gradient gm (B, H, Sq, Sk) of float_mask(keep, bias) in the bias's shape (B, Hkv, Sq|1, Sk), fp32:
    only kept and causally visible elements (elsewhere the mask is -inf: its gradient is 0, or NaN in a row that
    sees no key), summed over the query heads of a group and, for a per-key bias, over the query rows. That is
    ours' dbias (SPEC section 4: summed over the broadcast dims, 0 at masked entries). Row blocks bound the scratch."""
    B, H = gm.shape[0], gm.shape[1]
    Hkv = bias_shape[1]
    out = torch.zeros(B, Hkv, bias_shape[2], Sk, device=gm.device, dtype=torch.float32)
    j = torch.arange(Sk, device=gm.device)
    for i0 in range(0, Sq, 1024):
        i = torch.arange(i0, min(Sq, i0 + 1024), device=gm.device)
        vis = j[None, :] <= (i[:, None] + Sk - Sq)
        kp = (keep if keep.shape[2] == 1 else keep[:, :, i0:i0 + len(i)]) & vis       # (B, Hkv, rows, Sk)
        g = gm[:, :, i0:i0 + len(i)].float().view(B, Hkv, H // Hkv, len(i), Sk)
        g = torch.where(kp[:, :, None], g, 0.0).sum(2)
        if bias_shape[2] == 1:
            out += g.sum(2, keepdim=True)
        else:
            out[:, :, i0:i0 + len(i)] = g
    return out


def dense_flops(B, H, Sq, Sk, D, causal):
    f = 4.0 * B * H * Sq * Sk * D
    return f / 2 if causal and Sq == Sk else f


def workload_list(sizes, decode_sizes, w, smoke, w1c_long=(), fdma_only_above=math.inf):
    """Workloads in priority order (a budget cuts from the end). w1c_long: (Sk, w) pairs of the long W1c rows,
    last; a W1c row with Sk > fdma_only_above runs ours alone ("only")."""
    def wl(name, kind, B, H, Hkv, Sq, Sk, D, w_):
        return {"workload": name, "kind": kind, "B": B, "H": H, "Hkv": Hkv, "Sq": Sq, "Sk": Sk, "D": D, "w": w_,
                "causal": True}

    def w1c(Sk, w_):
        r = wl("W1c", "W1c", 1, 16, 4, Sk, Sk, 128, w_)
        if Sk > fdma_only_above:
            r["only"] = ["fdma"]
        return r
    s0, rest = sizes[0], sizes[1:]
    out = [wl("Dense", "dense", 1, 16, 4, s0, s0, 128, 0), wl("W1", "W1", 1, 16, 4, s0, s0, 128, w), w1c(s0, w)]
    for s in rest:
        out += [wl("W1", "W1", 1, 16, 4, s, s, 128, w), w1c(s, w)]
    out += [wl("Decode", "decode", 1, 16, 4, 1, s, 128, w) for s in decode_sizes]
    out += [wl("Dense", "dense", 1, 16, 4, s, s, 128, 0) for s in rest]
    out.append(wl("W2", "W2", 1, 16, 4, s0, s0, 128, w))
    b2 = 256 if smoke else 8192
    out.append(wl("W1 B2 H16 D64", "W1", 2, 16, 16, b2, b2, 64, 2 * w))
    out += [wl("W2", "W2", 1, 16, 4, s, s, 128, w) for s in rest]
    out += [w1c(s, w_) for s, w_ in w1c_long]
    return out


# ---------------------------------------------------------------------------------------------------------------
# timing

class Ctx:
    def __init__(self, args):
        self.args = args
        self.dev = "cpu" if args.smoke else "cuda"
        self.t0 = time.time()
        self.budget = args.budget_s
        self.gqa = {}
        self.flex_compiled = None
        self.fd = None

    def left(self):
        return math.inf if not self.budget else self.budget - (time.time() - self.t0)

    def time_ms(self, fn, grad_to_none=None):
        if self.dev == "cpu":
            ts = []
            for _ in range(3):
                if grad_to_none:
                    for x in grad_to_none:
                        x.grad = None
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e3)
            return statistics.median(ts)
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")

    def sync(self):
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def free(self):
        gc.collect()
        if self.dev == "cuda":
            torch.cuda.empty_cache()


def _sdpa_ctx(backend):
    if backend is None:
        return contextlib.nullcontext()
    return sdpa_kernel(getattr(SDPBackend, backend))


def probe_gqa(ctx):
    """Which SDPA backends take enable_gqa=True forward and backward here."""
    res = {}
    q = torch.randn(1, 128, 16, 64, device=ctx.dev, dtype=DT)
    k = torch.randn(1, 128, 4, 64, device=ctx.dev, dtype=DT)
    m = torch.randn(1, 16, 128, 128, device=ctx.dev, dtype=DT)
    for be in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q_, k_, v_ = (t.clone().transpose(1, 2).requires_grad_() for t in (q, k, k))
                with _sdpa_ctx(be):
                    o = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=m if be.startswith("EFF") else None,
                                                       is_causal=not be.startswith("EFF"), enable_gqa=True)
                o.float().sum().backward()
                ok = bool(torch.isfinite(k_.grad).all())
            res[be] = ok
        except Exception:
            res[be] = False
    return res


# ---------------------------------------------------------------------------------------------------------------
# peers: each gives inputs(train) -> tuple, call(*inputs) -> out (B, Sq, H, D), leaves(inputs), grads(inputs)

class Peer:
    def __init__(self, name, inputs, call, leaves=None, grads=None, fwd_grad=False, has_bwd=True):
        self.name, self.inputs, self.call = name, inputs, call
        self.leaves, self.grads = leaves, grads
        self.fwd_grad, self.has_bwd = fwd_grad, has_bwd


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def build_peer(name, X, ctx):
    """The Peer for `name` on inputs X, or a string saying why it does not apply."""
    kind, B, H, Hkv, Sq, Sk, D = X["kind"], X["B"], X["H"], X["Hkv"], X["Sq"], X["Sk"], X["D"]
    g = H // Hkv
    q, k, v, bias, keep = X["q"], X["k"], X["v"], X["bias"], X["keep"]
    train = kind != "decode"
    fd = ctx.fd

    if name.startswith("sdpa_") and name != "sdpa_gather":
        if sdpa_kernel is None:
            return "torch without torch.nn.attention.sdpa_kernel"
        backend = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION",
                   "sdpa_bias": "EFFICIENT_ATTENTION", "sdpa_bias_db": "EFFICIENT_ATTENTION"}[name]
        if name == "sdpa_cudnn" and kind == "decode":
            return "not a decode peer"
        with_mask = name in ("sdpa_bias", "sdpa_bias_db")
        mask_grad = name == "sdpa_bias_db"   # the float mask is a leaf: its backward computes the bias gradient
        if with_mask and bias is None:
            return "no bias in this workload"
        if mask_grad and Sk > ctx.args.materialise_max:
            return (f"needs the (B, H, Sq, Sk) float mask and its gradient ({4 * B * H * Sq * Sk / 2**30:.3g} GiB); "
                    f"skipped above --materialise-max {ctx.args.materialise_max}")
        if ctx.dev == "cpu" and with_mask:   # smoke test: the CPU has no EFFICIENT kernel
            backend = None
        native = g == 1 or ctx.gqa.get(backend, False)
        is_causal = X["causal"] and Sq == Sk and not with_mask   # Sq=1 decode: bottom-right row sees all keys
        if with_mask and kind == "W1c":
            keep = w1c_selection(X, ctx)
            if isinstance(keep, str):
                return keep
        if with_mask and "fm" not in X:
            X["fm"] = float_mask(keep, bias, H, Sq, Sk)
        m = X["fm"] if with_mask else None
        kw = {"enable_gqa": True} if native and g > 1 else {}

        def call(q_, k_, v_, m_=m):
            kt, vt = (k_.transpose(1, 2), v_.transpose(1, 2)) if native else (k_, v_)
            with _sdpa_ctx(backend):
                o = F.scaled_dot_product_attention(q_.transpose(1, 2), kt, vt, attn_mask=m_, is_causal=is_causal, **kw)
            return o.transpose(1, 2)
        if native:
            kf, vf = k, v
        else:  # (B, H, Sk, D) contiguous, made once outside the timing
            kf, vf = (t.transpose(1, 2).repeat_interleave(g, dim=1).contiguous() for t in (k, v))

        def grads(inp):
            dq, dk, dv = (t.grad for t in inp[:3])
            if not native:
                dk, dv = (t.view(B, Hkv, g, Sk, D).sum(2).transpose(1, 2) for t in (dk, dv))
            d = {"dq": dq, "dk": dk, "dv": dv}
            if mask_grad:
                d["dbias"] = mask_grad_as_bias(inp[3].grad, keep, bias.shape, Sq, Sk)
            return d

        def inputs(tr):
            qkv = tuple(_leaf(t) if tr else t for t in (q, kf, vf))
            if not mask_grad:
                return qkv
            return qkv + (X["fm"].detach().requires_grad_() if tr else X["fm"],)   # a leaf sharing fm's memory
        return Peer(name, inputs, call, leaves=lambda inp: list(inp), grads=grads, has_bwd=train)

    if name == "sdpa_gather":
        if kind != "decode":
            return "decode only"
        w = X["idx"].shape[-1]
        idx = X["idx"]
        ii = idx[..., None].expand(B, Hkv, w, D)
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        b3 = bias[:, :, 0]

        def call():
            kg, vg = torch.gather(kt, 2, ii), torch.gather(vt, 2, ii)
            bg = torch.gather(b3, 2, idx)
            if g > 1:
                kg, vg, bg = (t.repeat_interleave(g, dim=1) for t in (kg, vg, bg))
            o = F.scaled_dot_product_attention(q.transpose(1, 2), kg, vg, attn_mask=bg[:, :, None, :])
            return o.transpose(1, 2)
        return Peer(name, lambda tr: (), call, has_bwd=False)

    if name in ("mask", "fdma+mask"):
        if bias is None:
            return "no bias in this workload"
        if fd is None or fd.create_mask is None:
            return "flash_dmattn.create_mask unavailable"
        causal_rows = kind in ("W2", "W1c")
        w = X["w"]
        if kind == "W1c" and Sk > ctx.args.materialise_max:
            return w1c_selection(X, ctx)

        def mk():   # W1c: the per-row causal selection of a per-key bias, materialised (B, Hkv, Sq, Sk)
            return fd.create_mask(bias, is_causal=causal_rows, keep_window_size=w, query_len=Sq)
        if name == "mask":
            return Peer(name, lambda tr: (), mk, has_bwd=False)
        if not getattr(fd, "CUDA_AVAILABLE", False) and ctx.dev == "cuda":
            return "flash_dmattn CUDA backend unavailable"
        return Peer(name, lambda tr: (), lambda: fd.flash_dmattn_func(q, k, v, attn_mask=mk(), attn_bias=bias,
                                                                      is_causal=X["causal"]), has_bwd=False)

    if name in OURS:
        if fd is None:
            return "flash_dmattn failed to import"
        impl = "fdma" if name == "fdma_nodb" else name
        f = {"fdma": fd.flash_dmattn_func, "fdma_triton": getattr(fd, "triton_dmattn_func", None),
             "fdma_flex": getattr(fd, "flex_dmattn_func", None)}[impl]
        avail = {"fdma": getattr(fd, "CUDA_AVAILABLE", False) or ctx.dev == "cpu",
                 "fdma_triton": getattr(fd, "TRITON_AVAILABLE", False),
                 "fdma_flex": getattr(fd, "FLEX_AVAILABLE", False)}[impl]
        if f is None or not avail:
            why = getattr(getattr(fd, "_lib", None), "LOAD_ERROR", None) if impl == "fdma" else None
            return f"backend unavailable ({why or 'flag False'})"
        # W1c: the call selects per row itself (keep_window_size); triton / flex build the selection inside
        # the call with create_mask, so they are held to the same size limit as the materialising peers
        window = X["w"] if kind == "W1c" else None
        if kind == "W1c" and name != "fdma" and Sk > ctx.args.materialise_max:
            return w1c_selection(X, ctx)

        def call(q_, k_, v_, b_=None):
            o = f(q_, k_, v_, attn_mask=keep, attn_bias=b_, is_causal=X["causal"], keep_window_size=window)
            return o[0] if isinstance(o, tuple) else o

        base = (q, k, v) if bias is None else (q, k, v, bias)
        nleaf = 3 if name == "fdma_nodb" else len(base)   # fdma_nodb: the bias stays a plain tensor (no dbias)

        def grads(inp):
            d = {"dq": inp[0].grad, "dk": inp[1].grad, "dv": inp[2].grad}
            if nleaf > 3:
                d["dbias"] = inp[3].grad
            return d
        return Peer(name, lambda tr: tuple(_leaf(t) if tr and n < nleaf else t for n, t in enumerate(base)), call,
                    leaves=lambda inp: list(inp[:nleaf]), grads=grads, fwd_grad=(name == "fdma_flex" and train),
                    has_bwd=train)

    if name == "flex":
        if bias is None:
            return "no bias in this workload"
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            return f"flex_attention unavailable: {e}"
        if ctx.flex_compiled is None:
            ctx.flex_compiled = torch.compile(flex_attention, dynamic=False)
        if kind == "W1c":
            keep = w1c_selection(X, ctx)
            if isinstance(keep, str):
                return keep
        flex = ctx.flex_compiled
        off = Sk - Sq
        if bias.shape[2] == 1:
            def score_mod(s, b, h, qi, kj):
                return s + bias[b, h // g, 0, kj]
        else:
            def score_mod(s, b, h, qi, kj):
                return s + bias[b, h // g, qi, kj]
        if keep.shape[2] == 1:
            def mask_mod(b, h, qi, kj):
                return keep[b, h // g, 0, kj] & (kj <= qi + off)
        else:
            def mask_mod(b, h, qi, kj):
                return keep[b, h // g, qi, kj] & (kj <= qi + off)
        bm = create_block_mask(mask_mod, B, H, Sq, Sk, device=ctx.dev, _compile=True)

        def call(q_, k_, v_):
            o = flex(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), score_mod=score_mod, block_mask=bm,
                     enable_gqa=g > 1)
            return o.transpose(1, 2)

        def grads(inp):
            return {"dq": inp[0].grad, "dk": inp[1].grad, "dv": inp[2].grad}
        return Peer(name, lambda tr: tuple(_leaf(t) if tr else t for t in (q, k, v)), call,
                    leaves=lambda inp: list(inp), grads=grads, fwd_grad=train, has_bwd=train)

    return f"unknown peer {name}"


# ---------------------------------------------------------------------------------------------------------------

def make_inputs(spec, ctx, row_id):
    torch.manual_seed(1000 + row_id)
    dev = ctx.dev
    B, H, Hkv, Sq, Sk, D, w = (spec[x] for x in ("B", "H", "Hkv", "Sq", "Sk", "D", "w"))
    X = dict(spec)
    X["q"] = torch.randn(B, Sq, H, D, device=dev, dtype=DT)
    X["k"] = torch.randn(B, Sk, Hkv, D, device=dev, dtype=DT)
    X["v"] = torch.randn(B, Sk, Hkv, D, device=dev, dtype=DT)
    X["dout"] = torch.randn(B, Sq, H, D, device=dev, dtype=DT)
    X["bias"] = X["keep"] = None
    if spec["kind"] in ("W1", "decode"):
        X["bias"], X["keep"] = make_w1(B, Hkv, Sq, Sk, w, dev, DT)
    elif spec["kind"] == "W2":
        X["bias"], X["keep"] = make_w2(B, Hkv, Sq, Sk, w, dev, DT)
    elif spec["kind"] == "W1c":   # no keep mask: ours selects; every row has a causal key (Sq == Sk)
        X["bias"] = torch.randn(B, Hkv, 1, Sk, device=dev, dtype=DT)
    X["valid"] = None
    if X["keep"] is not None:   # (B, Sq, H): rows with at least one visible key (others: peers may differ)
        kp = X["keep"]
        if kp.shape[2] == 1:
            first = kp.to(torch.uint8).argmax(-1)                                    # (B, Hkv, 1)
            rows = torch.arange(Sq, device=dev) + (Sk - Sq)
            val = kp.any(-1) & (first <= rows)                                       # (B, Hkv, Sq)
        else:
            val = kp.any(-1)
        X["valid"] = val.transpose(1, 2).repeat_interleave(H // Hkv, dim=2)
    if spec["kind"] == "decode":
        nz = X["keep"][:, :, 0].nonzero()
        X["idx"] = nz[:, 2].reshape(B, Hkv, -1).contiguous()
    return X


def _diff_out(a, ref, valid=None):
    ok = torch.isfinite(ref) & torch.isfinite(a)
    if valid is not None:
        ok &= valid[..., None]
    if not bool(ok.any()):
        return float("nan")
    return float((a.float() - ref.float())[ok].abs().max())


def _diff_rel(a, ref, valid=None):
    if a is None or ref is None:
        return None
    a, ref = a.float(), ref.float()
    ok = torch.isfinite(ref) & torch.isfinite(a)
    if valid is not None:
        ok &= valid[..., None]
    den = float(ref[ok].abs().max()) if bool(ok.any()) else 0.0
    num = float((a - ref)[ok].abs().max()) if bool(ok.any()) else float("nan")
    nan_extra = int((~torch.isfinite(a) & torch.isfinite(ref) & (True if valid is None else valid[..., None])).sum())
    r = num / den if den > 0 else num
    return r if nan_extra == 0 else float("nan")


def _alarm(seconds):
    if seconds is None or seconds == math.inf:
        seconds = 0
    signal.setitimer(signal.ITIMER_REAL, max(0.0, float(seconds)))


def run_peer(peer, X, row, ctx, ref):
    """Time forward (and backward), check against ref; fills row. ref: dict(out, grads) or None."""
    a = ctx.args
    name = peer.name
    cap = a.peer_cap_s if ctx.left() == math.inf else max(1.0, min(a.peer_cap_s, ctx.left() - 2))
    errors = row.setdefault("errors", {})
    out_f = grads = None
    _alarm(cap)
    try:
        try:
            tinp = None
            if peer.fwd_grad and peer.has_bwd and not a.no_bwd:
                tinp = peer.inputs(True)
                inp, grad_mode = tinp, True
            else:
                inp, grad_mode = peer.inputs(False), False
            with torch.set_grad_enabled(grad_mode):
                out_f = peer.call(*inp)
                out_f = out_f.detach()
                ctx.sync()
                row["fwd_ms"][name] = ctx.time_ms(lambda: peer.call(*inp))
            if grad_mode:
                row.setdefault("fwd_grad_mode", []).append(name)
        except (Exception, PeerTimeout) as e:
            errors[name + "/fwd"] = ("timeout" if isinstance(e, PeerTimeout) else f"{type(e).__name__}: {e}")[:300]
            print(f"  {name} fwd: {errors[name + '/fwd']}", flush=True)
            tinp = None
        if peer.has_bwd and not a.no_bwd and name + "/fwd" not in errors:
            try:
                if tinp is None:
                    tinp = peer.inputs(True)
                out = peer.call(*tinp)
                leaves = peer.leaves(tinp)
                ctx.sync()
                row["bwd_ms"][name] = ctx.time_ms(lambda: out.backward(X["dout"], retain_graph=True),
                                                  grad_to_none=leaves)
                grads = {kk: (vv.detach().clone() if vv is not None else None) for kk, vv in peer.grads(tinp).items()}
                del out
            except (Exception, PeerTimeout) as e:
                errors[name + "/bwd"] = ("timeout" if isinstance(e, PeerTimeout)
                                         else f"{type(e).__name__}: {e}")[:300]
                print(f"  {name} bwd: {errors[name + '/bwd']}", flush=True)
        tinp = None
    finally:
        _alarm(0)
    if ref is not None and out_f is not None and ref.get("out") is not None and name not in (ref["name"], "mask"):
        try:
            d = {"ref": ref["name"], "out": _diff_out(out_f, ref["out"], X.get("valid"))}
            if grads and ref.get("grads"):
                for kk in ("dq", "dk", "dv", "dbias"):
                    if kk in grads and kk in ref["grads"]:
                        d[kk] = _diff_rel(grads[kk], ref["grads"][kk], X.get("valid") if kk == "dq" else None)
                if "dbias" in d and ref.get("dbias_ref"):
                    d["dbias_ref"] = ref["dbias_ref"]
            row.setdefault("diff", {})[name] = d
        except Exception as e:
            errors[name + "/check"] = f"{type(e).__name__}: {e}"[:300]
    ctx.free()
    return {"name": name, "out": out_f, "grads": grads}


def peak_memory(X, ctx, row):
    """Peak allocated bytes over ours' forward+backward: W1 vs dense, same q/k/v (CUDA only)."""
    if ctx.dev != "cuda" or ctx.fd is None or not getattr(ctx.fd, "CUDA_AVAILABLE", False):
        return
    f = ctx.fd.flash_dmattn_func
    res = {}
    for label, use in (("fdma_dense", False), ("fdma", True)):
        try:
            res[label] = _peak_fwd_bwd(ctx, X, use, lambda q_, k_, v_, b_: f(
                q_, k_, v_, attn_mask=X["keep"] if use else None, attn_bias=b_, is_causal=True))[0]
        except Exception as e:
            row.setdefault("errors", {})["peak/" + label] = f"{type(e).__name__}: {e}"[:300]
    if "fdma" in res and res.get("fdma_dense"):
        res["ratio"] = res["fdma"] / res["fdma_dense"]
    row["peak_mb"] = res
    ctx.free()


def _peak_fwd_bwd(ctx, X, use_bias, call):
    """Peak MiB allocated beyond what existed before one forward+backward of call(q, k, v, bias or None) on fresh
    leaves of X's tensors; also returns (q, k, v, bias, out) for the caller's byte counts."""
    q_, k_, v_ = (_leaf(t) for t in (X["q"], X["k"], X["v"]))
    b_ = _leaf(X["bias"]) if use_bias else None
    ctx.free()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = call(q_, k_, v_, b_)
    out.backward(X["dout"])
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, (q_, k_, v_, b_, out.detach())


def peak_memory_w1c(X, ctx, row):
    """W1c peak memory (MiB) of ours' fused forward+backward (selection included). fdma: allocated beyond the
    inputs (as for W1); fdma_total: that plus the inputs q, k, v, bias, dout (what a process running only this
    call peaks at); tensors: the call's own tensors (q, k, v, bias, dout, out, lse, dq, dk, dv, dbias); up to
    Sk=65536 also fdma_dense, the same q/k/v without bias or window, for the peak column's ratio. CUDA only."""
    if ctx.dev != "cuda" or ctx.fd is None or not getattr(ctx.fd, "CUDA_AVAILABLE", False):
        return
    f = ctx.fd.flash_dmattn_func
    res = {}
    B, H, Sq = X["B"], X["H"], X["Sq"]
    runs = [("fdma", True)] + ([("fdma_dense", False)] if X["Sk"] <= 65536 else [])
    for label, use in runs:
        if ctx.left() < 10:
            row.setdefault("skipped", {})["peak/" + label] = f"budget ({ctx.left():.0f} s left)"
            continue
        try:
            res[label], ts = _peak_fwd_bwd(ctx, X, use, lambda q_, k_, v_, b_: f(
                q_, k_, v_, attn_bias=b_, is_causal=True, keep_window_size=X["w"] if use else None))
            if use:
                def nb(ts):
                    return sum(t.numel() * t.element_size() for t in ts) / 2**20
                q_, k_, v_, b_, out = ts
                inputs = nb([q_, k_, v_, b_, X["dout"]])
                res["fdma_total"] = res[label] + inputs
                res["tensors"] = inputs + nb([out, q_.grad, k_.grad, v_.grad, b_.grad]) + B * H * Sq * 4 / 2**20
            del ts
        except Exception as e:
            row.setdefault("errors", {})["peak/" + label] = f"{type(e).__name__}: {e}"[:300]
    if "fdma" in res and res.get("fdma_dense"):
        res["ratio"] = res["fdma"] / res["fdma_dense"]
    row["peak_mb"] = res
    ctx.free()


def ref_name(kind, pass_no, fd_ok):
    if pass_no == 2 and fd_ok:
        return "fdma"
    return "sdpa_flash" if kind == "dense" else "sdpa_bias"


def applies(name, kind):
    if name in ("fdma_nodb", "sdpa_bias_db"):
        return kind in ("W1", "W2")
    if name in ("flex", "sdpa_bias", "mask", "fdma+mask"):
        return kind != "dense"
    if name == "sdpa_gather":
        return kind == "decode"
    if name == "sdpa_cudnn":
        return kind != "decode"
    return True


def run_workload(spec, row, row_id, peers, pass_no, ctx):
    a = ctx.args
    kind = spec["kind"]
    peers = [p for p in peers if applies(p, kind)]
    if spec.get("only"):
        for p in peers:
            if p not in spec["only"]:
                row.setdefault("n/a", {})[p] = f"Sk={spec['Sk']}: {', '.join(spec['only'])} only"
        peers = [p for p in peers if p in spec["only"]]
    if not peers:
        return
    X = make_inputs(spec, ctx, row_id)
    fd_ok = ctx.fd is not None and (getattr(ctx.fd, "CUDA_AVAILABLE", False) or ctx.dev == "cpu")
    rname = ref_name(kind, pass_no, fd_ok)
    if not row.get("flops"):
        row["flops"] = dense_flops(spec["B"], spec["H"], spec["Sq"], spec["Sk"], spec["D"], spec["causal"])
        if kind == "W1c":
            pairs = w1c_pairs(spec["B"], spec["H"], spec["Sq"], spec["Sk"], spec["w"])
        else:
            pairs = visible_pairs(X["keep"], spec["B"], spec["H"], spec["Hkv"], spec["Sq"], spec["Sk"], ctx.dev)
        row["useful_flops"] = 4.0 * pairs * spec["D"]
        row["gqa_native"] = {k: v for k, v in ctx.gqa.items()}
    ref = None
    order = list(peers)
    if rname not in order:  # passes 2 and 3: run the reference once, untimed
        p = build_peer(rname, X, ctx)
        if isinstance(p, Peer):
            try:
                with torch.no_grad():
                    o = p.call(*p.inputs(False)).detach()
                gr = None
                if p.has_bwd and not a.no_bwd:
                    inp = p.inputs(True)
                    out = p.call(*inp)
                    out.backward(X["dout"])
                    gr = {kk: vv.detach().clone() for kk, vv in p.grads(inp).items() if vv is not None}
                    del out, inp
                ref = {"name": rname, "out": o, "grads": gr}
            except Exception as e:
                row.setdefault("errors", {})["ref/" + rname] = f"{type(e).__name__}: {e}"[:300]
    else:
        order.remove(rname)
        order.insert(0, rname)
    for name in order:
        if name in a.skip:
            row.setdefault("skipped", {})[name] = "--skip"
            continue
        need = HEAVY_NEED_S.get(name, 3.0)
        if ctx.left() < need:
            row.setdefault("skipped", {})[name] = f"budget ({ctx.left():.0f} s left, needs ~{need:.0f} s)"
            print(f"  budget: skipping {name} ({ctx.left():.0f} s left)", flush=True)
            continue
        _alarm(a.peer_cap_s if ctx.left() == math.inf else max(1.0, min(a.peer_cap_s, ctx.left() - 2)))
        try:
            p = build_peer(name, X, ctx)
        except (Exception, PeerTimeout) as e:
            row.setdefault("errors", {})[name + "/setup"] = f"{type(e).__name__}: {e}"[:300]
            print(f"  {name} setup: {row['errors'][name + '/setup']}", flush=True)
            continue
        finally:
            _alarm(0)
        if not isinstance(p, Peer):
            row.setdefault("n/a", {})[name] = p
            continue
        r = run_peer(p, X, row, ctx, ref)
        if name == rname:
            ref = r
        elif name == "sdpa_bias_db" and ref and ref.get("grads") and (r["grads"] or {}).get("dbias") is not None:
            ref["grads"]["dbias"] = r["grads"]["dbias"]   # the reference for the dbias of the peers after it
            ref["dbias_ref"] = name
    if pass_no == 0 and kind == "W1":
        peak_memory(X, ctx, row)
    if pass_no == 0 and kind == "W1c" and "fdma" in peers and "fdma" not in a.skip:
        peak_memory_w1c(X, ctx, row)
    X.clear()
    ctx.free()


def fmt_ms(x):
    return "-" if x is None else (f"{x:.3f}" if x < 100 else f"{x:.1f}")


def report(data, out_dir=None):
    """The compact table (printed last) and bench.png."""
    rows = data["rows"]
    lines = []
    lines.append(f"==== bench table: {data.get('device', '?')}, torch {data.get('torch', '?')}; median ms fwd/bwd "
                 f"(ours = fdma: flash_dmattn CUDA; triton / flex_bk = our other backends) ====")
    peers = [p for p in TABLE_PEERS if any(p in r.get("fwd_ms", {}) or p in r.get("bwd_ms", {}) for r in rows)]
    lines.append(f"{'workload':14s}{'Sk':>7s} " + "".join(f"{SHORT[p]:>14s}" for p in peers))
    for r in rows:
        cells = []
        for p in peers:
            f, b = r.get("fwd_ms", {}).get(p), r.get("bwd_ms", {}).get(p)
            if f is None and b is None:
                err = any(k.startswith(p + "/") for k in r.get("errors", {}))
                cells.append("err" if err else ("skip" if p in r.get("skipped", {}) else "-"))
            else:
                cells.append(fmt_ms(f) + ("/" + fmt_ms(b) if b is not None else ""))
        lines.append(f"{r['workload']:14s}{r['Sk']:7d} " + "".join(f"{c:>14s}" for c in cells))
    lines.append("")
    if any(r["kind"] == "W1c" for r in rows):
        lines.append("W1c: fdma = flash_dmattn_func(attn_bias=bias, keep_window_size=w, is_causal=True), the per-row "
                     "top-w selection inside the timed call; fdma+mask = create_mask (materialised) + the dense-mask "
                     "call, both timed; sdpa_bias / flex / mask get the materialised selection (made untimed)")
    lines.append("ours (fdma): TFLOP/s dense/useful convention; ratio = peer ms / fdma ms (> 1: fdma faster); "
                 "peak = W1 / W1c fwd+bwd peak / dense peak")
    cols = [("sdpa_flash", "flash"), ("sdpa_cudnn", "cudnn"), ("sdpa_bias", "bias"), ("flex", "flex"),
            ("sdpa_gather", "gath"), ("fdma_triton", "trit"), ("fdma_flex", "flexbk")]
    lines.append(f"{'workload':14s}{'Sk':>7s} {'fwd TF d/u':>13s} {'bwd TF d/u':>13s} | fwd x " +
                 "".join(f"{c[1]:>7s}" for c in cols) + " | bwd x " + "".join(f"{c[1]:>7s}" for c in cols[:4] + cols[5:])
                 + f" | {'peak':>5s}")
    for r in rows:
        fm, bm = r.get("fwd_ms", {}), r.get("bwd_ms", {})
        f, b = fm.get("fdma"), bm.get("fdma")
        fl, us = r.get("flops", 0), r.get("useful_flops", 0)
        def tfl(x):
            return f"{x:.0f}" if x >= 10 else f"{x:.2g}"
        tf = f"{tfl(fl / f * 1e-9)}/{tfl(us / f * 1e-9)}" if f else "-"
        tb = f"{tfl(2.5 * fl / b * 1e-9)}/{tfl(2.5 * us / b * 1e-9)}" if b else "-"

        def rat(m, base, p):
            return f"{m[p] / base:.2f}" if base and m.get(p) else "-"
        pk = r.get("peak_mb", {}).get("ratio")
        lines.append(f"{r['workload']:14s}{r['Sk']:7d} {tf:>13s} {tb:>13s} | fwd x " +
                     "".join(f"{rat(fm, f, c[0]):>7s}" for c in cols) + " | bwd x " +
                     "".join(f"{rat(bm, b, c[0]):>7s}" for c in cols[:4] + cols[5:]) +
                     f" | {(f'{pk:.2f}' if pk else '-'):>5s}")
    lines.append("")
    lines.append("checks: max|out - ref| and max grad rel err (dq dk dv dbias) of ours; peak MB; masks")
    for r in rows:
        parts = []
        for p, d in r.get("diff", {}).items():
            if p not in OURS and p != "sdpa_bias_db":
                continue
            g = [d.get(k) for k in ("dq", "dk", "dv", "dbias") if d.get(k) is not None or k in d]
            gs = "/".join("nan" if x is None or x != x else f"{x:.1e}" for x in g)
            dbr = f" (dbias vs {SHORT.get(d['dbias_ref'], d['dbias_ref'])})" if d.get("dbias_ref") else ""
            parts.append(f"{SHORT[p]} vs {SHORT.get(d['ref'], d['ref'])}: {d['out']:.1e}" + (f" g {gs}" if gs else "")
                         + dbr)
        pm = r.get("peak_mb", {})
        if pm.get("fdma"):
            parts.append(f"peak {pm['fdma']:.0f}/{pm.get('fdma_dense', 0):.0f} MB")
        if pm.get("fdma_total"):
            parts.append(f"with inputs {pm['fdma_total']:.0f} MB (own tensors {pm['tensors']:.0f} MB)")
        if r.get("fwd_ms", {}).get("mask") is not None:
            parts.append(f"mask {r['fwd_ms']['mask']:.3f} ms, fdma+mask {fmt_ms(r['fwd_ms'].get('fdma+mask'))} ms")
        lines.append(f"{r['workload']:14s}{r['Sk']:7d}  " + "; ".join(parts))
    lines += issue8_lines(rows)
    lines += equal_work_lines(rows)
    ne = sum(len(r.get("errors", {})) for r in rows)
    sk = sorted({f"{r['workload']} {r['Sk']}: {p}" for r in rows for p, why in r.get("skipped", {}).items()
                 if why != "--skip"})
    lines.append(f"errors: {ne} (see bench.json 'errors');"
                 + (f" skipped for time: {len(sk)} ({'; '.join(sk[:8])}{' ...' if len(sk) > 8 else ''})" if sk else
                    " nothing skipped for time")
                 + ("" if not data.get("skipped_workloads") else
                    f"; workload passes skipped: {', '.join(data['skipped_workloads'][:8])}")
                 + (" [INTERRUPTED]" if data.get("interrupted") else ""))
    seen, shown = set(), 0
    for r in rows:
        for k, e in r.get("errors", {}).items():
            if e[:60] in seen or shown >= 8:
                continue
            seen.add(e[:60])
            shown += 1
            lines.append(f"  {r['workload']} {r['Sk']} {k}: {e[:160]}")
    print("\n".join(lines), flush=True)
    if out_dir:
        plot(data, os.path.join(out_dir, "bench.png"))


def issue8_lines(rows):
    """Issue 8's bars from this run: W1c time growth at fixed w, W1 / W1c against SDPA cuDNN's dense causal
    forward and backward, W1c peak memory."""
    w1c = [r for r in rows if r["kind"] == "W1c"]
    if not w1c:
        return []
    out = ["", "issue 8 bars (same run): W1c t(Sk2)/t(Sk1) at fixed w <= 1.25 x Sk2/Sk1 (<= 5 for 16K -> 64K); "
               "cuDNN dense causal ms / fdma ms >= 5 at Sk=16K, fwd and bwd"]

    def verdict(ok):
        return "ok" if ok else "MISS"
    by_w = {}
    for r in w1c:
        by_w.setdefault(r["w"], []).append(r)
    for w, rs in by_w.items():
        rs = sorted(rs, key=lambda r: r["Sk"])
        for a, b in zip(rs, rs[1:]):
            bar = 1.25 * b["Sk"] / a["Sk"]
            cells = []
            for key, tag in (("fwd_ms", "fwd"), ("bwd_ms", "bwd")):
                ta, tb = a.get(key, {}).get("fdma"), b.get(key, {}).get("fdma")
                cells.append(f"{tag} {tb / ta:.2f} {verdict(tb / ta <= bar)}" if ta and tb else f"{tag} -")
            out.append(f"  W1c w={w} t({b['Sk']})/t({a['Sk']}): " + ", ".join(cells) + f" (bar <= {bar:.2f})")
    for r in rows:
        if r["kind"] not in ("W1", "W1c") or r["B"] != 1:
            continue
        cells = []
        for key, tag in (("fwd_ms", "fwd"), ("bwd_ms", "bwd")):
            f, c = r.get(key, {}).get("fdma"), r.get(key, {}).get("sdpa_cudnn")
            cells.append(f"{tag} {c / f:.2f}x {verdict(c / f >= 5)}" if f and c else f"{tag} -")
        if any(not c.endswith("-") for c in cells):
            out.append(f"  {r['workload']} Sk={r['Sk']} w={r['w']} vs cuDNN dense causal: " + ", ".join(cells)
                       + ("" if r["Sk"] == 16384 else " (bar set at 16K)"))
    for r in w1c:
        pm = r.get("peak_mb", {})
        if pm.get("fdma_total"):
            out.append(f"  W1c Sk={r['Sk']} w={r['w']} fwd+bwd peak {pm['fdma_total'] / 1024:.2f} GiB with inputs "
                       f"(own tensors {pm['tensors'] / 1024:.2f} GiB; fwd {fmt_ms(r['fwd_ms'].get('fdma'))} ms, "
                       f"bwd {fmt_ms(r['bwd_ms'].get('fdma'))} ms)")
    return out


def equal_work_lines(rows):
    """The ratios the issues quote, per W1 / W2 row (peer ms / ours ms, > 1: ours faster): backward at equal work,
    sdpa_bias / fdma_nodb (dq dk dv) and sdpa_bias_db / fdma (dq dk dv and the bias gradient); forward flex / fdma."""
    out = []
    for r in rows:
        if r["workload"] not in ("W1", "W2"):
            continue
        cells = []
        for key, tag, peer, ours in (("bwd_ms", "bwd", "sdpa_bias", "fdma_nodb"),
                                     ("bwd_ms", "bwd", "sdpa_bias_db", "fdma"), ("fwd_ms", "fwd", "flex", "fdma")):
            a, b = r.get(key, {}).get(peer), r.get(key, {}).get(ours)
            cells.append(f"{tag} {peer}/{ours} " + (f"{a / b:.2f} ({fmt_ms(a)}/{fmt_ms(b)})" if a and b else "-"))
        out.append(f"  {r['workload']} Sk={r['Sk']}: " + "; ".join(cells))
    return ["", "equal-work ratios (peer ms / ours ms, > 1: ours faster):"] + out if out else []


def plot(data, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = data["rows"]
        tr = [r for r in rows if r["kind"] != "decode"]
        dc = [r for r in rows if r["kind"] == "decode"]
        peers = ["fdma", "fdma_nodb", "fdma_triton", "fdma_flex", "sdpa_flash", "sdpa_cudnn", "sdpa_bias",
                 "sdpa_bias_db", "flex"]
        fig, axs = plt.subplots(3, 1, figsize=(14, 13))
        wd = 0.8 / len(peers)
        for ax, key, mult, title in ((axs[0], "fwd_ms", 1.0, "forward"), (axs[1], "bwd_ms", 2.5, "backward")):
            for t, pn in enumerate(peers):
                ys = [(mult * r.get("flops", 0) / r[key][pn] * 1e-9) if r.get(key, {}).get(pn) else 0 for r in tr]
                ax.bar([x + t * wd for x in range(len(tr))], ys, wd, label=SHORT[pn])
            ax.set_xticks([x + 0.4 - wd / 2 for x in range(len(tr))])
            ax.set_xticklabels([f"{r['workload']}\nSk={r['Sk']}" for r in tr], fontsize=8)
            ax.set_ylabel("TFLOP/s (dense causal convention)")
            ax.set_title(f"{title}, bf16, {data.get('device', '')}")
            ax.legend(fontsize=8, ncol=4)
        dpeers = ["fdma", "fdma_triton", "fdma_flex", "sdpa_flash", "sdpa_bias", "sdpa_gather", "flex", "fdma+mask"]
        wd = 0.8 / len(dpeers)
        for t, pn in enumerate(dpeers):
            ys = [r.get("fwd_ms", {}).get(pn) or 0 for r in dc]
            axs[2].bar([x + t * wd for x in range(len(dc))], ys, wd, label=SHORT[pn])
        axs[2].set_xticks([x + 0.4 - wd / 2 for x in range(len(dc))])
        axs[2].set_xticklabels([f"Decode Sk={r['Sk']}" for r in dc], fontsize=8)
        if any(r.get("fwd_ms", {}).get(pn) for r in dc for pn in dpeers):
            axs[2].set_yscale("log")
        axs[2].set_ylabel("forward ms (log)")
        axs[2].set_title("decode (Sq=1, W1 w=1024)")
        axs[2].legend(fontsize=8, ncol=4)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    except Exception as e:
        print("plot skipped:", e)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--sizes", default="4096,16384")
    ap.add_argument("--decode-sizes", default="16384,131072")
    ap.add_argument("--w", type=int, default=1024)
    ap.add_argument("--w1c-long", default="65536,131072:2048",
                    help="long W1c rows, last: Sk or Sk:w (w defaults to --w)")
    ap.add_argument("--materialise-max", type=int, default=16384,
                    help="largest W1c Sk at which peers get the materialised (Sq, Sk) selection")
    ap.add_argument("--fdma-only-above", type=int, default=65536, help="W1c rows above this Sk run ours alone")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="skip the torch.compile'd peers (flex, fdma_flex)")
    ap.add_argument("--skip", default="", help="comma list of peers to leave out")
    ap.add_argument("--budget-s", type=float, default=0.0, help="wall-clock budget; 0 = none")
    ap.add_argument("--peer-cap-s", type=float, default=150.0, help="most seconds one peer of one workload may take")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--report", default=None, help="print the table and plot from a bench.json, then exit")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: exercises the control flow only")
    args = ap.parse_args()
    if args.report:
        with open(args.report) as f:
            report(json.load(f), os.path.dirname(os.path.abspath(args.report)))
        return
    args.skip = set(s for s in args.skip.split(",") if s)
    if args.quick:
        args.skip |= {"flex", "fdma_flex"}
    if args.smoke:
        args.skip |= {"flex", "fdma_flex", "fdma_triton", "sdpa_cudnn"}
        if args.sizes == ap.get_default("sizes"):
            args.sizes = "128,192"
        if args.decode_sizes == ap.get_default("decode_sizes"):
            args.decode_sizes = "512"
        if args.w == ap.get_default("w"):
            args.w = 32
        if args.w1c_long == ap.get_default("w1c_long"):
            args.w1c_long = "384,512:64"
        if args.materialise_max == ap.get_default("materialise_max"):
            args.materialise_max = 256
        if args.fdma_only_above == ap.get_default("fdma_only_above"):
            args.fdma_only_above = 384
    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGALRM, _on_alarm)
    ctx = Ctx(args)
    os.makedirs(args.out, exist_ok=True)
    for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):  # one compile per workload shape: never fall back to eager flex
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, max(getattr(torch._dynamo.config, attr), 256))
    try:
        import flash_dmattn
        ctx.fd = flash_dmattn
        if not getattr(flash_dmattn, "CUDA_AVAILABLE", False):
            print("flash_dmattn CUDA backend not available:", getattr(flash_dmattn._lib, "LOAD_ERROR", "?"))
    except Exception as e:
        print("flash_dmattn import failed:", type(e).__name__, e)
    if ctx.dev == "cuda":
        try:
            ctx.gqa = probe_gqa(ctx)
        except Exception as e:
            print("sdpa enable_gqa probe failed:", type(e).__name__, e)
    print("sdpa enable_gqa support:", ctx.gqa, flush=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    dsizes = [int(s) for s in args.decode_sizes.split(",") if s]
    w1c_long = []
    for item in (x for x in args.w1c_long.split(",") if x):
        sk, _, wl_ = item.partition(":")
        w1c_long.append((int(sk), int(wl_) if wl_ else args.w))
    specs = workload_list(sizes, dsizes, args.w, args.smoke, w1c_long, args.fdma_only_above)
    try:
        devname = torch.cuda.get_device_name() if ctx.dev == "cuda" else "cpu (smoke)"
    except Exception as e:
        devname = f"? ({type(e).__name__}: {e})"[:120]
    data = {"device": devname,
            "torch": torch.__version__, "args": {k: (sorted(v) if isinstance(v, set) else v)
                                                 for k, v in vars(args).items()},
            "rows": [], "skipped_workloads": []}
    rows = []
    for sp in specs:
        r = {k: sp[k] for k in ("workload", "kind", "B", "H", "Hkv", "Sq", "Sk", "D", "w", "causal")}
        r.update({"fwd_ms": {}, "bwd_ms": {}})
        rows.append(r)
    data["rows"] = rows
    jpath = os.path.join(args.out, "bench.json")

    def save():
        with open(jpath + ".tmp", "w") as f:
            json.dump(data, f, indent=1, default=str)
        os.replace(jpath + ".tmp", jpath)
    try:
        for pno, peers in enumerate(PASSES):
            peers = [p for p in peers if p not in args.skip]
            if not peers:
                continue
            for i, sp in enumerate(specs):
                tag = f"{sp['workload']} Sk={sp['Sk']} pass {pno + 1}"
                if ctx.left() < 5:
                    data["skipped_workloads"].append(tag)
                    print(f"budget: {ctx.left():.0f} s left, skipping {tag}", flush=True)
                    continue
                t = time.time()
                try:
                    run_workload(sp, rows[i], i, peers, pno, ctx)
                except (Exception, PeerTimeout) as e:
                    rows[i].setdefault("errors", {})[f"pass{pno + 1}"] = f"{type(e).__name__}: {e}"[:300]
                    print(f"{tag}: {type(e).__name__}: {e}", flush=True)
                    ctx.free()
                r = rows[i]
                fl = " ".join(f"{SHORT[p]}={fmt_ms(r['fwd_ms'].get(p))}/{fmt_ms(r['bwd_ms'].get(p))}"
                              for p in peers if p in r["fwd_ms"])
                print(f"{tag} ({time.time() - t:.1f} s, {time.time() - ctx.t0:.0f} s total): {fl}", flush=True)
                save()
    except Interrupted:
        data["interrupted"] = True
        print("interrupted (SIGTERM): writing results so far", flush=True)
    finally:
        _alarm(0)
        data["elapsed_s"] = time.time() - ctx.t0
        save()
    print()
    report(data, args.out)


if __name__ == "__main__":
    main()
