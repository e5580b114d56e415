"""The ``infinillm`` command: one-shot generation and CURVE keys.

    infinillm generate "Tell me a joke" [--model smollm2] [--max-tokens 64] [--temperature 0]
                       [--device auto] [--kv-capacity-tokens N] [--max-model-len N] [--raw]
    infinillm keys DIR [--name NAME] [--force]
    infinillm worker --join tcp://HOST:PORT --key FILE --model M --num-blocks N [--bind-host H]
    infinillm sim --paper | --trace FILE.csv [...]   (a simulated GPU cluster: docs/SIMULATION.md)

``generate`` streams the completion to stdout through the embedded runtime (the same API an
application uses); ``keys`` writes a CURVE key pair for the tcp endpoints.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


async def _generate(args: argparse.Namespace) -> int:
    from . import SamplingParams, open_runtime

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    options = {"model": args.model, "device": args.device}
    if args.kv_capacity_tokens is not None:
        options["kv_capacity_tokens"] = args.kv_capacity_tokens
    if args.max_model_len is not None:
        options["max_model_len"] = args.max_model_len
    async with open_runtime(**options) as rt:
        shown = 0
        out = None
        async for out in rt.generate(prompt, params):
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        sys.stdout.write("\n")
        if out is not None:
            c = out.outputs[0]
            print(f"[{len(c.token_ids)} tokens, finish_reason={c.finish_reason}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infinillm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion and stream it to stdout")
    g.add_argument("prompt")
    g.add_argument("--model", default="smollm2", help="'smollm2', a Hugging Face folder or a GGUF file")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default="auto")
    g.add_argument("--kv-capacity-tokens", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + generated tokens of one request")
    g.add_argument("--raw", dest="chat", action="store_false", help="send the prompt as is, without the chat template")
    k = sub.add_parser("keys", help="write a CURVE key pair for tcp endpoints")
    k.add_argument("rest", nargs=argparse.REMAINDER)
    w = sub.add_parser("worker", help="a worker joining a runtime on another host (--join tcp://HOST:PORT --key FILE)",
                       add_help=False)
    w.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("sim", help="simulate a GPU cluster serving a trace (--paper: the paper's experiment)", add_help=False)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sim"]:  # its options are the simulator's own
        from .sim.cli import main as sim_main

        return sim_main(argv[1:], prog="infinillm sim")
    if argv[:1] == ["worker"]:  # its options are the worker's own (argparse's REMAINDER drops leading --options)
        from .worker import main as worker_main

        return worker_main(argv[1:], prog="infinillm worker")
    args = parser.parse_args(argv)
    if args.command == "keys":
        from .transport.keys import main as keys_main

        return keys_main(args.rest)
    import trio

    from .errors import InfiniLLMError

    try:
        return trio.run(_generate, args)
    except InfiniLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
