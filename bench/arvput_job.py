"""Drive arv-put's upload engine (``ArvPutUploadJob``) with no API server.

Usage::

    python -m bench.arvput_job --local-store DIR [--threads N] PATH...
    python -m bench.arvput_job --keep URL [--threads N] PATH...

``--local-store`` is the SDK's ``KEEP_LOCAL_STORE`` mode: blocks become files in DIR
(no fsync). ``--keep`` sends them to a Keep service over HTTP, as
``ARVADOS_KEEP_SERVICES`` would. Prints one JSON object: ``pdh``, ``bytes``.

The API client is a stand-in with only the attributes ``KeepClient`` reads, and
nothing is saved (``save_collection=False``), so no cluster is needed; the resume
cache is off, as for a first upload. Runs as its own process because the SDK reads
its environment when the first ``KeepClient`` is built.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.arvput_job")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--local-store", metavar="DIR")
    target.add_argument("--keep", metavar="URL")
    parser.add_argument("--threads", type=int, default=2, help="put threads (arv-put's default 2)")
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)

    os.environ["HOME"] = tempfile.mkdtemp(prefix="arvput-home-")  # no user settings file
    os.environ["XDG_CACHE_HOME"] = os.environ["HOME"]
    for var in list(os.environ):
        if var.startswith("ARVADOS_") or var == "KEEP_LOCAL_STORE":
            del os.environ[var]
    if args.local_store:
        os.makedirs(args.local_store, exist_ok=True)
        os.environ["KEEP_LOCAL_STORE"] = args.local_store
    else:
        os.environ["ARVADOS_KEEP_SERVICES"] = args.keep
        os.environ["ARVADOS_API_TOKEN"] = "bench-token"
    import arvados.commands.put as arv_put

    stub_api = types.SimpleNamespace(api_token="bench-token", insecure=False)
    job = arv_put.ArvPutUploadJob(paths=args.paths, api_client=stub_api, replication_desired=1,
                                  put_threads=args.threads, use_cache=False, resume=False)
    job.start(save_collection=False)
    json.dump({"pdh": job.portable_data_hash(), "bytes": job.bytes_written}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
