"""The one thing pyproject.toml cannot state stably yet: the optional C extensions.

ingest._md5lanes hashes several blocks at once in SIMD lanes (see ingest/md5lanes.py);
ingest._smallfiles runs the walk's and the reader's loops over small files (see
ingest/walk.py and ingest/reader.py).
Both are optional: without a C compiler the install goes on, hashlib hashes one block
at a time, and the walk and the reader run their own Python loops.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ingest._md5lanes", sources=["ingest/_md5lanes.c"], optional=True),
                   Extension("ingest._smallfiles", sources=["ingest/_smallfiles.c"], optional=True)])
