"""A small Arvados API client over urllib3: JSON requests, retries, clear errors.

Every request carries ``Authorization: Bearer TOKEN`` and an ``X-Request-Id``.
Reads are retried after network errors and temporary statuses (408, 423, 429,
500, 502, 503, 504) with exponential backoff and jitter; a write is sent once and
the caller decides (a create that may have happened is looked up, not repeated).

Failures become :class:`ingest.errors.ApiError` with the server, the request, the
HTTP status and the server's ``errors`` text, and an exit code: 69 when the server
cannot be reached or keeps failing, 77 for 401 and 403, 1 otherwise. The token
goes into request headers only: never into a log record, an error message or a
file (a server that echoes it back has it replaced by ``<token>``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
import urllib.parse
from typing import Any

import urllib3

from ingest.errors import EXIT_ERROR, EXIT_NOPERM, EXIT_UNAVAILABLE, ApiError, ConfigError
from ingest.keep.client import new_request_id

log = logging.getLogger("keep-ingest.arvados")

TEMPORARY_STATUSES = frozenset({408, 423, 429, 500, 502, 503, 504})
DISCOVERY_PATH = "discovery/v1/apis/arvados/v1/rest"
_HOST_RE = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_MAX_ERROR_BODY = 1 << 16


def check_host(host: str, origin: str) -> str:
    """``HOST[:PORT]`` as ``ARVADOS_API_HOST`` gives it; refused (naming ``origin``)
    with a scheme, a path or anything else a host cannot hold."""
    if not _HOST_RE.fullmatch(host):
        hint = " (without https://)" if "://" in host else ""
        raise ConfigError(f"{origin}: the API host must be HOST or HOST:PORT{hint}, not {host!r}")
    return host


class ApiClient:
    """Requests to one Arvados API server (``host`` is ``HOST[:PORT]``, always https)."""

    def __init__(self, host: str, token: str, *, insecure: bool = False, retries: int = 3,
                 backoff_start: float = 1.0, backoff_max: float = 30.0, connect_timeout: float = 10.0,
                 read_timeout: float = 300.0, ca_certs: str | None = None):
        self.host = host
        self.root = f"https://{host}/"
        self.service_path = "arvados/v1/"
        self._token = token
        self.insecure = insecure
        self.retries = retries
        self.backoff_start = backoff_start
        self.backoff_max = backoff_max
        self._timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        pool_kw: dict[str, Any] = {"retries": False, "maxsize": 4}
        if insecure:
            pool_kw["cert_reqs"] = "CERT_NONE"
            # The user turned checks off (ARVADOS_API_HOST_INSECURE): no warning per request.
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        elif ca_certs:
            pool_kw["ca_certs"] = ca_certs
        self._http = urllib3.PoolManager(**pool_kw)

    def close(self) -> None:
        self._http.clear()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests

    def discovery(self) -> dict[str, Any]:
        """The discovery document (``GET /discovery/v1/apis/arvados/v1/rest``)."""
        doc = self._call("GET", self.root + DISCOVERY_PATH, "the discovery document", idempotent=True)
        if not isinstance(doc, dict):
            raise ApiError(f"Arvados API server {self.host}: the discovery document is not a JSON object")
        path = doc.get("servicePath")
        if isinstance(path, str) and re.fullmatch(r"[A-Za-z0-9_/.-]*", path) and ".." not in path:
            self.service_path = path.strip("/") + "/" if path.strip("/") else ""
        return doc

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """``GET`` an API path (relative to the service path), retried when temporary."""
        return self._call("GET", self._url(path), f"GET {path}", params=params, idempotent=True)

    def send(self, method: str, path: str, body: dict[str, Any], params: dict[str, Any] | None = None,
             retry: bool = False) -> Any:
        """``POST``/``PUT`` a JSON body; retried only with ``retry`` (the caller knows
        whether the request may be repeated)."""
        return self._call(method, self._url(path), f"{method} {path}", params=params, body=body, idempotent=retry)

    @staticmethod
    def body_size(body: dict[str, Any]) -> int:
        """The bytes a JSON body takes on the wire, as :meth:`send` encodes it."""
        return len(json.dumps(body).encode())

    def _url(self, path: str) -> str:
        return self.root + self.service_path + path

    def _call(self, method: str, url: str, what: str, *, params: dict[str, Any] | None = None,
              body: dict[str, Any] | None = None, idempotent: bool) -> Any:
        fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (params or {}).items()}
        if fields:
            url += "?" + urllib.parse.urlencode(fields)
        data = None if body is None else json.dumps(body).encode()  # the encoding body_size() measures
        attempts = self.retries + 1 if idempotent else 1
        for attempt in range(attempts):
            if attempt:
                base = min(self.backoff_max, self.backoff_start * 2 ** (attempt - 1))
                time.sleep(random.uniform(base / 2, base))
            request_id = new_request_id()
            headers = {"Authorization": f"Bearer {self._token}", "X-Request-Id": request_id,
                       "Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            try:
                resp = self._http.request(method, url, body=data, headers=headers, timeout=self._timeout,
                                          redirect=False, preload_content=False)
            except urllib3.exceptions.SSLError as exc:
                raise ApiError(self._scrub(
                    f"Arvados API server {self.host}: TLS failure ({_reason(exc)}); check the host name and "
                    "its certificate (ARVADOS_API_HOST_INSECURE=1 turns the checks off: for test clusters "
                    "only)"), exit_code=EXIT_ERROR) from None
            except urllib3.exceptions.HTTPError as exc:
                error = ApiError(self._scrub(f"cannot reach the Arvados API server {self.host} ({what}, "
                                             f"request {request_id}): {_reason(exc)}"),
                                 exit_code=EXIT_UNAVAILABLE)
                if attempt + 1 < attempts:
                    log.info("%s (will retry)", error)
                    continue
                raise error from None
            try:
                raw = resp.read(_MAX_ERROR_BODY + 1) if resp.status >= 300 else resp.read()
            except urllib3.exceptions.HTTPError as exc:
                raise ApiError(self._scrub(f"Arvados API server {self.host} ({what}): reading the answer "
                                           f"failed: {_reason(exc)}"), exit_code=EXIT_UNAVAILABLE) from None
            finally:
                resp.release_conn()
            if 200 <= resp.status < 300:
                try:
                    return json.loads(raw)
                except ValueError:
                    raise ApiError(f"Arvados API server {self.host} ({what}): the answer is not JSON "
                                   f"(HTTP {resp.status})") from None
            error = self._status_error(resp.status, raw, what, request_id)
            if resp.status in TEMPORARY_STATUSES and attempt + 1 < attempts:
                log.info("%s (will retry)", error)
                continue
            raise error
        raise AssertionError("unreachable")

    def _status_error(self, status: int, raw: bytes, what: str, request_id: str) -> ApiError:
        errors = _server_errors(raw)
        text = "; ".join(errors) if errors else raw.decode("utf-8", "replace").strip()[:200]
        hint = {401: " (the token is missing, wrong or expired: check ARVADOS_API_TOKEN)",
                403: " (permission denied)"}.get(status, "")
        code = EXIT_NOPERM if status in (401, 403) else EXIT_UNAVAILABLE if status >= 500 else EXIT_ERROR
        message = f"Arvados API server {self.host} refused {what}: HTTP {status}{hint}{': ' + text if text else ''}"
        if request_id not in message:
            message += f" (request {request_id})"
        return ApiError(self._scrub(message), status, tuple(self._scrub(e) for e in errors), code)

    def _scrub(self, text: str) -> str:
        return text.replace(self._token, "<token>") if self._token else text


def _reason(exc: Exception) -> str:
    reason = getattr(exc, "reason", None) or exc
    text = str(reason)
    if ": " in text and "Connection" in text:
        text = text.rsplit(": ", 1)[-1]
    return f"{type(reason).__name__}: {text}" if text else type(reason).__name__


def _server_errors(raw: bytes) -> list[str]:
    """The ``errors`` list of an Arvados error answer, as strings."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return []
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return []
    return [str(e)[:500] for e in errors[:10]]
