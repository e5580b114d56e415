"""04: the long-context chat (what `make chat` and `infinillm chat` run).

A streaming terminal chat on the bundled SmolLM2-135M-Instruct over several instances: two on a
CPU (this process and a worker process), one per GPU where there are GPUs. Each instance keeps
a small KV cache (--kv-capacity-tokens, 4,096 tokens by default), so a long document spreads
its KV over the instances, attention runs where the blocks lie, and follow-up questions start
from the conversation's cached KV.

    python examples/04_long_context_chat.py --document README.md      # then type questions
    printf 'Summarise the document.\nWhat is its title?\n' | python examples/04_long_context_chat.py --document README.md

In the chat: /stats shows where the KV lives (blocks per instance, lent, borrowed, cached) and
each instance's memory; /reset forgets the turns; /quit leaves. `--help` lists every option.
The program itself is `infinillm.chat` (runtime/chat.py): `Chat.ask` is the streaming loop
over `rt.generate`, `Chat.stats` reads `rt.sync_statistics()`.
"""

import sys

from infinillm.chat import main

if __name__ == "__main__":
    sys.exit(main(prog="04_long_context_chat.py"))
