"""Cross-check pairpack's loss types against TRL's DPOTrainer on identical tokens and weights.

Not part of the package or the tests (TRL is never a dependency): run it in a scratch venv that
has TRL, e.g.::

    python3 -m venv /tmp/trlvenv --system-site-packages && /tmp/trlvenv/bin/pip install trl
    PYTHONPATH=$PWD /tmp/trlvenv/bin/python tools/trl_crosscheck.py [../shared/tokenizers/gpt2.tokenizer.json]

A randomly initialised 2-layer GPT-2 (no download) is the policy; its perturbed copy is the
reference. For each loss type TRL's ``compute_loss`` runs on one collated batch of 4 pairs; pairpack's
``DPO(reduction="sum")`` runs on the same ``input_ids`` split into pairpack's triplet. Prints both
losses and their difference (model in float64; TRL's fused head computes in float32, hence ~1e-7).
For ``sft`` pairpack's per-sequence mean NLL is converted to TRL's batch token mean (the one
convention that differs) before the comparison.
"""

from __future__ import annotations

import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    import datasets
    import transformers

    from pairpack.dpo import DPO, sequence_logprobs

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    tok_path = sys.argv[1] if len(sys.argv) > 1 else "../shared/tokenizers/gpt2.tokenizer.json"
    tok = PreTrainedTokenizerFast(tokenizer_file=tok_path, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_head=2, n_embd=32, n_positions=128)
    policy = GPT2LMHeadModel(cfg).double().eval()
    ref = GPT2LMHeadModel(cfg).double().eval()
    ref.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows = [
        ("What is 2+2?", " Four.", " Five, I think."),
        ("Name a colour.", " Blue is a colour.", " Table."),
        ("Say hi.", " Hi!", " Goodbye, see you later."),
        ("Capital of France?", " Paris.", " It is Berlin, obviously."),
    ]
    data = Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                              "rejected": [r[2] for r in rows]})
    cases = [("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.1}), ("hinge", {}), ("ipo", {}), ("ipo", {"reduction": "mean"}), ("robust", {"label_smoothing": 0.1}),
             ("exo_pair", {"label_smoothing": 1e-3}), ("nca_pair", {}), ("bco_pair", {}), ("sppo_hard", {}),
             ("aot", {}), ("aot_unpaired", {}), ("apo_zero", {}), ("apo_down", {}), ("discopop", {}),
             ("sigmoid_norm", {}), ("sft", {}), (("sigmoid", "sft"), {"loss_weights": [1.0, 0.5]}),
             ("sigmoid", {"use_weighting": True})]
    print(f"{'loss_type':<40} {'TRL 1.16':>14} {'pairpack':>14} {'|diff|':>9}")
    # TRL's very first compute_loss on a fresh model gave 0.681507 vs 0.681619 on every later call
    # (observed, cause not investigated), so one unprinted warm-up case runs first.
    for i, (loss_type, kw) in enumerate([cases[0]] + cases):
        types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
        trl_kw = {k: v for k, v in kw.items() if k != "reduction"}
        args = DPOConfig(output_dir="/tmp/trl_xcheck", loss_type=types, beta=0.1, report_to=[],
                         per_device_train_batch_size=4, use_cpu=True, max_length=128, **trl_kw)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
        batch = next(iter(trainer.get_train_dataloader()))
        batch = {k: v.to("cpu") for k, v in batch.items()}
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, batch).item()
        ids, attn, comp = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
        b = ids.shape[0] // 2
        prompt = attn & ~comp
        assert torch.equal(prompt[:b], prompt[b:]), "TRL rows of one pair must share the prompt"
        eps = kw.get("label_smoothing", 0.0)
        dpo = DPO(_Wrap(policy), reduction=kw.get("reduction", "sum"), loss_type=tuple(types), beta=0.1, label_smoothing=eps,
                  loss_weights=kw.get("loss_weights"), use_weighting=kw.get("use_weighting", False),
                  ref_model=_Wrap(ref) if set(types) - {"sft"} else None)
        with torch.no_grad():
            mine = dpo(ids[:b], ids[b:], prompt_mask=prompt[:b], preferred_seq_mask=attn[:b],
                       unpreferred_seq_mask=attn[b:]).item()
        if "sft" in types:  # TRL averages the chosen NLL over all the batch's tokens, pairpack per sequence
            seq = torch.cat([ids[:b], ids[b:]])
            cm = torch.cat([attn[:b], attn[b:]]) & ~torch.cat([prompt[:b], prompt[:b]])
            with torch.no_grad():
                lp = sequence_logprobs(policy(seq[:, :-1]).logits, seq, cm)[:b]
            n = cm[:b, 1:].sum(dim=1)
            w = dict(zip(types, kw.get("loss_weights") or [1.0] * len(types)))["sft"]
            mine += w * ((-lp.sum() / n.sum()) - (-lp / n).mean()).item()
            kw = {**kw, "as": "TRL token mean"}
        if i == 0:
            continue
        name = "+".join(types) + ("".join(f" {k}={v}" for k, v in kw.items()))
        print(f"{name:<40} {trl_loss:>14.9f} {mine:>14.9f} {abs(trl_loss - mine):>9.2e}")


class _Wrap(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(ids).logits


if __name__ == "__main__":
    main()
