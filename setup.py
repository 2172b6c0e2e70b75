"""The one compiled part of Bastion: C twins of the header scan (everything else is in pyproject.toml).

Optional: where it cannot be built, Bastion runs the Python versions (``bastion.ingest.scan.SPEEDUPS``
says which).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("bastion.ingest._cscan", ["src/bastion/ingest/_cscan.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
                             optional=True)])
