"""Log records of forked local workers, written by the coordinator's handlers.

multiprocessing-logging wraps the root logger's handlers so that records logged in a
forked worker travel through a pipe and are written by the coordinator. Two gaps are
closed here: a worker flushes its records before it leaves (it exits with
``os._exit``, which would drop those still buffered), and the coordinator closes the
forwarding in the background once its workers are gone, so the library's receiving
thread, which wakes every 0.2 s, does not hold up the end of the run. The closing
threads are not daemons: the interpreter waits for them, so no record is lost.
"""

from __future__ import annotations

import logging
import threading

import multiprocessing_logging


def _forwarding_handlers() -> list[multiprocessing_logging.MultiProcessingHandler]:
    return [h for h in logging.getLogger().handlers
            if isinstance(h, multiprocessing_logging.MultiProcessingHandler)]


def start_forwarding() -> None:
    """Forward the records of workers forked from now on (needs the fork start method)."""
    multiprocessing_logging.install_mp_handler()


def flush_in_worker() -> None:
    """In a worker about to exit: push every record it logged into the pipe."""
    for handler in _forwarding_handlers():
        handler.queue.close()
        handler.queue.join_thread()


def stop_forwarding() -> None:
    """In the coordinator, once its workers are gone: log directly again, and let the
    forwarding handlers write what is left and close while the run goes on."""
    handlers = _forwarding_handlers()
    multiprocessing_logging.uninstall_mp_handler()
    for handler in handlers:
        threading.Thread(target=handler.close, name="close-worker-logs").start()
