"""The compiled parts of Bastion (everything else is in pyproject.toml): C twins of the header scan, the
blob store's file write without the GIL, and the index's common record (needs SQLite's headers: libsqlite3-dev).

Optional: where they cannot be built, Bastion runs the Python versions (``bastion.ingest.scan.SPEEDUPS`` and
``bastion.blobs.filesystem.CWRITE``, ``bastion.index.sqlite_record.CRECORD`` say which).
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(ext_modules=[
    Extension("bastion.ingest._cscan", ["src/bastion/ingest/_cscan.c"], extra_compile_args=_FLAGS, optional=True),
    Extension("bastion.blobs._cwrite", ["src/bastion/blobs/_cwrite.c"], extra_compile_args=_FLAGS, optional=True),
    Extension("bastion.index._crecord", ["src/bastion/index/_crecord.c"], extra_compile_args=_FLAGS,
              libraries=["sqlite3"], optional=True),
])
