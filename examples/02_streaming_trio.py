"""02: streaming from trio: the runtime is an async context manager, each request an async
iterator of cumulative outputs. Two requests share the runtime's steps (continuous batching);
leaving an ``async for`` early aborts that request and frees its KV blocks.

    python examples/02_streaming_trio.py
"""

import trio

import infinillm
from infinillm import SamplingParams


async def stream(rt, name: str, question: str, max_tokens: int) -> None:
    shown = 0
    async for out in rt.generate([{"role": "user", "content": question}],
                                 SamplingParams(max_tokens=max_tokens, temperature=0.0)):
        text = out.outputs[0].text
        if text[shown:]:
            print(f"[{name}] {text[shown:]!r}")
        shown = len(text)
        if out.finished:
            print(f"[{name}] done: {out.outputs[0].finish_reason}, {len(out.outputs[0].token_ids)} tokens")


async def main() -> None:
    async with infinillm.open_runtime(model="smollm2", kv_capacity_tokens=4096) as rt:
        async with trio.open_nursery() as nursery:  # both requests run in the same steps
            nursery.start_soon(stream, rt, "a", "Why is the sea salty?", 24)
            nursery.start_soon(stream, rt, "b", "Write a haiku about a lighthouse.", 24)

        # Stop reading early: the request is aborted, its blocks freed.
        async for out in rt.generate("Count from one to one hundred:", SamplingParams(max_tokens=200)):
            if len(out.outputs[0].token_ids) >= 5:
                break
        stats = await rt.sync_statistics()  # (after the abort has been applied)
        print(f"finished {stats.num_finished}, aborted {stats.num_aborted}, "
              f"KV blocks in use {stats.kv_used_blocks}, kept by the prefix cache {stats.kv_cached_blocks}")


trio.run(main)
