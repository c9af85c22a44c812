"""The DPO demo in a shortened form: the loss starts at ln 2 exactly and falls (pairpack.train.demo, CLI)."""

from __future__ import annotations

import json
import math

import pytest

from pairpack.ingest.build import build
from pairpack.train.demo import DemoConfig, format_table, run_demo, save_plot
from pairpack.train.reference import REFERENCE_COLUMNS

from .conftest import run_cli

LN2 = math.log(2)
# a tiny model and a short run: about a second of CPU per 10 steps
QUICK = DemoConfig(steps=24, eval_every=8, batch_size=8, lr=3e-3, d_model=32, n_layers=1, n_heads=2,
                   held_out=40, train_eval=40, eval_batch=20)


@pytest.fixture(scope="module")
def sample_subset(tmp_path_factory, sample_json):
    """The first 240 records of the bundled real sample, built with the byte tokenizer."""
    root = tmp_path_factory.mktemp("demo")
    records = json.loads(sample_json.read_text())[:240]
    src = root / "sample.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    return src


def _fresh(tmp_path, src):
    out = tmp_path / "ds"
    build([src], out, prompt="instruction")
    return out


def test_demo_loss_starts_at_ln2_and_falls(tmp_path, sample_subset):
    res = run_demo(_fresh(tmp_path, sample_subset), QUICK, progress=False)
    assert [r["step"] for r in res.rows] == [0, 8, 16, 24]
    first, last = res.rows[0], res.rows[-1]
    # step 0: the policy is the reference, evaluated in the cache's batches
    for split in ("train", "heldout"):
        assert first[f"{split}_loss"] == pytest.approx(LN2, abs=1e-6)
        assert first[f"{split}_acc"] == 0.0 and first[f"{split}_margin"] == 0.0
    assert last["train_loss"] < LN2 - 0.05  # learning is visible on the training pairs
    assert last["train_margin"] > 0.1 and last["train_acc"] > 0.5
    assert len(res.step_losses) == QUICK.steps
    assert sum(res.step_losses[-6:]) / 6 < sum(res.step_losses[:6]) / 6
    assert (res.n_train, res.n_heldout, res.n_train_eval) == (200, 40, 40)
    for r in res.rows:  # held-out figures are measured, not copied
        assert 0.0 <= r["heldout_acc"] <= 1.0 and math.isfinite(r["heldout_loss"])
    table = format_table(res).splitlines()
    assert "held-out acc" in table[0] and len(table) == 2 + len(res.rows)


def test_demo_with_zero_learning_rate_stays_at_ln2(tmp_path, sample_subset):
    """The control for the test above: without learning the loss does not move."""
    cfg = DemoConfig(**{**QUICK.__dict__, "lr": 0.0, "steps": 4, "eval_every": 4})
    res = run_demo(_fresh(tmp_path, sample_subset), cfg, progress=False)
    for r in res.rows:
        assert r["train_loss"] == pytest.approx(LN2, abs=1e-6)
        assert r["heldout_loss"] == pytest.approx(LN2, abs=1e-6)


@pytest.mark.parametrize("layout", ["prefix_shared", "packed"])
def test_demo_in_a_shared_layout_starts_at_ln2_and_follows_padded(tmp_path, sample_subset, layout):
    """Cache, training and evaluation in another layout: exactly ln 2 at step 0 (the cache's batches),
    the same training losses as the padded run (same pairs, same order), and learning."""
    cfg = DemoConfig(**{**QUICK.__dict__, "layout": layout, "steps": 16})
    res = run_demo(_fresh(tmp_path / "a", sample_subset), cfg, progress=False)
    pad = run_demo(_fresh(tmp_path / "b", sample_subset), DemoConfig(**{**QUICK.__dict__, "steps": 4, "eval_every": 4}),
                   progress=False)
    first = res.rows[0]
    for split in ("train", "heldout"):
        assert first[f"{split}_loss"] == pytest.approx(LN2, abs=1e-6)
        assert first[f"{split}_acc"] == 0.0 and first[f"{split}_margin"] == 0.0  # bit-equal to the cache
    assert res.step_losses[:4] == pytest.approx(pad.step_losses, rel=1e-4)
    assert res.rows[-1]["train_loss"] < LN2 - 0.03


def test_demo_plot(tmp_path, sample_subset):
    pytest.importorskip("matplotlib")
    cfg = DemoConfig(**{**QUICK.__dict__, "steps": 2, "eval_every": 1})
    res = run_demo(_fresh(tmp_path, sample_subset), cfg, progress=False)
    out = save_plot(res, tmp_path / "curves" / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_refuses_too_small_datasets(tmp_path, sample_subset):
    from pairpack.errors import PairpackError

    with pytest.raises(PairpackError, match="too few"):
        run_demo(_fresh(tmp_path, sample_subset), DemoConfig(held_out=10_000), progress=False)


def test_cli_demo(tmp_path):
    """`pairpack demo --layout prefix_shared` end to end (the bundled sample, 2 steps): build, show, cache,
    table, plot; the padded layout runs in the tests above."""
    import importlib.util

    png = tmp_path / "curves.png"
    plot = ["--plot", png] if importlib.util.find_spec("matplotlib") else []
    proc = run_cli("demo", "--out", tmp_path / "demo", "--steps", "2", "--no-progress", "--layout", "prefix_shared",
                   *plot)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "DPO demo" in out and "held-out acc" in out and "reference log-probs of 1,100 pairs" in out
    assert "prefix_shared layout" in out
    row0 = next(line for line in out.splitlines() if line.strip().startswith("0 "))
    assert row0.split()[1] == "0.6931"
    assert png.exists() == bool(plot)
    from pairpack import open as open_dataset

    ds = open_dataset(tmp_path / "demo" / "sample")
    assert set(REFERENCE_COLUMNS) <= set(ds.column_names) and ds.verify() == []


def test_count_progress_draws_a_bar_and_closes_once():
    import io

    from pairpack.progress import CountProgress

    buf = io.StringIO()
    bar = CountProgress(4, label="steps", enabled=True, stream=buf, hz=1e9)
    for i in range(1, 5):
        bar.postfix = f"loss {1 / i:.2f}"
        bar.update(i)
    bar.close()
    bar.close()
    text = buf.getvalue()
    assert "[" + "#" * 24 + "] 4/4 steps" in text and "loss 0.25" in text
    assert text.count("\n") == 1 and "\x1b" not in text  # no terminal codes into a non-terminal
    quiet = io.StringIO()
    CountProgress(4, stream=quiet).update(2)  # default: only on a terminal
    assert quiet.getvalue() == ""
