"""Between two real processes: round trips over ipc and tcp (CURVE), and a peer that dies."""

from __future__ import annotations

import re
import subprocess
import sys
from functools import partial

import pytest
import torch
import trio
import trio.testing
import zmq

from infinillm import TransportConfig, TransportError
from infinillm.transport import AbortRequest, Ack, CurveKeys, generate_keypair, open_transport

from .conftest import PEER_SERVER, make_query


async def _read_addresses(stream) -> dict[str, str]:
    buf = b""
    while not buf.endswith(b"ready\n"):
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"the peer exited before it was ready: {buf!r}")
        buf += chunk
    return dict(line.split(" ", 1) for line in buf.decode().splitlines() if " " in line)


async def test_two_processes_round_trips_curve_and_a_peer_that_dies(tmp_path):
    _, secret = generate_keypair(tmp_path / "keys")
    keys = CurveKeys.load(secret)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            proc = await nursery.start(partial(
                trio.run_process, [sys.executable, PEER_SERVER, f"ipc://{tmp_path}/peer", str(secret)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False,
            ))
            addresses = await _read_addresses(proc.stdout)
            assert addresses["tcp"].startswith("tcp://127.0.0.1:")

            async with open_transport(TransportConfig(transport="ipc", request_timeout_s=600), keys=keys) as tp:
                # Round trips over ipc and over tcp (authenticated).
                for kind in ("ipc", "tcp"):
                    async with tp.open_client(addresses[kind]) as client:
                        for i in range(30):
                            q = make_query(batch=1 + i % 4, seed=i)
                            r = await client.request(q)
                            assert torch.equal(r.out, q.q * 2)
                            assert torch.equal(r.lse, q.q.float().sum(-1))

                # A client with another key pair is refused at the handshake.
                other_public, other_secret = zmq.curve_keypair()
                other = CurveKeys.create(other_public, other_secret, server_public_key=keys.public_key)
                async with open_transport(keys=other) as tp_other:
                    async with tp_other.open_client(addresses["tcp"], timeout=30) as stranger:
                        with pytest.raises(TransportError, match=(
                            rf"handshake with {re.escape(addresses['tcp'])} failed: the server refused our key "
                            r"\(status 400\); check the CURVE keys"
                        )):
                            await stranger.request(Ack())

                # The peer dies with requests pending: they fail at once, not after 600 s.
                async with tp.open_client(addresses["ipc"]) as client:
                    await client.wait_connected()
                    failures = []

                    async def pending():
                        try:
                            await client.request(AbortRequest(1))
                        except TransportError as e:
                            failures.append(str(e))

                    async with trio.open_nursery() as inner:
                        inner.start_soon(pending)
                        inner.start_soon(pending)
                        await trio.testing.wait_all_tasks_blocked()
                        proc.kill()
                    assert len(failures) == 2 and all("has gone" in f for f in failures)
            await proc.wait()
