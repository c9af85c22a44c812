"""``pairpack.ray``: a pairpack build as a stage of a Ray Data pipeline (the extra ``pairpack[ray]``).

The documented import path; the implementation is :mod:`pairpack.ingest.ray`.
"""

from .ingest.ray import ROWS_PER_TASK, Datasink, build

__all__ = ["Datasink", "build", "ROWS_PER_TASK"]
