"""The long-context chat: a streaming terminal chat over several instances of the runtime.

Run by ``infinillm chat`` and ``make chat`` (``examples/04_long_context_chat.py``). A document
(``--document FILE``) goes into the conversation's first message; each answer streams as it is
generated and ends with a status line (tokens, tokens/s, time to the first token, the
instances holding the turn's KV). Follow-up turns start from the conversation's cached KV
(prefix caching), wherever its blocks lie. In a terminal, ``/stats`` shows how the KV is spread
over the instances, ``/reset`` forgets the turns (keeps the document), ``/quit`` leaves; when
standard input is not a terminal, every line is one user turn, and the chat exits at its end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, TextIO

import trio

__all__ = ["main", "build_parser", "run_chat"]

SYSTEM = "You are a helpful assistant. Answer briefly, from the document when there is one."
ROOM_FOR_TURNS = 1024  # context tokens kept for the questions, answers and template
HELP = "commands: /stats (where the KV lives), /reset (forget the turns, keep the document), /quit"


def default_instances() -> int:
    """One instance per visible GPU; two CPU instances (an in-process one and a worker) elsewhere."""
    try:
        import torch

        if torch.cuda.is_available():
            return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch CUDA: the CPU default
        pass
    return 2


def build_parser(prog: str = "infinillm chat") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="A streaming long-context chat on the embedded runtime, its KV spread over several "
                    "instances. " + HELP + ".",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="'smollm2' (the bundled SmolLM2-135M-Instruct), a Hugging Face folder or a GGUF file")
    p.add_argument("--document", metavar="FILE", help="a text file put into the conversation (cut to what the context holds)")
    p.add_argument("--instances", type=int, default=None, help="instances serving the chat (default: one per GPU, else 2 on the CPU)")
    p.add_argument("--kv-capacity-tokens", type=int, default=4096, help="KV cache of each instance, in tokens (small, so a long document spreads)")
    p.add_argument("--max-tokens", type=int, default=128, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-prefix-caching", action="store_true", help="recompute the whole conversation every turn")
    net = p.add_argument_group("workers on other hosts (infinillm worker --join ...)")
    net.add_argument("--join-address", metavar="tcp://HOST:PORT", default=None,
                     help="accept workers from other hosts here (tcp with CURVE; needs --keys)")
    net.add_argument("--keys", metavar="DIR", default=None,
                     help="the cluster's CURVE keys: DIR/infinillm.key and DIR/infinillm.key_secret (infinillm keys DIR)")
    net.add_argument("--bind-host", default="127.0.0.1", help="with --join-address: the address this host's sockets bind to")
    return p


def _placement(placement: dict[int, int]) -> str:
    return ", ".join(f"instance {i}: {n} blocks" for i, n in sorted(placement.items())) or "none"


class Chat:
    """One conversation on an open runtime: the turns so far and how the last ones went."""

    def __init__(self, rt, args: argparse.Namespace, out: TextIO, max_model_len: int) -> None:
        self.rt, self.args, self.out = rt, args, out
        self.max_model_len = max_model_len
        self.preamble: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
        self.turns: list[dict[str, str]] = []
        self.last_placement: dict[int, int] = {}
        self.turn = 0

    @property
    def room(self) -> int:
        """Context tokens kept for the template, the questions and the answers."""
        return min(ROOM_FOR_TURNS, self.max_model_len // 2)

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def load_document(self, path: str) -> None:
        from .errors import ValidationError

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValidationError("--document", path, f"cannot be read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ValidationError("--document", path, "must be a UTF-8 text file") from None
        ids = self.rt.tokenizer.encode(text)
        room = self.room
        budget = max(0, self.max_model_len - room)
        if len(ids) > budget:
            self.say(f"[document {os.path.basename(path)}: {len(ids)} tokens, cut to its first {budget} to leave "
                     f"{room} of the {self.max_model_len}-token context for the conversation]")
            text = self.rt.tokenizer.decode(ids[:budget])
            ids = ids[:budget]
        self.preamble += [
            {"role": "user", "content": f"Here is a document ({os.path.basename(path)}):\n\n{text}\n\nI will ask questions about it."},
            {"role": "assistant", "content": "I have read the document. Ask away."},
        ]
        self.say(f"[document {os.path.basename(path)}: {len(ids)} tokens in the conversation]")

    async def ask(self, question: str) -> None:
        from . import SamplingParams

        self.turn += 1
        messages = self.preamble + self.turns + [{"role": "user", "content": question}]
        params = SamplingParams(max_tokens=self.args.max_tokens, temperature=self.args.temperature, seed=0)
        rid = f"chat-turn-{self.turn}"
        t0 = time.perf_counter()
        first = None
        shown = 0
        out = None
        placement: dict[int, int] = {}
        from .errors import ValidationError

        while True:
            try:
                stream = self.rt.generate(messages, params, request_id=rid)
                break
            except ValidationError as e:
                if "max_model_len" not in str(e) or not self.turns:  # not a length, or the question alone is too long
                    self.say(f"[error: {e}]")
                    return
                self.turns = self.turns[2:]  # make room: the oldest turn goes
                messages = self.preamble + self.turns + [{"role": "user", "content": question}]
                self.say("[the context is full: the oldest turn was dropped]")
        async for out in stream:
            text = out.outputs[0].text
            if first is None:
                first = time.perf_counter() - t0
            if not out.finished:
                placement = dict(self.rt.statistics().placements.get(rid, placement))
            self.say(text[shown:], end="")
            shown = len(text)
        dt = time.perf_counter() - t0
        completion = out.outputs[0]
        n = len(completion.token_ids)
        decode_s = dt - (first or dt)
        rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
        self.last_placement = placement
        self.say()
        self.say(f"[{n} tokens, {rate:.1f} tokens/s, first token after {first or dt:.2f} s, "
                 f"{len(out.prompt_token_ids)} in context, {completion.finish_reason}; "
                 f"KV on {_placement(placement)}]")
        if completion.finish_reason in ("stop", "length"):
            self.turns += [{"role": "user", "content": question}, {"role": "assistant", "content": completion.text}]
        if len(out.prompt_token_ids) + n + self.room // 2 > self.max_model_len and self.turns:
            self.turns = self.turns[2:]  # the oldest turn goes: the context is nearly full
            self.say("[the context is nearly full: the oldest turn was dropped]")

    async def stats(self) -> None:
        s = await self.rt.sync_statistics()
        self.say(f"[{len(s.instances)} instances; prefix cache hit rate {s.prefix_cache_hit_rate:.0%}; "
                 f"last turn's KV on {_placement(self.last_placement)}]")
        self.say(f"  {'instance':>8} {'used':>6} {'cached':>6} {'free':>6} {'lent':>6} {'borrowed':>8} "
                 f"{'capacity':>8}  memory")
        for inst in s.instances:
            if inst.memory_total_bytes:
                memory = (f"memory {(inst.memory_total_bytes - inst.memory_free_bytes) / 2**30:.1f} of "
                          f"{inst.memory_total_bytes / 2**30:.1f} GiB used")
            else:
                memory = f"KV {inst.kv_used_blocks * inst.block_size} of {inst.kv_capacity_blocks * inst.block_size} tokens"
            self.say(f"  {inst.instance_id:>8} {inst.kv_used_blocks:>6} {inst.kv_cached_blocks:>6} "
                     f"{inst.kv_free_blocks:>6} {inst.kv_lent_blocks:>6} {inst.kv_borrowed_blocks:>8} "
                     f"{inst.kv_capacity_blocks:>8}  {memory}")
        for i, reason in s.lost_instances.items():
            self.say(f"  instance {i} lost: {reason}")
        self.say("  (blocks of 16 tokens; cached: kept for the conversation's next turns, free for others to use)")


async def _read_line(stdin: TextIO, prompt: str, tty: bool) -> str | None:
    """One line of input (None at its end), read on a worker thread so the runtime goes on."""

    def read() -> str | None:
        if tty:
            try:
                return input(prompt)
            except EOFError:
                return None
        line = stdin.readline()
        return None if line == "" else line

    return await trio.to_thread.run_sync(read, abandon_on_cancel=True)


async def run_chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    import infinillm
    from . import SamplingParams

    SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)  # bad values: refused before loading
    if stdin is None:  # (started with its standard input closed)
        stdin = open(os.devnull, encoding="utf-8")
    elif hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 do not end the chat
    tty = stdin.isatty()
    instances = args.instances or default_instances()
    print(f"[starting {instances} instance{'s' if instances > 1 else ''} of {args.model}, "
          f"{args.kv_capacity_tokens} KV tokens each]", file=sys.stderr)
    options: dict[str, Any] = dict(
        model=args.model, device=args.device, num_instances=instances, kv_capacity_tokens=args.kv_capacity_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    if args.join_address is not None:
        if args.keys is None:
            from .errors import ValidationError

            raise ValidationError("--keys", None, "must name the cluster's key directory with --join-address")
        options.update(transport="tcp", join_address=args.join_address, bind_host=args.bind_host,
                       curve_secret_key_file=os.path.join(args.keys, "infinillm.key_secret"),
                       curve_public_key_file=os.path.join(args.keys, "infinillm.key"))
    async with infinillm.open_runtime(**options) as rt:
        # The context: the model's, or what one request can hold (its home's blocks and what the
        # others may lend it) if less.
        max_model_len = rt.engine.max_model_len
        print(f"[ready: context {max_model_len} tokens over {instances} instances]", file=sys.stderr)
        chat = Chat(rt, args, out, max_model_len)
        if args.document:
            chat.load_document(args.document)
        if tty:
            chat.say(f"[{HELP}]")
        while True:
            line = await _read_line(stdin, "> ", tty)
            if line is None:
                break
            line = line.strip()
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/stats":
                await chat.stats()
            elif line == "/reset":
                chat.turns.clear()
                chat.say("[the conversation starts again from the document]")
            elif line in ("/help", "/?"):
                chat.say(f"[{HELP}]")
            else:
                if not tty:
                    chat.say(f"> {line}")
                await chat.ask(line)
    return 0


def main(argv: list[str] | None = None, prog: str = "infinillm chat") -> int:
    from .cli import run_command

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for name in ("instances", "kv_capacity_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value} must be at least 1")
    return run_command(run_chat, args)


if __name__ == "__main__":
    sys.exit(main())
