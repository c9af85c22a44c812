"""The reference log-prob cache; documented path ``pairpack.reference`` (code: :mod:`pairpack.train.reference`)."""

from .train.reference import *  # noqa: F403
from .train.reference import __all__  # noqa: F401
