"""The keepstore server over real sockets: routes, status codes, signatures, admin, memory, SIGTERM."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.parse

import pytest
import urllib3
from keepstore_fixture import ROOT_TOKEN, SIGNING_KEY, TOKEN

from ingest.keep.signing import sign_locator, verify_signature

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20
BLOCK = 64 * MiB
EMPTY = "d41d8cd98f00b204e9800998ecf8427e"
HTTP = urllib3.PoolManager(retries=False)
INDEX_LINE = re.compile(r"^[0-9a-f]{32}\+\d+ \d+$")


def req(method, url, body=None, headers=None, token=None):
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    r = HTTP.request(method, url, body=body, headers=headers, redirect=False,
                     timeout=urllib3.Timeout(connect=5, read=30))
    return r


def put(ks, data: bytes, token=None, headers=None):
    md5 = hashlib.md5(data).hexdigest()
    return md5, req("PUT", ks.url + md5, body=data, token=token, headers=headers)


def read_response(s: socket.socket) -> bytes:
    """One HTTP response (status line, headers, Content-Length body) from a socket."""
    out = b""
    while b"\r\n\r\n" not in out:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    want = int(m.group(1)) if m else 0
    while len(body) < want:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def raw_exchange(url: str, payload: bytes, timeout=10) -> bytes:
    """Send raw bytes, return the first response."""
    host, port = url[len("http://"):-1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(payload)
        return read_response(s)


# ---- PUT / GET / HEAD without signing

def test_put_get_head_round_trip(keepstore):
    data = b"foo"
    md5, r = put(keepstore, data, headers={"X-Keep-Desired-Replicas": "2", "X-Request-Id": "req-x"})
    assert r.status == 200
    assert r.data == f"{md5}+3\n".encode()
    assert r.headers["X-Keep-Replicas-Stored"] == "1"
    assert r.headers["X-Keep-Storage-Classes-Confirmed"] == "default=1"
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert keepstore.block_path(md5).read_bytes() == data

    r = req("GET", keepstore.url + f"{md5}+3")
    assert (r.status, r.data, r.headers["Content-Length"]) == (200, data, "3")
    r = req("HEAD", keepstore.url + f"{md5}+3")
    assert (r.status, r.headers["Content-Length"]) == (200, "3")
    r = req("HEAD", keepstore.url + md5)  # HEAD needs no size hint
    assert (r.status, r.headers["Content-Length"]) == (200, "3")
    # Hints are ignored; a doubled leading slash is accepted for reads.
    assert req("GET", keepstore.url + f"{md5}+3+Kzzzzz+Xfoo").data == data
    assert req("GET", keepstore.url + f"/{md5}+3").data == data
    # A repeated PUT is fine and refreshes the mtime.
    os.utime(keepstore.block_path(md5), ns=(10**9, 10**9))
    assert put(keepstore, data)[1].status == 200
    assert keepstore.block_path(md5).stat().st_mtime_ns > 10**9


def test_get_status_codes(keepstore):
    absent = hashlib.md5(b"absent").hexdigest()
    assert req("GET", keepstore.url + f"{absent}+6").status == 404
    assert req("HEAD", keepstore.url + f"{absent}+6").status == 404
    assert req("GET", keepstore.url + absent).status == 405          # no size hint
    assert req("GET", keepstore.url + f"{absent}+Kzzzzz").status == 405
    assert req("GET", keepstore.url + f"{absent}+6+Kzz+7").status == 400  # size not first
    assert req("GET", keepstore.url + f"{absent}++6").status == 400
    # The empty hash may be read without a size hint (once it is stored).
    assert req("GET", keepstore.url + EMPTY).status == 404
    md5, r = put(keepstore, b"")
    assert (md5, r.status, r.data) == (EMPTY, 200, f"{EMPTY}+0\n".encode())
    r = req("GET", keepstore.url + EMPTY)
    assert (r.status, r.data) == (200, b"")


def test_put_status_codes(keepstore):
    md5 = hashlib.md5(b"foo").hexdigest()
    r = req("PUT", keepstore.url + md5, body=b"fox")
    assert r.status == 400 and b"did not match" in r.data
    r = req("PUT", keepstore.url + md5 + "+3", body=b"foo")   # hints after the hash are fine
    assert r.status == 200
    assert req("PUT", keepstore.url + "/" + md5, body=b"foo").status == 400  # no // for PUT
    assert req("PUT", keepstore.url + "index", body=b"").status == 400
    # Too large, refused from the header alone (no body is sent).
    out = raw_exchange(keepstore.url, f"PUT /{md5} HTTP/1.1\r\nHost: x\r\n"
                                      f"Content-Length: {BLOCK + 1}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 413 ")
    out = raw_exchange(keepstore.url, f"PUT /{md5} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                      f"Content-Length: {BLOCK + 1}\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in out


def test_put_chunked_over_64mib_is_413(keepstore):
    md5 = hashlib.md5(b"x").hexdigest()
    chunk = b"\0" * (4 * MiB)

    def body():
        for _ in range(17):  # 68 MiB
            yield chunk

    try:
        r = req("PUT", keepstore.url + md5, body=body(), headers={"Transfer-Encoding": "chunked"})
        status = r.status
    except urllib3.exceptions.ProtocolError:
        status = None  # the server may close before the client has sent everything
    assert status in (413, None)
    # The access log line is written once the connection is done with.
    deadline = time.monotonic() + 5
    while f"PUT /{md5} 413" not in keepstore.log():
        assert time.monotonic() < deadline, keepstore.log()
        time.sleep(0.05)


def test_stalled_body_is_408_and_frees_its_buffer(keepstore_factory):
    ks = keepstore_factory(max_buffers=1, extra_args=["--read-timeout", "0.5"])
    md5 = hashlib.md5(b"0123456789").hexdigest()
    t0 = time.monotonic()
    out = raw_exchange(ks.url, f"PUT /{md5} HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234".encode())
    assert out.startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - t0 < 5
    # The only buffer is free again.
    assert put(ks, b"0123456789")[1].status == 200


def test_chunked_put_within_limit(keepstore):
    data = os.urandom(3 * MiB + 5)
    md5 = hashlib.md5(data).hexdigest()
    r = req("PUT", keepstore.url + md5, body=iter([data[:MiB], data[MiB:]]),
            headers={"Transfer-Encoding": "chunked"})
    assert r.status == 200 and r.data == f"{md5}+{len(data)}\n".encode()


def test_unmatched_routes_are_400(keepstore):
    for method, path in [("GET", "status.json"), ("GET", "_health/ping"), ("POST", "abc"),
                         ("GET", ""), ("PATCH", EMPTY), ("GET", "debug.json"), ("PUT", "pull")]:
        r = req(method, keepstore.url + path)
        assert r.status == 400, (method, path)
    r = req("OPTIONS", keepstore.url + EMPTY)
    assert r.status == 200 and "PUT" in r.headers["Access-Control-Allow-Methods"]


def test_storage_classes(keepstore):
    md5, r = put(keepstore, b"classy", headers={"X-Keep-Storage-Classes": " default , "})
    assert r.status == 200 and r.headers["X-Keep-Storage-Classes-Confirmed"] == "default=1"
    # No volume offers the class: nothing is written (keepstore answers 507).
    md5, r = put(keepstore, b"archived", headers={"X-Keep-Storage-Classes": "archive"})
    assert r.status == 507
    assert not keepstore.block_path(md5).exists()


def test_full_volume_is_507(keepstore_factory):
    ks = keepstore_factory(extra_args=["--min-free-space", str(1 << 60)])
    md5, r = put(ks, b"no room")
    assert r.status == 507


def test_two_volumes_one_copy_in_mount_order(keepstore_factory):
    ks = keepstore_factory(volumes=2, root_token=ROOT_TOKEN)
    mounts = json.loads(req("GET", ks.url + "mounts", token=ROOT_TOKEN).data)
    assert len(mounts) == 2
    for i in range(10):
        md5, r = put(ks, b"block %d" % i)
        assert r.headers["X-Keep-Replicas-Stored"] == "1"
        weights = {m["uuid"]: hashlib.md5((md5 + m["uuid"][12:]).encode()).hexdigest() for m in mounts}
        first = min(weights, key=weights.get)
        lines = req("GET", ks.url + f"mounts/{first}/blocks/{md5[:5]}", token=ROOT_TOKEN).data.decode()
        assert lines.startswith(f"{md5}+{len(b'block %d' % i)} ")
        assert sum(ks.block_path(md5, v).exists() for v in (0, 1)) == 1


# ---- signatures

def test_signed_put_and_reads(keepstore_signed):
    ks = keepstore_signed
    data = b"signed data"
    md5, r = put(ks, data, token=TOKEN)
    assert r.status == 200
    signed = r.data.decode().strip()
    assert re.fullmatch(rf"{md5}\+{len(data)}\+A[0-9a-f]{{40}}@[0-9a-f]{{8}}", signed)
    verify_signature(signed, TOKEN, SIGNING_KEY.encode())
    expiry = int(signed.rsplit("@", 1)[1], 16)
    assert abs(expiry - (time.time() + 1209600)) < 60

    assert req("GET", ks.url + signed, token=TOKEN).data == data
    assert req("HEAD", ks.url + signed, token=TOKEN).status == 200
    plain = f"{md5}+{len(data)}"
    assert req("GET", ks.url + signed).status == 401                       # no token
    assert req("GET", ks.url + plain, token=TOKEN).status == 400           # missing signature
    assert req("HEAD", ks.url + plain, token=TOKEN).status == 400
    assert req("GET", ks.url + signed, token="someone-else").status == 400  # other token
    bad = signed[:-12] + ("0" if signed[-12] != "0" else "1") + signed[-11:]
    assert req("GET", ks.url + bad, token=TOKEN).status == 400             # bad signature
    expired = sign_locator(plain, TOKEN, SIGNING_KEY.encode(), expiry=int(time.time()) - 5)
    r = req("GET", ks.url + expired, token=TOKEN)
    assert r.status == 401 and b"expired" in r.data
    other_ttl = sign_locator(plain, TOKEN, SIGNING_KEY.encode(), ttl=3600)
    assert req("GET", ks.url + other_ttl, token=TOKEN).status == 400
    # The unsized GET is refused before the signature is looked at.
    assert req("GET", ks.url + md5, token=TOKEN).status == 405
    # An absent block with a valid signature is 404.
    absent = sign_locator(hashlib.md5(b"zz").hexdigest() + "+2", TOKEN, SIGNING_KEY.encode())
    assert req("GET", ks.url + absent, token=TOKEN).status == 404


def test_tokens_from_every_source(keepstore_signed):
    ks = keepstore_signed
    md5, r = put(ks, b"token sources", token=TOKEN)
    signed = r.data.decode().strip()
    basic = "Basic " + base64.b64encode(f"x:{TOKEN}".encode()).decode()
    cookie = "arvados_api_token=" + base64.urlsafe_b64encode(TOKEN.encode()).decode()
    assert req("GET", ks.url + signed, headers={"Authorization": f"OAuth2 {TOKEN}"}).status == 200
    assert req("GET", ks.url + signed, headers={"Authorization": basic}).status == 200
    assert req("GET", ks.url + signed + f"?api_token={TOKEN}").status == 200
    assert req("GET", ks.url + signed, headers={"Cookie": cookie}).status == 200
    # The first token found is the one checked.
    assert req("GET", ks.url + signed + f"?api_token={TOKEN}", token="other").status == 400
    # PUT needs no token; without one the locator comes back unsigned.
    md5, r = put(ks, b"anonymous")
    assert r.status == 200 and r.data == f"{md5}+9\n".encode()
    # The signature is for the token used on PUT.
    md5, r = put(ks, b"anonymous", token="other-token")
    verify_signature(r.data.decode().strip(), "other-token", SIGNING_KEY.encode())


def test_tokens_are_trimmed_of_whitespace_as_arvados_does(keepstore_signed):
    ks = keepstore_signed
    _, r = put(ks, b"padded tokens", token=TOKEN)
    signed = r.data.decode().strip()
    padded = f" {TOKEN}\t\n"
    basic = "Basic " + base64.b64encode(f"x:{padded}".encode()).decode()
    cookie = "arvados_api_token=" + base64.urlsafe_b64encode(padded.encode()).decode()
    query = urllib.parse.urlencode({"api_token": padded})
    assert req("GET", ks.url + signed, headers={"Authorization": basic}).status == 200
    assert req("GET", ks.url + signed + "?" + query).status == 200
    assert req("GET", ks.url + signed, headers={"Cookie": cookie}).status == 200
    # a PUT with a padded token is signed for the token itself (here a no-break space, in UTF-8)
    _, r = put(ks, b"padded put", headers={"Authorization": f"Bearer {TOKEN}" + "\u00a0 ".encode().decode("latin-1")})
    verify_signature(r.data.decode().strip(), TOKEN, SIGNING_KEY.encode())
    # a token that is not UTF-8 is signed as its bytes, never a server error
    odd = "tok\xff"
    _, r = put(ks, b"odd token", headers={"Authorization": f"Bearer {odd}"})
    assert r.status == 200
    verify_signature(r.data.decode().strip(), odd.encode("latin-1").decode("utf-8", "surrogateescape"),
                     SIGNING_KEY.encode())


# ---- admin routes

def test_index_format_and_prefixes(keepstore_signed):
    ks = keepstore_signed
    md5s = {}
    for i in range(30):
        data = b"index %d" % i
        md5s[put(ks, data)[0]] = len(data)
    r = req("GET", ks.url + "index", token=ROOT_TOKEN)
    assert r.status == 200
    text = r.data.decode()
    assert text.endswith("\n\n")
    lines = text[:-1].splitlines()
    assert all(INDEX_LINE.match(line) for line in lines)
    listed = {line.split("+")[0]: int(line.split("+")[1].split()[0]) for line in lines}
    assert listed == md5s
    for line in lines:
        md5 = line[:32]
        assert int(line.split()[1]) == ks.block_path(md5).stat().st_mtime_ns
    some = sorted(md5s)[7]
    for prefix in (some[:1], some[:2], some[:3], some):
        want = sorted(m for m in md5s if m.startswith(prefix))
        for path in (f"index/{prefix}", f"index?prefix={prefix}"):
            text = req("GET", ks.url + path, token=ROOT_TOKEN).data.decode()
            assert text.endswith("\n\n") or (not want and text == "\n")
            assert sorted(line[:32] for line in text.splitlines() if line) == want
    # Nothing matches: just the final empty line.
    assert req("GET", ks.url + "index/fffffffffff", token=ROOT_TOKEN).data in (b"\n",) or \
        any(m.startswith("fffffffffff") for m in md5s)
    assert req("GET", ks.url + "index/xyz", token=ROOT_TOKEN).status == 400


def test_admin_auth(keepstore_signed):
    ks = keepstore_signed
    for path in ("index", "index/abc", "mounts"):
        assert req("GET", ks.url + path).status == 401
        assert req("GET", ks.url + path, token=TOKEN).status == 403
        assert req("GET", ks.url + path, token=ROOT_TOKEN).status == 200
        assert req("GET", ks.url + path + f"?api_token={ROOT_TOKEN}").status == 200
    assert req("DELETE", ks.url + EMPTY + "+0").status == 401
    assert req("DELETE", ks.url + EMPTY + "+0", token=ROOT_TOKEN).status == 405
    # TOUCH is refused by aiohttp's parser (see ingest/keepstore/server.py).
    assert req("TOUCH", ks.url + EMPTY + "+0", token=ROOT_TOKEN).status == 400


def test_admin_routes_open_without_root_token(keepstore):
    assert req("GET", keepstore.url + "index").status == 200
    assert req("GET", keepstore.url + "mounts").status == 200


def test_mounts_json(keepstore_factory):
    ks = keepstore_factory(volumes=2, root_token=ROOT_TOKEN)
    r = req("GET", ks.url + "mounts", token=ROOT_TOKEN)
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    mounts = json.loads(r.data)
    assert len(mounts) == 2
    for m in mounts:
        assert re.fullmatch(r"zzzzz-nyw5e-[0-9a-z]{15}", m["uuid"])
        assert m["replication"] == 1 and m["storage_classes"] == {"default": True}
        assert m["allow_write"] is True and m["read_only"] is False
        assert m["device_id"].endswith(tuple(str(v) for v in ks.volumes))
    uuid = mounts[0]["uuid"]
    assert req("GET", ks.url + f"mounts/{uuid}/blocks", token=ROOT_TOKEN).data == b"\n"
    assert req("GET", ks.url + "mounts/zzzzz-nyw5e-nosuchmount00000/blocks", token=ROOT_TOKEN).status == 404


# ---- memory and shutdown

def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_concurrent_64mib_puts_stay_within_the_buffer_limit(keepstore_factory):
    max_buffers, n = 2, 6
    ks = keepstore_factory(max_buffers=max_buffers)
    assert req("GET", ks.url + "index").status == 200   # warm up imports and the loop
    base_kib = _rss_kib(ks.pid, "VmRSS")
    # n distinct 64 MiB blocks as windows of one buffer, so the test itself stays small.
    pool = os.urandom(BLOCK + n)
    views = [memoryview(pool)[i:i + BLOCK] for i in range(n)]
    md5s = [hashlib.md5(v).hexdigest() for v in views]
    results: dict[int, tuple[int, bytes]] = {}
    http = urllib3.PoolManager(retries=False, maxsize=n)

    def upload(i):
        r = http.request("PUT", ks.url + md5s[i], body=views[i],
                         timeout=urllib3.Timeout(connect=5, read=60))
        results[i] = (r.status, r.data)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=50)
    assert all(not t.is_alive() for t in threads)
    for i in range(n):
        assert results[i] == (200, f"{md5s[i]}+{BLOCK}\n".encode())
        assert ks.block_path(md5s[i]).stat().st_size == BLOCK
    peak_kib = _rss_kib(ks.pid, "VmHWM")
    grown_mib = (peak_kib - base_kib) / 1024
    # max_buffers blocks in memory, plus slack for socket buffers and allocator
    # overhead; without the limit it would be about n x 64 MiB.
    assert grown_mib < (max_buffers + 1) * 64, f"server grew by {grown_mib:.0f} MiB"


def test_sigterm_finishes_an_in_flight_put(keepstore):
    data = os.urandom(2 * MiB)
    md5 = hashlib.md5(data).hexdigest()
    host, port = keepstore.url[len("http://"):-1].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    try:
        s.sendall(f"PUT /{md5} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                  + data[:MiB])
        time.sleep(0.3)
        keepstore.signal(signal.SIGTERM)
        time.sleep(0.5)
        assert keepstore.running(), "server exited with a request in flight"
        with pytest.raises(OSError):   # no longer accepting connections
            socket.create_connection((host, int(port)), timeout=2).close()
        s.sendall(data[MiB:])
        out = read_response(s)
    finally:
        s.close()
    assert out.startswith(b"HTTP/1.1 200 "), out[:200]
    assert out.endswith(f"{md5}+{len(data)}\n".encode())
    assert keepstore.wait(timeout=15) == 0
    assert keepstore.block_path(md5).read_bytes() == data
