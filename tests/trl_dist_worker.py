"""One rank of tests/test_trl.py::test_two_gloo_ranks_train_on_disjoint_batches (run by torchrun):
trains pairpack.trl.DPOTrainer for one epoch and writes the pairs this rank trained on."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pairpack.trl import DPOConfig, DPOTrainer  # noqa: E402
from tests.trl_support import tiny_llama  # noqa: E402


def main() -> None:
    ds, out = sys.argv[1], Path(sys.argv[2])
    model = tiny_llama(0, hidden=16, layers=1)
    args = DPOConfig(output_dir=str(out / "run"), per_device_train_batch_size=2, num_train_epochs=1, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, logging_steps=1,
                     gradient_checkpointing=False, layout="prefix_shared", ddp_backend="gloo")
    trainer = DPOTrainer(model, ref_model=copy.deepcopy(model), train_dataset=ds, args=args)
    seen: list[int] = []
    real = trainer.compute_loss

    def spy(model, inputs, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.extend(inputs["pairpack_batch"].indices.tolist())
        return real(model, inputs, *a, **k)

    trainer.compute_loss = spy
    trainer.train()
    loader = trainer._pp_train_loader
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "rank": loader.rank, "world": loader.world_size,
                                                       "losses": [h["loss"] for h in trainer.state.log_history
                                                                  if "loss" in h]}))


if __name__ == "__main__":
    main()
