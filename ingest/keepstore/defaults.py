"""Defaults of the keepstore server, importable without loading the HTTP stack."""

DEFAULT_MAX_BUFFERS = 4          # 64 MiB block buffers held at once
DEFAULT_SHUTDOWN_TIMEOUT = 60.0  # seconds SIGTERM waits for requests in flight
DEFAULT_READ_TIMEOUT = 60.0      # seconds a stalled request body may wait before 408
DEFAULT_MIN_RATE = 32 * 1024       # bytes/s a PUT body or a GET response must average (0: no minimum)...
DEFAULT_RATE_WINDOW = 30.0         # ...over each window of this many seconds, or it is aborted
DEFAULT_MAX_QUEUED = 128           # requests that may wait for memory; more get 503 at once
DEFAULT_MAX_CONNECTIONS = 512      # open connections; beyond, the one idle longest is closed
DEFAULT_IDLE_TIMEOUT = 20.0        # seconds to complete the next request's headers
