"""pairpack.trl: TRL's DPOTrainer on pairpack datasets.

With the padded layout, pairpack.trl.DPOTrainer logs TRL's own DPOTrainer's losses and metrics on the
same records (full-batch steps, so batch order cannot matter) and in evaluate(); prefix_shared and
packed give the padded run's; a run stopped after a checkpoint and resumed gives the uninterrupted
run's; the ids of `pairpack build` equal what TRL prepares from the same text records; the
reference cache is stored in the dataset and reused; fields pairpack cannot honour are refused.
A tiny Llama built from a config and a byte-level tokenizer made here: nothing is downloaded.
mean_token_accuracy may differ by one near-tied token of ~300. Tolerances: float32 sums of ~150 token log-probs (|logp| ~ 170 nats) agree to ~1e-4 between TRL's
chunked fused head and pairpack's gather; rewards are beta * differences of such sums.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

import pairpack  # noqa: E402
from pairpack.errors import ArgumentError  # noqa: E402
from pairpack.trl import LOADER_STATE_FILE, DPOConfig, DPOTrainer  # noqa: E402
from pairpack.train.reference import REFERENCE_COLUMNS  # noqa: E402

from .trl_support import byte_tokenizer, records, tiny_llama  # noqa: E402

N_PAIRS = 8
# plain SGD: Adam's first steps move every weight by about the learning rate whatever its gradient,
# so float noise in a near-zero gradient becomes a full step; SGD keeps the runs as close as their losses
COMMON = dict(per_device_train_batch_size=N_PAIRS, per_device_eval_batch_size=N_PAIRS, logging_steps=1,
              report_to=[], optim="sgd", learning_rate=0.5, beta=0.1, use_cpu=True, seed=0, disable_tqdm=True,
              bf16=False)  # TRL defaults to bf16 autocast; float32 makes the comparison exact to float noise
TOL = dict(rtol=2e-4, atol=2e-4)
REWARD_TOL = dict(rtol=2e-3, atol=1e-3)
KEYS = ("loss", "entropy", "num_tokens", "logits/chosen", "logits/rejected", "mean_token_accuracy",
        "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("trl")
    tok_dir = byte_tokenizer(tmp / "tok")
    recs = records(N_PAIRS, shared_prompts=2)
    (tmp / "r.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    pairpack.build([str(tmp / "r.jsonl")], tmp / "ds", tokenizer=str(tok_dir / "tokenizer.json"))
    return {"tmp": tmp, "records": recs, "ds": tmp / "ds",
            "tokenizer": transformers.PreTrainedTokenizerFast.from_pretrained(str(tok_dir)), "model": tiny_llama(0)}


def _logs(trainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def _close(a: dict, b: dict, keys=KEYS) -> None:
    for k in keys:
        tol = REWARD_TOL if "rewards/" in k and not k.endswith("rewards/accuracies") else TOL
        if k.endswith("mean_token_accuracy"):  # a random tiny model's top-1 may flip on a near-tie: 1 of ~300
            tol = dict(rtol=0, atol=0.01)
        assert b[k] == pytest.approx(a[k], rel=tol["rtol"], abs=tol["atol"]), (k, a[k], b[k])


def _pairpack(data: dict, out: str, **kw) -> DPOTrainer:
    m = data["model"]
    return DPOTrainer(copy.deepcopy(m), ref_model=copy.deepcopy(m), train_dataset=data["ds"],
                      eval_dataset=data["ds"], args=DPOConfig(output_dir=str(data["tmp"] / out), **{**COMMON, **kw}))


@pytest.fixture(scope="module")
def trl_run(data: dict) -> dict:
    import trl

    m = data["model"]
    recs = datasets.Dataset.from_list(data["records"])
    t = trl.DPOTrainer(copy.deepcopy(m), ref_model=copy.deepcopy(m), train_dataset=recs, eval_dataset=recs,
                       processing_class=data["tokenizer"],
                       args=trl.DPOConfig(output_dir=str(data["tmp"] / "trl"), max_steps=3, save_strategy="no",
                                          **COMMON))
    t.train()
    # after training: before it, policy == reference and the rewards are float noise around 0
    return {"logs": _logs(t), "eval": t.evaluate(), "prepared": t.train_dataset}


def test_build_ids_equal_what_trl_prepares(data: dict, trl_run: dict) -> None:
    ds = pairpack.open(data["ds"])
    prepared = trl_run["prepared"]
    for i in range(N_PAIRS):
        row = prepared[i]
        assert ds[i].prompt.tolist() == row["prompt_ids"]
        assert ds[i].chosen.tolist() == row["chosen_ids"]
        assert ds[i].rejected.tolist() == row["rejected_ids"]


@pytest.mark.parametrize("layout", ["padded", "prefix_shared", "packed"])
def test_losses_and_metrics_equal_trl(data: dict, trl_run: dict, layout: str) -> None:
    t = _pairpack(data, f"pp-{layout}", max_steps=3, save_strategy="no", layout=layout)
    t.train()
    got = _logs(t)
    got_eval = t.evaluate()
    assert len(got) == len(trl_run["logs"]) == 3
    for a, b in zip(trl_run["logs"], got):
        _close(a, b)
    _close(trl_run["eval"], got_eval, keys=[f"eval_{k}" for k in KEYS if k != "num_tokens"])


def test_resume_continues_with_the_uninterrupted_batches(data: dict) -> None:
    """Batches of 2 pairs, shuffled: the resumed run must see exactly the batches steps 3-4 would have seen."""
    kw = dict(per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2, layout="prefix_shared")
    whole = _pairpack(data, "whole", **kw)
    whole.train()
    ckpt = data["tmp"] / "whole" / "checkpoint-2"
    state = json.loads((ckpt / LOADER_STATE_FILE).read_text())
    assert (state["epoch"], state["position"]) == (0, 2)
    resumed = _pairpack(data, "whole", **kw)
    seen = []
    real_loss = resumed.compute_loss

    def spy(model, inputs, *a, **k):
        seen.append(inputs["pairpack_batch"].indices.tolist())
        return real_loss(model, inputs, *a, **k)

    resumed.compute_loss = spy
    resumed.train(resume_from_checkpoint=str(ckpt))
    loader = resumed._pp_train_loader
    loader.set_epoch(0)
    want = [b.tolist() for b in loader.batches()[2:4]]
    assert seen == want
    a = _logs(whole)[2:]
    b = [x for x in _logs(resumed) if x["step"] > 2]  # the log history before step 2 is the checkpoint's
    assert [x["step"] for x in b] == [3, 4]
    for x, y in zip(a, b):
        _close(x, y)
    # a checkpoint without the Loader's file (made by another trainer): the position is derived
    (ckpt / LOADER_STATE_FILE).unlink()
    derived = _pairpack(data, "whole", **kw)
    seen_derived = []
    real_derived = derived.compute_loss

    def spy_derived(model, inputs, *a, **k):
        seen_derived.append(inputs["pairpack_batch"].indices.tolist())
        return real_derived(model, inputs, *a, **k)

    derived.compute_loss = spy_derived
    derived.train(resume_from_checkpoint=str(ckpt))
    assert seen_derived == want


def test_reference_cache_is_stored_and_reused(data: dict, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(data["ds"], tmp_path / "ds")
    m = data["model"]
    args = DPOConfig(output_dir=str(tmp_path / "o"), max_steps=1, save_strategy="no", precompute_ref_log_probs=True,
                     **COMMON)
    t = DPOTrainer(copy.deepcopy(m), train_dataset=tmp_path / "ds", args=args)
    assert t.ref_model is None
    ds = pairpack.open(tmp_path / "ds")
    assert set(REFERENCE_COLUMNS) <= set(ds.column_names)
    stamp = (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns
    t.train()
    DPOTrainer(copy.deepcopy(m), train_dataset=tmp_path / "ds", args=args)  # same reference: reused
    assert (tmp_path / "ds" / "manifest.json").stat().st_mtime_ns == stamp
    # the cached losses equal a run with the reference model (step 1: policy == reference)
    live = _pairpack(data, "live", max_steps=1, save_strategy="no")
    live.train()
    # at step 1 the rewards are float32 noise around 0, so their signs (accuracies) are not compared
    _close(_logs(live)[0], _logs(t)[0], keys=[k for k in KEYS if k != "rewards/accuracies"])


def test_processing_class_comes_from_the_dataset(data: dict) -> None:
    t = DPOTrainer(copy.deepcopy(data["model"]), ref_model=copy.deepcopy(data["model"]), train_dataset=str(data["ds"]),
                   args=DPOConfig(output_dir=str(data["tmp"] / "tok"), max_steps=1, **COMMON))
    tok = t.processing_class
    assert tok.eos_token == "<|endoftext|>"
    assert tok("ab")["input_ids"] == data["tokenizer"]("ab")["input_ids"]


@pytest.mark.parametrize("field,value,match", [
    ("f_divergence_type", "js_divergence", "f_divergence_type"),
    ("ld_alpha", 0.5, "ld_alpha"),
    ("sync_ref_model", True, "sync_ref_model"),
])
def test_fields_pairpack_cannot_honour_are_refused(data: dict, field: str, value, match: str) -> None:
    args = DPOConfig(output_dir=str(data["tmp"] / "x"), **{field: value}, **COMMON)
    with pytest.raises(ArgumentError, match=match):
        DPOTrainer(copy.deepcopy(data["model"]), train_dataset=data["ds"], args=args)


def test_config_fields_and_refusals(data: dict) -> None:
    with pytest.raises(ArgumentError, match="layout must be one of"):
        DPOConfig(output_dir="x", layout="nested", use_cpu=True)
    with pytest.raises(ArgumentError, match="batch_rebalance"):
        DPOConfig(output_dir="x", train_sampling_strategy="batch_rebalance", use_cpu=True)
    assert DPOConfig(output_dir="x", padding_free=True, use_cpu=True).layout == "packed"
    assert DPOConfig(output_dir="x", train_sampling_strategy="group_by_length",
                     use_cpu=True).group_by_length
    parser = transformers.HfArgumentParser(DPOConfig)
    (cfg,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--use_cpu", "--layout", "prefix_shared", "--max_tokens",
                                                 "4096", "--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.5"])
    assert (cfg.layout, cfg.max_tokens, cfg.loss_type, cfg.loss_weights) == ("prefix_shared", 4096, ["sigmoid", "sft"],
                                                                            [1.0, 0.5])
    with pytest.raises(ArgumentError, match="pairpack dataset or its path"):
        DPOTrainer(copy.deepcopy(data["model"]), train_dataset=datasets.Dataset.from_list(data["records"]),
                   args=DPOConfig(output_dir="x", **COMMON))
    with pytest.raises(ArgumentError, match="data_collator"):
        DPOTrainer(copy.deepcopy(data["model"]), train_dataset=data["ds"], data_collator=lambda x: x,
                   args=DPOConfig(output_dir="x", **COMMON))


@pytest.mark.parametrize("loss_type,extra", [(["sigmoid", "sft"], dict(loss_weights=[1.0, 0.5])),
                                             (["ipo"], {}), (["robust"], dict(label_smoothing=0.1)),
                                             (["sigmoid"], dict(use_weighting=True))])
def test_loss_family_equals_trl(data: dict, loss_type: list, extra: dict) -> None:
    """Two full-batch steps of other loss types, TRL's sft convention (token mean over the batch) and WPO weighting."""
    import trl

    m = data["model"]
    kw = dict(max_steps=2, save_strategy="no", loss_type=loss_type, **extra, **COMMON)
    recs = datasets.Dataset.from_list(data["records"])
    ref = trl.DPOTrainer(copy.deepcopy(m), ref_model=copy.deepcopy(m), train_dataset=recs,
                         processing_class=data["tokenizer"], args=trl.DPOConfig(output_dir=str(data["tmp"] / "l"), **kw))
    ref.train()
    got = _pairpack(data, "l2", **kw)
    got.train()
    for a, b in zip(_logs(ref), _logs(got)):
        _close(a, b)


def test_gradient_accumulation_equals_the_full_batch(data: dict) -> None:
    """Two micro-batches of 4 pairs with gradient_accumulation_steps=2 train as one batch of 8."""
    full = _pairpack(data, "ga1", max_steps=2, save_strategy="no", train_sampling_strategy="sequential")
    full.train()
    acc = _pairpack(data, "ga2", max_steps=2, save_strategy="no", train_sampling_strategy="sequential",
                    per_device_train_batch_size=4, gradient_accumulation_steps=2)
    acc.train()
    for a, b in zip(_logs(full), _logs(acc)):
        _close(a, b, keys=("loss", "logps/chosen", "logps/rejected", "rewards/margins"))


def test_peft_reference_is_the_disabled_adapter(data: dict) -> None:
    """A LoRA run without ref_model: at step 1 (adapter initialised to zero) the rewards are 0 and the
    loss ln 2; the reference forward ran with the adapter disabled (the policy then moved)."""
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    t = DPOTrainer(copy.deepcopy(data["model"]), train_dataset=data["ds"], peft_config=cfg,
                   args=DPOConfig(output_dir=str(data["tmp"] / "peft"), max_steps=3, save_strategy="no",
                                  **{**COMMON, "learning_rate": 2.0}))
    assert t.ref_model is None
    t.train()
    logs = _logs(t)
    assert logs[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    assert logs[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert logs[-1]["rewards/margins"] != pytest.approx(0.0, abs=1e-4)


def test_mixed_precision_follows_the_trainer(data: dict) -> None:
    """TRL's default bf16=True runs the forwards under the accelerator's autocast; pairpack's fused path
    (backbone, then the head at scored positions) runs under it too. At step 1 the log-probs then equal
    TRL's to 2e-4 nats (measured: 1.5e-5; computed in float32 instead they were 2e-3 off)."""
    import trl

    m = data["model"]
    kw = {**COMMON, "bf16": True, "max_steps": 1, "save_strategy": "no"}
    ref = trl.DPOTrainer(copy.deepcopy(m), ref_model=copy.deepcopy(m), processing_class=data["tokenizer"],
                         train_dataset=datasets.Dataset.from_list(data["records"]),
                         args=trl.DPOConfig(output_dir=str(data["tmp"] / "bf"), **kw))
    ref.train()
    got = DPOTrainer(copy.deepcopy(m), ref_model=copy.deepcopy(m), train_dataset=data["ds"],
                     args=DPOConfig(output_dir=str(data["tmp"] / "bf2"), layout="prefix_shared", **kw))
    got.train()
    a, b = _logs(ref)[0], _logs(got)[0]
    for k in ("loss", "logps/chosen", "logps/rejected"):
        assert b[k] == pytest.approx(a[k], rel=0, abs=2e-4), (k, a[k], b[k])


def test_reference_free_loss_types_hold_no_reference(data: dict) -> None:
    """pairpack's reference-free types (here SimPO) train without a reference model; the loss is
    pairpack's formula on the policy's per-sequence sums and token counts."""
    t = _pairpack(data, "simpo", max_steps=1, save_strategy="no", loss_type=["simpo"])
    assert t.ref_model is None and not t.needs_reference
    t.train()
    log = _logs(t)[0]
    assert "rewards/chosen" not in log and log["loss"] > 0 and log["logps/chosen"] < 0


def test_two_gloo_ranks_train_on_disjoint_batches(data: dict, tmp_path: Path) -> None:
    """torchrun, 2 CPU processes (gloo, DistributedDataParallel): each rank's Loader takes the rank and
    world size from the trainer's accelerator; the ranks train on disjoint pairs that together are the
    epoch, and log the same (gathered) losses."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("trl_dist_worker.py")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), str(worker), str(data["ds"]), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    assert sorted(ranks[0]["seen"] + ranks[1]["seen"]) == list(range(N_PAIRS))
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == N_PAIRS // 4
