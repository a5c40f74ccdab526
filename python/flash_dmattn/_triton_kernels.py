"""
_triton_kernels.py -- the Triton kernels of the Triton backend (SPEC.md sections 3-5), used by
flash_dmattn_triton.py. Private: the host code there validates inputs and picks block sizes.

Shapes (strides in elements, every stride passed, so any layout works):
  q, out, dout, dq (B, Sq, H, D);  k, v, dk, dv (B, Sk, Hkv, D);  lse, delta (B, H, Sq) fp32 contiguous;
  mask (uint8 view of bool), bias, dbias: 4-D views with dims ({B|1}, {H|Hkv|1}, {Sq|1}, Sk); a broadcast
  dim has stride 0, and head index = h // hdiv (hdiv = 1 for H heads, H/Hkv for Hkv heads; stride 0 for 1).

Algorithm (FlashAttention-2 layout, every kernel recomputes scores through `_scores`):
  _fwd_kernel      one program per (b, h, block of BLOCK_M query rows): online softmax over key blocks,
                   out = sum_j p z/(1-p_drop) v / l, lse = m + log(l); rows with nothing visible: out 0, lse -inf.
  _delta_kernel    delta[i] = dot(dout[i], out[i]) (SPEC section 4 "Di"), from the fp32 out the forward
                   also wrote (out rounded to fp16/bf16 would put its rounding error into every ds of the row).
  _dkdv_kernel     one program per (b, hkv, block of BLOCK_N keys): loops over the H/Hkv query heads of the
                   group and the query blocks, accumulates dk, dv in registers (no atomics: deterministic).
  _dq_kernel       one program per (b, h, query block): loops over key blocks, accumulates dq.
  _dbias_kernel    one program per (bias batch, bias head, query block or all rows, key block): sums
                   ds = p (dp - delta) over every (b, h, i) that reads that bias element, in fp32 registers,
                   and stores it once in the bias dtype; no (B, H, Sq, Sk) scratch.
  _probs_kernel    p = exp(s - lse) at visible entries (return_attn_probs).
  _keep_kernel     the dropout keep bits alone (tests compare them with reference.dropout_keep).
Dropout: SPEC section 5 Philox4x32-10 in uint32 arithmetic with tl.umulhi; key j of row (b*H + h)*Sq + i uses
word j & 3 of the counter (j >> 2, row, offset_lo, offset_hi); kept iff word >= floor(p_drop * 2^32). One
Philox call serves 4 keys. The (seed, offset, threshold) triple is read from an int64[3] device tensor.
Precision: dots accumulate in fp32 (`_mm`); P and dS are rounded to the inputs' dtype before their dots, as
FlashAttention does; softmax, lse, delta and every reduction are fp32.
Interpreter (TRITON_INTERPRET=1, CPU tensors): two interpreter defects are worked around here, and only there:
scalar loop bounds (`_fix_interpreter_scalar_index`) and bf16 (`_mm` mode 2 widens bf16 operands, `_rne`
rounds fp32 -> bf16 to nearest even, since the interpreter multiplies bf16 as integers and truncates casts).
"""
import triton
import triton.language as tl


def _fix_interpreter_scalar_index():
    """Triton 3.6's interpreter holds scalars as 1-element numpy arrays and converts them with int(array),
    which numpy >= 2.4 refuses, so any loop bound computed from program_id fails under TRITON_INTERPRET=1
    (upstream now uses .squeeze()). Convert with .item() instead; compiled kernels are unaffected."""
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor
    if getattr(original, "_fdma_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._fdma_fixed = True
    interpreter._patch_lang_tensor = patched

_PHILOX_M0: tl.constexpr = tl.constexpr(0xD2511F53)
_PHILOX_M1: tl.constexpr = tl.constexpr(0xCD9E8D57)
_PHILOX_W0: tl.constexpr = tl.constexpr(0x9E3779B9)
_PHILOX_W1: tl.constexpr = tl.constexpr(0xBB67AE85)


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """a @ b accumulated in fp32. DOT 0: native (fp16/bf16 tensor cores); 1: fp32 inputs in IEEE fp32 (no TF32);
    2: operands widened to fp32 first (the interpreter mis-multiplies bf16; products of bf16 values are exact
    in fp32, so this matches the tensor-core result up to summation order)."""
    if DOT == 0:
        c = tl.dot(a, b)
    elif DOT == 1:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return c


@triton.jit
def _rne(x, DOT: tl.constexpr):
    """x (fp32) about to be cast to the inputs' dtype. With DOT 2 (bf16 in the interpreter, whose fp32 -> bf16
    cast truncates) round to the nearest even bf16 value by hand first, as the GPU's cast does."""
    if DOT == 2:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _keep_bits(Drop, rows, offs_n):
    """rows [BM] (= (b*H + h)*Sq + i), offs_n [BN] consecutive key indices starting at a multiple of 4
    -> keep [BM, BN] bool (SPEC section 5). One Philox call per 4 keys: its 4 words are keys 4g .. 4g+3."""
    seed = tl.load(Drop)
    offset = tl.load(Drop + 1)
    thresh = tl.load(Drop + 2)
    BM: tl.constexpr = rows.shape[0]
    BN: tl.constexpr = offs_n.shape[0]
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    groups = tl.reshape(offs_n, [BN // 4, 4])
    zero = tl.zeros([BM, BN // 4], dtype=tl.uint32)
    c0 = zero + (tl.min(groups, 1) >> 2).to(tl.uint32)[None, :]
    c1 = zero + (rows.to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)[:, None]
    c2 = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    # interleave to [BM, BN // 4, 4] = (c0, c1, c2, c3) along the last dim, i.e. key 4g + w gets word w
    r = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [BM, BN])
    return r.to(tl.int64) >= thresh


@triton.jit
def _scores(q, k, b, h, offs_m, offs_n, Sq, Sk, scale, softcap,
            Mask, s_mb, s_mh, s_mq, s_mk, mask_hdiv,
            Bias, s_bb, s_bh, s_bq, s_bk, bias_hdiv,
            HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, DOT: tl.constexpr):
    """q [BM, BD], k [BN, BD] -> (s, t): s [BM, BN] fp32 scores after softcap and bias, -inf where not
    visible (out of range, masked, causal); t = tanh(s_pre / softcap) (only meaningful with softcap)."""
    s = _mm(q, tl.trans(k), DOT) * scale
    t = s
    if HAS_SOFTCAP:
        t = 1.0 - 2.0 / (tl.exp(2.0 * (s / softcap)) + 1.0)
        s = softcap * t
    rm = offs_m.to(tl.int64)[:, None]
    cn = offs_n.to(tl.int64)[None, :]
    visible = (offs_m[:, None] < Sq) & (offs_n[None, :] < Sk)
    if IS_CAUSAL:
        visible = visible & (offs_n[None, :] <= offs_m[:, None] + (Sk - Sq))
    if HAS_BIAS:
        bptr = Bias + b * s_bb + (h // bias_hdiv) * s_bh + rm * s_bq + cn * s_bk
        s = s + tl.load(bptr, mask=visible, other=0.0).to(tl.float32)
    if HAS_MASK:
        mptr = Mask + b * s_mb + (h // mask_hdiv) * s_mh + rm * s_mq + cn * s_mk
        visible = visible & (tl.load(mptr, mask=visible, other=0) != 0)
    s = tl.where(visible, s, float("-inf"))
    return s, t


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, Mask, Bias, Drop, Out32,
                s_qb, s_qs, s_qh, s_qd, s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd,
                s_ob, s_os, s_oh, s_od,
                s_mb, s_mh, s_mq, s_mk, mask_hdiv, s_bb, s_bh, s_bq, s_bk, bias_hdiv,
                H, G, Sq, Sk, D, scale, softcap, drop_scale,
                HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
                STORE_F32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """STORE_F32: also write out in fp32 to Out32 (B, Sq, H, D) contiguous, for the backward's delta."""
    n_mblocks = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    bh = (pid // n_mblocks).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    d_ok = offs_d < D
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m.to(tl.int64)[:, None] * s_qs + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_end = Sk
    if IS_CAUSAL:
        n_end = tl.maximum(tl.minimum(Sk, (pid_m + 1) * BLOCK_M + Sk - Sq), 0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Sk)[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * s_ks + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * s_vs + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        s, t = _scores(q, k, b, h, offs_m, offs_n, Sq, Sk, scale, softcap,
                       Mask, s_mb, s_mh, s_mq, s_mk, mask_hdiv, Bias, s_bb, s_bh, s_bq, s_bk, bias_hdiv,
                       HAS_MASK, HAS_BIAS, IS_CAUSAL, HAS_SOFTCAP, DOT)
        # online softmax: a row that has seen only -inf keeps m = -inf; shift by 0 there so exp gives 0, not NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _keep_bits(Drop, bh * Sq + offs_m, offs_n)
            p = tl.where(keep, p * drop_scale, 0.0)
        acc = acc * alpha[:, None] + _mm(_rne(p, DOT).to(v.dtype), v, DOT)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out = tl.where(seen[:, None], out, 0.0)
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(Out + b * s_ob + h * s_oh + offs_m.to(tl.int64)[:, None] * s_os + offs_d[None, :] * s_od,
             _rne(out, DOT).to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + bh * Sq + offs_m, lse, mask=row_ok)
    if STORE_F32:
        tl.store(Out32 + ((b * Sq + offs_m.to(tl.int64)[:, None]) * H + h) * D + offs_d[None, :], out,
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _delta_kernel(Out, dOut, Delta,
                  s_ob, s_os, s_oh, s_od, s_gb, s_gs, s_gh, s_gd,
                  H, Sq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    n_mblocks = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    bh = (pid // n_mblocks).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < Sq)[:, None] & (offs_d < D)[None, :]
    rm = offs_m.to(tl.int64)[:, None]
    o = tl.load(Out + b * s_ob + h * s_oh + rm * s_os + offs_d[None, :] * s_od, mask=msk, other=0.0)
    do = tl.load(dOut + b * s_gb + h * s_gh + rm * s_gs + offs_d[None, :] * s_gd, mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + bh * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _ds_tile(q, k, v, do, lse, delta, b, h, bh, offs_m, offs_n, Sq, Sk, scale, softcap, drop_scale,
             Mask, s_mb, s_mh, s_mq, s_mk, mask_hdiv, Bias, s_bb, s_bh, s_bq, s_bk, bias_hdiv, Drop,
             HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
             HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr):
    """Recompute one (BM, BN) tile of the backward (SPEC section 4). Returns
    pz = p z/(1-p_drop) (for dv), ds = p (dp - delta) (= dbias), dsc = ds with the softcap factor (for dq, dk)."""
    s, t = _scores(q, k, b, h, offs_m, offs_n, Sq, Sk, scale, softcap,
                   Mask, s_mb, s_mh, s_mq, s_mk, mask_hdiv, Bias, s_bb, s_bh, s_bq, s_bk, bias_hdiv,
                   HAS_MASK, HAS_BIAS, IS_CAUSAL, HAS_SOFTCAP, DOT)
    lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
    p = tl.exp(s - lse_safe[:, None])
    dp = _mm(do, tl.trans(v), DOT)
    pz = p
    if HAS_DROPOUT:
        zs = tl.where(_keep_bits(Drop, bh * Sq + offs_m, offs_n), drop_scale, 0.0)
        pz = p * zs
        dp = dp * zs
    ds = p * (dp - delta[:, None])
    dsc = ds
    if HAS_SOFTCAP:
        dsc = ds * (1.0 - t * t)
    return pz, ds, dsc


@triton.jit
def _dkdv_kernel(Q, K, V, dOut, Lse, Delta, dK, dV, Mask, Bias, Drop,
                 s_qb, s_qs, s_qh, s_qd, s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd,
                 s_gb, s_gs, s_gh, s_gd, s_dkb, s_dks, s_dkh, s_dkd, s_dvb, s_dvs, s_dvh, s_dvd,
                 s_mb, s_mh, s_mq, s_mk, mask_hdiv, s_bb, s_bh, s_bq, s_bk, bias_hdiv,
                 H, Hkv, G, Sq, Sk, D, scale, softcap, drop_scale,
                 HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n_nblocks = tl.cdiv(Sk, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_nblocks
    bhk = (pid // n_nblocks).to(tl.int64)
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n < Sk)[:, None] & d_ok[None, :]
    cn = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + b * s_kb + hk * s_kh + cn * s_ks + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * s_vb + hk * s_vh + cn * s_vs + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_start = 0
    if IS_CAUSAL:
        m_start = tl.maximum(pid_n * BLOCK_N - (Sk - Sq), 0)
        m_start = (m_start // BLOCK_M) * BLOCK_M
    for hh in range(0, G):
        h = hk * G + hh
        bh = b * H + h
        for start_m in range(m_start, Sq, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < Sq
            qd_mask = row_ok[:, None] & d_ok[None, :]
            rm = offs_m.to(tl.int64)[:, None]
            q = tl.load(Q + b * s_qb + h * s_qh + rm * s_qs + offs_d[None, :] * s_qd, mask=qd_mask, other=0.0)
            do = tl.load(dOut + b * s_gb + h * s_gh + rm * s_gs + offs_d[None, :] * s_gd, mask=qd_mask, other=0.0)
            lse = tl.load(Lse + bh * Sq + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(Delta + bh * Sq + offs_m, mask=row_ok, other=0.0)
            pz, ds, dsc = _ds_tile(q, k, v, do, lse, delta, b, h, bh, offs_m, offs_n, Sq, Sk, scale, softcap,
                                   drop_scale, Mask, s_mb, s_mh, s_mq, s_mk, mask_hdiv,
                                   Bias, s_bb, s_bh, s_bq, s_bk, bias_hdiv, Drop,
                                   HAS_MASK, HAS_BIAS, IS_CAUSAL, HAS_SOFTCAP, HAS_DROPOUT, DOT)
            dv += _mm(tl.trans(_rne(pz, DOT).to(do.dtype)), do, DOT)
            dk += _mm(tl.trans(_rne(dsc, DOT).to(q.dtype)), q, DOT)
    dk = dk * scale
    tl.store(dK + b * s_dkb + hk * s_dkh + cn * s_dks + offs_d[None, :] * s_dkd,
             _rne(dk, DOT).to(dK.dtype.element_ty), mask=kv_mask)
    tl.store(dV + b * s_dvb + hk * s_dvh + cn * s_dvs + offs_d[None, :] * s_dvd,
             _rne(dv, DOT).to(dV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kernel(Q, K, V, dOut, Lse, Delta, dQ, Mask, Bias, Drop,
               s_qb, s_qs, s_qh, s_qd, s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd,
               s_gb, s_gs, s_gh, s_gd, s_dqb, s_dqs, s_dqh, s_dqd,
               s_mb, s_mh, s_mq, s_mk, mask_hdiv, s_bb, s_bh, s_bq, s_bk, bias_hdiv,
               H, G, Sq, Sk, D, scale, softcap, drop_scale,
               HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    n_mblocks = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_mblocks
    bh = (pid // n_mblocks).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Sq
    d_ok = offs_d < D
    qd_mask = row_ok[:, None] & d_ok[None, :]
    rm = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * s_qb + h * s_qh + rm * s_qs + offs_d[None, :] * s_qd, mask=qd_mask, other=0.0)
    do = tl.load(dOut + b * s_gb + h * s_gh + rm * s_gs + offs_d[None, :] * s_gd, mask=qd_mask, other=0.0)
    lse = tl.load(Lse + bh * Sq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(Delta + bh * Sq + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_end = Sk
    if IS_CAUSAL:
        n_end = tl.maximum(tl.minimum(Sk, (pid_m + 1) * BLOCK_M + Sk - Sq), 0)
    for start_n in range(0, n_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Sk)[:, None] & d_ok[None, :]
        cn = offs_n.to(tl.int64)[:, None]
        k = tl.load(K + b * s_kb + hk * s_kh + cn * s_ks + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(V + b * s_vb + hk * s_vh + cn * s_vs + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        pz, ds, dsc = _ds_tile(q, k, v, do, lse, delta, b, h, bh, offs_m, offs_n, Sq, Sk, scale, softcap,
                               drop_scale, Mask, s_mb, s_mh, s_mq, s_mk, mask_hdiv,
                               Bias, s_bb, s_bh, s_bq, s_bk, bias_hdiv, Drop,
                               HAS_MASK, HAS_BIAS, IS_CAUSAL, HAS_SOFTCAP, HAS_DROPOUT, DOT)
        dq += _mm(_rne(dsc, DOT).to(k.dtype), k, DOT)
    dq = dq * scale
    tl.store(dQ + b * s_dqb + h * s_dqh + rm * s_dqs + offs_d[None, :] * s_dqd,
             _rne(dq, DOT).to(dQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dbias_kernel(Q, K, V, dOut, Lse, Delta, dBias, Mask, Bias, Drop,
                  s_qb, s_qs, s_qh, s_qd, s_kb, s_ks, s_kh, s_kd, s_vb, s_vs, s_vh, s_vd,
                  s_gb, s_gs, s_gh, s_gd, s_db, s_dh, s_dq, s_dk,
                  s_mb, s_mh, s_mq, s_mk, mask_hdiv, s_bb, s_bh, s_bq, s_bk, bias_hdiv,
                  B, H, G, Sq, Sk, D, Bb, Hb, scale, softcap, drop_scale,
                  HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT: tl.constexpr,
                  REDUCE_Q: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dBias has the bias's own shape (Bb, Hb, Sq or 1, Sk). Program = (bias b, bias h, query block, key block);
    it sums ds over b in [bb, bb + B/Bb), h in [hb*H/Hb, (hb+1)*H/Hb) and, with REDUCE_Q, over all rows."""
    n_nblocks = tl.cdiv(Sk, BLOCK_N)
    n_mblocks = tl.cdiv(Sq, BLOCK_M)
    if REDUCE_Q:
        n_mblocks = 1
    pid = tl.program_id(0)
    pid_n = pid % n_nblocks
    pid_m = (pid // n_nblocks) % n_mblocks
    bbh = (pid // (n_nblocks * n_mblocks)).to(tl.int64)
    bb = bbh // Hb
    hb = bbh % Hb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = (offs_n < Sk)[:, None] & d_ok[None, :]
    cn = offs_n.to(tl.int64)[:, None]
    heads_per = H // Hb
    m_lo = pid_m * BLOCK_M
    m_hi = m_lo + 1
    if REDUCE_Q:
        m_hi = Sq
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for b in range(bb, bb + B // Bb):
        for h in range(hb * heads_per, (hb + 1) * heads_per):
            hk = h // G
            bh = b * H + h
            k = tl.load(K + b * s_kb + hk * s_kh + cn * s_ks + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
            v = tl.load(V + b * s_vb + hk * s_vh + cn * s_vs + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                row_ok = offs_m < Sq
                qd_mask = row_ok[:, None] & d_ok[None, :]
                rm = offs_m.to(tl.int64)[:, None]
                q = tl.load(Q + b * s_qb + h * s_qh + rm * s_qs + offs_d[None, :] * s_qd, mask=qd_mask, other=0.0)
                do = tl.load(dOut + b * s_gb + h * s_gh + rm * s_gs + offs_d[None, :] * s_gd,
                             mask=qd_mask, other=0.0)
                lse = tl.load(Lse + bh * Sq + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(Delta + bh * Sq + offs_m, mask=row_ok, other=0.0)
                pz, ds, dsc = _ds_tile(q, k, v, do, lse, delta, b, h, bh, offs_m, offs_n, Sq, Sk, scale, softcap,
                                       drop_scale, Mask, s_mb, s_mh, s_mq, s_mk, mask_hdiv,
                                       Bias, s_bb, s_bh, s_bq, s_bk, bias_hdiv, Drop,
                                       HAS_MASK, True, IS_CAUSAL, HAS_SOFTCAP, HAS_DROPOUT, DOT)
                acc += ds
    dptr = dBias + bb * s_db + hb * s_dh + offs_n.to(tl.int64)[None, :] * s_dk
    if REDUCE_Q:
        tl.store(dptr + tl.zeros([1, BLOCK_N], dtype=tl.int64), _rne(tl.sum(acc, 0)[None, :], DOT).to(dBias.dtype.element_ty),
                 mask=(offs_n < Sk)[None, :])
    else:
        offs_m = m_lo + tl.arange(0, BLOCK_M)
        tl.store(dptr + offs_m.to(tl.int64)[:, None] * s_dq, _rne(acc, DOT).to(dBias.dtype.element_ty),
                 mask=(offs_m < Sq)[:, None] & (offs_n < Sk)[None, :])


@triton.jit
def _probs_kernel(Q, K, Lse, P, Mask, Bias,
                  s_qb, s_qs, s_qh, s_qd, s_kb, s_ks, s_kh, s_kd,
                  s_mb, s_mh, s_mq, s_mk, mask_hdiv, s_bb, s_bh, s_bq, s_bk, bias_hdiv,
                  H, G, Sq, Sk, D, scale, softcap,
                  HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, DOT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """P (B, H, Sq, Sk) contiguous: p = exp(s - lse) at visible entries, 0 elsewhere (before dropout)."""
    n_nblocks = tl.cdiv(Sk, BLOCK_N)
    n_mblocks = tl.cdiv(Sq, BLOCK_M)
    pid = tl.program_id(0)
    pid_n = pid % n_nblocks
    pid_m = (pid // n_nblocks) % n_mblocks
    bh = (pid // (n_nblocks * n_mblocks)).to(tl.int64)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    rm = offs_m.to(tl.int64)[:, None]
    cn = offs_n.to(tl.int64)[:, None]
    q = tl.load(Q + b * s_qb + h * s_qh + rm * s_qs + offs_d[None, :] * s_qd,
                mask=(offs_m < Sq)[:, None] & d_ok[None, :], other=0.0)
    k = tl.load(K + b * s_kb + hk * s_kh + cn * s_ks + offs_d[None, :] * s_kd,
                mask=(offs_n < Sk)[:, None] & d_ok[None, :], other=0.0)
    s, t = _scores(q, k, b, h, offs_m, offs_n, Sq, Sk, scale, softcap,
                   Mask, s_mb, s_mh, s_mq, s_mk, mask_hdiv, Bias, s_bb, s_bh, s_bq, s_bk, bias_hdiv,
                   HAS_MASK, HAS_BIAS, IS_CAUSAL, HAS_SOFTCAP, DOT)
    lse = tl.load(Lse + bh * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    p = tl.exp(s - tl.where(lse == float("-inf"), 0.0, lse)[:, None])
    tl.store(P + (bh * Sq + rm) * Sk + offs_n.to(tl.int64)[None, :], _rne(p, DOT).to(P.dtype.element_ty),
             mask=(offs_m < Sq)[:, None] & (offs_n < Sk)[None, :])


@triton.jit
def _keep_kernel(Z, Drop, n_rows, Sk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Z (n_rows, Sk) uint8 contiguous, n_rows = B*H*Sq: the dropout keep bit of every (row, key)."""
    n_nblocks = tl.cdiv(Sk, BLOCK_N)
    pid = tl.program_id(0)
    offs_m = (pid // n_nblocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % n_nblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_bits(Drop, offs_m, offs_n)
    tl.store(Z + offs_m[:, None] * Sk + offs_n[None, :], keep.to(tl.uint8),
             mask=(offs_m < n_rows)[:, None] & (offs_n < Sk)[None, :])


def _interpreting():
    """True when triton.jit produced interpreted kernels (TRITON_INTERPRET=1 at import): CPU tensors."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_fwd_kernel, InterpretedFunction)


if _interpreting():
    _fix_interpreter_scalar_index()
