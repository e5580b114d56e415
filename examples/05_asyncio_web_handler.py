"""05: embedding in an asyncio web server: each HTTP request streams its answer as it is
generated (chunked transfer), through ``infinillm.AsyncLLM``, which hosts the trio runtime on a
thread of its own. A client that disconnects cancels its handler, and so aborts its request.

    python examples/05_asyncio_web_handler.py            # serves one request to itself, prints it, exits
    python examples/05_asyncio_web_handler.py --serve    # serves on http://127.0.0.1:8080/?q=...

(Plain asyncio streams so that the example needs no web framework; with aiohttp, FastAPI or
Starlette the handler's body is the same ``async for``.)
"""

import asyncio
import sys
import urllib.parse

from infinillm import AsyncLLM, SamplingParams


def handler_for(llm: AsyncLLM):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass  # the headers
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request_line.split(" ")[1]).query)
        question = query.get("q", ["Why is the sea salty?"])[0]
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n")
        shown = 0
        try:
            async for out in llm.generate([{"role": "user", "content": question}],
                                          SamplingParams(max_tokens=32, temperature=0.0)):
                piece = out.outputs[0].text[shown:].encode()
                shown = len(out.outputs[0].text)
                if piece:
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()  # a client gone raises here: the request is aborted
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return handle


async def fetch(port: int, question: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /?q={urllib.parse.quote(question)} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    body = await reader.read()
    writer.close()
    head, _, chunked = body.partition(b"\r\n\r\n")
    text, rest = b"", chunked
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        text, rest = text + rest[:n], rest[n + 2:]
    return text.decode()


async def main(serve: bool) -> None:
    async with AsyncLLM(model="smollm2", kv_capacity_tokens=4096) as llm:
        server = await asyncio.start_server(handler_for(llm), "127.0.0.1", 8080 if serve else 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            if serve:
                print(f"serving on http://127.0.0.1:{port}/?q=your+question (Ctrl-C stops)")
                await server.serve_forever()
            else:
                print("answer:", await fetch(port, "Why is the sea salty?"))
                print(f"finished requests: {llm.statistics().num_finished}")


if __name__ == "__main__":
    try:
        asyncio.run(main("--serve" in sys.argv[1:]))
    except KeyboardInterrupt:
        pass
