"""The keepstore server: a Keep-protocol HTTP server over directory volumes.

A product of its own (``keep-ingest keepstore``), built on the directory store of
:mod:`ingest.keep`; nothing in the upload or read paths imports it.
"""
