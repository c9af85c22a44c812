"""pairpack's attention for Hugging Face models, through transformers' public ``AttentionInterface``.

A Hugging Face causal LM given a ``packed`` or ``prefix_shared`` batch as a dense 4-D mask runs the
masked, non-causal attention path and pays ``T**2`` per row (``(P+C+R)**2`` per prefix-shared pair),
which eats most of what the layout saves. transformers lets a custom attention function be
registered by name (``AttentionInterface``) with its mask function (``AttentionMaskInterface``), and
passes every extra keyword of ``model(...)`` down to it. :func:`register` adds the implementation
``"pairpack"``:

* called with the keyword ``pairpack_split=`` (a :class:`~pairpack.batch.attention.SplitAttention`,
  what :func:`pairpack.train.models.layout_logits` passes), the layer's attention is the layout's rule
  as small causal attentions (:meth:`SplitAttention.attend`): ``(P+C)**2 + R (P+R)`` per pair, on any
  device, and the mask function builds no mask at all;
* called without it (a padded batch, generation, evaluation), it is exactly transformers' ``sdpa``
  implementation and mask: a model loaded with ``attn_implementation="pairpack"`` behaves as with
  ``"sdpa"`` everywhere else.

Any model whose attention layers dispatch through the interface (``_supports_attention_backend``:
Llama, Qwen2/3, Mistral, Gemma, Phi-3, ...) takes it. :func:`use_split` switches a model loaded with
``"sdpa"``/``"eager"`` to it (``layout_logits(attention="auto")`` does), so users need not reload
their model. Attention logit soft-capping and sliding windows shorter than the row are
refused (:class:`~pairpack.errors.ModelError`): the split rule does not implement them.

transformers is imported on first use only (the ``pairpack[trl]`` / ``[test]`` extras bring it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from torch import Tensor, nn

from ..errors import ModelError, import_optional

__all__ = ["ATTN_IMPLEMENTATION", "SPLIT_KWARG", "register", "split_forward", "supports_split", "use_split"]

ATTN_IMPLEMENTATION = "pairpack"
"""The name registered with transformers: ``attn_implementation="pairpack"`` / ``set_attn_implementation``."""
SPLIT_KWARG = "pairpack_split"
"""The forward keyword carrying the batch's :class:`~pairpack.batch.attention.SplitAttention`."""
# implementations a model may be loaded with and still be switched to split attention for one call
_SWITCHABLE = ("sdpa", "eager", ATTN_IMPLEMENTATION)

# True while a split call runs: the mask function then returns None (no T x T mask is built)
_split_call: ContextVar[bool] = ContextVar("pairpack_split_call", default=False)
_registered = False


def _transformers() -> Any:
    return import_optional("transformers", feature="pairpack's Hugging Face attention", extra="trl")


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               dropout: float = 0.0, scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """The registered attention function: ``query`` ``(R, H, T, D)``, ``key``/``value`` ``(R, Hkv, T, D)``
    -> ``((R, T, H, D), None)``, transformers' calling convention."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    split = kwargs.pop(SPLIT_KWARG, None)
    if split is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ModelError(f"{type(module).__name__}: attention logit soft-capping is not part of pairpack's split "
                         "attention; use layout='padded' (or attention='dense') with this model")
    window = kwargs.get("sliding_window")
    if window is not None and window < query.shape[2]:
        raise ModelError(f"{type(module).__name__}: a sliding window of {window} tokens is shorter than the row "
                         f"({query.shape[2]}); pairpack's split attention does not implement windows: use "
                         "layout='padded' or rows no longer than the window (max_row_tokens)")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: SplitAttention takes one key/value head per query head
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = split.attend(query, key, value, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def _mask(*args: Any, **kwargs: Any) -> Any:
    """The registered mask function: none during a split call, else transformers' sdpa mask."""
    if _split_call.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register ``"pairpack"`` with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``
    (idempotent) and return the name, for ``from_pretrained(..., attn_implementation=register())``
    or ``model.set_attn_implementation(register())``.

    Raises:
        MissingDependencyError (a pairpack.errors class): transformers is not installed.
    """
    global _registered
    if not _registered:
        tf = _transformers()
        tf.AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _mask)
        _registered = True
    return ATTN_IMPLEMENTATION


def supports_split(model: nn.Module) -> bool:
    """Whether ``model`` (a Hugging Face ``PreTrainedModel``) can run split attention: its attention
    layers dispatch through ``AttentionInterface`` and it is loaded with ``"sdpa"``, ``"eager"`` or
    ``"pairpack"`` (flash and flex implementations keep their own kernels)."""
    config = getattr(model, "config", None)
    return (bool(getattr(type(model), "_supports_attention_backend", False))
            and str(getattr(config, "_attn_implementation", None) or "eager") in _SWITCHABLE)


@contextlib.contextmanager
def use_split(model: nn.Module) -> Iterator[None]:
    """Within the block, calls of ``model`` passing ``pairpack_split=`` run split attention and build
    no attention mask.

    A model loaded with ``"sdpa"`` or ``"eager"`` is switched to ``"pairpack"`` for good (not just
    for the block): gradient checkpointing recomputes layers during the backward pass, outside the
    block, and they must run the same attention then. Without ``pairpack_split=``, ``"pairpack"`` is
    ``"sdpa"``, so the model's other calls are unchanged (an ``"eager"`` model computes the same
    attention through SDPA).

    Raises:
        ModelError: the model does not dispatch attention through ``AttentionInterface``.
    """
    if not supports_split(model):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ModelError(f"{type(model).__name__} (attn_implementation={impl!r}) cannot run pairpack's split "
                         "attention: it needs a Hugging Face model whose attention dispatches through "
                         "transformers' AttentionInterface, loaded with attn_implementation 'sdpa', 'eager' or "
                         "'pairpack'")
    register()
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    token = _split_call.set(True)
    try:
        yield
    finally:
        _split_call.reset(token)


def split_forward(model: nn.Module, batch: Any, run: Callable[..., Any] | None = None) -> Any:
    """``model``'s output on a ``packed``/``prefix_shared`` batch through split attention: ids and
    position ids ``(R, T)``, no attention mask, the batch's ``SplitAttention`` as a forward keyword.
    ``run`` is what is called (a wrapper of ``model``, e.g. DistributedDataParallel); default ``model``."""
    with use_split(model):
        return (model if run is None else run)(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                     **{SPLIT_KWARG: batch.split_attention()})
