"""Writing: the streaming, atomic :class:`~.writer.Writer` (FORMAT.md §9) and
:func:`~.columns.add_columns` (W7). Imports :mod:`pairpack.format` only.
"""
