"""The error contract: what a user can trigger leaves pairpack as a PairpackError subclass (which
also subclasses the builtin it replaced, so existing ``except ValueError`` code keeps working);
one DeviceError for a missing CUDA, one MissingDependencyError naming the extra, one "already
exists" wording; export installs its files like every other writer (temp, fsync, rename)."""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pairpack
from pairpack.errors import (
    ArgumentError,
    ColumnNotFoundError,
    DatasetExistsError,
    DeviceError,
    MissingDependencyError,
    PairIndexError,
    PairpackError,
    StateError,
    import_optional,
)
from pairpack.format import token_dtype_for_vocab
from pairpack.ops import archive
from pairpack.ops.export import export
from pairpack.ops.merge import merge
from pairpack.write.columns import add_columns

EXISTS = "already exists; pass --force to replace it (force=True in Python)"


@pytest.fixture
def ds_path(tmp_path: Path) -> Path:
    with pairpack.Writer(tmp_path / "ds", vocab_size=100, columns={"score": "float32"}) as w:
        for i in range(5):
            w.add([1, 2, i], [3, 4], [5], score=float(i))
    return tmp_path / "ds"


def test_reader_errors_are_pairpack_errors(ds_path: Path) -> None:
    ds = pairpack.open(ds_path)
    with pytest.raises(ColumnNotFoundError) as e:
        ds.column("nope")
    assert isinstance(e.value, (PairpackError, KeyError)) and e.value.column == "nope"
    assert str(e.value) == f"{ds_path}: no column 'nope'; columns: ['score']"  # not quoted like a KeyError
    with pytest.raises(PairIndexError):
        ds[5]
    with pytest.raises(PairIndexError):
        ds.take([0, 7])
    with pytest.raises(ArgumentError, match="pair indices"):
        ds.take(["a"])
    assert [p.prompt.tolist() for p in ds] == [[1, 2, i] for i in range(5)]  # iteration still ends on IndexError
    ds.close()
    with pytest.raises(StateError, match="closed"):
        ds[0]


def test_writer_and_format_errors_are_pairpack_errors(tmp_path: Path, ds_path: Path) -> None:
    with pytest.raises(ArgumentError, match="vocab_size"):
        token_dtype_for_vocab(0)
    w = pairpack.Writer(tmp_path / "w", vocab_size=10)
    with pytest.raises(ArgumentError, match="lengths add up"):
        w.add_batch(np.array([1, 2, 3]), np.array([[1], [1], [2]]))
    w.add([1], [2], [3])
    w.commit()
    with pytest.raises(StateError, match="writer is closed"):
        w.add([1], [2], [3])
    with pytest.raises(ArgumentError, match="bad column name"):
        add_columns(ds_path, {"Bad-Name": np.zeros(5, np.float32)})
    with pytest.raises(ArgumentError, match="how must be"):
        merge([ds_path], tmp_path / "m", how="teleport")
    for e in (ArgumentError, StateError):
        assert issubclass(e, PairpackError) and issubclass(e, ValueError)


def test_cuda_unavailable_is_one_device_error(ds_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from pairpack.cuda import DeviceFeeder

    with pytest.raises(DeviceError, match="CUDA is not available") as a:
        pairpack.Loader(ds_path, batch_size=2, device="cuda")._device_feeder_class()
    with pytest.raises(DeviceError, match="CUDA is not available") as b:
        DeviceFeeder("cuda", pad_id=0)
    assert str(a.value) == str(b.value)


def test_missing_dependency_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ds_path: Path) -> None:
    from pairpack.ops.stats import compute_stats, plot_stats
    from pairpack.train.demo import save_plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    for call in (lambda: plot_stats(compute_stats(pairpack.open(ds_path)), tmp_path / "p.png"),
                 lambda: save_plot(None, tmp_path / "d.png")):  # type: ignore[arg-type]
        with pytest.raises(MissingDependencyError) as e:
            call()
        assert e.value.extra == "plot" and e.value.package == "matplotlib"
        assert str(e.value) == '--plot needs matplotlib, which is not installed: pip install "pairpack[plot]"'
        assert isinstance(e.value, ImportError)
    assert not list(tmp_path.glob("*.png"))
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    monkeypatch.setattr("pairpack.ingest.shapes._SANDBOX_ENV", None)
    from pairpack.ingest.shapes import ChatRenderer

    with pytest.raises(MissingDependencyError, match=r'pairpack\[hf\]'):
        ChatRenderer("{{ messages }}")._jinja()


def test_errors_survive_pickling() -> None:
    # build workers send errors across processes
    for e in (DatasetExistsError("/x", "and was built differently"), ColumnNotFoundError("/d", "c", ["a"]),
              MissingDependencyError("pyarrow", "reading Parquet", "parquet")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
    with pytest.raises(MissingDependencyError, match=r"pip install zstd_missing_pkg$"):
        import_optional("zstd_missing_pkg.sub", feature="x", extra=None)


def test_already_exists_is_worded_once(tmp_path: Path, ds_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": [1], "chosen": [2], "rejected": [3]}\n')
    calls = {
        "Writer": lambda: pairpack.Writer(target),
        "build": lambda: pairpack.build([src], target),
        "merge": lambda: merge([ds_path], target),
        "export": lambda: export(ds_path, target),
        "pack": lambda: archive.pack(ds_path, target),
    }
    for name, call in calls.items():
        with pytest.raises(DatasetExistsError) as e:
            call()
        assert str(e.value) == f"{target}: {EXISTS}", name


def _fsynced_paths(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced files")
def test_export_fsyncs_like_every_writer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ds_path: Path) -> None:
    out = tmp_path / "out" / "pairs.jsonl"
    out.parent.mkdir()
    seen = _fsynced_paths(monkeypatch)
    assert export(ds_path, out) == 5
    names = [Path(p).name for p in seen]
    # the data file and the sidecar, each under its temp name before the rename, then the directory
    assert any(n.startswith(".pairs.jsonl.pairpack-tmp-") for n in names), names
    assert any(n.startswith(".pairs.jsonl.pairpack.json.pairpack-tmp-") for n in names), names
    assert names.count("out") >= 2, names
    assert sorted(p.name for p in out.parent.iterdir()) == ["pairs.jsonl", "pairs.jsonl.pairpack.json"]


def test_export_leaves_nothing_when_the_sidecar_cannot_be_written(tmp_path: Path, ds_path: Path) -> None:
    out = tmp_path / "pairs.jsonl"
    Path(str(out) + ".pairpack.json").mkdir()  # the sidecar's path is taken by a directory
    with pytest.raises(OSError):
        export(ds_path, out)
    assert not out.exists()  # no export without its sidecar
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "pairs.jsonl.pairpack.json"]


def test_column_update_is_not_rolled_back_after_its_commit_point(monkeypatch: pytest.MonkeyPatch,
                                                                 ds_path: Path) -> None:
    """A failure after the new manifest is in place (the directory fsync) must not delete the
    column files that manifest now names."""
    from pairpack.format import fsio

    real = fsio._fsync_dir

    def fsync_dir(p: Path) -> None:
        if Path(p) == ds_path:
            raise OSError(5, "I/O error")
        real(p)

    monkeypatch.setattr(fsio, "_fsync_dir", fsync_dir)
    with pytest.raises(OSError):
        add_columns(ds_path, {"bonus": np.arange(5, dtype=np.float32)})
    monkeypatch.undo()
    ds = pairpack.open(ds_path)
    assert ds.column("bonus").tolist() == [0, 1, 2, 3, 4] and ds.verify() == []


def test_dpo_input_checks_are_argument_errors() -> None:
    from pairpack.errors import ArgumentTypeError
    from pairpack.train.dpo import dpo_loss, xtransformers_inputs

    z = torch.zeros(2)
    with pytest.raises(ArgumentError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)
    seq = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ArgumentTypeError, match="bool") as e:
        xtransformers_inputs(seq, seq, torch.zeros(2, 4, dtype=torch.long))
    assert isinstance(e.value, TypeError) and isinstance(e.value, PairpackError)
    with pytest.raises(ArgumentError, match="N >= 2"):
        xtransformers_inputs(seq[:, :1], seq[:, :1], torch.zeros(2, 1, dtype=torch.bool))


BAD_CALLS = {  # call on a 5-pair dataset -> (pairpack class, the builtin it also is)
    'ds["x"]': (lambda ds: ds["x"], ArgumentError, ValueError),
    "ds[inf]": (lambda ds: ds[float("inf")], ArgumentError, ValueError),
    "ds[None]": (lambda ds: ds[None], pairpack.ArgumentTypeError, TypeError),
    "ds[0:2]": (lambda ds: ds[0:2], pairpack.ArgumentTypeError, TypeError),
    "ds[[0]]": (lambda ds: ds[[0]], pairpack.ArgumentTypeError, TypeError),
    "ds[5]": (lambda ds: ds[5], PairIndexError, IndexError),
    'ds.batch(["a"])': (lambda ds: ds.batch(["a"]), ArgumentError, ValueError),
    'ds.batch([0], layout="x")': (lambda ds: ds.batch([0], layout="x"), ArgumentError, ValueError),
    "ds.batch([0], max_length=-1)": (lambda ds: ds.batch([0], max_length=-1), ArgumentError, ValueError),
    "pairpack.open(None)": (lambda ds: pairpack.open(None), pairpack.ArgumentTypeError, TypeError),
    "pairpack.open(missing)": (lambda ds: pairpack.open(ds.path / "nope"), pairpack.FormatError, ValueError),
    'Loader(seed="a")': (lambda ds: pairpack.Loader(ds, batch_size=2, seed="a"), pairpack.ArgumentTypeError,
                         TypeError),
    "Loader(batch_size=0)": (lambda ds: pairpack.Loader(ds, batch_size=0), ArgumentError, ValueError),
    'Loader.set_epoch("a")': (lambda ds: pairpack.Loader(ds, batch_size=2).set_epoch("a"),
                              pairpack.ArgumentTypeError, TypeError),
    "Loader.load_state_dict({})": (lambda ds: pairpack.Loader(ds, batch_size=2).load_state_dict({}), StateError,
                                   ValueError),
    "DPO(3)": (lambda ds: __import__("pairpack.dpo").dpo.DPO(3), pairpack.ArgumentTypeError, TypeError),
    'Collate(ds)(["x"])': (lambda ds: pairpack.Collate(ds)(["x"]), ArgumentError, ValueError),
    "build(nonsense=1)": (lambda ds: pairpack.build([], ds.path / "out", nonsense=1), pairpack.ArgumentTypeError,
                          TypeError),
}


@pytest.mark.parametrize("call", sorted(BAD_CALLS))
def test_bad_calls_raise_pairpack_errors(ds_path: Path, call: str) -> None:
    """A bad call raises a PairpackError subclass that is also the builtin Python code expects
    (``ds["x"]`` once escaped as int()'s bare ValueError)."""
    fn, cls, builtin = BAD_CALLS[call]
    with pytest.raises(cls) as e:
        fn(pairpack.open(ds_path))
    assert isinstance(e.value, (PairpackError)) and isinstance(e.value, builtin), type(e.value).__mro__
