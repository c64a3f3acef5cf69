"""keep-ingest: multiprocess batch ingest of directory trees into Arvados Keep."""

__version__ = "0.1.0"
