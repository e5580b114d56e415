"""03: several instances sharing one KV pool, and the statistics that show it.

``num_instances=3`` runs instance 0 in this process and two worker processes, each with
``kv_capacity_tokens`` of KV cache. A prompt longer than one instance's cache is placed on one
instance (its home), which borrows blocks from the others; they compute attention over the
blocks they lend (DistAttention) and the home merges the partial results exactly.

    python examples/03_several_instances.py
"""

import trio

import infinillm
from infinillm import SamplingParams

# ~1,600 tokens of text: more than one instance's 1,024-token cache holds. (One request can
# hold its home's 1,024 tokens and half of each other instance's: 2,048, the default context.)
DOCUMENT = " ".join(f"Line {i}: the keeper lit the lamp and watched the ships pass." for i in range(110))


async def main() -> None:
    async with infinillm.open_runtime(model="smollm2", num_instances=3, kv_capacity_tokens=1024) as rt:
        request_id = "long-document"
        messages = [{"role": "user", "content": DOCUMENT + "\n\nWhat did the keeper do?"}]
        seen = {}
        async for out in rt.generate(messages, SamplingParams(max_tokens=16, temperature=0.0), request_id=request_id):
            seen = rt.statistics().placements.get(request_id, seen)  # {instance: blocks} while it runs
        print(f"answer: {out.outputs[0].text!r}")
        print(f"prompt of {len(out.prompt_token_ids)} tokens; its KV blocks were on: "
              + ", ".join(f"instance {i}: {n}" for i, n in sorted(seen.items())))

        stats = await rt.sync_statistics()  # every worker asked for its figures now
        for inst in stats.instances:
            print(f"instance {inst.instance_id}: {inst.kv_used_blocks} used, {inst.kv_cached_blocks} cached, "
                  f"{inst.kv_free_blocks} free of {inst.kv_capacity_blocks} blocks; "
                  f"lent {inst.kv_lent_blocks}, borrowed {inst.kv_borrowed_blocks}")
        print(f"prefix cache hit rate: {stats.prefix_cache_hit_rate:.0%}")


trio.run(main)
