"""``make bench``: keep-ingest side by side with arv-put's engine and the hashing limit.

Modules:

* :mod:`bench.datasets`: seeded, cached datasets (large, small, tiny, tiny10k, mixed; and,
  only when asked for, tiny1m, tiny2m and tiny4m: millions of files);
* :mod:`bench.measure`: run one command, measure wall time, CPU seconds and peak
  resident memory summed over its process tree (and those of a server it talks to,
  apart);
* :mod:`bench.keepstore`: a ``keep-ingest keepstore`` server on a loopback port;
* :mod:`bench.runners`: the commands of every row (keep-ingest, arv-put's engine, md5sum);
* :mod:`bench.arvput_job`: the subprocess that drives ``ArvPutUploadJob``;
* :mod:`bench.walkfloor`: the floor of a re-run, a walk with ``os.scandir`` and one stat per file;
* :mod:`bench.report`: medians, ratios, the table on stdout and the JSON file;
* :mod:`bench.__main__`: the command line and the order of runs.
"""
