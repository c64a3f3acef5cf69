"""Subcommands of ``keep-ingest``: one module each, registered in COMMANDS.

A command module exports ``register(subparsers, common)`` which adds its parser
(with ``common`` among its parents) and sets ``func`` to a ``run(args) -> int``.
"""

COMMANDS: tuple[str, ...] = (
    "put",
    "worker",
    "keepstore",
    "ls",
    "cat",
    "get",
    "verify",
    "status",
    "config",
)
