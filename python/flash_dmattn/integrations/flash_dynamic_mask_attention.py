"""
flash_dynamic_mask_attention.py -- flash-dmattn as a Hugging Face transformers attention implementation.

    flash_dynamic_mask_attention_forward(module, query, key, value, attention_mask, attention_bias=None,
                                         scaling=None, softcap=None, **kwargs) -> (out, None)

Shapes (transformers' head-first layout): query (B, H, Sq, D); key, value (B, Hkv, Sk, D); out (B, Sq, H, D),
the layout transformers' attention functions return (the caller reshapes it to (B, Sq, H * D)).

attention_mask, every form transformers passes:
  * None: no mask (causality comes from is_causal).
  * bool: (B, Sk) padding mask or 4-D ({B|1}, {1|Hkv|H}, {Sq|1}, Sk): True = attend.
  * 2-D integer/float (B, Sk): the tokenizer's padding mask, nonzero = attend.
  * 3-D/4-D floating: an additive mask as built by transformers (0 = attend, torch.finfo(dtype).min = masked),
    possibly carrying a bias at the attended entries (Doge's dynamic mask: bias values, dtype min elsewhere,
    already expanded to all query heads). It is split exactly as
        keep = x > finfo(x.dtype).min / 2          (the fill value and -inf are masked; everything else attends)
        bias = x                                   (read only where keep is True, so the fill value never enters)
    and when every attended value is exactly 0 the bias is dropped (a plain 0/min mask). The comparison runs on
    the tensor with its stride-0 (broadcast) dims collapsed, so a broadcast mask yields a broadcast bool mask.
    The bias stays in the autograd graph: gradients reach whatever produced it (Doge's dt_proj and A).
  * a 2-D mask longer than Sk keeps its last Sk columns; a 4-D mask wider than Sk keeps its first Sk columns.
  attention_bias (optional, the API document's DynamicMaskAttention): any form flash_dmattn accepts; added to a
  bias split from the mask when both are present.

kwargs:
  is_causal: bottom-right causal mask. Default: module.is_causal (True when the module has none), except that a
      4-D mask with one row per query (Sq > 1) already carries causality (it is how transformers builds it, and
      transformers' own sdpa path then ignores is_causal too), so it is not added unless is_causal=True is passed.
  keep_window_size: per query row keep only the keep_window_size visible keys with the largest bias (SPEC
      section 6), applied when Sk > keep_window_size; default module.keep_window_size, then
      module.config.keep_window_size. Needs a bias (an attention_bias or a bias-carrying additive mask).
  dropout: attention dropout probability; default module.attention_dropout when module.training, else 0.
  scale: alias of scaling (the API document's example passes scale=).
  implementation: None or "flash_dmattn" (automatic backend: cuda > triton > flex, CPU tensors run the C CPU
      backend), or a backend name "cuda", "triton", "flex" for flash_dmattn_func_auto(backend=...).
  layer_idx and every other transformers kwarg are accepted and ignored.

Registration: register() (run when flash_dmattn.integrations is imported) adds "flash_dmattn" to transformers'
AttentionInterface and AttentionMaskInterface, so that attn_implementation="flash_dmattn" works with models
that use those interfaces (Llama, Doge, ...). The mask function returns:
  * None or the (B, Sk) bool padding mask when the pattern is the plain causal one aligned at the bottom right
    (no (Sq, Sk) mask is built; causality comes from is_causal), except for models that post-process the mask
    themselves (config.keep_window_size, e.g. Doge, which selects its top-k window from the mask);
  * otherwise transformers' sdpa_mask: a (B, 1, Sq, Sk) bool mask, always materialised.
transformers treats every implementation whose name contains "flash" as a flash-attn kernel and tries to load it
(modeling_utils.lazy_import_flash_attention) when a model is created; register() wraps that one function so the
name "flash_dmattn" is accepted, and leaves every other name to transformers.
"""
import torch

_IMPLEMENTATION = "flash_dmattn"
_BACKENDS = ("cuda", "triton", "flex")


def _attention_function(implementation):
    import flash_dmattn

    if implementation in (None, _IMPLEMENTATION):
        fn = flash_dmattn.flash_dmattn_func_auto()
    elif implementation in _BACKENDS:
        fn = flash_dmattn.flash_dmattn_func_auto(backend=implementation)
    else:
        raise ValueError(f"implementation: expected None, {_IMPLEMENTATION!r} or one of {_BACKENDS}, "
                         f"got {implementation!r}")
    if fn is None:
        raise RuntimeError(f"flash_dmattn: no attention backend is available for implementation={implementation!r} "
                           f"(available: {flash_dmattn.get_available_backends()})")
    return fn


def _collapse(x):
    """View with every stride-0 dim of size > 1 reduced to size 1 (a broadcast input stays small)."""
    idx = tuple(slice(0, 1) if (x.stride(d) == 0 and x.shape[d] > 1) else slice(None) for d in range(x.dim()))
    return x[idx]


def split_attention_mask(attention_mask, Sk):
    """transformers attention_mask -> (mask, bias) for flash_dmattn: mask bool (True = attend) or None, bias
    (from an additive mask that carries non-zero values) or None. See the module docstring for the rule."""
    if attention_mask is None:
        return None, None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor or None, got {type(attention_mask).__name__} "
                        f"(BlockMask belongs to attn_implementation='flex_attention')")
    m = attention_mask
    if m.dim() == 2:
        if m.shape[-1] > Sk:
            m = m[:, -Sk:]
        return (m if m.dtype == torch.bool else m != 0), None
    if m.dim() not in (3, 4):
        raise ValueError(f"attention_mask: expected 2 dims (B, Sk), 3 dims or 4 dims (B, heads, Sq, Sk), got shape "
                         f"{tuple(m.shape)}")
    if m.shape[-1] > Sk:
        m = m[..., :Sk]
    if m.dtype == torch.bool:
        return m, None
    if not m.is_floating_point():
        return _collapse(m) != 0, None
    c = _collapse(m)
    keep = c > torch.finfo(c.dtype).min / 2
    has_bias = m.requires_grad or bool(torch.where(keep, c, torch.zeros((), dtype=c.dtype, device=c.device)).any())
    return keep, (m if has_bias else None)


def _default_causal(module, mask, Sq):
    per_row = mask is not None and mask.dim() == 4 and mask.shape[2] == Sq and Sq > 1
    return (not per_row) and bool(getattr(module, "is_causal", True))


def _keep_window(module, kwargs):
    if kwargs.get("keep_window_size") is not None:
        return kwargs["keep_window_size"]
    w = getattr(module, "keep_window_size", None)
    if w is None:
        w = getattr(getattr(module, "config", None), "keep_window_size", None)
    return w


def _common_dtype(query, key, value, bias):
    """One dtype for q, k, v and the bias, as transformers' flash-attention path does: under autocast the
    projections may hand over float32 (after a norm) next to bf16/fp16 (after a Linear), and every backend
    takes a single dtype. Target: the autocast dtype when autocast is on for this device, else the lowest
    precision among q, k, v (float32 only when all three are float32)."""
    dev = query.device.type
    if torch.is_autocast_enabled(dev) and query.is_floating_point():
        target = torch.get_autocast_dtype(dev)
    else:
        dts = {query.dtype, key.dtype, value.dtype}
        target = query.dtype if len(dts) == 1 else next(d for d in (torch.bfloat16, torch.float16, torch.float32)
                                                          if d in dts)
    cast = (lambda t: t if t is None or t.dtype == target else t.to(target))
    return cast(query), cast(key), cast(value), (bias if bias is None or not bias.is_floating_point()
                                                else cast(bias))


def flash_dynamic_mask_attention_forward(module, query, key, value, attention_mask, attention_bias=None,
                                         scaling=None, softcap=None, **kwargs):
    """transformers attention function: query (B, H, Sq, D), key/value (B, Hkv, Sk, D) -> ((B, Sq, H, D), None)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor (batch, heads, seqlen, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    Sq, Sk = query.shape[2], key.shape[2]
    if scaling is None:
        scaling = kwargs.get("scale")
    mask, bias = split_attention_mask(attention_mask, Sk)
    if attention_bias is not None:
        bias = attention_bias if bias is None else bias + attention_bias
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = _default_causal(module, attention_mask, Sq)
    window = _keep_window(module, kwargs)
    if window is not None and Sk <= int(window):
        window = None
    if window is not None and bias is None:
        raise ValueError(f"keep_window_size: {window} < Sk={Sk} selects keys by the attention bias, but neither "
                         f"attention_bias nor a bias-carrying attention_mask was given")
    dropout = kwargs.get("dropout")
    if dropout is None:
        dropout = getattr(module, "attention_dropout", 0.0) if getattr(module, "training", False) else 0.0
    query, key, value, bias = _common_dtype(query, key, value, bias)
    fn = _attention_function(kwargs.get("implementation"))
    out = fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, attn_bias=bias,
             scale=scaling, is_causal=bool(is_causal), softcap=softcap, dropout_p=float(dropout),
             keep_window_size=None if window is None else int(window))
    return out, None


def flash_dmattn_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, config=None, **kwargs):
    """transformers AttentionMaskInterface function for "flash_dmattn" (see the module docstring)."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if mask_function is None:
        mask_function = causal_mask_function
    plain_causal = (mask_function is causal_mask_function and isinstance(q_offset, int)
                    and isinstance(kv_offset, int) and q_offset - kv_offset == kv_length - q_length)
    dense_needed = getattr(config, "keep_window_size", None) is not None
    if plain_causal and not dense_needed:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None
        padding = padding[:, kv_offset:kv_offset + kv_length].to(torch.bool)
        return None if bool(padding.all()) else padding
    kwargs.pop("allow_is_causal_skip", None)
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                     allow_is_causal_skip=False, config=config, **kwargs)


def _accept_name_in_flash_preload():
    """transformers preloads a flash-attn kernel for every implementation name containing "flash"; let
    "flash_dmattn" through (returning what a kernel-less preload returns) and pass every other name on."""
    import transformers.modeling_utils as mu

    original = getattr(mu, "lazy_import_flash_attention", None)
    if original is None or getattr(original, "_flash_dmattn_wrapped", False):
        return

    def lazy_import_flash_attention(implementation, *args, **kwargs):
        if implementation == _IMPLEMENTATION or implementation == f"paged|{_IMPLEMENTATION}":
            return (None, None, None, None, None), None
        return original(implementation, *args, **kwargs)

    lazy_import_flash_attention._flash_dmattn_wrapped = True
    mu.lazy_import_flash_attention = lazy_import_flash_attention


def register():
    """Register "flash_dmattn" with transformers' AttentionInterface and AttentionMaskInterface (idempotent).
    Returns True, or False when transformers is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(_IMPLEMENTATION, flash_dynamic_mask_attention_forward)
    AttentionMaskInterface.register(_IMPLEMENTATION, flash_dmattn_mask)
    _accept_name_in_flash_preload()
    return True
