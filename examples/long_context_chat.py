"""A long-context chat on the bundled SmolLM2-135M-Instruct, through the embedded runtime.

The conversation starts with a long document in the first user message (by default this
project's own docs, a few thousand tokens), then questions about it; every answer streams as it
is generated, and the whole history stays in the context. At the end it prints the runtime's
statistics (KV blocks used, tokens/s).

    python examples/long_context_chat.py                 # scripted demo (also what `make chat` runs)
    python examples/long_context_chat.py --interactive   # type your own questions; empty line quits
    python examples/long_context_chat.py --document book.txt --max-tokens 200
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import trio

import infinillm
from infinillm import SamplingParams

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_DOCS = ["README.md", "docs/ARCHITECTURE.md"]
_ROOM_FOR_TURNS = 1024  # context tokens kept for the questions, answers and chat template
DEMO_QUESTIONS = [
    "In two sentences: what does this project do?",
    "Which environment variable chooses between the compiled scheduler core and its Python twin?",
]


def load_document(path: str | None) -> str:
    if path:
        return pathlib.Path(path).read_text(encoding="utf-8")
    return "\n\n".join((ROOT / p).read_text(encoding="utf-8") for p in DEFAULT_DOCS if (ROOT / p).exists())


async def ask(rt, messages, params) -> str:
    shown = 0
    text = ""
    t0 = time.perf_counter()
    first = None
    async for out in rt.generate(messages, params):
        text = out.outputs[0].text
        if first is None and text:
            first = time.perf_counter() - t0
        print(text[shown:], end="", flush=True)
        shown = len(text)
    n = len(out.outputs[0].token_ids)
    dt = time.perf_counter() - t0
    print(f"\n   [{n} tokens in {dt:.1f} s, first after {first or dt:.1f} s, {out.outputs[0].finish_reason}]\n")
    return text


async def main(args: argparse.Namespace) -> None:
    document = load_document(args.document)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    print(f"loading {args.model} ...", file=sys.stderr)
    async with infinillm.open_runtime(
        model=args.model, device=args.device, kv_capacity_tokens=args.kv_capacity_tokens
    ) as rt:
        doc_ids = rt.tokenizer.encode(document)
        # Keep room for the questions and answers: a document longer than the model's context
        # (less that room) is cut to its beginning, and said so.
        budget = rt.engine.max_model_len - _ROOM_FOR_TURNS
        if len(doc_ids) > budget:
            print(f"document: {len(doc_ids)} tokens, cut to its first {budget} to leave {_ROOM_FOR_TURNS} "
                  f"of the model's {rt.engine.max_model_len} for the conversation")
            document = rt.tokenizer.decode(doc_ids[:budget])
        n_doc = min(len(doc_ids), budget)
        print(f"document: {len(document)} characters, {n_doc} tokens; "
              f"KV capacity {rt.statistics().instances[0].kv_capacity_blocks * rt.engine.block_size} tokens\n")
        messages = [
            {"role": "system", "content": "You are a helpful assistant. Answer from the document."},
            {"role": "user", "content": f"Here is a document:\n\n{document}\n\nI will ask questions about it."},
            {"role": "assistant", "content": "I have read the document. Ask away."},
        ]
        questions = iter(DEMO_QUESTIONS) if not args.interactive else None
        while True:
            if questions is not None:
                q = next(questions, None)
                if q is None:
                    break
                print(f"> {q}")
            else:
                try:
                    q = input("> ").strip()
                except EOFError:
                    break
                if not q:
                    break
            messages.append({"role": "user", "content": q})
            answer = await ask(rt, messages, params)
            messages.append({"role": "assistant", "content": answer})
        s = rt.statistics()
        inst = s.instances[0]
        print(f"runtime: {s.num_finished} finished, KV {inst.kv_used_blocks}/{inst.kv_capacity_blocks} blocks in use, "
              f"{inst.generated_tokens} tokens generated, {inst.prompt_tokens} prompt tokens")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Long-context chat on the embedded infinillm runtime.")
    p.add_argument("--model", default="smollm2", help="'smollm2', a Hugging Face folder or a GGUF file")
    p.add_argument("--document", help="a text file to chat about (default: this project's docs)")
    p.add_argument("--interactive", action="store_true", help="read questions from stdin")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--device", default="auto")
    p.add_argument("--kv-capacity-tokens", type=int, default=16384)
    return p.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
