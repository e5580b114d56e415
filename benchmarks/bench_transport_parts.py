"""Where a transport round trip's time goes, server side: one part added at a time.

A blocking pyzmq client (the baseline of ``bench_transport.py``) sends the decode-sized
attention query to servers in other processes, each doing a little more of what our
``Server`` does per request before it answers with the same pre-encoded result:

    raw        blocking pyzmq ROUTER (the baseline)
    socket     our trio socket layer (``RouterSocket``)
    torch1     socket + one torch call (``tensor.data_ptr()``) per request
    header     socket + parse the query's header (the compiled msgpack subset)
    decode     socket + ``Codec.decode`` (header, three tensors, the message's check)
    encode     decode + build the ``AttentionResult`` and ``Codec.encode`` it
    server     our whole ``Server`` with the benchmark's handler

Round trips are timed one by one, in interleaved chunks (every server sees the same machine
load), and each server's figure is the median over runs of its median round trip; ``+us`` is
what it adds to ``raw``. The client side does the mirror image (encode the query, decode the
result) and costs about the same. What this shows on a small shared VM: each part costs far
more right after a wait (caches and TLBs cold) than in a hot loop (the ``codec_*`` figures of
``bench_transport.py``); about 2 us per torch call.

    python benchmarks/bench_transport_parts.py [--runs 5] [--round-trips 1000] [--chunk 25]

Prints JSON lines {"metric", "value", "unit"}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import trio
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402
from bench_transport import RawClient, make_query, make_result, serve_ours, serve_raw, wire_frames  # noqa: E402

from infinillm.transport import AttentionResult, Codec, RouterSocket  # noqa: E402

PARTS = ["raw", "socket", "torch1", "header", "decode", "encode", "server"]


def serve_part(part: str, address: str) -> None:
    if part == "raw":
        return serve_raw(address)
    if part == "server":
        return serve_ours(address, "ipc")
    from infinillm.transport import codec as codec_module

    codec = Codec()
    result = make_result()
    reply = wire_frames(result)
    probe = make_query().q
    unpack_header = codec_module._wire.unpack_header

    async def main():
        ctx = zmq.Context()
        sock = RouterSocket.create(ctx)
        try:
            print(sock.bind(address), flush=True)
            while True:
                peer, frames = await sock.receive()
                if part == "torch1":
                    probe.data_ptr()
                elif part == "header":
                    unpack_header(frames[0].buffer)
                elif part == "decode":
                    codec.decode(frames)
                elif part == "encode":
                    seq, msg = codec.decode(frames)
                    sock.send_nowait(peer, codec.encode(AttentionResult(msg.layer, result.out, result.lse), seq))
                    continue
                sock.send_nowait(peer, reply)
        finally:
            sock.close()
            ctx.term()

    trio.run(main)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=1000, help="per part and run")
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--serve", nargs=2, metavar=("PART", "ADDRESS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        try:
            serve_part(*args.serve)
        except KeyboardInterrupt:
            pass
        return
    with tempfile.TemporaryDirectory(prefix="infinillm-parts-") as tmp:
        procs, clients = [], {}
        try:
            for part in PARTS:
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", part, f"ipc://{tmp}/{part}"],
                                        stdout=subprocess.PIPE, text=True)
                procs.append(proc)
                bound = proc.stdout.readline().strip()
                if not bound:
                    raise RuntimeError(f"the {part} server did not start")
                clients[part] = RawClient(bound)
            for client in clients.values():
                for _ in range(300):
                    client.round_trip()
            medians: dict[str, list[float]] = {part: [] for part in PARTS}
            for _ in range(args.runs):
                samples: dict[str, list[float]] = {part: [] for part in PARTS}
                for _ in range(max(1, args.round_trips // args.chunk)):
                    for part, client in clients.items():
                        client.rtt_samples(args.chunk, samples[part])
                for part in PARTS:
                    medians[part].append(statistics.median(samples[part]))
            base = statistics.median(medians["raw"])
            for part in PARTS:
                rtt = statistics.median(medians[part])
                emit(f"parts_{part}_rtt_us", rtt * 1e6, "us", added_us=round((rtt - base) * 1e6, 1))
            for client in clients.values():
                client.close()
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
