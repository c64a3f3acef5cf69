"""The one thing pyproject.toml cannot state stably yet: the optional C extension.

ingest._md5lanes hashes several blocks at once in SIMD lanes (see ingest/md5lanes.py).
It is optional: without a C compiler the install goes on, and hashlib hashes one block
at a time.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ingest._md5lanes", sources=["ingest/_md5lanes.c"], optional=True)])
