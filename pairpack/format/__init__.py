"""The format core: spec/FORMAT.md in code. Imports nothing of pairpack but :mod:`pairpack.errors`,
never torch, never the rest of the package.

- :mod:`.spec`: the constants, each naming its section of FORMAT.md;
- :mod:`.npy`: ``.npy`` headers and memory maps (§4, §8 R6-R8);
- :mod:`.manifest`: the manifest's dataclasses and its strict parser (§5);
- :mod:`.fsio`: checksums (§6), fsync and atomic installation (§9);
- :mod:`.sidecar`: the settings file beside a JSONL export.

The names below are re-exported so that ``from pairpack import format as fmt; fmt.X`` reads as
one namespace.
"""

from .fsio import file_checksum  # noqa: F401
from .manifest import *  # noqa: F403
from .manifest import _file_entry, _nonneg, _req  # noqa: F401
from .npy import *  # noqa: F403
from .spec import *  # noqa: F403
from .spec import _CHECKSUM_RE, _HASH_CHUNK  # noqa: F401
