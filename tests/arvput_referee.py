"""Run arv-put's upload engine (ArvPutUploadJob) on local paths, with no cluster.

Usage: python arvput_referee.py STORE_DIR PATH... ; prints {"manifest", "pdh"} as JSON.
Blocks go to STORE_DIR through the SDK's KEEP_LOCAL_STORE mode (see ARV_PUT.md §4).
Run it as a subprocess: the SDK reads KEEP_LOCAL_STORE when its first KeepClient is made.
"""

import json
import os
import sys
import tempfile
import types


def main() -> None:
    store, paths = sys.argv[1], sys.argv[2:]
    os.makedirs(store, exist_ok=True)
    os.environ["KEEP_LOCAL_STORE"] = store
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="arvput-cache-")
    os.environ.pop("ARVADOS_KEEP_SERVICES", None)
    import arvados.commands.put as arv_put

    stub_api = types.SimpleNamespace(api_token="unused", insecure=False)
    job = arv_put.ArvPutUploadJob(paths=paths, api_client=stub_api, replication_desired=1,
                                  put_threads=2, use_cache=False, resume=False)
    job.start(save_collection=False)
    json.dump({"manifest": job.manifest_text(), "pdh": job.portable_data_hash()}, sys.stdout)


if __name__ == "__main__":
    main()
