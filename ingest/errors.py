"""Exit codes and the exceptions that carry them to the command line.

Every subcommand uses the same codes; the README and ``--help`` list them.
"""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2          # also: --dry-run with uploads pending (arv-put's convention)
EXIT_PARTIAL = 3        # the run completed but skipped some files
EXIT_UNAVAILABLE = 69   # the Arvados API server cannot be reached, or fails (EX_UNAVAILABLE): try later
EXIT_LOCKED = 75        # another run holds the state lock (EX_TEMPFAIL)
EXIT_NOPERM = 77        # the Arvados API server refused the token (401) or the request (403) (EX_NOPERM)
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: stopped cleanly, resumable

EXIT_CODES_HELP = """exit codes:
  0    success
  1    error (bad input, unreadable file, store failure, ...)
  2    usage error, or --dry-run with uploads pending
  3    partial: completed, but some files were skipped
  69   the Arvados API server cannot be reached or keeps failing; try again later
  75   another run holds the lock on this state
  77   the Arvados API server refused the token (401) or the request (403)
  130  interrupted (SIGINT/SIGTERM); run again to resume"""


class IngestError(Exception):
    """An error to report to the user as one clear line, with an exit code."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(IngestError):
    """Bad flags or arguments."""

    exit_code = EXIT_USAGE


class ConfigError(IngestError):
    """A bad setting; the message names the key and where it came from."""

    exit_code = EXIT_USAGE


class SourceError(IngestError):
    """A source path that cannot be ingested; the message names the path."""


class StoreError(IngestError):
    """The block store refused or failed; the message names the store."""


class ApiError(IngestError):
    """The Arvados API server refused or failed a request; the message names the
    server, the request, the HTTP status and the server's own error text."""

    def __init__(self, message: str, status: int | None = None, errors: tuple[str, ...] = (),
                 exit_code: int | None = None):
        super().__init__(message, exit_code)
        self.status = status
        self.errors = errors


class BlockNotFound(StoreError):
    """The block is not in the store."""


class BlockCorrupt(StoreError):
    """The stored bytes do not match the locator's MD5 or size."""


class StoreFull(StoreError):
    """The store has no room for the block (no space left, quota, free-space floor)."""
