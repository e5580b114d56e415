"""CURVE authentication for tcp endpoints: key files, and the ZAP handler that admits peers.

A cluster's sockets over tcp use ZeroMQ CURVE (elliptic-curve encryption and authentication):

- ``python -m infinillm.transport.keys DIR`` writes a key pair, ``DIR/infinillm.key`` (public)
  and ``DIR/infinillm.key_secret`` (public and secret, mode 0600), in ZeroMQ's certificate
  format (the one ``zmq.auth.load_certificate`` and czmq read).
- ``TransportConfig.curve_secret_key_file`` / ``curve_public_key_file`` name this process's
  pair; ``curve_server_public_key_file`` the servers' public key (default: our own, when the
  whole cluster shares one pair). ``CurveKeys.from_directory(DIR, NAME)`` loads the same files
  by key name.
- Key files are checked when loaded, and every problem is a ``TransportError`` naming the file
  and what was wrong with it: a missing or unreadable file, content that is not a ZeroMQ
  certificate or not a Z85 key, a public key that does not belong to the secret key, a secret
  key file that group or others may access (it must be mode 0600 or stricter), a key name the
  directory does not hold.
- A server admits a client only if the client's public key is authorized: our own public key
  and the server key, plus any given in ``authorized_keys``. Anyone else's handshake is refused
  by the ZAP handler (``ZapHandler``), and a client that does not know the server's public key
  cannot complete the handshake at all: either way the peer gets nothing.

ipc and inproc endpoints stay on one host and are not authenticated (ipc sockets live in a
directory only this user can enter).
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import trio
import zmq
from zmq.utils import z85

from ..errors import TransportError
from .socket import RouterSocket

__all__ = [
    "CurveKeys",
    "ZapHandler",
    "ZapStats",
    "generate_keypair",
    "key_files",
    "load_public_key",
    "load_secret_key",
    "ZAP_DOMAIN",
    "ZAP_ENDPOINT",
]

log = logging.getLogger("infinillm.transport")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
ZAP_DOMAIN = "infinillm"
_Z85_CHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
_Z85_LEN = 40  # a 32-byte curve25519 key in Z85
_LINE = re.compile(r'^\s*(public|secret)-key\s*=\s*"([^"]*)"\s*$')
_KEY_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SECRET_MODE_MASK = stat.S_IRWXG | stat.S_IRWXO  # no access at all for group and others


def _z85(key: bytes | str, what: str) -> bytes:
    if isinstance(key, str):
        key = key.encode("ascii", "backslashreplace")  # a non-ASCII character is then not Z85
    if len(key) != _Z85_LEN:
        raise TransportError(f"{what} is not a CURVE key: must be {_Z85_LEN} Z85 characters, got {len(key)}")
    for i, c in enumerate(key):  # (the character itself is not shown: it may be a secret's)
        if c not in _Z85_CHARS:
            raise TransportError(f"{what} is not a CURVE key: character {i} of {_Z85_LEN} is not a Z85 character")
    return key


def _read_keys(path: str | os.PathLike) -> dict[str, bytes]:
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise TransportError(f"CURVE key file {str(p)!r} does not exist (make one with: python -m infinillm.transport.keys DIR)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TransportError(f"cannot read CURVE key file {str(p)!r}: {e}") from None
    keys: dict[str, bytes] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            keys[m.group(1)] = _z85(m.group(2), f"{m.group(1)}-key in {str(p)!r}")
    return keys


def load_public_key(path: str | os.PathLike) -> bytes:
    """The Z85 public key in a certificate file (public or secret)."""
    keys = _read_keys(path)
    if "public" not in keys:
        raise TransportError(f"CURVE key file {str(path)!r} holds no public-key line")
    return keys["public"]


def load_secret_key(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` Z85 keys from a secret certificate file; checks they belong
    together, and refuses a file that group or others may access (it must be mode 0600 or
    stricter: anyone who reads it can pose as this process)."""
    keys = _read_keys(path)
    if "secret" not in keys:
        raise TransportError(f"CURVE key file {str(path)!r} holds no secret-key line: is it the .key_secret file?")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as e:  # read a moment ago: gone or replaced since
        raise TransportError(f"cannot check the mode of CURVE secret key file {str(path)!r}: {e}") from None
    if mode & _SECRET_MODE_MASK:
        raise TransportError(
            f"CURVE secret key file {str(path)!r} has mode {mode:04o}: group or others may access it; "
            f"it must be 0600 or stricter (chmod 600 {str(path)!r})"
        )
    secret = keys["secret"]
    public = zmq.curve_public(secret)
    if "public" in keys and keys["public"] != public:
        raise TransportError(
            f"CURVE key file {str(path)!r}: its public-key {keys['public'].decode()} does not belong to its "
            f"secret-key (whose public key is {public.decode()})"
        )
    return public, secret


def _key_name(name: str) -> str:
    if not isinstance(name, str) or not _KEY_NAME.fullmatch(name):
        raise TransportError(f"key name {name!r} must be letters, digits, '_', '.' or '-'")
    return name


def key_files(directory: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """``(public, secret)`` paths of the pair called ``name`` in ``directory`` (as
    ``generate_keypair`` writes them); ``TransportError`` naming the keys the directory holds
    when it has no public key of that name. The secret file is not checked here."""
    d = Path(directory)
    public_path, secret_path = d / f"{_key_name(name)}.key", d / f"{name}.key_secret"
    if not d.is_dir():
        raise TransportError(f"CURVE key directory {str(d)!r} does not exist (make a pair in it with: "
                             f"python -m infinillm.transport.keys {str(d)!r} --name {name})")
    if not public_path.is_file():
        held = sorted(p.name[: -len(".key")] for p in d.glob("*.key") if p.is_file())
        raise TransportError(
            f"no CURVE key named {name!r} in {str(d)!r}: it holds "
            + (", ".join(repr(h) for h in held) if held else "no keys")
            + f" (make one with: python -m infinillm.transport.keys {str(d)!r} --name {name})"
        )
    return public_path, secret_path


def generate_keypair(directory: str | os.PathLike, name: str = "infinillm", *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new pair: ``directory/name.key`` (public) and ``directory/name.key_secret``
    (mode 0600). Refuses to replace existing files unless ``overwrite``."""
    _key_name(name)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = d / f"{name}.key", d / f"{name}.key_secret"
    if not overwrite:
        for p in (public_path, secret_path):
            if p.exists():
                raise TransportError(f"{str(p)!r} exists; pass --force (overwrite=True) to replace it")
    public, secret = zmq.curve_keypair()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = f"#   ****  Generated on {stamp} by infinillm  ****\n"
    public_text = (
        f"{head}#   ZeroMQ CURVE Public Certificate\n#   Exchange securely, or use a secure mechanism to verify the contents\n"
        f'#   of this file after exchange. Store public certificates in your home\n#   directory, in the .curve subdirectory.\n\n'
        f'metadata\ncurve\n    public-key = "{public.decode()}"\n'
    )
    secret_text = (
        f"{head}#   ZeroMQ CURVE **Secret** Certificate\n#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\n"
        f'metadata\ncurve\n    public-key = "{public.decode()}"\n    secret-key = "{secret.decode()}"\n'
    )
    _write(public_path, public_text, 0o644)
    _write(secret_path, secret_text, 0o600)
    return public_path, secret_path


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """One process's CURVE credentials.

    ``public_key`` / ``secret_key``: this process's pair (Z85). ``server_public_key``: the key
    a client expects its servers to have. ``authorized_keys``: the client keys a server
    admits (always including our own public key and the server key, for a cluster that shares
    one pair).
    """

    public_key: bytes
    secret_key: bytes
    server_public_key: bytes
    authorized_keys: frozenset[bytes]

    def __post_init__(self) -> None:
        _z85(self.public_key, "public_key")
        _z85(self.secret_key, "secret_key")
        _z85(self.server_public_key, "server_public_key")
        own = zmq.curve_public(self.secret_key)
        if own != self.public_key:
            raise TransportError(
                f"public_key {self.public_key.decode()} does not belong to secret_key (whose public key is {own.decode()})"
            )
        for key in self.authorized_keys:
            _z85(key, "an authorized key")

    def __repr__(self) -> str:  # never print the secret
        return f"CurveKeys(public_key={self.public_key!r}, server_public_key={self.server_public_key!r}, authorized={len(self.authorized_keys)})"

    @classmethod
    def create(
        cls,
        public_key: bytes,
        secret_key: bytes,
        server_public_key: bytes | None = None,
        authorized_keys: tuple[bytes, ...] | list[bytes] | frozenset[bytes] = (),
    ) -> CurveKeys:
        server = server_public_key or public_key
        return cls(public_key, secret_key, server, frozenset({public_key, server, *authorized_keys}))

    @classmethod
    def load(
        cls,
        secret_key_file: str | os.PathLike,
        public_key_file: str | os.PathLike | None = None,
        server_public_key_file: str | os.PathLike | None = None,
        authorized_key_files: tuple[str | os.PathLike, ...] | list[str | os.PathLike] = (),
    ) -> CurveKeys:
        """From certificate files (``authorized_key_files``: public keys of more clients)."""
        public, secret = load_secret_key(secret_key_file)
        if public_key_file is not None:
            given = load_public_key(public_key_file)
            if given != public:
                raise TransportError(
                    f"curve_public_key_file {str(public_key_file)!r} holds public key {given.decode()}, which does not "
                    f"match curve_secret_key_file {str(secret_key_file)!r} (whose public key is {public.decode()}): "
                    f"they are not one pair"
                )
        server = load_public_key(server_public_key_file) if server_public_key_file is not None else None
        return cls.create(public, secret, server, [load_public_key(p) for p in authorized_key_files])

    @classmethod
    def from_directory(
        cls,
        directory: str | os.PathLike,
        name: str = "infinillm",
        *,
        server_name: str | None = None,
        authorized_names: tuple[str, ...] | list[str] = (),
    ) -> CurveKeys:
        """By key name from a directory of pairs (``generate_keypair``'s files): ``name`` is
        this process's pair, ``server_name`` the servers' public key (default: ours), and
        ``authorized_names`` the public keys of more clients."""
        public_path, secret_path = key_files(directory, name)
        if not secret_path.is_file():
            raise TransportError(
                f"CURVE key {name!r} in {str(directory)!r} has no secret key file {secret_path.name!r}, only its "
                f"public key: this process cannot use it as its own"
            )
        server = key_files(directory, server_name)[0] if server_name is not None else None
        return cls.load(secret_path, public_path, server, [key_files(directory, n)[0] for n in authorized_names])

    @classmethod
    def from_config(cls, config) -> CurveKeys | None:
        """From a ``TransportConfig``'s key files; None when it names none."""
        if not config.curve_enabled:
            if config.curve_server_public_key_file is not None:
                raise TransportError("curve_server_public_key_file is set but curve_secret_key_file is not")
            return None
        return cls.load(config.curve_secret_key_file, config.curve_public_key_file, config.curve_server_public_key_file)

    def apply_server(self, sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.zap_domain = ZAP_DOMAIN.encode()

    def apply_client(self, sock: zmq.Socket) -> None:
        sock.curve_serverkey = self.server_public_key
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key


@dataclass(frozen=True, slots=True)
class ZapStats:
    num_accepted: int
    num_refused: int


class ZapHandler:
    """Answers ZeroMQ's authentication requests (ZAP, RFC 27) for one context: a CURVE client
    is admitted iff its public key is in ``keys.authorized_keys``. Run ``serve`` in a nursery
    before any CURVE server socket binds (the context's ``open_transport`` does)."""

    def __init__(self, context: zmq.Context, keys: CurveKeys) -> None:
        self._context = context
        self._authorized = keys.authorized_keys
        self.num_accepted = 0
        self.num_refused = 0

    def statistics(self) -> ZapStats:
        return ZapStats(self.num_accepted, self.num_refused)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = RouterSocket.create(self._context)
        # RouterSocket sets ROUTER_MANDATORY; libzmq's ZAP client is always there to hear us.
        try:
            sock.bind(ZAP_ENDPOINT)
            task_status.started()
            while True:
                peer, frames = await sock.receive()
                reply = self._answer([f.bytes for f in frames])
                if reply is not None:
                    try:
                        sock.send_nowait(peer, reply)
                    except (trio.WouldBlock, TransportError) as e:  # the handshake went away
                        log.debug("ZAP reply not sent: %s", e)
        finally:
            sock.close()

    def _answer(self, frames: list[bytes]) -> list[bytes] | None:
        # [b"", version, request_id, domain, address, identity, mechanism, *credentials]
        if len(frames) < 7 or frames[0] != b"" or frames[1] != b"1.0":
            log.warning("malformed ZAP request of %d frames ignored", len(frames))
            return None
        request_id, domain, address, mechanism = frames[2], frames[3], frames[4], frames[6]
        credentials = frames[7:]
        ok = False
        if domain == ZAP_DOMAIN.encode() and mechanism == b"CURVE" and len(credentials) == 1 and len(credentials[0]) == 32:
            ok = z85.encode(credentials[0]) in self._authorized
        if ok:
            self.num_accepted += 1
            return [b"", b"1.0", request_id, b"200", b"OK", b"", b""]
        self.num_refused += 1
        log.warning(
            "refused a %s peer from %s: its key is not authorized",
            mechanism.decode("ascii", "replace"),
            address.decode("ascii", "replace"),
        )
        return [b"", b"1.0", request_id, b"400", b"key not authorized", b"", b""]
