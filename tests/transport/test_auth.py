"""CURVE: keys made by a command and loaded from files; the right key is served, a wrong or
missing key gets nothing; tcp stays on loopback unless keys (or an explicit opt-out) allow more."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import pytest
import trio
import zmq
import zmq.auth

from infinillm import TransportConfig, TransportError
from infinillm.transport import Ack, CurveKeys, ZapHandler, generate_keypair, load_public_key, open_transport
from infinillm.transport.auth import ZAP_DOMAIN
from infinillm.transport.keys import main as keys_main


def test_keys_command_writes_a_pair_with_a_private_secret(tmp_path, capsys):
    assert keys_main([str(tmp_path / "k"), "--name", "node0"]) == 0
    out = capsys.readouterr().out
    public, secret = tmp_path / "k" / "node0.key", tmp_path / "k" / "node0.key_secret"
    assert str(secret) in out and "curve_secret_key_file" in out
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    keys = CurveKeys.load(secret, public)
    assert keys.public_key == load_public_key(public) == zmq.curve_public(keys.secret_key)
    assert keys.secret_key.decode() not in repr(keys)
    # pyzmq reads the same format
    assert zmq.auth.load_certificate(str(secret)) == (keys.public_key, keys.secret_key)
    assert keys_main([str(tmp_path / "k"), "--name", "node0"]) == 1  # refuses to overwrite
    assert "exists" in capsys.readouterr().err
    assert keys_main([str(tmp_path / "k"), "--name", "node0", "--force"]) == 0


def test_keys_command_runs_as_a_module(tmp_path):
    done = subprocess.run([sys.executable, "-m", "infinillm.transport.keys", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "infinillm.key_secret").exists()


def _q(path) -> str:
    """``path`` as an error message quotes it, as a regular expression."""
    return re.escape(repr(str(path)))


def test_key_files_load_from_a_config(tmp_path):
    public, secret = generate_keypair(tmp_path)
    other_public, _ = generate_keypair(tmp_path, "other")
    config = TransportConfig(curve_secret_key_file=str(secret), curve_public_key_file=str(public),
                             curve_server_public_key_file=str(other_public))
    keys = CurveKeys.from_config(config)
    assert keys.server_public_key == load_public_key(other_public)
    assert CurveKeys.from_config(TransportConfig()) is None


def test_a_missing_or_swapped_key_file_is_named(tmp_path):
    missing = tmp_path / "missing.key_secret"
    with pytest.raises(TransportError, match=rf"CURVE key file {_q(missing)} does not exist \(make one with: "
                                             r"python -m infinillm.transport.keys DIR\)"):
        CurveKeys.load(missing)
    public, secret = generate_keypair(tmp_path)
    with pytest.raises(TransportError, match=rf"CURVE key file {_q(tmp_path / 'nope.key')} does not exist"):
        CurveKeys.load(secret, tmp_path / "nope.key")
    with pytest.raises(TransportError, match=rf"CURVE key file {_q(public)} holds no secret-key line: is it the "
                                             r"\.key_secret file\?"):
        CurveKeys.load(public)  # the public file given as the secret one


def test_a_public_key_file_that_does_not_match_the_secret_key_file_is_refused(tmp_path):
    public, secret = generate_keypair(tmp_path)
    other_public, _ = generate_keypair(tmp_path, "other")
    own, other = load_public_key(public).decode(), load_public_key(other_public).decode()
    with pytest.raises(TransportError, match=(
        rf"curve_public_key_file {_q(other_public)} holds public key {re.escape(other)}, which does not match "
        rf"curve_secret_key_file {_q(secret)} \(whose public key is {re.escape(own)}\): they are not one pair"
    )):
        CurveKeys.load(secret, other_public)
    # within one secret file: a public-key line that is not the secret key's
    third_public, third_secret = generate_keypair(tmp_path, "third")
    third = load_public_key(third_public).decode()
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text(third_secret.read_text().replace(third, other))
    mixed.chmod(0o600)
    with pytest.raises(TransportError, match=(
        rf"CURVE key file {_q(mixed)}: its public-key {re.escape(other)} does not belong to its secret-key "
        rf"\(whose public key is {re.escape(third)}\)"
    )):
        CurveKeys.load(mixed)
    public_key, secret_key = zmq.curve_keypair()
    with pytest.raises(TransportError, match=(
        rf"public_key {re.escape(other)} does not belong to secret_key \(whose public key is "
        rf"{re.escape(public_key.decode())}\)"
    )):
        CurveKeys.create(other.encode(), secret_key)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o620, 0o660, 0o700 | 0o001])
def test_a_secret_key_file_that_group_or_others_may_access_is_refused(tmp_path, mode):
    public, secret = generate_keypair(tmp_path)
    secret.chmod(mode)
    with pytest.raises(TransportError, match=(
        rf"CURVE secret key file {_q(secret)} has mode {mode:04o}: group or others may access it; "
        rf"it must be 0600 or stricter \(chmod 600 {_q(secret)}\)"
    )):
        CurveKeys.load(secret, public)
    secret.chmod(0o400)  # stricter than 0600 is fine
    assert CurveKeys.load(secret, public).public_key == load_public_key(public)


def test_an_unknown_key_name_is_refused_naming_the_keys_the_directory_holds(tmp_path):
    keys_dir = tmp_path / "keys"
    generate_keypair(keys_dir, "node0")
    generate_keypair(keys_dir, "node1")
    keys = CurveKeys.from_directory(keys_dir, "node0", server_name="node1", authorized_names=["node1"])
    assert keys.public_key == load_public_key(keys_dir / "node0.key")
    assert keys.server_public_key == load_public_key(keys_dir / "node1.key")
    make = rf"\(make one with: python -m infinillm.transport.keys {_q(keys_dir)} --name node2\)"
    with pytest.raises(TransportError, match=rf"no CURVE key named 'node2' in {_q(keys_dir)}: it holds 'node0', 'node1' {make}"):
        CurveKeys.from_directory(keys_dir, "node2")
    with pytest.raises(TransportError, match=rf"no CURVE key named 'node2' in {_q(keys_dir)}: it holds 'node0', 'node1'"):
        CurveKeys.from_directory(keys_dir, "node0", server_name="node2")
    with pytest.raises(TransportError, match=rf"no CURVE key named 'node2' in {_q(keys_dir)}: it holds 'node0', 'node1'"):
        CurveKeys.from_directory(keys_dir, "node0", authorized_names=["node1", "node2"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TransportError, match=rf"no CURVE key named 'infinillm' in {_q(tmp_path / 'empty')}: it holds no keys"):
        CurveKeys.from_directory(tmp_path / "empty")
    with pytest.raises(TransportError, match=rf"CURVE key directory {_q(tmp_path / 'nowhere')} does not exist"):
        CurveKeys.from_directory(tmp_path / "nowhere", "node0")
    with pytest.raises(TransportError, match=r"key name '\.\./node0' must be letters, digits, '_', '\.' or '-'"):
        CurveKeys.from_directory(keys_dir, "../node0")
    (keys_dir / "node1.key_secret").unlink()  # a peer's public key only
    with pytest.raises(TransportError, match=(
        rf"CURVE key 'node1' in {_q(keys_dir)} has no secret key file 'node1.key_secret', only its public key: "
        r"this process cannot use it as its own"
    )):
        CurveKeys.from_directory(keys_dir, "node1")


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"\xff\xfe garbage", r"cannot read CURVE key file {path}: 'ascii' codec can't decode byte 0xff in position 0"),
        (b"", r"CURVE key file {path} holds no secret-key line: is it the \.key_secret file\?"),
        (b"just some text\n", r"CURVE key file {path} holds no secret-key line"),
        (b'curve\n    secret-key = "short"\n', r"secret-key in {path} is not a CURVE key: must be 40 Z85 characters, got 5"),
        (b'curve\n    secret-key = "' + b"a" * 41 + b'"\n', r"secret-key in {path} is not a CURVE key: must be 40 Z85 characters, got 41"),
        (b'curve\n    secret-key = "' + b"a" * 7 + b"~" + b"a" * 32 + b'"\n',
         r"secret-key in {path} is not a CURVE key: character 7 of 40 is not a Z85 character"),
        (b'curve\n    public-key = "' + b"b" * 39 + b'"\n', r"public-key in {path} is not a CURVE key: must be 40 Z85 characters, got 39"),
    ],
    ids=["binary", "empty", "no-key-lines", "short-key", "long-key", "not-z85", "short-public-key"],
)
def test_garbage_key_files_are_refused(tmp_path, content, pattern):
    bad = tmp_path / "bad.key_secret"
    bad.write_bytes(content)
    bad.chmod(0o600)
    with pytest.raises(TransportError, match=pattern.format(path=_q(bad))):
        CurveKeys.load(bad)


def test_a_public_key_file_without_a_public_key_is_refused(tmp_path):
    bad = tmp_path / "bad.key"
    bad.write_text("metadata\ncurve\n")
    with pytest.raises(TransportError, match=rf"CURVE key file {_q(bad)} holds no public-key line"):
        load_public_key(bad)
    _, secret = generate_keypair(tmp_path)
    with pytest.raises(TransportError, match=rf"CURVE key file {_q(bad)} holds no public-key line"):
        CurveKeys.load(secret, bad)


def _pair():
    public, secret = zmq.curve_keypair()
    return public, secret


async def test_the_right_key_is_served_and_wrong_or_missing_keys_get_nothing():
    public, secret = _pair()
    keys = CurveKeys.create(public, secret)
    stranger_public, stranger_secret = _pair()
    served = []

    async def handler(msg):
        served.append(msg)

    clients = {
        "the right key": keys,
        "another client key": CurveKeys.create(stranger_public, stranger_secret, server_public_key=public),
        "no key": None,
        "a wrong server key": CurveKeys.create(stranger_public, stranger_secret, server_public_key=_pair()[0]),
    }
    outcomes = {}
    with trio.fail_after(30):
        async with open_transport(TransportConfig(transport="tcp"), keys=keys) as tp:
            async with tp.open_server(handler) as server:
                for label, client_keys in clients.items():
                    async with open_transport(keys=client_keys) as tp_client:
                        async with tp_client.open_client(server.address, timeout=20) as client:
                            try:
                                outcomes[label] = await client.request(Ack())
                            except TransportError as e:
                                outcomes[label] = str(e)
            zap = tp.zap_statistics()
    assert outcomes["the right key"] == Ack()
    assert "the server refused our key (status 400)" in outcomes["another client key"]
    assert "handshake with" in outcomes["no key"] and "check the CURVE keys" in outcomes["no key"]
    assert "handshake with" in outcomes["a wrong server key"]
    assert len(served) == 1  # only the authorized client reached the handler
    assert zap.num_accepted == 1 and zap.num_refused == 1


async def test_ipc_and_inproc_need_no_keys_even_when_keys_are_configured(tmp_path):
    public, secret = _pair()
    async with open_transport(TransportConfig(transport="ipc"), keys=CurveKeys.create(public, secret)) as tp:
        async def handler(msg):
            return None

        async with tp.open_server(handler) as server, tp.open_client(server.address) as client:
            assert await client.request(Ack()) == Ack()
        async with tp.open_server(handler, "inproc://x") as server, tp.open_client(server.address) as client:
            assert await client.request(Ack()) == Ack()


async def test_tcp_binds_to_loopback_unless_told_otherwise():
    async def handler(msg):
        return None

    async with open_transport(TransportConfig(transport="tcp")) as tp:
        assert tp.default_address("x").startswith("tcp://127.0.0.1:")
        with pytest.raises(TransportError, match=r"refusing to bind 'tcp://0\.0\.0\.0:\*' without CURVE keys: only "
                                                 r"loopback tcp may be unauthenticated"):
            async with tp.open_server(handler, "tcp://0.0.0.0:*"):
                pass
    async with open_transport(TransportConfig(transport="tcp", bind_host="0.0.0.0", base_port=0)) as tp:
        with pytest.raises(TransportError, match=r"refusing to bind 'tcp://0\.0\.0\.0:\*' without CURVE keys: only "
                                                 r"loopback tcp may be unauthenticated"):
            async with tp.open_server(handler):
                pass
    async with open_transport(TransportConfig(transport="tcp"), allow_insecure_tcp=True) as tp:
        async with tp.open_server(handler, "tcp://0.0.0.0:*") as server:
            assert server.address.startswith("tcp://0.0.0.0:")


def test_zap_handler_admits_only_authorized_curve_keys():
    public, secret = _pair()
    keys = CurveKeys.create(public, secret)
    ctx = zmq.Context()
    try:
        zap = ZapHandler(ctx, keys)
        domain = ZAP_DOMAIN.encode()
        ok = zap._answer([b"", b"1.0", b"id", domain, b"1.2.3.4", b"", b"CURVE", zmq.utils.z85.decode(public)])
        assert ok[3] == b"200"
        other = zap._answer([b"", b"1.0", b"id", domain, b"1.2.3.4", b"", b"CURVE", zmq.utils.z85.decode(_pair()[0])])
        assert other[3] == b"400"
        plain = zap._answer([b"", b"1.0", b"id", domain, b"1.2.3.4", b"", b"NULL"])
        assert plain[3] == b"400"
        assert zap._answer([b"junk"]) is None
        assert zap.statistics().num_accepted == 1 and zap.statistics().num_refused == 2
    finally:
        ctx.destroy(linger=0)
