"""Build hook for the optional C extension ``pairpack._native`` (all metadata is in pyproject.toml).

The extension is optional: without a C compiler the build skips it and pairpack uses its numpy
path (same results, slower; ``pairpack --version`` and ``pairpack.backend()`` say which one is in use).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pairpack._native", ["pairpack/_native.c"], optional=True,
                             extra_compile_args=["-O3"])])
