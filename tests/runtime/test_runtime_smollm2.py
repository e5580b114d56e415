"""SmolLM2-135M-Instruct (fp32, CPU) through the whole runtime, against Hugging Face transformers
on the same GGUF: greedy tokens equal, logprobs within 1e-3, a prompt over 4,000 tokens, and
batch invariance while other requests join and leave.

Everything here goes through the public API (paged KV, chunked prefill, the batch planner,
the torch attention path), so it checks the serving stack, not just the model.
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import trio

import infinillm
from infinillm import SamplingParams

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three primary colours."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf(hf_smollm2):
    """transformers' tokenizer and model on the bundled GGUF (the reference)."""
    model, tok = hf_smollm2
    return tok, model


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy continuation and the raw log-probability of each chosen token."""
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, output_scores=True, output_logits=True,
        return_dict_in_generate=True, pad_token_id=model.config.eos_token_id,
    )
    tokens = out.sequences[0, len(ids):].tolist()
    logprobs = [float(torch.log_softmax(l[0].float(), -1)[t]) for l, t in zip(out.logits, tokens)]
    return tokens, logprobs


def runtime(**options):
    options.setdefault("kv_capacity_tokens", 16384)
    return infinillm.open_runtime(model="smollm2", device="cpu", dtype="float32", **options)


async def generate(rt, prompt, n, request_id=None, ignore_eos=True):
    params = SamplingParams(max_tokens=n, temperature=0, logprobs=1, ignore_eos=ignore_eos)
    final = None
    async for final in rt.generate(prompt, params, request_id=request_id):
        pass
    c = final.outputs[0]
    return list(c.token_ids), [e[t].logprob for t, e in zip(c.token_ids, c.logprobs)], final


async def test_greedy_tokens_and_logprobs_match_transformers(hf):
    tok, model = hf
    async with runtime() as rt:
        for chat in CHATS:
            ours_prompt = rt.tokenizer.encode(rt.tokenizer.apply_chat_template(chat, add_generation_prompt=True))
            theirs_prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            if not isinstance(theirs_prompt, list):  # transformers 5 returns a BatchEncoding
                theirs_prompt = theirs_prompt["input_ids"]
            assert ours_prompt == list(theirs_prompt)
            # Both stop at the end-of-turn token (transformers' generate always honours EOS).
            tokens, logprobs, final = await generate(rt, chat, NEW_TOKENS, ignore_eos=False)
            ref_tokens, ref_logprobs = hf_greedy(model, ours_prompt, NEW_TOKENS)
            assert tokens == ref_tokens
            assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < 1e-3
            assert final.outputs[0].text == tok.decode(ref_tokens, skip_special_tokens=True)


@pytest.mark.slow
async def test_a_prompt_over_4000_tokens_matches_transformers_on_one_and_on_four_instances(hf):
    tok, model = hf
    passage = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "ARCHITECTURE.md").read_text()
    async with runtime() as rt:
        text = ""
        lines = passage.splitlines(keepends=True)
        while len(rt.tokenizer.encode(text)) < 4100:  # line by line: just over 4,100 tokens
            text += "".join(lines[:20])
            lines = lines[20:] or passage.splitlines(keepends=True)
        chat = [{"role": "user", "content": text + "\nSummarise the text above in one sentence."}]
        ids = rt.tokenizer.encode(rt.tokenizer.apply_chat_template(chat, add_generation_prompt=True))
        assert len(ids) > 4000
        tokens, logprobs, _ = await generate(rt, {"prompt_token_ids": ids}, 8)
    ref_tokens, ref_logprobs = hf_greedy(model, ids, 8)
    assert tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(logprobs, ref_logprobs)) < 1e-3
    # The same prompt on 4 instances of C blocks each, C about 2/5 of what it needs: the home
    # holds C, each worker lends at most C/2, so it spreads over all four (at least three).
    need = -(-(len(ids) + 8) // 16)
    c = need * 2 // 5 + 2
    held = set()
    async with runtime(num_instances=4, kv_capacity_tokens=c * 16, max_model_len=(c + 3 * (c // 2)) * 16) as rt:

        def watch():
            for r in rt.engine.requests.values():
                held.update(i for i, _ in rt.engine.tables.runs(r.rid))

        params = SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True)
        async for final in rt.generate({"prompt_token_ids": ids}, params):
            watch()
        out = final.outputs[0]
        spread_tokens = list(out.token_ids)
        spread_logprobs = [entry[t].logprob for t, entry in zip(out.token_ids, out.logprobs)]
    assert len(held) >= 3, held
    assert spread_tokens == ref_tokens
    assert max(abs(a - b) for a, b in zip(spread_logprobs, ref_logprobs)) < 1e-3


async def test_batch_invariance_while_requests_join_and_leave():
    probe = [{"role": "user", "content": "Explain what a KV cache is."}]
    async with runtime(max_num_seqs=16) as rt:
        alone, _, _ = await generate(rt, probe, 32)
        results: dict[str, list[int]] = {}

        async def run(name: str, prompt, n: int, start_after: trio.Event | None = None):
            if start_after is not None:
                await start_after.wait()
            results[name], _, _ = await generate(rt, prompt, n, request_id=name)

        probe_started = trio.Event()
        async with trio.open_nursery() as nursery:
            # 8 requests already running, of mixed lengths: some finish while the probe runs.
            for i in range(8):
                nursery.start_soon(run, f"early{i}", f"Count from {i} to {i + 20}.", 4 + 5 * i)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(run, "probe", probe, 32)
            probe_started.set()
            # 7 more join after the probe has started (the batch reaches 16).
            for i in range(7):
                nursery.start_soon(run, f"late{i}", f"Name {i + 2} animals.", 10 + 3 * i, probe_started)
        assert results["probe"] == alone
        s = rt.statistics().instances[0]
        assert s.kv_used_blocks == 0 and s.num_running == 0


def test_decode_batches_run_torch_on_one_thread_and_give_its_threads_back():
    """On the quantised weights a decode batch runs torch's own operations on one thread (the
    products use the cores themselves); a prefill keeps torch's threads, and the stepping thread
    gets them back when the engine is idle."""
    import threading

    from infinillm.config import CacheConfig, SchedulerConfig
    from infinillm.engine import Engine
    from infinillm.loader import load_model

    model, tok, args = load_model("smollm2", dtype=torch.float32, device="cpu", progress=False)
    assert model.num_quantized > 0
    seen: dict[str, object] = {}

    def steps():
        before = torch.get_num_threads()
        eng = Engine(model, args, tok, cache=CacheConfig(block_size=16), scheduler=SchedulerConfig(),
                     num_blocks=64, max_model_len=1024)
        eng.add_request("long", [(i * 7) % 1000 + 5 for i in range(100)], SamplingParams(max_tokens=3, temperature=0))
        counts = []
        while eng.has_work:
            eng.step()
            counts.append(torch.get_num_threads())
        seen.update(before=before, counts=counts, after=torch.get_num_threads())

    t = threading.Thread(target=steps)
    t.start()
    t.join()
    before = seen["before"]
    if before == 1:
        pytest.skip("torch has one thread here: nothing to switch")
    assert seen["counts"][0] == before  # the 100-token prefill: more than a decode batch
    assert 1 in seen["counts"] and seen["after"] == before
