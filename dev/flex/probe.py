"""
probe.py -- GPU probe for issue 6: the Flex backend (torch.compile'd flex_attention, torch 2.11 / triton 3.6)
forward+backward at the shapes where Inductor failed, run through variants so that the cause shows.

Each variant runs in its own subprocess with a timeout (an Inductor crash or hang stops that variant only);
up to --jobs run at once. One line per variant as it finishes, then a summary table:
  PASS (ran, every error within tolerance) / WRONG (ran, some error too large) / FAIL (exception) /
  TIMEOUT / CRASH (child died without a result), the first line of the error (and the line naming the cause,
  when the traceback has one), max |x - ref| for out, dq, dk, dv, dbias against an eager float64 reference
  (relative to max |ref| in the table), and the compiled forward+backward time where it ran.

Configurations (q (B, Sq, H, D); k, v (B, Sk, Hkv, D); causal, bottom-right aligned):
  T  tests/python/test_flex.py::test_gpu_forward_backward[2-113-257-4-2-64-*]: B=2, Sq=113, Sk=257, H=4,
     Hkv=2, D=64, fp16 (bf16 in t_*_bf16); mask (B, 1, Sq, Sk) (30 % masked, row Sq//2 and keys < Sk//3
     empty); bias (B, Hkv, 1, Sk) requiring grad.  Inductor raised NoValidChoicesError there.
  E  the same failure at other numbers: B=1, Sq=65, Sk=300, H=8, Hkv=2 (Sq * G = 260 > 128), D=64, fp16;
     e_sq32 has Sq * G = 128 (flex decoding still taken, and fine).
  W  bench W2 at 4096: B=1, H=16, Hkv=4, Sq=Sk=4096, D=128, bf16; bias (1, Hkv, Sq, Sk) requiring grad; mask
     (1, Hkv, Sq, Sk) keeping ~1/4 of the keys.  Backward: 'out of resource: shared memory, Required 245760,
     Hardware limit 232448' on the H200.

Variants (t_* on T, e_* on E, w_* on W). 'module' = flash_dmattn_flex.flex_attention_core as the tests call it
(its current defaults); 'legacy' = the same with FDMA_FLEX_LEGACY=1 (no issue-6 kernel_options). The other
variants rebuild the module's compiled call here from its own pieces (_make_mods, _block_mask), changing one
thing (kernel_options None unless named):
  bias_h       bias repeat_interleave'd to H query heads (its gradient sums back through autograd), so the
               score_mod reads bias[b, h, 0, j]: no h // g in the captured-buffer index
  kv_expand    k, v repeat_interleave'd to H heads, enable_gqa=False (bias still read at h // g)
  pad128       Sq, Sk padded up to multiples of 128 (zeros), the padding masked out, outputs sliced
  torch_bm     BlockMask from torch's create_block_mask instead of the module's tile construction
  kopt_small   kernel_options bwd BLOCK_M1 = N1 = M2 = N2 = 32, bwd_num_stages = 1, bwd_num_warps = 4
  write_dq0    kernel_options WRITE_DQ=False (captured-buffer gradient scattered in the dK/dV loop)
  force_flex   kernel_options FORCE_USE_FLEX_ATTENTION (main kernel instead of flex decoding for Sq < 128)
  no_mask      no mask (causal and bias only)        nograd_bias  bias not requiring grad
  b1           B = 1 (bias index without b)
  w_st2 / w_st1  bwd_num_stages = 2 / 1     w_blk64  bwd BLOCK_* = 64, bwd_num_warps = 4
               (torch 2.11's sm90 backward default: BLOCK (64, 128, 128, 64), 3 stages, 8 warps)
  w_biasonly[_st2]   full bias, no mask          w_maskonly[_st2]  bias (1, Hkv, 1, Sk), full mask
  w_d64              W at D = 64, defaults

  PYTHONPATH=python python dev/flex/probe.py [--only NAME,...] [--jobs N] [--timeout S] [--deadline S]
                                               [--logdir DIR] [--list]
Needs a CUDA GPU and torch >= 2.5 (written for 2.11); no libflashdma.so. The full stderr of each variant
goes to --logdir/NAME.log (default /tmp/flex_probe_logs). Designed to end in < 4 min on one H100 (children
compile in parallel, TORCHINDUCTOR_COMPILE_THREADS=1 in each; --deadline stops what is left).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))

# name -> (configuration, runner, options)
VARIANTS = {
    "t_module":      ("T", "module", {}),
    "t_legacy":      ("T", "module", {"legacy": True}),
    "t_module_bf16": ("T", "module", {"dtype": "bf16"}),
    "t_legacy_bf16": ("T", "module", {"legacy": True, "dtype": "bf16"}),
    "t_bias_h":      ("T", "probe", {"bias_h": True}),
    "t_kv_expand":   ("T", "probe", {"kv_expand": True}),
    "t_pad128":      ("T", "probe", {"pad": True}),
    "t_torch_bm":    ("T", "probe", {"bm": "torch"}),
    "t_kopt_small":  ("T", "probe", {"kopts": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 32, "bwd_BLOCK_M2": 32,
                                               "bwd_BLOCK_N2": 32, "bwd_num_stages": 1, "bwd_num_warps": 4}}),
    "t_write_dq0":   ("T", "probe", {"kopts": {"WRITE_DQ": False}}),
    "t_force_flex":  ("T", "probe", {"kopts": {"FORCE_USE_FLEX_ATTENTION": True}}),
    "t_no_mask":     ("T", "probe", {"no_mask": True}),
    "t_nograd_bias": ("T", "probe", {"bias_grad": False}),
    "t_b1":          ("T", "probe", {"B": 1}),
    "e_module":      ("E", "module", {}),
    "e_legacy":      ("E", "module", {"legacy": True}),
    "e_sq32":        ("E", "module", {"Sq": 32}),
    "w_module":      ("W", "module", {}),
    "w_legacy":      ("W", "module", {"legacy": True}),
    "w_st2":         ("W", "probe", {"kopts": {"bwd_num_stages": 2}}),
    "w_st1":         ("W", "probe", {"kopts": {"bwd_num_stages": 1}}),
    "w_blk64":       ("W", "probe", {"kopts": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                                               "bwd_BLOCK_N2": 64, "bwd_num_warps": 4}}),
    "w_biasonly":    ("W", "probe", {"no_mask": True}),
    "w_biasonly_st2": ("W", "probe", {"no_mask": True, "kopts": {"bwd_num_stages": 2}}),
    "w_maskonly":    ("W", "probe", {"bias_rows": "1"}),
    "w_maskonly_st2": ("W", "probe", {"bias_rows": "1", "kopts": {"bwd_num_stages": 2}}),
    "w_d64":         ("W", "probe", {"D": 64}),
}

CONFIGS = {
    "T": dict(B=2, Sq=113, Sk=257, H=4, Hkv=2, D=64, dtype="fp16", bias_rows="1", mask_heads="1", causal=True),
    "E": dict(B=1, Sq=65, Sk=300, H=8, Hkv=2, D=64, dtype="fp16", bias_rows="1", mask_heads="1", causal=True),
    "W": dict(B=1, Sq=4096, Sk=4096, H=16, Hkv=4, D=128, dtype="bf16", bias_rows="Sq", mask_heads="Hkv",
              causal=True),
}
TOL = {"fp16": 2e-2, "bf16": 4e-2, "fp32": 1e-3}     # max|x - ref| / max|ref| for PASS


# ---------------------------------------------------------------------------------------------------------
# Child: one variant.

def _hooks(notes):
    """Record what Inductor hides: template choices dropped by maybe_append_choice (NotImplementedError) or by
    generate (None after a ZeroDivisionError while rendering), with the tracebacks' last frames."""
    try:
        from torch._inductor import select_algorithm as SA
    except Exception as e:                                       # pragma: no cover - older torch
        notes.append(f"hooks unavailable: {e}")
        return

    def wrap_raise(cls, name, what):
        orig = getattr(cls, name, None)
        if orig is None:
            return

        def f(*a, **kw):
            try:
                return orig(*a, **kw)
            except (ZeroDivisionError, NotImplementedError) as e:
                tb = traceback.format_exc().strip().splitlines()
                notes.append(f"{what} raised {type(e).__name__}: {e} | " + " / ".join(tb[-7:]))
                raise
        setattr(cls, name, f)

    wrap_raise(SA.TritonTemplateKernel, "render", "TritonTemplateKernel.render")
    if hasattr(SA, "PartialRender"):
        wrap_raise(SA.PartialRender, "finalize_all", "PartialRender.finalize_all")

    orig_append = SA.TritonTemplate.maybe_append_choice

    def append(self, choices, **kw):
        n = len(choices)
        err = orig_append(self, choices, **kw)
        if err is not None:
            notes.append(f"maybe_append_choice({getattr(self, 'name', '?')}) dropped a choice: {err}")
        elif len(choices) == n:
            opts = {k: kw.get(k) for k in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "num_stages",
                                           "num_warps", "BLOCK_M", "BLOCK_N") if k in kw}
            notes.append(f"maybe_append_choice({getattr(self, 'name', '?')}) added nothing (generate returned "
                         f"None) for {opts}")
        return err
    SA.TritonTemplate.maybe_append_choice = append


def _dtype(torch, name):
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def make_inputs(torch, cfg, opts):
    """q, k, v (leaves), mask, bias (leaf), dout on cuda, for the configuration cfg (variant overrides applied)."""
    B, Sq, Sk, H, Hkv, D = (cfg[x] for x in ("B", "Sq", "Sk", "H", "Hkv", "D"))
    dt = _dtype(torch, cfg["dtype"])
    g = torch.Generator(device="cpu").manual_seed(10)
    dev = "cuda"
    q = torch.randn(B, Sq, H, D, generator=g).to(dt).to(dev).requires_grad_()
    k = torch.randn(B, Sk, Hkv, D, generator=g).to(dt).to(dev).requires_grad_()
    v = torch.randn(B, Sk, Hkv, D, generator=g).to(dt).to(dev).requires_grad_()
    mh = {"1": 1, "Hkv": Hkv, "H": H}[cfg["mask_heads"]]
    if cfg["mask_heads"] == "1":                                 # test_gpu_forward_backward's mask
        mask = torch.rand(B, 1, Sq, Sk, generator=g) > 0.3
        mask[:, :, Sq // 2] = False
        mask[:, :, :, : Sk // 3] = False
    else:                                                        # W2-like: ~1/4 of the keys kept per row
        mask = torch.rand(B, mh, Sq, Sk, generator=g) > 0.75
    mask = mask.to(dev)
    rows = 1 if cfg["bias_rows"] == "1" else Sq
    bias = (torch.randn(B, Hkv, rows, Sk, generator=g) * 2).to(dt).to(dev)
    if opts.get("bias_grad", True):
        bias.requires_grad_()
    if opts.get("no_mask"):
        mask = None
    dout = torch.randn(B, Sq, H, D, generator=g).to(dt).to(dev)
    return q, k, v, mask, bias, dout


def reference(torch, q, k, v, mask, bias, causal, scale, dout):
    """Eager float64, one query head at a time (W's (Sq, Sk) scores stay small): out and the grads of q, k, v
    and bias (in bias's shape). A row with no visible key: out 0, grads 0."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    g = H // Hkv
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    bd = bias.detach().double().requires_grad_() if bias is not None else None
    out = torch.empty(B, Sq, H, D, dtype=torch.float64, device=q.device)
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    caus = j <= i + (Sk - Sq)

    def pick(n, h):
        return h if n == H else (h // g if n > 1 else 0)

    for h in range(H):
        hk = h // g
        s = scale * torch.einsum("bqd,bkd->bqk", qd[:, :, h], kd[:, :, hk])
        if bd is not None:
            s = s + bd[:, pick(bd.shape[1], h)]
        vis = torch.ones(1, Sq, Sk, dtype=torch.bool, device=q.device)
        if mask is not None:
            vis = vis & mask[:, pick(mask.shape[1], h)]
        if causal:
            vis = vis & caus
        s = s.masked_fill(~vis, -math.inf)
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        den = e.sum(-1, keepdim=True)
        p = e / torch.where(den > 0, den, torch.ones_like(den))
        o = torch.einsum("bqk,bkd->bqd", p, vd[:, :, hk])
        o.backward(dout[:, :, h].double())
        out[:, :, h] = o.detach()
    res = {"out": out, "dq": qd.grad, "dk": kd.grad, "dv": vd.grad}
    if bd is not None and bias.requires_grad:
        res["dbias"] = bd.grad
    return res


_COMPILED = None


def probe_core(torch, FX, q4, k4, v4, mask, bias, causal, scale, opts):
    """The module's _run_compiled rebuilt with one change (opts): bias_h, kv_expand, pad, bm='torch', kopts.
    Shapes as flex_attention_core; returns out (B, Sq, H, D)."""
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    B, Sq, H, D = q4.shape
    Sk, Hkv = k4.shape[1], k4.shape[2]
    g = H // Hkv
    q, k, v = q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2)
    Hk = Hkv
    if opts.get("kv_expand") and g > 1:
        k, v, Hk = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1), H
    if bias is not None and opts.get("bias_h") and bias.shape[1] == Hkv and g > 1:
        bias = bias.repeat_interleave(g, dim=1)
    Sq0, Sk0, causal0 = Sq, Sk, causal
    if opts.get("pad"):
        Sq, Sk = -(-Sq // 128) * 128, -(-Sk // 128) * 128
        q = F.pad(q, (0, 0, 0, Sq - Sq0))
        k = F.pad(k, (0, 0, 0, Sk - Sk0))
        v = F.pad(v, (0, 0, 0, Sk - Sk0))
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        vis = (i < Sq0) & (j < Sk0)
        if causal0:
            vis = vis & (j <= i + (Sk0 - Sq0))
        vis = vis[None, None]
        if mask is not None:
            mp = torch.zeros(mask.shape[0], mask.shape[1], Sq, Sk, dtype=torch.bool, device=q.device)
            mp[:, :, :Sq0, :Sk0] = mask
            vis = vis & mp
        mask, causal = vis, False
        if bias is not None:
            rows = bias.shape[2]
            bias = F.pad(bias, (0, Sk - Sk0, 0, (Sq - Sq0) if rows > 1 else 0))
    # the bias / mask head maps keep the caller's Hkv; only flex's enable_gqa sees the expanded k / v
    score_mod, mask_mod = FX._make_mods(None if bias is None else tuple(bias.shape),
                                        None if mask is None else tuple(mask.shape), H, Hkv, Sq, Sk, causal, 0.0)
    bm = None
    if mask is not None:
        def mm(b, h, i, j):
            return mask_mod(b, h, i, j, mask)
        if opts.get("bm") == "torch":
            bm = create_block_mask(mm, mask.shape[0], None if mask.shape[1] == 1 else H, Sq, Sk, device=q.device)
        else:
            bm = FX._block_mask(mask, causal, Sq, Sk, H, Hkv, q.device, mm)
    elif causal:
        if opts.get("bm") == "torch":
            off = Sk - Sq

            def cm(b, h, i, j):
                return j <= i + off
            bm = create_block_mask(cm, None, None, Sq, Sk, device=q.device)
        else:
            bm = FX._causal_block_mask(Sq, Sk, q.device)
    sm = None
    if bias is not None:
        def sm(score, b, h, i, j):
            return score_mod(score, b, h, i, j, bias)
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(flex_attention, dynamic=False)
    fn = _COMPILED
    out, aux = fn(q, k, v, score_mod=sm, block_mask=bm, scale=scale, enable_gqa=(H != Hk),
                  return_aux=AuxRequest(lse=True), kernel_options=opts.get("kopts"))
    out = torch.where(torch.isneginf(aux.lse).unsqueeze(-1), out.new_zeros(()), out)
    return out[:, :, :Sq0].transpose(1, 2)


def child(name):
    notes = []
    res = {"name": name, "status": "FAIL", "err": "", "cause": "", "errs": {}, "refmax": {}, "ms": None,
           "notes": notes}
    cfg_name, runner, opts = VARIANTS[name]
    cfg = {**CONFIGS[cfg_name], **{k: v for k, v in opts.items() if k in CONFIGS[cfg_name]}}
    if opts.get("legacy"):
        os.environ["FDMA_FLEX_LEGACY"] = "1"
    import torch
    sys.path.insert(0, os.path.join(ROOT, "python"))
    from flash_dmattn import flash_dmattn_flex as FX
    _hooks(notes)
    res["torch"] = torch.__version__
    res["device"] = torch.cuda.get_device_name()
    q, k, v, mask, bias, dout = make_inputs(torch, cfg, opts)
    scale = 1.0 / math.sqrt(cfg["D"])
    causal = cfg["causal"]
    leaves = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])

    def fwd():
        if runner == "module":
            return FX.flex_attention_core(q, k, v, mask, bias, scale, causal, 0.0, None)[0]
        return probe_core(torch, FX, q, k, v, mask, bias, causal, scale, opts)

    t0 = time.time()
    try:
        out = fwd()
        grads = torch.autograd.grad(out, leaves, dout)
        torch.cuda.synchronize()
    except BaseException as e:
        text = traceback.format_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        res["err"] = f"{type(e).__name__}: {first}"[:300]
        frames = re.findall(r'File "[^"]*/_inductor/(kernel/[^"]*|select_algorithm\.py)", line (\d+), in (\w+)', text)
        kernel_frames = [f for f in frames if f[0].startswith("kernel/")]
        if kernel_frames:                                        # where Inductor's lowering gave up
            f = kernel_frames[-1]
            res["cause"] = f"raised in torch/_inductor/{f[0]}:{f[1]} {f[2]}()"
        sys.stderr.write(text)
        res["compile_s"] = round(time.time() - t0, 1)
        return res
    res["compile_s"] = round(time.time() - t0, 1)
    with _gpu_turn():
        _check_and_time(torch, res, cfg, fwd, leaves, out, grads, q, k, v, mask, bias, causal, scale, dout)
    return res


class _gpu_turn:
    """The GPU work after compiling (reference, timing) one variant at a time across the children, so that
    the timings are not taken while another variant runs (compiles, on the CPU, still overlap)."""

    def __enter__(self):
        import fcntl
        self.f = open(os.environ.get("FLEX_PROBE_LOCK", "/tmp/flex_probe.lock"), "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        self.f.close()
        return False


def _check_and_time(torch, res, cfg, fwd, leaves, out, grads, q, k, v, mask, bias, causal, scale, dout):
    notes = res["notes"]
    got = {"out": out.detach(), "dq": grads[0], "dk": grads[1], "dv": grads[2]}
    if len(grads) > 3:
        got["dbias"] = grads[3]
    ref = reference(torch, q, k, v, mask, bias, causal, scale, dout)
    ok = True
    tol = TOL[cfg["dtype"]]
    for key, x in got.items():
        r = ref[key]
        if x.shape != r.shape:
            res["errs"][key] = float("nan")
            notes.append(f"{key}: shape {tuple(x.shape)} != reference {tuple(r.shape)}")
            ok = False
            continue
        e = (x.double() - r).abs().max().item()
        m = r.abs().max().item()
        res["errs"][key], res["refmax"][key] = e, m
        if not (e <= tol * max(m, 1e-6)):
            ok = False
    # compiled forward + backward time (already compiled above)
    for _ in range(2):
        o = fwd()
        torch.autograd.grad(o, leaves, dout)
    torch.cuda.synchronize()
    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    n = 5
    ev0.record()
    for _ in range(n):
        o = fwd()
        torch.autograd.grad(o, leaves, dout)
    ev1.record()
    torch.cuda.synchronize()
    res["ms"] = ev0.elapsed_time(ev1) / n
    res["status"] = "PASS" if ok else "WRONG"


# ---------------------------------------------------------------------------------------------------------
# Parent: run the variants, print lines and the table.

def _fmt_line(r):
    errs = " ".join(f"{k}={v:.1e}" for k, v in r.get("errs", {}).items())
    t = f" fwd+bwd {r['ms']:.2f} ms" if r.get("ms") is not None else ""
    c = f" compile+run {r['compile_s']} s" if r.get("compile_s") is not None else ""
    line = f"[{r['status']:7s}] {r['name']:14s}{c}{t} {errs}"
    if r.get("err"):
        line += f"\n          error: {r['err']}"
    if r.get("cause"):
        line += f"\n          cause: {r['cause']}"
    for n_ in r.get("notes", [])[:4]:
        line += f"\n          note:  {n_[:600]}"
    return line


def parent(args):
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    unknown = [n for n in (args.only.split(",") if args.only else []) if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; --list shows them")
    os.makedirs(args.logdir, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("FDMA_FLEX_LEGACY", None)
    env["FLEX_PROBE_LOCK"] = os.path.join(args.logdir, "gpu.lock")
    t_start = time.time()
    results, lock = {}, threading.Lock()
    queue = list(names)
    procs = {}

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                name = queue.pop(0)
            left = args.deadline - (time.time() - t_start)
            if left < 5:
                r = {"name": name, "status": "SKIPPED", "err": "no time left before --deadline"}
            else:
                log = open(os.path.join(args.logdir, f"{name}.log"), "w")
                p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", name], env=env,
                                     stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
                with lock:
                    procs[name] = p
                try:
                    so, _ = p.communicate(timeout=min(args.timeout, left))
                    line = [x for x in so.splitlines() if x.startswith("RESULT ")]
                    if line:
                        r = json.loads(line[-1][7:])
                    else:
                        r = {"name": name, "status": "CRASH", "err": f"exit {p.returncode}, no result "
                             f"(see {log.name})"}
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
                    p.communicate()
                    r = {"name": name, "status": "TIMEOUT", "err": f"killed after {min(args.timeout, left):.0f} s"}
                log.close()
            with lock:
                results[name] = r
                print(_fmt_line(r), flush=True)

    print(f"flex probe: {len(names)} variants, {args.jobs} at a time, timeout {args.timeout} s each, "
          f"deadline {args.deadline} s; logs in {args.logdir}", flush=True)
    threads = [threading.Thread(target=worker) for _ in range(args.jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    first = next((r for r in results.values() if r.get("torch")), {})
    print(f"\n==== summary ({first.get('device', '?')}, torch {first.get('torch', '?')}, "
          f"{time.time() - t_start:.0f} s) ====")
    print("err = max|x - ref| / max|ref| against float64; ms = compiled forward+backward (mean of 5, one "
          "variant on the GPU at a time)")
    print(f"{'variant':14s} {'status':7s} {'out':>8s} {'dq':>8s} {'dk':>8s} {'dv':>8s} {'dbias':>8s} {'ms':>8s}  "
          f"error")
    for name in names:
        r = results.get(name, {"status": "?"})
        cols = []
        for key in ("out", "dq", "dk", "dv", "dbias"):
            e, m = r.get("errs", {}).get(key), r.get("refmax", {}).get(key)
            cols.append(f"{e / max(m, 1e-30):8.1e}" if e is not None and m is not None else f"{'-':>8s}")
        ms = f"{r['ms']:8.2f}" if r.get("ms") is not None else f"{'-':>8s}"
        why = (r.get("cause") or r.get("err") or "")[:110]
        print(f"{name:14s} {r['status']:7s} {' '.join(cols)} {ms}  {why}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    ap.add_argument("--timeout", type=float, default=200.0, help="seconds per variant")
    ap.add_argument("--deadline", type=float, default=225.0, help="seconds for the whole probe")
    ap.add_argument("--logdir", default="/tmp/flex_probe_logs", help="full stderr of each variant")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.list:
        for n, (c, r, o) in VARIANTS.items():
            print(f"{n:14s} config {c}  {r:6s} {o}")
        return 0
    if args.child:
        try:
            r = child(args.child)
        except BaseException as e:                              # probe bug: still report one line
            traceback.print_exc()
            r = {"name": args.child, "status": "FAIL", "err": f"probe: {type(e).__name__}: {e}"[:300]}
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
