"""Transport round trip against raw blocking pyzmq, between two processes.

The payload is a decode-sized attention query (one request, 32 heads x 128 dims fp16, its
block tables) answered with an attention result (out fp16 + lse fp32), over ipc and over tcp.
Three flavours, each a client here and a server in another process:

- ``raw``: blocking pyzmq, a DEALER sending the very frames our codec produces to a ROUTER that
  answers with pre-encoded reply frames (the baseline);
- ``socket``: our trio socket layer alone on both ends (``DealerSocket`` / ``RouterSocket``),
  the same pre-encoded frames: what trio's waiting costs;
- ``ours``: the whole stack, ``Client.request`` to a ``Server``: encoding, decoding and
  dispatch on both ends on top of the socket layer.

Each run times ``--round-trips`` sequential round trips of each flavour, one by one, taken in
interleaved chunks of ``--chunk`` (raw, socket, ours, raw, ...) so that all three see the same
machine load; a flavour's round-trip latency in a run is the median of its round trips (this
machine is shared: a neighbour's burst lands on a few round trips, not on one flavour's whole
block). ``<t>_rtt_ratio`` is the median over ``--runs`` of ours / raw, ``<t>_socket_rtt_ratio``
of socket / raw; ``<t>_rtt_mean_ratio`` is the same ratio of mean round trips, tails included.
Messages/s is measured with ``--window`` requests in flight.

    python benchmarks/bench_transport.py [--runs 11] [--round-trips 1000] [--chunk 25] [--window 16]

Prints JSON lines {"metric", "value", "unit"}. A server process is started per transport
and flavour (``--serve``, internal).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import trio
import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit, median_seconds  # noqa: E402

from infinillm.config import TransportConfig  # noqa: E402
from infinillm.transport import AttentionQuery, AttentionResult, Codec, open_transport  # noqa: E402

NUM_HEADS, HEAD_DIM, NUM_BLOCKS = 32, 128, 8


def make_query() -> AttentionQuery:
    g = torch.Generator().manual_seed(0)
    table = torch.arange(NUM_BLOCKS, dtype=torch.int32).view(1, NUM_BLOCKS)
    return AttentionQuery.build(
        layer=0,
        request_ids=(7,),
        q=torch.randn(1, NUM_HEADS, HEAD_DIM, generator=g).half(),
        cu_q=None,  # one query row per request: decode
        q_pos=torch.tensor([NUM_BLOCKS * 16 - 1], dtype=torch.int32),
        block_table=table,
        block_start=table * 16,
        block_len=torch.full((1, NUM_BLOCKS), 16, dtype=torch.int32),
    )


def make_result() -> AttentionResult:
    g = torch.Generator().manual_seed(1)
    return AttentionResult(0, torch.randn(1, NUM_HEADS, HEAD_DIM, generator=g).half(), torch.randn(1, NUM_HEADS, generator=g))


def wire_frames(msg, seq: int = 1) -> list[bytes]:
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in Codec().encode(msg, seq)]


# ---- servers (child processes) -----------------------------------------------------------------


def serve_raw(address: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(address)
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    reply = wire_frames(make_result())
    try:
        while True:
            frames = sock.recv_multipart(copy=False)
            sock.send_multipart([frames[0], *reply], copy=False)
    finally:
        sock.close(linger=0)
        ctx.term()


def serve_socket(address: str) -> None:
    from infinillm.transport import RouterSocket

    async def main():
        ctx = zmq.Context()
        sock = RouterSocket.create(ctx)
        try:
            print(sock.bind(address), flush=True)
            reply = wire_frames(make_result())
            while True:
                peer, _ = await sock.receive()
                sock.send_nowait(peer, reply)
        finally:
            sock.close()
            ctx.term()

    trio.run(main)


def serve_ours(address: str, transport: str) -> None:
    result = make_result()

    async def handler(msg):
        return AttentionResult(msg.layer, result.out, result.lse)

    async def main():
        async with open_transport(TransportConfig(transport=transport)) as tp:
            async with tp.open_server(handler, address) as server:
                print(server.address, flush=True)
                await trio.sleep_forever()

    trio.run(main)


def start_server(flavour: str, address: str, transport: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve", flavour, address, transport],
        stdout=subprocess.PIPE,
        text=True,
    )
    bound = proc.stdout.readline().strip()
    if not bound:
        proc.kill()
        raise RuntimeError(f"the {flavour} server did not start")
    return proc, bound


# ---- clients -----------------------------------------------------------------------------------


class RawClient:
    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(address)
        self.frames = wire_frames(make_query())

    def round_trip(self) -> None:
        self.sock.send_multipart(self.frames, copy=False)
        self.sock.recv_multipart(copy=False)

    def rtt_samples(self, n: int, out: list[float]) -> None:
        sock, frames, clock = self.sock, self.frames, time.perf_counter
        for _ in range(n):
            t0 = clock()
            sock.send_multipart(frames, copy=False)
            sock.recv_multipart(copy=False)
            out.append(clock() - t0)

    def throughput(self, n: int, window: int) -> float:
        t0 = time.perf_counter()
        for _ in range(window):
            self.sock.send_multipart(self.frames, copy=False)
        for i in range(n):
            self.sock.recv_multipart(copy=False)
            if i + window < n:
                self.sock.send_multipart(self.frames, copy=False)
        return n / (time.perf_counter() - t0)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


async def socket_rtt_samples(sock, frames, n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        await sock.send(frames)
        await sock.receive()
        out.append(clock() - t0)


async def ours_rtt_samples(client, query, n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        await client.request(query)
        out.append(clock() - t0)


async def ours_throughput(client, query, n: int, window: int) -> float:
    per_task = n // window

    async def worker():
        for _ in range(per_task):
            await client.request(query)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(window):
            nursery.start_soon(worker)
    return per_task * window / (time.perf_counter() - t0)


def bench_transport(transport: str, tmp: str, args) -> float:
    from infinillm.transport import DealerSocket

    address = f"ipc://{tmp}/{{}}" if transport == "ipc" else "tcp://127.0.0.1:*"
    servers = {flavour: start_server(flavour, address.format(flavour), transport) for flavour in ("raw", "socket", "ours")}
    rtts: dict[str, list[float]] = {"raw": [], "socket": [], "ours": []}  # per run: median
    means: dict[str, list[float]] = {"raw": [], "socket": [], "ours": []}  # per run: mean
    rates: dict[str, list[float]] = {"raw": [], "ours": []}
    try:
        raw = RawClient(servers["raw"][1])
        query = make_query()
        frames = wire_frames(query)

        async def main():
            async with open_transport(TransportConfig(transport=transport)) as tp:
                sock = tp.socket(DealerSocket)
                tp.connect(sock, servers["socket"][1])
                async with sock, tp.open_client(servers["ours"][1]) as client:
                    await client.wait_connected()
                    for _ in range(200):  # warm up all three
                        raw.round_trip()
                        await socket_rtt_samples(sock, frames, 1, [])
                        await client.request(query)
                    for _ in range(args.runs):
                        samples: dict[str, list[float]] = {"raw": [], "socket": [], "ours": []}
                        for _ in range(max(1, args.round_trips // args.chunk)):
                            raw.rtt_samples(args.chunk, samples["raw"])
                            await socket_rtt_samples(sock, frames, args.chunk, samples["socket"])
                            await ours_rtt_samples(client, query, args.chunk, samples["ours"])
                        for flavour, xs in samples.items():
                            rtts[flavour].append(statistics.median(xs))
                            means[flavour].append(statistics.fmean(xs))
                    for _ in range(args.runs):
                        rates["raw"].append(raw.throughput(args.round_trips, args.window))
                        rates["ours"].append(await ours_throughput(client, query, args.round_trips, args.window))

        trio.run(main)
        raw.close()
    finally:
        for proc, _ in servers.values():
            proc.kill()
            proc.wait()
    t = transport
    ratios = [o / r for o, r in zip(rtts["ours"], rtts["raw"])]
    emit(f"{t}_rtt_us", statistics.median(rtts["ours"]) * 1e6, "us")
    emit(f"{t}_raw_rtt_us", statistics.median(rtts["raw"]) * 1e6, "us")
    emit(f"{t}_socket_rtt_us", statistics.median(rtts["socket"]) * 1e6, "us")
    emit(f"{t}_socket_rtt_ratio", statistics.median(s / r for s, r in zip(rtts["socket"], rtts["raw"])), "x")
    emit(f"{t}_rtt_ratio", statistics.median(ratios), "x", runs=[round(r, 3) for r in ratios])
    emit(f"{t}_rtt_mean_us", statistics.median(means["ours"]) * 1e6, "us")
    emit(f"{t}_raw_rtt_mean_us", statistics.median(means["raw"]) * 1e6, "us")
    emit(f"{t}_rtt_mean_ratio", statistics.median(o / r for o, r in zip(means["ours"], means["raw"])), "x")
    emit(f"{t}_msgs_per_s", statistics.median(rates["ours"]), "msg/s", window=args.window)
    emit(f"{t}_raw_msgs_per_s", statistics.median(rates["raw"]), "msg/s", window=args.window)
    emit(f"{t}_msgs_ratio", statistics.median(o / r for o, r in zip(rates["ours"], rates["raw"])), "x")
    return statistics.median(ratios)


def bench_codec() -> None:
    codec = Codec()
    query, result = make_query(), make_result()
    q_frames = [zmq.Frame(f) for f in wire_frames(query)]
    r_frames = [zmq.Frame(f) for f in wire_frames(result)]
    emit("codec_encode_query_us", median_seconds(lambda: codec.encode(query, 1)) * 1e6, "us")
    emit("codec_decode_query_us", median_seconds(lambda: codec.decode(q_frames)) * 1e6, "us")
    emit("codec_encode_result_us", median_seconds(lambda: codec.encode(result, 1)) * 1e6, "us")
    emit("codec_decode_result_us", median_seconds(lambda: codec.decode(r_frames)) * 1e6, "us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--round-trips", type=int, default=1000, help="per flavour and run")
    parser.add_argument("--chunk", type=int, default=25, help="round trips of one flavour before the next")
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--transports", default="ipc,tcp")
    parser.add_argument("--serve", nargs=3, metavar=("FLAVOUR", "ADDRESS", "TRANSPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        flavour, address, transport = args.serve
        try:
            if flavour == "raw":
                serve_raw(address)
            elif flavour == "socket":
                serve_socket(address)
            else:
                serve_ours(address, transport)
        except KeyboardInterrupt:
            pass
        return
    bench_codec()
    with tempfile.TemporaryDirectory(prefix="infinillm-bench-") as tmp:
        for transport in args.transports.split(","):
            bench_transport(transport, tmp, args)


if __name__ == "__main__":
    main()
