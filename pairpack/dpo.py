"""DPO losses; the documented import path ``pairpack.dpo`` (code: :mod:`pairpack.train.dpo`)."""

from .train.dpo import *  # noqa: F403
from .train.dpo import __all__  # noqa: F401
