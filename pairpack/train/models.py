"""Calling a model with a batch of any layout: which inputs each model family takes.

A ``padded`` batch (:class:`~pairpack.batch.triplets.Triplets`) needs nothing but ids: right padding
and causal attention keep every real token from seeing a pad. The ``packed`` and ``prefix_shared``
layouts (:mod:`pairpack.batch.layouts`, docs/layouts.md) put several sequences in one row, so the
model must take per-token positions and a mask that keeps them apart (and, in ``prefix_shared``,
rejected tokens away from chosen ones). :func:`layout_logits` knows how to pass these to:

model                          attention="dense" (any     attention="auto" / "flex" on CUDA
                               device)
============================== ========================= =============================================
``TinyLM``, or any module with ``positions=``,            "flex": a FlexAttention ``BlockMask`` as
``pairpack_layouts``           ``attn_mask=`` bool        ``attn_mask``; "auto" and "split" (any
                               ``(R, 1, T, T)``           device), if its ``pairpack_attention`` lists
                                                          it: a ``SplitAttention`` as ``attn_mask``
x-transformers                 ``pos=``, ``attn_mask=``   built with ``attn_flash_pack_seq=True``
``TransformerWrapper``                                    (flash-attn): ``packed`` only, rows flattened
                                                          to one, ``flash_pack_seq_kwargs``
Hugging Face causal LM         ``position_ids=``, 4-D     "auto"/"split" (sdpa, eager or pairpack
(``PreTrainedModel``)          additive float mask        implementations): split attention through
                               (eager, sdpa)              ``AttentionInterface`` (:mod:`.hf_attention`),
                                                          no mask; ``flash_attention_2/3``: ``packed``
                                                          only, ``cu_seq_lens_*``; ``flex_attention``:
                                                          the ``BlockMask`` as ``attention_mask``
anything else                  ``padded`` only            ``padded`` only
============================== ========================= =============================================
=======
| model | attention="dense" (any device) | attention="auto" / "flex" on CUDA |
|---|---|---|
| ``TinyLM``, or any module with ``pairpack_layouts`` | ``positions=``, ``attn_mask=`` bool ``(R, 1, T, T)`` | "flex": a FlexAttention ``BlockMask`` as ``attn_mask``; "auto" and "split" (any device), if its ``pairpack_attention`` lists it: a ``SplitAttention`` as ``attn_mask`` |
| x-transformers ``TransformerWrapper`` | ``pos=``, ``attn_mask=`` | built with ``attn_flash_pack_seq=True`` (flash-attn): ``packed`` only, rows flattened to one, ``flash_pack_seq_kwargs`` |
| Hugging Face causal LM (``PreTrainedModel``) | ``position_ids=``, 4-D additive float mask (eager, sdpa) | "auto" and "split" (sdpa, eager or pairpack implementations, any device): split attention through ``AttentionInterface`` (:mod:`pairpack.train.hf_attention`), no mask; ``flash_attention_2/3``: ``packed`` only, ``cu_seq_lens_*``; ``flex_attention``: the ``BlockMask`` as ``attention_mask`` |
| anything else | ``padded`` only | ``padded`` only |

A layout a model cannot take raises :class:`~pairpack.errors.ModelError`; FlexAttention without
CUDA raises :class:`~pairpack.errors.DeviceError`. Nothing here imports x-transformers or
transformers: a model's family is recognised by the module its class comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..errors import ArgumentError, DeviceError, ModelError
from .hf_attention import split_forward, supports_split

__all__ = ["ATTENTIONS", "LAYOUTS", "as_logits", "layout_logits", "layout_of", "model_family", "model_layouts"]

LAYOUTS: tuple[str, ...] = ("padded", "packed", "prefix_shared")
"""The batch layouts a model may take (docs/layouts.md)."""
ATTENTIONS: tuple[str, ...] = ("auto", "dense", "flex", "split")
"""How a packed layout's attention rule reaches the model: ``"auto"`` (split where the model takes it,
else dense), a dense mask, a FlexAttention ``BlockMask`` (CUDA), or a ``SplitAttention``."""
Attention = Literal["auto", "dense", "flex", "split"]


def layout_of(batch: Any) -> str:
    """``"padded"`` for a :class:`~pairpack.batch.triplets.Triplets`, else the batch's ``layout``."""
    return getattr(batch, "layout", "padded")


def as_logits(out: Any, model: nn.Module) -> Tensor:
    """The logits tensor of a model's output: the tensor itself, or the ``.logits`` of a Hugging
    Face ``ModelOutput`` (or of any object carrying one)."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ModelError(f"{type(model).__name__} returned {type(out).__name__}, neither a logits tensor nor an "
                     "object with a .logits tensor; wrap the model so that it returns logits (R, T, V)")


def model_family(model: nn.Module) -> str:
    """``"pairpack"`` (a module declaring ``pairpack_layouts``, e.g. TinyLM), ``"x_transformers"``,
    ``"hf"`` (a Hugging Face ``PreTrainedModel``) or ``"plain"``."""
    if getattr(model, "pairpack_layouts", None) is not None:
        return "pairpack"
    mods = [c.__module__ for c in type(model).__mro__]
    if any(m.startswith("x_transformers") for m in mods) and hasattr(model, "attn_layers"):
        return "x_transformers"
    if any(m.startswith("transformers.") for m in mods) and hasattr(getattr(model, "config", None),
                                                                       "_attn_implementation"):
        return "hf"
    return "plain"


def _xt_flash_pack(model: nn.Module) -> bool:
    return any(getattr(m, "flash_pack_seq", False) for m in model.attn_layers.modules())


def _xt_blocker(model: nn.Module) -> str | None:
    """Why an x-transformers wrapper cannot take custom positions and a mask, or None."""
    rel = getattr(model.attn_layers, "rel_pos", None)
    if rel is not None and type(rel).__name__ != "AlibiPositionalBias":
        return (f"its relative position bias ({type(rel).__name__}) takes no custom positions; build it with "
                "rotary_pos_emb=True (or alibi_pos_bias=True)")
    if getattr(model, "num_memory_tokens", 0):
        return "its memory tokens (num_memory_tokens > 0) would attend across the sequences of a row"
    return None


def _hf_impl(model: nn.Module) -> str:
    return str(model.config._attn_implementation or "eager")


def model_layouts(model: nn.Module, attention: Attention = "auto") -> tuple[str, ...]:
    """The layouts :func:`layout_logits` can feed ``model`` with this ``attention`` choice."""
    fam = model_family(model)
    if fam == "pairpack":
        return tuple(model.pairpack_layouts) if attention in _pairpack_attention(model) + ("auto",) else ("padded",)
    if attention == "split":
        return LAYOUTS if fam == "hf" and supports_split(model) else ("padded",)
    if fam == "x_transformers":
        if _xt_blocker(model) is not None or attention == "flex":
            return ("padded",)
        return ("padded", "packed") if _xt_flash_pack(model) else LAYOUTS
    if fam == "hf":
        impl = _hf_impl(model)
        if impl.startswith("flash"):
            return ("padded", "packed")
        if attention == "flex" and impl != "flex_attention":
            return ("padded",)
        return LAYOUTS
    return ("padded",)


def _pairpack_attention(model: nn.Module) -> tuple[str, ...]:
    """The attention inputs a pairpack-family model declares (``pairpack_attention``; without it
    the dense mask and FlexAttention, what such modules took before ``split`` existed)."""
    return tuple(getattr(model, "pairpack_attention", ("dense", "flex")))


def _refuse(model: nn.Module, layout: str, attention: str, why: str) -> ModelError:
    return ModelError(f"{type(model).__name__} cannot take layout={layout!r} (attention={attention!r}): {why}. "
                      f"It takes {list(model_layouts(model, attention))}; build the batches with one of those "
                      "(Loader(..., layout=...)) or see docs/layouts.md for the models that take each")


def _check_flex(batch: Any) -> None:
    dev = batch.input_ids.device
    if dev.type != "cuda":
        raise DeviceError(f"attention='flex' needs a CUDA device (FlexAttention block masks are compiled for GPUs); "
                          f"this batch is on {dev}. Use attention='dense' on the CPU, or move the batch with "
                          "batch.to('cuda')")
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        raise DeviceError(f"attention='flex' needs torch.nn.attention.flex_attention (torch >= 2.5); this is "
                          f"torch {torch.__version__}. Use attention='dense'") from None


def _flattened(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The real tokens of a packed batch as one row: ids and positions ``(1, n)`` and the scoring map
    ``(2, N)`` moved onto that row (the flash-attention varlen convention)."""
    real = batch.attention_mask
    t = real.shape[1]
    slot = real.reshape(-1).cumsum(0) - 1  # row-major rank of each real token
    rows, cols = batch.score_index.unbind(0)
    col = slot[rows.long() * t + cols.long()]
    return (batch.input_ids[real].unsqueeze(0), batch.position_ids[real].unsqueeze(0),
            torch.stack([torch.zeros_like(col), col]))


def _varlen(batch: Any) -> dict[str, Any]:
    cu = batch.cu_seqlens.to(device=batch.input_ids.device, dtype=torch.int32)
    return {"cu": cu, "max": int(batch.max_seqlen)}


def layout_logits(model: nn.Module, batch: Any, *, attention: Attention = "auto",
                  run: Callable[..., Any] | None = None) -> tuple[Tensor, Tensor]:
    """Run ``model`` on a ``packed`` or ``prefix_shared`` batch.

    Args:
        model: see the module docstring for the families and what each takes.
        batch: a ``PackedBatch`` (``input_ids``/``position_ids`` int64 ``(R, T)``, ``attention_mask``
            bool ``(R, T)``, ``dense_mask()``, ``block_mask()``, ``cu_seqlens``, ``score_index``).
        attention: ``"dense"``: a dense ``(R, 1, T, T)`` mask (any device; attention costs ``T**2``
            per row); ``"flex"``: a FlexAttention block mask (CUDA; skips masked blocks);
            ``"split"``: :meth:`~pairpack.batch.layouts.PackedBatch.split_attention` (any device;
            ``(P+C)**2 + R (P+R)`` per pair; models declaring it, as TinyLM, and Hugging Face models
            dispatching through ``AttentionInterface``); ``"auto"``: the model's own packed kernel
            where it has one (x-transformers ``flash_pack_seq``, Hugging Face flash attention or flex
            attention), else split where the model takes it, else dense.

        run: what is called to run the model (e.g. its DistributedDataParallel wrapper, which must
            see the forward for its gradient hooks); default ``model``. ``model`` is what is inspected.

    Returns:
        ``(logits, score_index)``: float logits ``(R', T', V)`` and int64 ``(2, N)``, the (row,
        column) in them of the logit that predicts each scored token (``batch.score_index``, or
        its image when the rows were flattened into one for a varlen kernel).

    Raises:
        ModelError: the model cannot take this layout with this attention.
        DeviceError: ``attention="flex"`` without CUDA or without FlexAttention.
        ValueError: unknown ``attention`` or layout.
    """
    if attention not in ATTENTIONS:
        raise ArgumentError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    layout = layout_of(batch)
    if layout not in LAYOUTS[1:]:
        raise ArgumentError(f"layout_logits takes a packed or prefix_shared batch, got layout={layout!r}")
    fam = model_family(model)
    call = model if run is None else run
    if attention == "flex":
        _check_flex(batch)
    ids, pos = batch.input_ids, batch.position_ids
    if fam == "pairpack":
        if layout not in model.pairpack_layouts:
            raise _refuse(model, layout, attention, "its pairpack_layouts does not list it")
        takes = _pairpack_attention(model)
        if attention != "auto" and attention not in takes:
            raise _refuse(model, layout, attention, f"its pairpack_attention lists {list(takes)}")
        if attention == "flex":
            mask = batch.block_mask()
        elif attention == "split" or (attention == "auto" and "split" in takes):
            mask = batch.split_attention()
        else:
            mask = batch.dense_mask()
        return as_logits(call(ids, positions=pos, attn_mask=mask), model), batch.score_index
    if fam == "hf" and attention in ("auto", "split") and supports_split(model):
        return as_logits(split_forward(model, batch, call), model), batch.score_index
    if attention == "split":
        raise _refuse(model, layout, attention, "split attention needs a model whose attention calls "
                      "SplitAttention.attend(q, k, v) (a pairpack_attention attribute listing 'split', as TinyLM's, "
                      "or a Hugging Face model that dispatches through AttentionInterface, loaded with 'sdpa', "
                      "'eager' or 'pairpack')")
    if fam == "x_transformers":
        why = _xt_blocker(model)
        if why is None and attention == "flex":
            why = "x-transformers has no FlexAttention path (use attention='dense', or flash_pack_seq for packed)"
        if why is not None:
            raise _refuse(model, layout, attention, why)
        if _xt_flash_pack(model):
            if layout != "packed":
                raise _refuse(model, layout, attention, "flash_pack_seq (flash-attn varlen) cannot keep rejected "
                              "tokens from attending to chosen ones")
            flat_ids, flat_pos, index = _flattened(batch)
            v = _varlen(batch)
            kw = {"cu_seqlens_q": v["cu"], "cu_seqlens_k": v["cu"], "max_seqlen_q": v["max"], "max_seqlen_k": v["max"]}
            return as_logits(call(flat_ids, pos=flat_pos, flash_pack_seq_kwargs=kw), model), index
        return as_logits(call(ids, pos=pos, attn_mask=batch.dense_mask()), model), batch.score_index
    if fam == "hf":
        return _hf_logits(model, call, batch, layout, attention)
    raise _refuse(model, layout, attention, "pairpack does not know how to pass it positions and an attention "
                  "mask; give the module a pairpack_layouts attribute and have forward(ids, positions=, "
                  "attn_mask=) take them")


def _hf_logits(model: nn.Module, call: Callable[..., Any], batch: Any, layout: str, attention: str
               ) -> tuple[Tensor, Tensor]:
    """:func:`layout_logits` for a Hugging Face model that does not run split attention."""
    ids, pos = batch.input_ids, batch.position_ids
    impl = _hf_impl(model)
    if impl.startswith("flash"):
        if layout != "packed":
            raise _refuse(model, layout, attention, f"attn_implementation={impl!r} (varlen) cannot keep "
                          "rejected tokens from attending to chosen ones; load it with "
                          "attn_implementation='sdpa' or 'flex_attention'")
        flat_ids, flat_pos, index = _flattened(batch)
        v = _varlen(batch)
        out = call(input_ids=flat_ids, position_ids=flat_pos, use_cache=False, cu_seq_lens_q=v["cu"],
                    cu_seq_lens_k=v["cu"], max_length_q=v["max"], max_length_k=v["max"])
        return as_logits(out, model), index
    if attention == "flex" or (attention == "auto" and impl == "flex_attention"):
        if impl != "flex_attention":
            raise _refuse(model, layout, attention, f"it was loaded with attn_implementation={impl!r}; load it "
                          "with attn_implementation='flex_attention' to take block masks")
        if attention == "auto":
            _check_flex(batch)
        mask = batch.block_mask()
    else:
        dtype = next(model.parameters()).dtype
        # additive: the form eager and sdpa attention both take (a bool mask is only right for sdpa)
        dense = batch.dense_mask()
        mask = torch.zeros(dense.shape, dtype=dtype, device=ids.device).masked_fill_(~dense, torch.finfo(dtype).min)
    out = call(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False)
    return as_logits(out, model), batch.score_index
