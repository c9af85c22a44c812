"""Reading: :class:`~.dataset.Dataset` (O(1) open, zero-copy pairs, bounds-checked gathers) and
:func:`~.verify.verify_dataset` (every rule of FORMAT.md §8). Imports :mod:`pairpack.format` only;
``Dataset.batch`` loads :mod:`pairpack.batch` on use (it needs torch), ``Dataset.decode`` loads
:mod:`pairpack.tokenization`, so opening and reading need numpy alone.
"""
