"""A peer in another process, for the two-process tests (run as a script, not collected).

    python peer_server.py IPC_ADDRESS [SECRET_KEY_FILE]

Serves one server on IPC_ADDRESS and one on loopback tcp (CURVE with the key file when given),
prints ``ipc <address>`` and ``tcp <address>`` then ``ready``, and exits when its stdin closes.
Answers an AttentionQuery with (q * 2, sum of q over head_dim); holds an AbortRequest forever.
"""

from __future__ import annotations

import os
import sys

import trio

from infinillm import TransportConfig
from infinillm.transport import AbortRequest, AttentionQuery, AttentionResult, CurveKeys, open_transport


async def handler(msg):
    if isinstance(msg, AttentionQuery):
        return AttentionResult(msg.layer, msg.q * 2, msg.q.float().sum(-1))
    if isinstance(msg, AbortRequest):
        await trio.sleep_forever()
    return None


async def main(ipc_address: str, secret_key_file: str | None) -> None:
    keys = CurveKeys.load(secret_key_file) if secret_key_file else None
    async with open_transport(TransportConfig(transport="tcp"), keys=keys) as tp:
        async with tp.open_server(handler, ipc_address) as ipc, tp.open_server(handler, name="peer") as tcp:
            print("ipc", ipc.address, flush=True)
            print("tcp", tcp.address, flush=True)
            print("ready", flush=True)
            stdin = trio.lowlevel.FdStream(os.dup(0))
            async with stdin:
                while await stdin.receive_some():
                    pass


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
