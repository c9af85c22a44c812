"""TRL's ``DPOTrainer`` on pairpack data: the documented import path is :mod:`pairpack.trl`.

:class:`DPOTrainer` is a subclass of ``trl.DPOTrainer`` whose datasets are pairpack datasets (or
their paths) and whose batches come from :class:`pairpack.Loader`; :class:`DPOConfig` is a
subclass of ``trl.DPOConfig`` adding the Loader's batching fields. What changes against TRL:

* no ``datasets.map`` and no tokenization: each rank opens the dataset in O(1);
* batches of any layout (``padded``, ``packed``, ``prefix_shared``), per-device batch sizes or
  token budgets, length grouping, rank and world size from the trainer's accelerator;
* checkpoints carry the Loader's state (``pairpack_loader.json``): resuming continues with the
  batches an uninterrupted run would have used, without reading the skipped ones;
* ``precompute_ref_log_probs`` stores the reference log-probs in the dataset as pairpack's
  reference columns (FORMAT.md §4.4), which a second run with the same reference reuses.

What stays TRL's: the config fields and their meaning (``beta``, ``loss_type`` with
``loss_weights``, ``label_smoothing``, ``use_weighting``, ``max_length``/``truncation_mode``,
...), per-sequence sums of log-probs, the metrics' names and values (``rewards/chosen``,
``rewards/rejected``, ``rewards/accuracies``, ``rewards/margins``, ``logps/*``, ``logits/*``,
``entropy``, ``mean_token_accuracy``, ``num_tokens``), the reference model or a PEFT model's
disabled adapter, optimizers, schedulers, logging, saving. A field pairpack cannot honour
(``f_divergence_type`` other than ``reverse_kl``, ``ld_alpha``, ``sync_ref_model``, a Mixture-of-
Experts auxiliary loss, vision data) raises :class:`~pairpack.errors.ArgumentError` at construction.

Truncation (``max_length``) follows pairpack's rule (FORMAT-independent, ``pairpack.batch.options``):
both rows of a pair keep one prompt, completions are cut first. It equals TRL's ``keep_start``
wherever the prompt leaves room for a completion token (TRL drops the other pairs; pairpack keeps
``min_completion_tokens``); TRL's ``keep_end`` cuts each row from the left on its own, which would
give the two rows different prompts, so pairpack's ``keep_end`` drops prompt tokens from the start
of the prompt (after cutting completions).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..batch.loader import Loader
from ..batch.options import LAYOUTS
from ..errors import ArgumentError, StateError, import_optional
from ..read.dataset import Dataset, open_dataset
from .dpo import pair_rows
from .losses import dpo_loss, loss_config
from .hf_attention import SPLIT_KWARG, supports_split, use_split
from .models import ATTENTIONS, as_logits, layout_logits, layout_of, model_family, model_layouts
from .reference import REF_CHOSEN, REF_REJECTED, REFERENCE_COLUMNS, check_reference, model_hash, precompute_reference

trl = import_optional("trl", feature="pairpack.trl", extra="trl")

__all__ = ["DPOConfig", "DPOTrainer", "LOADER_STATE_FILE"]

LOADER_STATE_FILE = "pairpack_loader.json"
"""The file in each checkpoint directory holding the training Loader's ``state_dict()`` (JSON)."""
_BATCH = "pairpack_batch"  # the key of the batch in the dicts the trainer's loop passes around
# TRL's sampling strategies the Loader serves -> its shuffle (group_by_length sets that field too)
_SAMPLING = {"random": True, "sequential": False, "group_by_length": True}


@dataclass
class DPOConfig(trl.DPOConfig):
    """``trl.DPOConfig`` plus pairpack's batching fields (the :class:`pairpack.Loader`'s names), so
    YAML configs and ``HfArgumentParser`` command lines take them as TRL's own.

    ``per_device_train_batch_size`` / ``per_device_eval_batch_size`` are pairs per batch unless a
    token budget is given; ``train_sampling_strategy`` ``"random"``, ``"sequential"`` or
    ``"group_by_length"`` (the Loader's length grouping, as ``group_by_length=True``);
    ``dataloader_num_workers`` the Loader's worker processes; ``data_seed`` (else ``seed``) its seed;
    ``pad_to_multiple_of`` its padding multiple; ``padding_free=True`` means ``layout="packed"``.
    """

    layout: str = field(default="padded", metadata={
        "help": "Batch layout: 'padded' (two right-padded rows per pair), 'packed' (sequences packed into "
                "rows, no padding) or 'prefix_shared' (each prompt once: [prompt][chosen][rejected])."})
    max_tokens: int | None = field(default=None, metadata={
        "help": "Per-device token budget of a training batch (rows x row length); replaces "
                "per_device_train_batch_size when set."})
    eval_max_tokens: int | None = field(default=None, metadata={
        "help": "Per-device token budget of an evaluation batch (default: per_device_eval_batch_size pairs)."})
    max_row_tokens: int | None = field(default=None, metadata={
        "help": "packed / prefix_shared: the longest row in tokens (default: the whole budget or batch; "
                "0: one pair per row)."})
    group_by_length: bool = field(default=False, metadata={
        "help": "Group pairs of similar length into batches (little padding), batches in random order."})
    length_group_window: int | None = field(default=None, metadata={
        "help": "Pairs sorted together by group_by_length (default: 512 batches' worth)."})
    min_completion_tokens: int = field(default=1, metadata={
        "help": "Truncation (max_length) cuts completions no shorter than this before cutting the prompt."})
    attention: str = field(default="auto", metadata={
        "help": "How packed layouts reach the model: 'auto', 'split', 'dense' or 'flex' (CUDA)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layout not in LAYOUTS:
            raise ArgumentError(f"DPOConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.attention not in ATTENTIONS:
            raise ArgumentError(f"DPOConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.padding_free and self.layout == "padded":
            self.layout = "packed"  # pairpack's padding-free layout (TRL disables padding_free)
        strategy = str(self.train_sampling_strategy)
        if strategy not in _SAMPLING:
            raise ArgumentError(f"DPOConfig.train_sampling_strategy={strategy!r} is not served by pairpack's Loader; "
                                f"use one of {sorted(_SAMPLING)} (and max_tokens for token-balanced batches)")
        if strategy == "group_by_length":
            self.group_by_length = True
        for name in ("max_tokens", "eval_max_tokens"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ArgumentError(f"DPOConfig.{name} must be a positive int or None, got {v!r}")


def _loss_config(args: Any) -> Any:
    """The run's :class:`~pairpack.train.losses.LossConfig` (checked); raises for the TRL fields pairpack
    does not implement (never ignored silently)."""
    why = []
    if args.f_divergence_type != "reverse_kl":
        why.append(f"f_divergence_type={args.f_divergence_type!r} (only 'reverse_kl', standard DPO)")
    if args.ld_alpha is not None:
        why.append(f"ld_alpha={args.ld_alpha} (LD-DPO length desensitisation)")
    if args.sync_ref_model:
        why.append("sync_ref_model=True")
    if why:
        raise ArgumentError("pairpack.trl.DPOTrainer does not implement " + "; ".join(why)
                            + ": use trl.DPOTrainer for these, or unset them")
    return loss_config(args.beta, list(args.loss_type), args.loss_weights, args.label_smoothing, 0.5,
                       args.discopop_tau)


def _as_config(args: Any) -> DPOConfig:
    if isinstance(args, DPOConfig):
        return args
    if isinstance(args, trl.DPOConfig):  # a plain TRL config: pairpack's fields take their defaults
        return DPOConfig(**{f.name: getattr(args, f.name) for f in fields(args) if f.init})
    raise ArgumentError(f"args must be a pairpack.trl.DPOConfig (or trl.DPOConfig), got {type(args).__name__}")


def _open(ds: Any, name: str) -> Dataset:
    if isinstance(ds, Dataset):
        return ds
    if isinstance(ds, (str, os.PathLike)):
        return open_dataset(ds)
    raise ArgumentError(f"{name} must be a pairpack dataset or its path (build one with `pairpack build`), "
                        f"got {type(ds).__name__}")


def processing_class_of(ds: Dataset) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` for the tokenizer recorded in ``ds`` (its own copy
    of ``tokenizer.json``, with the manifest's special ids).

    Raises:
        ArgumentError: the dataset records no Hugging Face tokenizer (built from ids or with bytes).
    """
    tok = ds.tokenizer
    path = getattr(tok, "path", None)
    if path is None:
        raise ArgumentError(f"{ds.path}: the dataset records no Hugging Face tokenizer (kind "
                            f"{(ds.manifest.tokenizer or {}).get('kind')!r}); pass processing_class= to the trainer")
    from transformers import PreTrainedTokenizerFast

    m = ds.manifest
    text = {k: tok._tok.id_to_token(i) for k, i in (("eos_token", m.eos_id), ("bos_token", m.bos_id),
                                                    ("pad_token", m.pad_id)) if i is not None}
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **text)


class _Batches:
    """The Loader as the trainer's dataloader: yields ``{"pairpack_batch": batch}``; ``len``,
    ``set_epoch`` and ``dataset`` as the trainer's loop reads them."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self.dataset = loader.ds

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Any:
        return ({_BATCH: b} for b in self.loader)


def _placeholder() -> Any:
    """A one-row ``datasets.Dataset`` standing for a pairpack dataset while ``trl.DPOTrainer.__init__``
    runs (it accepts only ``datasets`` objects); replaced by the real dataset right after."""
    import datasets

    return datasets.Dataset.from_dict({"prompt_ids": [[0]], "chosen_ids": [[0]], "rejected_ids": [[0]]})


class DPOTrainer(trl.DPOTrainer):
    """``trl.DPOTrainer`` on pairpack datasets; see the module docstring.

    Args:
        model: a Hugging Face causal LM (or its path, loaded by TRL), optionally a PEFT model.
        ref_model: the frozen reference; None: a copy of ``model`` made now (TRL reloads it from
            the model's path instead, which a model built from a config has not), the PEFT
            model's disabled adapter, or none at all with ``precompute_ref_log_probs``.
        args: a :class:`DPOConfig` (a plain ``trl.DPOConfig`` is converted, pairpack's fields at
            their defaults).
        data_collator: must be None (the Loader assembles batches).
        train_dataset: a pairpack :class:`~pairpack.Dataset` or its path.
        eval_dataset: the same, or a dict name -> dataset (evaluated one by one).
        processing_class: optional: by default the tokenizer the dataset records (saved with the
            model); needed only for datasets built from token ids.
        compute_metrics: as ``trl.DPOTrainer``.
        callbacks: as ``trl.DPOTrainer``.
        optimizers: as ``trl.DPOTrainer``.
        quantization_config: as ``trl.DPOTrainer`` (with a model path).
        peft_config: as ``trl.DPOTrainer``: the reference is then the disabled adapter.

    Raises:
        ArgumentError: a dataset that is not pairpack's, a collator, or a config field pairpack
            cannot honour.
    """

    def __init__(self, model: Any, ref_model: nn.Module | None = None, args: Any = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None,
                 compute_metrics: Any = None, callbacks: Any = None, optimizers: Any = (None, None),
                 quantization_config: Any = None, peft_config: Any = None) -> None:
        if data_collator is not None:
            raise ArgumentError("pairpack.trl.DPOTrainer assembles batches with pairpack's Loader: leave "
                                "data_collator=None (choose the layout with DPOConfig.layout)")
        if train_dataset is None:
            raise ArgumentError("train_dataset is required: a pairpack dataset or its path")
        if args is None:
            args = DPOConfig(output_dir="pairpack-dpo")
        args = _as_config(args)
        needs_ref = _loss_config(args).needs_reference
        train = _open(train_dataset, "train_dataset")
        evals: Any = None
        if isinstance(eval_dataset, dict):
            evals = {k: _open(v, f"eval_dataset[{k!r}]") for k, v in eval_dataset.items()}
        elif eval_dataset is not None:
            evals = _open(eval_dataset, "eval_dataset")
        if processing_class is None:
            processing_class = processing_class_of(train)
        # TRL would reload the reference from the model's path (which a model built from a config has
        # not); TRL's __init__ wants one even for reference-free losses (dropped below then)
        if (ref_model is None and isinstance(model, nn.Module) and not args.precompute_ref_log_probs
                and peft_config is None and not hasattr(model, "peft_config")):
            ref_model = copy.deepcopy(model)
        self._pp_placeholder = placeholder = _placeholder()
        self._pp_resume: str | None = None
        super().__init__(model, ref_model=ref_model, args=args, train_dataset=placeholder,
                         eval_dataset=None if evals is None else (
                             {k: placeholder for k in evals} if isinstance(evals, dict) else placeholder),
                         processing_class=processing_class, compute_metrics=compute_metrics, callbacks=callbacks,
                         optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config)
        if self.aux_loss_enabled:
            raise ArgumentError(f"{type(self.model).__name__} returns a Mixture-of-Experts router loss "
                                "(router_aux_loss_coef != 0), which pairpack.trl does not add; set "
                                "DPOConfig.router_aux_loss_coef=0.0")
        self.needs_reference = needs_ref
        if not needs_ref:
            self.ref_model = None  # reference-free loss types (simpo, cpo, orpo, sft): no reference at all
        self.train_dataset, self.eval_dataset = train, evals
        if args.precompute_ref_log_probs and needs_ref:
            self.train_dataset = self._pp_precompute(train)
            if isinstance(evals, dict):
                self.eval_dataset = {k: self._pp_precompute(v) for k, v in evals.items()}
            elif evals is not None:
                self.eval_dataset = self._pp_precompute(evals)
        self._pp_train_loader: Loader | None = None

    # --- TRL's dataset hooks: pairpack datasets need none of them ------------------------------------
    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        if isinstance(dataset, Dataset) or dataset is self._pp_placeholder:
            return dataset
        raise ArgumentError("pairpack.trl.DPOTrainer takes pairpack datasets (or their paths); build one with "
                            "`pairpack build` (or use trl.DPOTrainer for a datasets.Dataset)")

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        return dataset  # done by _pp_precompute on the pairpack dataset, once TRL's __init__ is through

    # --- the reference cache ------------------------------------------------------------------------
    def _truncation(self) -> dict[str, Any]:
        return {"max_length": self.args.max_length, "truncation": self.args.truncation_mode,
                "min_completion_tokens": self.args.min_completion_tokens}

    def _reference_module(self) -> nn.Module:
        """The reference as a module: the reference model, or the policy (before training; a PEFT
        model with its adapter disabled)."""
        if self.ref_model is not None:
            return self.accelerator.unwrap_model(self.ref_model)
        model = self.accelerator.unwrap_model(self.model)
        return _AdapterOff(model) if hasattr(model, "peft_config") else model

    def _pp_precompute(self, ds: Dataset) -> Dataset:
        """Reference log-probs as the dataset's reference columns, computed unless the dataset already
        holds them for this reference and truncation (then reused)."""
        ref = self._reference_module()
        digest = model_hash(ref)
        try:
            check_reference(ds, reduction="sum", model_hash=digest, **self._truncation())
            return ds
        except StateError:
            pass
        size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        layout = self.args.layout if _takes_layouts(ref) else "padded"
        with self.accelerator.main_process_first():
            if self.accelerator.is_main_process:
                precompute_reference(ds, ref, batch_size=size, device=self.accelerator.device, reduction="sum",
                                     layout=layout, attention=self.args.attention, **self._truncation())
        return open_dataset(ds.path)

    # --- batches ------------------------------------------------------------------------------------
    def _loader(self, ds: Dataset, *, train: bool) -> Loader:
        a = self.args
        shuffle = _SAMPLING[str(a.train_sampling_strategy)] if train else False
        budget = a.max_tokens if train else a.eval_max_tokens
        size = None if budget is not None else (a.per_device_train_batch_size if train else
                                                a.per_device_eval_batch_size)
        cols = REFERENCE_COLUMNS if (a.precompute_ref_log_probs and self.needs_reference) else ()
        return Loader(ds, batch_size=size, max_tokens=budget, shuffle=shuffle,
                      seed=a.data_seed if a.data_seed is not None else a.seed,
                      drop_last=a.dataloader_drop_last, group_by_length=train and a.group_by_length,
                      window=a.length_group_window, rank=self.accelerator.process_index,
                      world_size=self.accelerator.num_processes, max_length=a.max_length,
                      truncation=a.truncation_mode, min_completion_tokens=a.min_completion_tokens,
                      pad_to_multiple_of=a.pad_to_multiple_of, layout=a.layout, max_row_tokens=a.max_row_tokens,
                      num_workers=a.dataloader_num_workers, columns=cols)

    def get_train_dataloader(self) -> Any:
        """This rank's training batches: a :class:`pairpack.Loader` over ``train_dataset`` with the
        config's batching fields, wrapped for the trainer's loop (``len``, ``set_epoch``)."""
        self._pp_train_loader = self._loader(self.train_dataset, train=True)
        return _Batches(self._pp_train_loader)

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """This rank's evaluation batches, in dataset order (``per_device_eval_batch_size`` pairs or
        ``eval_max_tokens``); ``eval_dataset`` a dataset, its path, or a name of the eval dict."""
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(ds, str) and isinstance(self.eval_dataset, dict) and ds in self.eval_dataset:
            ds = self.eval_dataset[ds]
        if ds is None:
            raise ArgumentError("evaluation needs an eval_dataset (a pairpack dataset or its path)")
        return _Batches(self._loader(_open(ds, "eval_dataset"), train=False))

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> Any:
        """``Trainer.evaluate`` on pairpack datasets: the mean loss and TRL's metrics with ``eval_``
        prefixes (a dict of datasets: one prefix per name). Reference columns are computed first
        with ``precompute_ref_log_probs``."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            if isinstance(eval_dataset, dict):
                out: dict[str, float] = {}
                for k, v in eval_dataset.items():
                    out.update(self.evaluate(v, ignore_keys, f"{metric_key_prefix}_{k}"))
                return out
            eval_dataset = _open(eval_dataset, "eval_dataset")
            if self.args.precompute_ref_log_probs and self.needs_reference:
                eval_dataset = self._pp_precompute(eval_dataset)
        if eval_dataset is None and isinstance(self.eval_dataset, dict):
            out = {}
            for k, v in self.eval_dataset.items():
                out.update(trl.trainer.dpo_trainer._BaseTrainer.evaluate(
                    self, v, ignore_keys=ignore_keys, metric_key_prefix=f"{metric_key_prefix}_{k}"))
            return out
        return trl.trainer.dpo_trainer._BaseTrainer.evaluate(self, eval_dataset, ignore_keys=ignore_keys,
                                                             metric_key_prefix=metric_key_prefix)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {_BATCH: inputs[_BATCH].to(self.args.device)}

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        if self.args.include_num_input_tokens_seen != "no":
            self.state.num_input_tokens_seen += _pair_tokens(inputs[_BATCH])

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """``6 x token slots the model processes x non-embedding parameters`` for the batch."""
        model = self.accelerator.unwrap_model(self.model)
        if not hasattr(model, "num_parameters"):
            return 0
        return 6 * _model_tokens(inputs[_BATCH]) * model.num_parameters(exclude_embeddings=True)

    # --- resume -------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; resuming restores the Loader's position from the checkpoint's
        ``pairpack_loader.json`` (``True``: the last checkpoint in ``output_dir``)."""
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._pp_resume = None if resume_from_checkpoint in (None, False) else str(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _init_training_state(self, *args: Any, **kwargs: Any) -> Any:
        out = super()._init_training_state(*args, **kwargs)
        # TRL restarts its num_tokens counter on resume; continue it from the checkpoint's last log
        seen = [h["num_tokens"] for h in self.state.log_history if "num_tokens" in h and "eval_loss" not in h]
        if self._pp_resume and seen:
            self._total_train_tokens = int(seen[-1])
        return out

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        """Set the Loader to the checkpoint's position (its saved state when the checkpoint has one):
        no batch is read or assembled to get there."""
        loader = dataloader.loader
        path = Path(self._pp_resume or "") / LOADER_STATE_FILE
        if self._pp_resume and path.is_file():
            state = json.loads(path.read_text())
            if state.get("position") != num_batches:
                raise StateError(f"{path}: the loader was at batch {state.get('position')} of epoch "
                                 f"{state.get('epoch')}, but the trainer resumes after {num_batches} batches")
        else:  # a checkpoint without the file: the order is a pure function of (seed, epoch), so derive it
            state = loader.state_dict()
            ga = self.args.gradient_accumulation_steps
            per_epoch = max(1, -(-len(loader) // ga))  # the trainer's update steps per epoch
            state["epoch"] = int(self.state.global_step // per_epoch)
            state["position"] = num_batches
        loader.load_state_dict(state)
        return dataloader

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self._pp_train_loader is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            out = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            out.mkdir(parents=True, exist_ok=True)
            (out / LOADER_STATE_FILE).write_text(json.dumps(self._pp_train_loader.state_dict()))

    # --- the loss -----------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """TRL's loss and metrics on a pairpack batch of any layout (per-sequence sums)."""
        if return_outputs:
            raise ArgumentError("pairpack.trl.DPOTrainer computes no logits for compute_metrics; evaluate with "
                                "prediction_loss_only=True (the default)")
        batch = inputs[_BATCH]
        mode = "train" if self.model.training else "eval"
        # the trainer's mixed precision (TRL's default bf16=True): prepared models run their forward
        # under autocast, and the backbone and head calls of the fused path must too
        with self.accelerator.autocast():
            policy = _Scored.of(model, self.accelerator.unwrap_model(model), batch, self.args.attention)
        chosen, rejected = policy.sums()
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            ref_chosen, ref_rejected = self._reference_logps(model, batch)
        weights = policy.wpo_weights() if self.args.use_weighting else None
        loss = self._loss(chosen, rejected, ref_chosen, ref_rejected, policy.counts, weights)
        self._log_metrics(mode, batch, policy, chosen, rejected, ref_chosen, ref_rejected)
        return loss

    def _loss(self, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor | None, ref_rejected: Tensor | None,
              counts: Tensor, weights: Tensor | None) -> Tensor:
        """``sum_t w_t * mean(per-pair loss of type t [* WPO weight])`` with pairpack's formulas
        (:func:`~pairpack.train.losses.dpo_loss`) under TRL's two conventions that differ from
        pairpack's sums: ``ipo`` on per-token averages, ``sft`` as the batch's token mean."""
        lc, lr = counts[:, 0].clamp(min=1), counts[:, 1].clamp(min=1)
        total = chosen.new_zeros(())
        for t, w in zip(self.loss_types, self.loss_weights):
            if t == "sft":
                per = (-chosen.sum() / lc.sum()).expand_as(chosen)
            else:
                x = (chosen, rejected, ref_chosen, ref_rejected)
                if t == "ipo":
                    x = (chosen / lc, rejected / lr, ref_chosen / lc, ref_rejected / lr)  # type: ignore[operator]
                per = dpo_loss(*x, beta=self.beta, loss_type=t, label_smoothing=self.label_smoothing,
                               discopop_tau=self.args.discopop_tau, reduction="sum", chosen_tokens=counts[:, 0],
                               rejected_tokens=counts[:, 1]).losses
            total = total + w * (per if weights is None else per * weights).mean()
        return total

    def _reference_logps(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        cols = batch.columns
        if REF_CHOSEN in cols:
            return cols[REF_CHOSEN].float(), cols[REF_REJECTED].float()
        with torch.no_grad(), self.accelerator.autocast():
            if self.ref_model is not None:
                ref = self.ref_model
                return _Scored.of(ref, self.accelerator.unwrap_model(ref), batch, self.args.attention).sums()
            unwrapped = self.accelerator.unwrap_model(model)
            if not hasattr(unwrapped, "peft_config"):
                raise StateError("no reference: pass ref_model=, use a PEFT model, or set precompute_ref_log_probs")
            from trl.trainer.utils import use_adapter

            with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                return _Scored.of(model, unwrapped, batch, self.args.attention).sums()

    def _log_metrics(self, mode: str, batch: Any, policy: "_Scored", chosen: Tensor, rejected: Tensor,
                     ref_chosen: Tensor | None, ref_rejected: Tensor | None) -> None:
        """TRL's metrics, TRL's names, TRL's reductions (token-weighted over ranks where TRL's are)."""
        acc, m = self.accelerator, self._metrics[mode]
        stats = policy.token_stats()  # (entropy sum, tokens, chosen logit sum, chosen tokens, rejected logit
        # sum, rejected tokens, chosen top-1 hits): one gather
        s = acc.gather_for_metrics(stats[None]).sum(0).tolist()
        m["entropy"].append(s[0] / s[1] if s[1] > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(acc.gather_for_metrics(
                torch.tensor([_pair_tokens(batch)], device=chosen.device)).sum()) // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]
        m["logits/chosen"].append(s[2] / s[3] if s[3] > 0 else 0.0)
        m["logits/rejected"].append(s[4] / s[5] if s[5] > 0 else 0.0)
        m["mean_token_accuracy"].append(s[6] / s[3] if s[3] > 0 else 0.0)
        if ref_chosen is not None:
            cr, rr = self.beta * (chosen.detach() - ref_chosen), self.beta * (rejected.detach() - ref_rejected)
            cr, rr = acc.gather(cr), acc.gather(rr)
            m["rewards/chosen"].append(cr.mean().item())
            m["rewards/rejected"].append(rr.mean().item())
            m["rewards/accuracies"].append((cr > rr).float().mean().item())
            m["rewards/margins"].append((cr - rr).mean().item())
        m["logps/chosen"].append(acc.gather(chosen.detach()).mean().item())
        m["logps/rejected"].append(acc.gather(rejected.detach()).mean().item())


class _AdapterOff(nn.Module):
    """A PEFT model with its adapter disabled, as a module (the reference of a PEFT run)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from trl.trainer.utils import use_adapter

        name = "ref" if "ref" in self.inner.peft_config else None
        with use_adapter(self.inner, adapter_name=name):
            return self.inner(*args, **kwargs)


def _takes_layouts(model: nn.Module) -> bool:
    return len(model_layouts(model)) > 1


def _pair_tokens(batch: Any) -> int:
    """Tokens of the batch's pairs as TRL counts them (``attention_mask.sum()`` of its padded
    ``[chosen; rejected]`` rows): ``2P + C + R`` per pair, whatever the layout."""
    p, c, r = batch.prompt_lengths, batch.chosen_lengths, batch.rejected_lengths
    return int((2 * p + c + r).sum())


def _model_tokens(batch: Any) -> int:
    """Token slots the model processes for the batch (rows x length)."""
    if layout_of(batch) == "padded":
        return 2 * batch.preferred_seq.numel()
    return batch.padded_tokens()


@dataclass
class _Scored:
    """A model's next-token logits at the scored positions of a batch, any layout: ``logits``
    ``(N, V)``, ``labels`` int64 ``(N,)``, ``slot`` int64 ``(N,)`` (``2 * pair + side``, side 0
    chosen, 1 rejected), ``b`` pairs, ``counts`` int64 ``(b, 2)`` scored tokens per pair and side."""

    logits: Tensor
    labels: Tensor
    slot: Tensor
    b: int
    _logp: Tensor | None = None

    @classmethod
    def of(cls, run: nn.Module, model: nn.Module, batch: Any, attention: str) -> "_Scored":
        """``run`` is what is called (e.g. a DDP wrapper), ``model`` the module it wraps. A Hugging Face
        causal LM called directly runs its backbone, and its LM head at the scored positions only (as
        TRL's fused head does: no ``(rows, length, vocabulary)`` logits, no projection of prompt
        tokens); other models give their logits."""
        b = len(batch)
        padded = layout_of(batch) == "padded"
        head = _hf_head(model) if run is model else None
        if head is not None and not padded and not (attention in ("auto", "split") and supports_split(head.causal_lm)):
            head = None  # dense, flex or flash attention: layout_logits knows how to call the model
        if padded:
            seq, mask = pair_rows(**batch.as_kwargs())
            rows, cols = mask[:, 1:].nonzero(as_tuple=True)
            labels, slot = seq[rows, cols + 1], (rows % b) * 2 + rows // b
            if head is not None:
                out = head.backbone(input_ids=seq[:, :-1], use_cache=False).last_hidden_state
            else:
                out = as_logits(run(input_ids=seq[:, :-1], use_cache=False) if _is_hf(model) else run(seq[:, :-1]),
                                model)
        else:
            if head is not None:
                with use_split(head.causal_lm):
                    out = head.backbone(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                                        **{SPLIT_KWARG: batch.split_attention()}).last_hidden_state
                index = batch.score_index
            else:
                out, index = layout_logits(model, batch, attention=attention, run=run)
            rows, cols = index.long().unbind(0)
            labels, slot = batch.score_labels.long(), batch.score_pair.long() * 2 + batch.score_side.long()
        picked = out[rows, cols]
        return cls(picked if head is None else head.logits(picked), labels, slot, b)

    @property
    def logp(self) -> Tensor:
        """float32 (at least) ``(N, V)`` log-softmax, computed once."""
        if self._logp is None:
            self._logp = self.logits.log_softmax(-1, dtype=torch.promote_types(self.logits.dtype, torch.float32))
        return self._logp

    def _per_slot(self, x: Tensor) -> Tensor:
        return x.new_zeros(2 * self.b).index_add(0, self.slot, x).view(self.b, 2)

    @property
    def counts(self) -> Tensor:
        return torch.bincount(self.slot, minlength=2 * self.b).view(self.b, 2)

    def sums(self) -> tuple[Tensor, Tensor]:
        """Per-sequence sums of the scored tokens' log-probs: ``(chosen, rejected)``, ``(b,)`` each."""
        token = self.logp.gather(-1, self.labels[:, None]).squeeze(-1)
        s = self._per_slot(token)
        return s[:, 0], s[:, 1]

    def wpo_weights(self) -> Tensor:
        """WPO pair weights ``(b,)`` as TRL computes them: per sequence, exp of the mean over its
        tokens of ``log p(token) - log sum_v p(v)**2``; chosen times rejected. Detached."""
        with torch.no_grad():
            lp = self.logp
            aligned = lp.gather(-1, self.labels[:, None]).squeeze(-1) - torch.logsumexp(2 * lp, dim=-1)
            w = torch.exp(self._per_slot(aligned) / self.counts.clamp(min=1))
            return w[:, 0] * w[:, 1]

    def token_stats(self) -> Tensor:
        """float64 ``(7,)``: entropy sum and tokens (both sides), chosen mean-logit sum and tokens,
        rejected mean-logit sum and tokens, chosen top-1 hits (TRL's entropy, logits/* and
        mean_token_accuracy numerators and denominators)."""
        with torch.no_grad():
            lp = self.logp
            entropy = -(lp.exp() * lp).sum(-1)
            mean_logit = self.logits.float().mean(-1)
            top1 = (self.logits.argmax(-1) == self.labels).double()
            chosen = (self.slot % 2 == 0).double()
            n = float(self.labels.numel())
            nc = float(chosen.sum())
            return torch.stack([entropy.double().sum(), entropy.new_tensor(n, dtype=torch.float64),
                                (mean_logit.double() * chosen).sum(), entropy.new_tensor(nc, dtype=torch.float64),
                                (mean_logit.double() * (1 - chosen)).sum(),
                                entropy.new_tensor(n - nc, dtype=torch.float64), (top1 * chosen).sum()])


@dataclass
class _Head:
    """A Hugging Face causal LM split into its backbone and its LM head, with the config's logit
    scale and final soft-capping (the ones TRL's fused head applies)."""

    causal_lm: nn.Module
    backbone: nn.Module
    lm_head: nn.Module
    scale: float
    softcap: float | None

    def logits(self, hidden: Tensor) -> Tensor:
        out = self.lm_head(hidden)
        if self.scale != 1.0:
            out = out * self.scale
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out


def _hf_head(model: nn.Module) -> _Head | None:
    """The :class:`_Head` of a Hugging Face causal LM (a PEFT model's base model, adapters in
    place), or None for other models and for configs that scale logits in ways not known here."""
    if hasattr(model, "get_base_model"):  # PEFT: the causal LM, its adapter layers in place
        model = model.get_base_model()
    if not _is_hf(model):
        return None
    cfg = model.config.get_text_config()
    if any(getattr(cfg, k, None) is not None for k in ("output_multiplier", "lm_head_multiplier", "logits_scaling")):
        return None  # scaled differently by different families: the full forward is exact
    head, backbone = model.get_output_embeddings(), getattr(model, "base_model", None)
    if head is None or backbone is None or backbone is model:
        return None
    return _Head(model, backbone, head, float(getattr(cfg, "logit_scale", None) or 1.0),
                 getattr(cfg, "final_logit_softcapping", None))


def _is_hf(model: nn.Module) -> bool:
    return model_family(model) == "hf"
