"""Typed errors of pairpack.

Every error a user can cause (a damaged file, a bad input record, a wrong option) is raised as a
subclass of :class:`PairpackError`, so ``except pairpack.PairpackError`` catches exactly the
problems pairpack reports on purpose. Each carries the file and field it is about as attributes
as well as in its message.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = [
    "PairpackError",
    "FormatError",
    "ChecksumError",
    "SourceError",
    "TokenizerError",
    "DatasetExistsError",
    "NotReplaceableError",
    "StateError",
    "DeviceError",
    "ModelError",
    "ArgumentError",
    "ArgumentTypeError",
    "ColumnNotFoundError",
    "PairIndexError",
    "MissingDependencyError",
    "OversizeError",
    "LossConfigError",
]


class PairpackError(Exception):
    """Base class of every error pairpack raises on purpose."""


class FormatError(PairpackError, ValueError):
    """A dataset on disk breaks spec/FORMAT.md.

    Attributes:
        path: the file (or dataset directory) at fault.
        field: the manifest key, array or header field at fault.
        expected: what the spec requires (may be None).
        actual: what was found (may be None).
        section: the FORMAT.md section that states the rule (e.g. "§5.2").
    """

    def __init__(
        self,
        message: str,
        *,
        path: Any = None,
        field: str | None = None,
        expected: Any = None,
        actual: Any = None,
        section: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.field = field
        self.expected = expected
        self.actual = actual
        self.section = section
        where = ": ".join(p for p in (self.path, field) if p)
        text = f"{where}: {message}" if where else message
        if expected is not None or actual is not None:
            text += f" (expected {expected!r}, got {actual!r})"
        if section:
            text += f" [FORMAT.md {section}]"
        super().__init__(text)


class ChecksumError(FormatError):
    """A file's size or checksum differs from the one its manifest records."""


class SourceError(PairpackError, ValueError):
    """An input record cannot be turned into a pair.

    Attributes:
        path: the input file.
        line: 1-based line number (JSONL) or record number (other containers), or None.
        field: the record field at fault, or None.
        reason: a short machine-readable reason (e.g. "missing_field"), used for reject counts.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Any = None,
        line: int | None = None,
        field: str | None = None,
        reason: str = "invalid",
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        self.reason = reason
        self.detail = message
        where = str(self.path or "<input>")
        if line is not None:
            where += f":{line}"
        if field:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")


class TokenizerError(PairpackError, ValueError):
    """A tokenizer cannot be loaded or used (missing extra, bad file, unknown id)."""


class DatasetExistsError(PairpackError, FileExistsError):
    """An output path (a dataset, an archive, an export) already exists and ``force`` was not given.

    The one wording every writer uses: ``<path>: already exists[ <why>]; pass --force to replace it
    (force=True in Python)``.

    Attributes:
        path: the existing output.
    """

    FIX = "pass --force to replace it (force=True in Python)"

    def __init__(self, path: Any, why: str = "", fix: str = FIX) -> None:
        self.path = str(path)
        self.why = why
        self.fix = fix
        super().__init__(f"{self.path}: {self._state(why)}; {fix}")

    @staticmethod
    def _state(why: str) -> str:
        return f"already exists {why}" if why else "already exists"

    def __reduce__(self) -> tuple[Any, ...]:
        return (DatasetExistsError, (self.path, self.why, self.fix))


class NotReplaceableError(DatasetExistsError):
    """``force`` was given, but the output path holds something pairpack did not make (a user's
    directory, a plain file, a dataset directory with the user's own files in it): pairpack
    replaces only its own datasets, archives and exports, and never deletes anything else
    (spec/FORMAT.md §9 W8).

    Attributes:
        path: the output path.
        why: what makes it not pairpack's (e.g. ``"is a file, not a dataset directory"``).
        what: what pairpack would have replaced (``"dataset"``, ``"archive"``, ``"export"``).
    """

    def __init__(self, path: Any, why: str, what: str = "dataset") -> None:
        self.what = what
        super().__init__(path, why, fix=f"--force replaces only a {what} pairpack wrote, so it is left as it is: "
                                        "move it away or choose another output path")

    @staticmethod
    def _state(why: str) -> str:
        return why

    def __reduce__(self) -> tuple[Any, ...]:
        return (NotReplaceableError, (self.path, self.why, self.what))


class StateError(PairpackError, ValueError):
    """An object is used in a state that does not allow it (a closed dataset or writer), or a
    loader/sampler state or an option set does not match the dataset it is used with."""


class ArgumentError(PairpackError, ValueError):
    """A value passed to a pairpack function is invalid: an option out of its range, an array of
    the wrong dtype or shape, a column name that breaks FORMAT.md §4.4. The message names the
    argument, the value and what is allowed."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of the wrong type: a mask that is not bool, float ids, a model that is not an
    ``nn.Module``. Also a ``TypeError``, as Python code expects."""


class ColumnNotFoundError(PairpackError, KeyError):
    """A column asked for by name is not in the dataset.

    Attributes:
        path: the dataset directory.
        column: the name asked for.
        available: the dataset's column names.
    """

    def __init__(self, path: Any, column: str, available: Any) -> None:
        self.path = str(path)
        self.column = column
        self.available = list(available)
        super().__init__(f"{self.path}: no column {column!r}; columns: {self.available}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (ColumnNotFoundError, (self.path, self.column, self.available))


class PairIndexError(PairpackError, IndexError):
    """A pair index is outside ``[-len(ds), len(ds))``."""


class MissingDependencyError(PairpackError, ImportError):
    """An optional package that a feature needs is not installed.

    Attributes:
        package: the importable name that is missing (e.g. ``"matplotlib"``).
        feature: what needs it (e.g. ``"--plot"``).
        extra: the pairpack extra that installs it (e.g. ``"plot"``), or None for a core dependency.
        install: the command that fixes it.
    """

    def __init__(self, package: str, feature: str, extra: str | None) -> None:
        self.package = package
        self.feature = feature
        self.extra = extra
        self.install = f'pip install "pairpack[{extra}]"' if extra else f"pip install {package}"
        super().__init__(f"{feature} needs {package}, which is not installed: {self.install}", name=package)

    def __reduce__(self) -> tuple[Any, ...]:
        return (MissingDependencyError, (self.package, self.feature, self.extra))


def import_optional(module: str, *, feature: str, extra: str | None) -> ModuleType:
    """Import ``module`` (an optional dependency) or raise :class:`MissingDependencyError`.

    Args:
        module: dotted module name, e.g. ``"pyarrow.parquet"``.
        feature: what needs it, for the message (e.g. ``"reading Parquet"``).
        extra: the pairpack extra that installs it (``"hf"``, ``"parquet"``, ``"plot"``), or None
            when it is a core dependency (then the message says ``pip install <package>``).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(module.split(".")[0], feature, extra) from None


class DeviceError(PairpackError, RuntimeError):
    """A device cannot be used as asked (e.g. ``device="cuda"`` without CUDA), or a device feeder
    is misused (``get()`` with nothing submitted, use after ``close()``)."""


class ModelError(PairpackError, TypeError):
    """A model cannot be called as asked: a batch layout it cannot take (e.g. ``prefix_shared`` for a
    model that accepts no attention mask), or an output without logits."""


class OversizeError(PairpackError, ValueError):
    """A pair needs more tokens than the batch budget (``max_tokens``) or the row bound
    (``max_row_tokens``) allows it alone."""


class LossConfigError(ArgumentError):
    """A preference-loss configuration is invalid: an unknown loss type, a bad ``beta``, ``gamma``,
    ``label_smoothing`` or ``loss_weights``, or inputs a loss type needs but did not get (reference
    log-probs, token counts)."""
