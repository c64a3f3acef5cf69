"""The worker link's security, used by both ends: who may join a run, and how.

Two links, both ZeroMQ CURVE (authenticated, encrypted, by libsodium in pyzmq):

* **local**: the coordinator's forked workers connect to an ipc socket inside a
  private directory (mode 0700, so no other user can reach it). The run makes a
  fresh key pair for its local workers and one for itself; the workers inherit
  both through fork and nothing else can know them, so only they pass.
* **remote** (``put --listen tcp://...``): the coordinator's long-term key pair and
  the public keys of the workers it accepts, all files made by ``keep-ingest keys``;
  a worker is given the coordinator's public key and its own key pair. A worker
  whose key is not on the list never completes the handshake, so it receives not
  a byte; a coordinator whose key is not the one the worker was given is refused
  by the worker.

Authentication is done by a ZAP handler (pyzmq's ThreadAuthenticator) which also
names each authenticated peer: ``local``, or the file name of the remote worker's
public key, available on each message as its ``User-Id`` property.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ingest.errors import ConfigError, IngestError

log = logging.getLogger("keep-ingest.link")

LOCAL_DOMAIN = "local"
REMOTE_DOMAIN = "remote"
LOCAL_USER = "local"
PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_IPC_DIR_PREFIX = "keep-ingest-link-"


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair (z85-encoded, as libzmq takes them)."""

    public: bytes
    secret: bytes

    @classmethod
    def new(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)


def make_key_pair(directory: str, name: str, force: bool = False) -> tuple[str, str]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (0600) into
    ``directory`` (created 0700); return their paths. Refuses to overwrite unless
    ``force``."""
    if not name or name.startswith(".") or os.sep in name:
        raise ConfigError(f"key name {name!r}: use a plain file name such as 'coordinator' or 'worker'")
    public_path = os.path.join(directory, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(directory, name + SECRET_SUFFIX)
    existing = [p for p in (public_path, secret_path) if os.path.lexists(p)]
    if existing and not force:
        raise IngestError(f"{existing[0]} already exists; use --force to replace the key pair "
                          "(workers or coordinators given the old public key will be refused)")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".keys-", dir=directory) as tmp:
            os.chmod(tmp, 0o700)
            old_umask = os.umask(0o077)
            try:
                made_public, made_secret = zmq.auth.create_certificates(tmp, name)
            finally:
                os.umask(old_umask)
            os.chmod(made_public, 0o644)
            os.chmod(made_secret, 0o600)
            os.replace(made_secret, secret_path)
            os.replace(made_public, public_path)
    except OSError as exc:
        raise IngestError(f"cannot write a key pair into {directory}: {exc.strerror or exc}") from None
    return public_path, secret_path


def _is_key(z85_key: bytes | None) -> bool:
    try:
        return z85_key is not None and len(z85.decode(z85_key)) == 32
    except (ValueError, KeyError, TypeError):
        return False


def _load(path: str, what: str) -> tuple[bytes, bytes | None]:
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} does not exist (make key pairs with 'keep-ingest keys NAME')")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError:
        public, secret = None, None
    if not _is_key(public) or (secret is not None and not _is_key(secret)):
        raise ConfigError(f"{what} {path} is not a key file made by 'keep-ingest keys'")
    return public, secret


def load_public_key(path: str) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    return _load(path, "public key file")[0]


def load_key_pair(path: str) -> KeyPair:
    """The key pair in a ``.key_secret`` file, which no other user may read."""
    public, secret = _load(path, "secret key file")
    if secret is None:
        raise ConfigError(f"{path} holds no secret key: give the .key_secret file")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"secret key file {path} can be read by other users (mode {stat.S_IMODE(mode):04o}); "
                          f"run: chmod 600 {path}")
    return KeyPair(public, secret)


def load_authorized_keys(paths: Sequence[str]) -> dict[bytes, str]:
    """The public keys of the workers a coordinator accepts, from key files or
    directories of them: ``{public key: name}`` (the file name without ``.key``)."""
    keys: dict[bytes, str] = {}
    for path in paths:
        if os.path.isdir(path):
            files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(PUBLIC_SUFFIX))
        elif os.path.exists(path):
            files = [path]
        else:
            raise ConfigError(f"worker key {path} does not exist")
        for file in files:
            keys[load_public_key(file)] = os.path.basename(file).removesuffix(PUBLIC_SUFFIX)
    if not keys:
        raise ConfigError(f"no worker public keys (*{PUBLIC_SUFFIX}) in {', '.join(paths)}: copy each "
                          f"worker's public key there (made by 'keep-ingest keys worker' on its host)")
    return keys


class _Gate(ThreadAuthenticator):
    """The ZAP handler: a local key, or a listed remote key, per domain."""

    def __init__(self, context: zmq.Context, local_key: bytes, remote_keys: dict[bytes, str]):
        super().__init__(context)
        self._local_key = local_key
        self._remote_keys = remote_keys
        self._address = "?"
        self._refused: set[str] = set()
        self.configure_curve_callback(LOCAL_DOMAIN, self)
        self.configure_curve_callback(REMOTE_DOMAIN, self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode(errors="replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, z85_key: bytes) -> bool:
        """ZAP's question: may this key join on this link?"""
        if domain == LOCAL_DOMAIN:
            allowed = z85_key == self._local_key
        else:
            allowed = z85_key in self._remote_keys
        if not allowed and self._address not in self._refused:
            self._refused.add(self._address)  # once per address: a scan must not flood the log
            log.warning("refused a worker from %s on the %s link: its key is not one this run accepts",
                        self._address, domain)
        return allowed

    def curve_user_id(self, client_public_key: bytes) -> str:
        z85_key = z85.encode(client_public_key)
        return LOCAL_USER if z85_key == self._local_key else self._remote_keys.get(z85_key, "?")


class CoordinatorLink:
    """The coordinator's end: the authenticator and the settings of its two sockets."""

    def __init__(self, context: zmq.Context, remote_key: KeyPair | None = None,
                 remote_workers: dict[bytes, str] | None = None):
        self.local_server = KeyPair.new()
        self.local_client = KeyPair.new()   # inherited by the local workers through fork
        self.remote_key = remote_key
        self._gate = _Gate(context, self.local_client.public, remote_workers or {})
        self._gate.start()

    def secure_local(self, sock: zmq.Socket) -> None:
        _serve(sock, self.local_server, LOCAL_DOMAIN)

    def secure_remote(self, sock: zmq.Socket) -> None:
        """CURVE on the remote socket; without a key (the insecure plaintext mode) nothing."""
        if self.remote_key is not None:
            _serve(sock, self.remote_key, REMOTE_DOMAIN)

    def local_credentials(self) -> WorkerCredentials:
        """What a local worker needs to join: given to it through fork, never sent."""
        return WorkerCredentials(self.local_client, self.local_server.public)

    def close(self) -> None:
        self._gate.stop()


def _serve(sock: zmq.Socket, key: KeyPair, domain: str) -> None:
    sock.curve_secretkey = key.secret
    sock.curve_publickey = key.public
    sock.curve_server = True
    sock.zap_domain = domain.encode()


@dataclass(frozen=True)
class WorkerCredentials:
    """A worker's end: its key pair and the coordinator's public key."""

    own: KeyPair
    server_public: bytes

    def secure(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.own.secret
        sock.curve_publickey = self.own.public
        sock.curve_serverkey = self.server_public


def peer_user(frame: zmq.Frame) -> str:
    """The authenticated name of the peer a message came from ('' when unauthenticated)."""
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:
        return ""


def peer_address(frame: zmq.Frame) -> str:
    """The network address of the peer a message came from, when the transport has one."""
    try:
        return frame.get("Peer-Address") or ""
    except zmq.ZMQError:
        return ""


# -- the private directory of the local socket ------------------------------------------


def _runtime_base() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
        return base
    return tempfile.gettempdir()


def _sweep_dead_runs(base: str) -> None:
    """Remove the socket directories of runs killed before they could (kill -9)."""
    uid = os.getuid()
    try:
        names = [n for n in os.listdir(base) if n.startswith(_IPC_DIR_PREFIX)]
    except OSError:
        return
    for name in names:
        pid_text = name[len(_IPC_DIR_PREFIX):].split("-", 1)[0]
        path = os.path.join(base, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or not pid_text.isdigit():
                continue
            os.kill(int(pid_text), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


@contextlib.contextmanager
def private_ipc_endpoint() -> Iterator[str]:
    """An ``ipc://`` endpoint inside a new directory only this user can enter,
    removed on leaving; the directories of dead runs are swept first."""
    base = _runtime_base()
    _sweep_dead_runs(base)
    try:
        directory = tempfile.mkdtemp(prefix=f"{_IPC_DIR_PREFIX}{os.getpid()}-", dir=base)
    except OSError as exc:
        raise IngestError(f"cannot create the workers' private socket directory in {base}: "
                          f"{exc.strerror or exc}") from None
    try:
        yield f"ipc://{os.path.join(directory, 'link')}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
