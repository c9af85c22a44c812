"""Typed errors of pairpack.

Every error a user can cause (a damaged file, a bad input record, a wrong option) is raised as a
subclass of :class:`PairpackError`, so ``except pairpack.PairpackError`` catches exactly the
problems pairpack reports on purpose. Each carries the file and field it is about as attributes
as well as in its message.
"""

from __future__ import annotations

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
    """The output path of a build already exists and ``force`` was not given."""


class NotReplaceableError(DatasetExistsError):
    """``force`` was given, but the output path holds something pairpack did not make (a user's
    directory, a plain file, a dataset directory with the user's own files in it): pairpack
    replaces only its own datasets, archives and exports, and never deletes anything else
    (spec/FORMAT.md §9 W8)."""


class StateError(PairpackError, ValueError):
    """A loader/sampler state or an option set does not match the dataset it is used with."""


class DeviceError(PairpackError, RuntimeError):
    """A device cannot be used as asked (e.g. ``device="cuda"`` without CUDA), or a device feeder
    is misused (``get()`` with nothing submitted, use after ``close()``)."""


class ModelError(PairpackError, TypeError):
    """A model cannot be called as asked: a batch layout it cannot take (e.g. ``prefix_shared`` for a
    model that accepts no attention mask), or an output without logits."""


class LossConfigError(PairpackError, ValueError):
    """A preference-loss configuration is invalid: an unknown loss type, a bad ``beta``, ``gamma``,
    ``label_smoothing`` or ``loss_weights``, or inputs a loss type needs but did not get (reference
    log-probs, token counts)."""
