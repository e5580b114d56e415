"""CURVE: keys made by a command and loaded from files; the right key is served, a wrong or
missing key gets nothing; tcp stays on loopback unless keys (or an explicit opt-out) allow more."""

from __future__ import annotations

import os
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


def test_key_files_are_checked(tmp_path):
    public, secret = generate_keypair(tmp_path)
    other_public, _ = generate_keypair(tmp_path, "other")
    with pytest.raises(TransportError, match="does not exist"):
        CurveKeys.load(tmp_path / "missing")
    with pytest.raises(TransportError, match="holds no secret-key line: is it the .key_secret file"):
        CurveKeys.load(public)
    with pytest.raises(TransportError, match="does not match curve_secret_key_file"):
        CurveKeys.load(secret, other_public)
    bad = tmp_path / "bad.key_secret"
    bad.write_text('curve\n    secret-key = "short"\n')
    with pytest.raises(TransportError, match="not a CURVE key: must be 40 Z85 characters"):
        CurveKeys.load(bad)
    config = TransportConfig(curve_secret_key_file=str(secret), curve_public_key_file=str(public),
                             curve_server_public_key_file=str(other_public))
    keys = CurveKeys.from_config(config)
    assert keys.server_public_key == load_public_key(other_public)
    assert CurveKeys.from_config(TransportConfig()) is None


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
        with pytest.raises(TransportError, match=r"refusing to bind 'tcp://0.0.0.0:\*' without CURVE keys"):
            async with tp.open_server(handler, "tcp://0.0.0.0:*"):
                pass
    async with open_transport(TransportConfig(transport="tcp", bind_host="0.0.0.0", base_port=0)) as tp:
        with pytest.raises(TransportError, match="refusing to bind"):
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
