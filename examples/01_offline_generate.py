"""01: offline generation from plain (blocking) Python, as vLLM's ``LLM``.

``infinillm.LLM`` hosts the trio runtime on a thread of its own: no event loop in sight. The
constructor loads the model; ``generate`` runs every prompt at once (one batch) and returns the
final output of each, in order.

    python examples/01_offline_generate.py
"""

from infinillm import LLM, SamplingParams

prompts = [
    "The capital of France is",
    [{"role": "user", "content": "Name three colours of the sea."}],  # chat messages: the template is applied
    {"prompt_token_ids": [1, 504, 3458, 314]},  # or token ids
]

with LLM(model="smollm2", kv_capacity_tokens=4096) as llm:  # leaving `with` closes the runtime
    outputs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, out in zip(prompts, outputs):
        done = out.outputs[0]
        print(f"{str(prompt)[:50]} -> {done.text!r} ({len(done.token_ids)} tokens, {done.finish_reason})")
    print(f"finished requests: {llm.statistics().num_finished}")
