"""Shared fixtures and Hypothesis profiles (``HYPOTHESIS_PROFILE=ci`` in CI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"

settings.register_profile("dev", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# `make test-long`: ten times the examples of the tests that take their count from the profile
settings.register_profile("long", max_examples=400, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="no CUDA device")
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout (real data and tokenizers); tests skip when absent."""
    if not SHARED.is_dir():
        pytest.skip(SHARED_MISSING)
    return SHARED


SHARED_MISSING = (
    f"needs {SHARED}: the real tokenizers (GPT-2, Qwen3, Phi-3 tokenizer.json files) and preference data "
    "(HH-RLHF harmless test split, rasbt Alpaca-style sample) these tests run on, in a 'shared' directory "
    "beside the checkout; its PROVENANCE.md files name the public source of each file (e.g. "
    "github.com/anthropics/hh-rlhf harmless-base/test.jsonl.gz); copy them there to run these tests")


@pytest.fixture(scope="session")
def sample_json() -> Path:
    """The bundled real sample inside the package."""
    return ROOT / "pairpack" / "data" / "instruction-data-with-preference.json"


def run_cli(*args: str, cwd: Path | None = None, input: str | None = None):
    """Run ``python -m pairpack.cli ARGS`` in a subprocess; returns CompletedProcess (text)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "pairpack.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, input=input, timeout=300)


def write_jsonl(path: Path, records: list, blank_every: int = 0) -> Path:
    """Write ``records`` as JSON lines at ``path`` (gzip or zstandard by suffix); with
    ``blank_every`` a blank line follows every that-many records. Returns ``path``."""
    import gzip
    import json

    import zstandard

    lines = []
    for i, r in enumerate(records):
        lines.append(json.dumps(r, ensure_ascii=False))
        if blank_every and i % blank_every == 0:
            lines.append("")
    data = ("\n".join(lines) + "\n").encode() if lines else b""
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(params=["native", "numpy"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on both batch paths: the C kernels (``pairpack._native``, skipped where they
    are not built) and the numpy path they replace."""
    from pairpack import _accel

    if request.param == "native":
        if _accel.native is None:
            pytest.skip("pairpack._native is not built")
    else:
        monkeypatch.setattr(_accel, "native", None)
    return request.param
