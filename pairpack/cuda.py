"""The CUDA feeder; documented path ``pairpack.cuda`` (code: :mod:`pairpack.batch.cuda`)."""

from .batch.cuda import *  # noqa: F403
from .batch.cuda import __all__  # noqa: F401
