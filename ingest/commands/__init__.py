"""Subcommands of ``keep-ingest``: one module each, registered in COMMANDS.

A command module exports ``register(subparsers, common)`` which adds its parser
(with ``common`` among its parents) and sets ``func`` to a ``run(args) -> int``.

Every start builds the whole parser, so it imports every command module: at module
level a command imports only what ``register`` needs, and its implementation inside
``run`` (tests/test_startup.py checks what --version, --help, put, ls and cat import).
"""

COMMANDS: tuple[str, ...] = (
    "put",
    "worker",
    "keys",
    "keepstore",
    "ls",
    "cat",
    "get",
    "verify",
    "status",
    "config",
)
