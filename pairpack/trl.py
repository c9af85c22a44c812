"""``pairpack.trl``: TRL's ``DPOTrainer`` on pairpack datasets (the extra ``pairpack[trl]``).

    from pairpack.trl import DPOConfig, DPOTrainer          # instead of: from trl import ...
    args = DPOConfig(output_dir="out", per_device_train_batch_size=8, layout="prefix_shared")
    trainer = DPOTrainer(model, args=args, train_dataset="data/pairs")   # a pairpack dataset path

The documented import path; the implementation is :mod:`pairpack.train.trl_trainer`, and the
Hugging Face attention it uses for packed layouts is :mod:`pairpack.train.hf_attention`.
"""

from .train.hf_attention import ATTN_IMPLEMENTATION, register
from .train.trl_trainer import LOADER_STATE_FILE, DPOConfig, DPOTrainer, processing_class_of

register_attention = register

__all__ = ["ATTN_IMPLEMENTATION", "DPOConfig", "DPOTrainer", "LOADER_STATE_FILE", "processing_class_of",
           "register_attention"]
