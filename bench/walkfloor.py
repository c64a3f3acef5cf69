"""The floor of a re-run (issue 15): walk a tree with ``os.scandir`` and one stat per file.

``python -m bench.walkfloor DIR`` prints ``FILES BYTES``: the files under DIR and their
sizes. Nothing else is done (no sorting, no names checked, nothing kept per file), so
its time is what any re-run that looks at every file must spend at least. It runs as
a process of its own so that the bench measures its time and memory as it does a
``put``'s.
"""

from __future__ import annotations

import os
import sys


def walk(top: str) -> tuple[int, int]:
    """(files, bytes) under ``top``: directories by ``d_type``, one ``lstat`` per file."""
    files = size = 0
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
    return files, size


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.walkfloor DIR", file=sys.stderr)
        return 2
    files, size = walk(argv[0])
    print(files, size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
