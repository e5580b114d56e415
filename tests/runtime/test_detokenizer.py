"""Incremental detokenization with a real byte-level BPE, and every stop condition.

The tokenizer is trained here (``tokenizers``, in milliseconds) on a small corpus without emoji
and with only a few CJK words, so emoji become one token per UTF-8 byte and some CJK
characters are split across tokens: the cases where decoding one token at a time goes wrong.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from infinillm.detokenizer import IncrementalDetokenizer, StopCheck
from infinillm.sampling import SamplingParams

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = 2  # <|im_end|>, as in SmolLM2
IM_START = 1
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Hello world, hello there! Stop here and there.",
    "世界 你好 世界",
    "日本語のテキスト",
] * 20


class BPETokenizer:
    """The tokenizer interface the detokenizer relies on, over a ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self.eos_token_ids: tuple[int, ...] = (EOS,)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self._tokenizer.id_to_token(i) for i in ids]

    def is_special(self, token_id: int) -> bool:
        return token_id < len(SPECIALS)


@pytest.fixture(scope="module")
def tok() -> BPETokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    assert [tokenizer.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    return BPETokenizer(tokenizer)


def stream(
    tok: BPETokenizer, ids: list[int], params: SamplingParams, prompt: list[int] | None = None
) -> tuple[list[str], StopCheck | None, IncrementalDetokenizer]:
    """Append ids until the request stops; the text after each append, and the stop."""
    detok = IncrementalDetokenizer(tok, prompt if prompt is not None else tok.encode("Say:"), params)
    texts = []
    stop = None
    for token_id in ids:
        stop = detok.append(token_id)
        texts.append(detok.output_text)
        if stop is not None:
            break
    return texts, stop, detok


def assert_each_text_extends_the_last(texts: list[str]) -> None:
    for before, after in zip(texts, texts[1:]):
        assert after.startswith(before), (before, after)


# ---- cumulative text ------------------------------------------------------------------------

UNLIMITED = SamplingParams(max_tokens=None)


def test_an_emoji_split_over_four_byte_tokens_appears_whole_once_complete(tok):
    ids = tok.encode("🤖")
    assert len(ids) == 4 and all(tok.decode([i]) == "\ufffd" for i in ids)
    texts, stop, _ = stream(tok, ids, UNLIMITED)
    assert texts == ["", "", "", "🤖"] and stop is None


def test_a_cjk_character_split_between_tokens_is_held_back(tok):
    ids = tok.encode("日本語")
    assert [tok.decode([i]) for i in ids] == ["日本\ufffd", "\ufffd\ufffd"]  # 語 spans both tokens
    texts, _, _ = stream(tok, ids, UNLIMITED)
    assert texts == ["", "日本語"]


@pytest.mark.parametrize(
    "text",
    [
        "Hello 🤖 world 世界! 日本語のテキスト 🎉🎉",
        "plain ascii, the quick brown fox",
        "混合 text 😀 with ñ and é and 你好",
    ],
)
def test_streamed_text_is_always_complete_characters_and_ends_as_the_full_decode(tok, text):
    ids = tok.encode(text)
    texts, stop, detok = stream(tok, ids, UNLIMITED)
    assert stop is None
    assert texts[-1] == text == tok.decode(ids)
    assert all("\ufffd" not in t for t in texts)
    assert_each_text_extends_the_last(texts)
    # After each token, exactly the complete characters decoded so far.
    assert texts == [tok.decode(ids[: i + 1]).rstrip("\ufffd") for i in range(len(ids))]
    assert detok.output_token_ids == tuple(ids) and detok.num_output_tokens == len(ids)


def test_a_long_generation_decodes_like_the_whole(tok):
    text = "The quick 🦊 jumps over 世界 and the lazy 🐶. " * 60
    ids = tok.encode(text)
    texts, _, _ = stream(tok, ids, UNLIMITED)
    assert texts[-1] == text


def test_the_text_is_the_completion_only_whatever_the_prompt(tok):
    prompt = tok.encode("<|im_start|>user\n日本語?<|im_end|>\n<|im_start|>assistant\n")
    texts, _, _ = stream(tok, tok.encode("Hello world"), UNLIMITED, prompt=prompt)
    assert texts[-1] == "Hello world"
    texts, _, _ = stream(tok, tok.encode(" there"), UNLIMITED, prompt=[])
    assert texts[-1] == " there"


def test_special_tokens_are_skipped_unless_asked(tok):
    ids = tok.encode("Hello") + [IM_START] + tok.encode(" world")
    skipped, _, _ = stream(tok, ids, UNLIMITED)
    kept, _, _ = stream(tok, ids, SamplingParams(max_tokens=None, skip_special_tokens=False))
    assert skipped[-1] == "Hello world"
    assert kept[-1] == "Hello<|im_start|> world"


def test_decode_token_gives_one_token_with_specials(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    assert detok.decode_token(EOS) == "<|im_end|>"
    assert detok.decode_token(tok.encode("Hello")[0]) == "Hello"


# ---- EOS and stop token ids -----------------------------------------------------------------


def test_eos_stops_and_its_text_is_left_out(tok):
    ids = tok.encode("Hello world") + [EOS] + tok.encode(" more")
    for skip in (True, False):
        texts, stop, detok = stream(tok, ids, SamplingParams(max_tokens=None, skip_special_tokens=skip))
        assert stop == StopCheck("stop", None)
        assert texts[-1] == "Hello world"
        assert detok.output_token_ids[-1] == EOS and detok.finished and detok.stop_check == stop


def test_eos_text_is_kept_with_include_stop_str_in_output_and_visible_specials(tok):
    ids = tok.encode("Hi") + [EOS]
    params = SamplingParams(include_stop_str_in_output=True, skip_special_tokens=False)
    texts, stop, _ = stream(tok, ids, params)
    assert stop == StopCheck("stop", None) and texts[-1] == "Hi<|im_end|>"


def test_ignore_eos_generates_through_eos_until_max_tokens(tok):
    ids = tok.encode("Hi") + [EOS] + tok.encode(" there friend")
    params = SamplingParams(ignore_eos=True, max_tokens=len(tok.encode("Hi")) + 2)
    texts, stop, detok = stream(tok, ids, params)
    assert stop == StopCheck("length")
    assert detok.num_output_tokens == params.max_tokens
    assert texts[-1] == tok.decode(ids[: params.max_tokens])


def test_a_stop_token_id_stops_with_the_id_as_stop_reason(tok):
    ids = tok.encode("Hello world, hello there!")
    stop_id = ids[3]
    texts, stop, detok = stream(tok, ids, SamplingParams(stop_token_ids=[stop_id, 399]))
    assert stop == StopCheck("stop", stop_id)
    assert texts[-1] == tok.decode(ids[:3])
    assert detok.output_token_ids == tuple(ids[:4])
    texts, _, _ = stream(tok, ids, SamplingParams(stop_token_ids=[stop_id], include_stop_str_in_output=True))
    assert texts[-1] == tok.decode(ids[:4])


# ---- stop strings ---------------------------------------------------------------------------

TEXT = "Hello world, hello there! Stop here and there."


def test_a_stop_string_spanning_tokens_cuts_the_text_before_it(tok):
    ids = tok.encode(TEXT)
    stop_str = "ld, hel"
    # The stop string spans at least three tokens of this text.
    pieces = [tok.decode([i]) for i in ids]
    starts = [sum(map(len, pieces[:k])) for k in range(len(pieces))]
    at = TEXT.index(stop_str)
    assert sum(1 for s in starts if at < s < at + len(stop_str)) >= 2

    texts, stop, detok = stream(tok, ids, SamplingParams(stop=[stop_str], max_tokens=None))
    assert stop == StopCheck("stop", "ld, hel")
    assert texts[-1] == "Hello wor"
    assert all(stop_str not in t for t in texts)
    assert_each_text_extends_the_last(texts)
    # The request stopped on the token that completed the stop string.
    consumed = detok.num_output_tokens
    assert stop_str in tok.decode(ids[:consumed]) and stop_str not in tok.decode(ids[: consumed - 1])


def test_include_stop_str_in_output_keeps_the_stop_string_and_drops_what_follows(tok):
    texts, stop, _ = stream(tok, tok.encode(TEXT), SamplingParams(stop="ld, hel", include_stop_str_in_output=True))
    assert stop == StopCheck("stop", "ld, hel")
    assert texts[-1] == "Hello world, hel"
    assert_each_text_extends_the_last(texts)


def test_text_holds_back_what_could_be_the_start_of_a_stop_string(tok):
    ids = tok.encode(TEXT)
    texts, _, _ = stream(tok, ids, SamplingParams(stop=["there?", "xyz"], max_tokens=None))
    # "there?" never occurs: while running, the last 5 characters are held back; at the end
    # (no stop string, no limit) the generation is still running, so they are still held.
    assert texts[-1] == TEXT[:-5]
    assert_each_text_extends_the_last(texts)
    _, stop, detok = stream(tok, ids, SamplingParams(stop=["there?"], max_tokens=len(ids)))
    assert stop == StopCheck("length") and detok.output_text == TEXT  # finished: everything shown


def test_the_first_stop_string_to_complete_wins(tok):
    texts, stop, _ = stream(tok, tok.encode(TEXT), SamplingParams(stop=["llo, wait", "o there", "hello"]))
    assert stop == StopCheck("stop", "hello")
    assert texts[-1] == "Hello world, "


def test_of_stop_strings_completing_on_the_same_token_the_one_starting_first_wins(tok):
    assert len(tok.encode("Hello")) == 1  # both stop strings complete with this one token
    texts, stop, _ = stream(tok, tok.encode(TEXT), SamplingParams(stop=["llo", "el"]))
    assert stop == StopCheck("stop", "el") and texts == ["H"]


def test_a_stop_string_of_cjk_split_across_tokens(tok):
    text = "日本語のテキスト 🤖 world"
    texts, stop, _ = stream(tok, tok.encode(text), SamplingParams(stop="語の"))
    assert stop == StopCheck("stop", "語の") and texts[-1] == "日本"
    texts, stop, _ = stream(tok, tok.encode(text), SamplingParams(stop="🤖"))
    assert stop == StopCheck("stop", "🤖") and texts[-1] == "日本語のテキスト "


# ---- lengths ----------------------------------------------------------------------------------


def test_max_tokens_finishes_with_length_and_then_refuses_more(tok):
    ids = tok.encode(TEXT)
    texts, stop, detok = stream(tok, ids, SamplingParams(max_tokens=3))
    assert stop == StopCheck("length") and detok.num_output_tokens == 3 and len(texts) == 3
    assert texts[-1] == tok.decode(ids[:3])
    with pytest.raises(RuntimeError, match="after the request finished"):
        detok.append(ids[3])


def test_max_model_len_counts_the_prompt(tok):
    prompt = tok.encode("one two three")
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams(max_tokens=100), max_model_len=len(prompt) + 2)
    assert detok.append(tok.encode("A")[0]) is None
    assert detok.append(tok.encode("B")[0]) == StopCheck("length")


def test_a_character_left_incomplete_at_the_end_is_flushed_as_the_decoder_renders_it(tok):
    ids = tok.encode("ok 🤖")[:-2]  # the emoji's last two bytes never come
    texts, stop, _ = stream(tok, ids, SamplingParams(max_tokens=len(ids)))
    assert stop == StopCheck("length")
    assert texts[-2] == "ok " and texts[-1] == tok.decode(ids) == "ok \ufffd"


# ---- min_tokens -------------------------------------------------------------------------------


def test_min_tokens_masks_eos_and_stop_ids_then_stops_normally(tok):
    params = SamplingParams(min_tokens=2, stop_token_ids=[9, 5], stop=["Hello"])
    detok = IncrementalDetokenizer(tok, [], params)
    assert detok.mask_ids() == (EOS, 5, 9)
    # Within the first min_tokens tokens nothing stops the request, not even a stop string.
    assert detok.append(tok.encode("Hello")[0]) is None
    assert detok.mask_ids() == (EOS, 5, 9)
    assert detok.append(EOS) is None
    assert detok.mask_ids() == ()
    assert detok.append(EOS) == StopCheck("stop")
    assert detok.output_text == "Hello"  # the first EOS was an ordinary (special, skipped) token


def test_ignore_eos_leaves_eos_out_of_the_min_tokens_mask(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(min_tokens=1, ignore_eos=True, stop_token_ids=[7]))
    assert detok.mask_ids() == (7,)
    assert IncrementalDetokenizer(tok, [], SamplingParams(min_tokens=1, ignore_eos=True)).mask_ids() == ()


# ---- finishing from outside -------------------------------------------------------------------


def test_abort_releases_held_text_and_is_idempotent(tok):
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop="zzzz"))
    for token_id in tok.encode("Hello world"):
        detok.append(token_id)
    assert detok.output_text == "Hello wo"  # 3 characters held back
    assert detok.finish("abort") == StopCheck("abort")
    assert detok.output_text == "Hello world" and detok.finished
    assert detok.finish("error") == StopCheck("abort")  # the first reason stays
