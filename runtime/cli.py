"""The ``infinillm`` command.

    infinillm chat [--document FILE] [--instances N] ...   the long-context chat (streams; /stats)
    infinillm generate "Tell me a joke" [--max-tokens 64]  one prompt, the answer streamed
    infinillm worker --join tcp://HOST:PORT --key FILE ... join a runtime on another host
    infinillm sim --paper | --trace FILE.csv [...]         a simulated GPU cluster (docs/SIMULATION.md)
    infinillm bench [--requests 16 --prompt-tokens 256]    throughput and latency on this machine
    infinillm keys DIR                                     a CURVE key pair for tcp endpoints

``infinillm COMMAND --help`` lists a command's options with their defaults. Errors are one line
(``error: ...``, exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]

_COMMANDS = {
    "chat": "the long-context chat: streams answers, --document FILE, /stats shows where the KV lives",
    "generate": "generate a completion of one prompt and stream it to stdout",
    "worker": "a worker joining a runtime on another host (--join tcp://HOST:PORT --key FILE)",
    "sim": "simulate a GPU cluster serving a trace (--paper: the paper's experiment)",
    "bench": "measure throughput and latency of the runtime on this machine",
    "keys": "write a CURVE key pair for tcp endpoints",
}


def _generate_parser() -> argparse.ArgumentParser:
    g = argparse.ArgumentParser(prog="infinillm generate", description=_COMMANDS["generate"],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g.add_argument("prompt", help="the prompt (sent as one user message of a chat, unless --raw)")
    g.add_argument("--model", default="smollm2", help="'smollm2', a Hugging Face folder or a GGUF file")
    g.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--seed", type=int, default=None, help="the request's seed (None: the runtime's generator)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--kv-capacity-tokens", type=int, default=None, help="KV cache in tokens (None: from free memory)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + generated tokens of one request (None: the model's positions)")
    g.add_argument("--raw", dest="chat", action="store_false", help="send the prompt as is, without the chat template")
    return g


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


def run_command(fn, *args) -> int:
    """``trio.run(fn, *args)`` for a command: its exit status; an ``InfiniLLMError`` is one line
    (``error: ...``, status 2), an interrupt status 130."""
    import trio

    from .errors import InfiniLLMError

    try:
        return trio.run(fn, *args)
    except InfiniLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _top_parser() -> argparse.ArgumentParser:
    epilog = "commands:\n" + "\n".join(f"  {name:<10} {text}" for name, text in _COMMANDS.items())
    epilog += "\n\n'infinillm COMMAND --help' lists a command's options with their defaults."
    p = argparse.ArgumentParser(prog="infinillm", description=__doc__.splitlines()[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=list(_COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(_COMMANDS))
    p.add_argument("--version", action="version", version=f"infinillm {_version()}")
    return p


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in _COMMANDS:  # --help, --version, or a command that is not one
        _top_parser().parse_args(argv or ["--help"])
        return 2
    command, rest = argv[0], argv[1:]
    if command == "chat":
        from .chat import main as chat_main

        return chat_main(rest, prog="infinillm chat")
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest, prog="infinillm bench")
    if command == "sim":
        from .sim.cli import main as sim_main

        return sim_main(rest, prog="infinillm sim")
    if command == "worker":
        from .worker import main as worker_main

        return worker_main(rest, prog="infinillm worker")
    if command == "keys":
        from .transport.keys import main as keys_main

        return keys_main(rest, prog="infinillm keys")
    return run_command(_generate, _generate_parser().parse_args(rest))


if __name__ == "__main__":
    sys.exit(main())
