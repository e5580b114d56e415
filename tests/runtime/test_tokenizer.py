"""The tokenizer: tokenizer.json and GGUF metadata sources, special tokens, chat templates."""

from __future__ import annotations

import json
import os

import gguf
import pytest

from infinillm.errors import ValidationError
from infinillm.loader import load_tokenizer
from infinillm.testing import TINY_CHAT_TEMPLATE, import_transformers, make_tiny_model
from infinillm.tokenizer import Tokenizer, bytes_to_unicode

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tok") / "m")


@pytest.fixture(scope="module")
def tok(tiny_folder) -> Tokenizer:
    return Tokenizer.from_hf_folder(tiny_folder)


# ---- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello world", "Ünïcödé — 漢字 🙂", "  spaces\n\ttabs  ", "", "123 + 456 = 579"])
def test_any_text_round_trips(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_in_text_are_single_ids_and_skippable(tok):
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "user\nhello"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhello<|im_end|>"
    assert [tok.is_special(i) for i in (0, 1, 2, ids[1])] == [True, True, True, False]
    assert tok.special_token_ids == {0, 1, 2}


def test_ids_to_tokens_and_token_ids(tok):
    assert tok.convert_ids_to_tokens([1, 2]) == ["<|im_start|>", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(3 + ord("A") - 0) is not None
    hello = tok.encode(" hello")
    assert tok.convert_ids_to_tokens(hello) == ["Ġhello"]  # a merged word of the tiny vocabulary
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.convert_ids_to_tokens([10**6]) == [None]


def test_bos_eos_and_vocab_size(tok, tiny_folder):
    vocab = json.loads((tiny_folder / "tokenizer.json").read_text())["model"]["vocab"]
    assert tok.vocab_size == len(vocab)
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, (2,))
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # the tiny model adds no BOS


def test_eos_ids_include_generation_config_and_the_template_end_of_turn(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 1]}))
    tok = Tokenizer.from_hf_folder(folder)
    assert tok.eos_token_ids == (0, 1, 2)  # eos, generation_config's, then <|im_end|> of the template


# ---- chat templates --------------------------------------------------------------------------


def test_chat_template_renders(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(messages) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=False).endswith("hello<|im_end|>\n")


def test_template_raise_exception_and_bad_messages_are_validation_errors(tok):
    with pytest.raises(ValidationError, match="Unknown role: robot") as e:
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    assert e.value.field == "messages"
    assert str(e.value) == "messages=['robot'] is invalid: rejected by the chat template: Unknown role: robot"
    not_a_list = "must be a non-empty list of {'role', 'content'} dicts"
    not_a_message = "must be a dict with a str 'role' and a str 'content'"
    for bad, message in (
        ([], f"messages=[] is invalid: {not_a_list}"),
        ("hello", f"messages='hello' is invalid: {not_a_list}"),
        ([{"role": "user"}], f"messages[0]={{'role': 'user'}} is invalid: {not_a_message}"),
        ([{"role": "user", "content": 3}], f"messages[0]={{'role': 'user', 'content': 3}} is invalid: {not_a_message}"),
        ([["user", "hi"]], f"messages[0]=['user', 'hi'] is invalid: {not_a_message}"),
    ):
        with pytest.raises(ValidationError) as e:
            tok.apply_chat_template(bad)
        assert str(e.value) == message


def test_template_variables_filters_and_formats(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if tools %}{{ tools | tojson }}{% endif %}{{ pad_token }}"
    )
    # the list form of tokenizer_config.json's chat_template
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_folder(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "hé"}], tools=[{"name": "ünï"}])
    assert text == '<|im_start|>USER: hé<|im_end|>[{"name": "ünï"}]<|im_end|>'


def test_chat_template_jinja_file_and_no_template(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValidationError) as e:
        Tokenizer.from_hf_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(e.value) == (
        "chat_template=None is invalid: this model has no chat template; pass a text prompt or prompt_token_ids"
    )
    (folder / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
    assert Tokenizer.from_hf_folder(folder).apply_chat_template([{"role": "user", "content": "hi"}]).endswith("assistant\n")


def test_missing_tokenizer_json(tmp_path):
    folder = make_tiny_model(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValidationError) as e:
        Tokenizer.from_hf_folder(folder)
    assert str(e.value) == f"model={str(folder)!r} is invalid: a Hugging Face folder needs a tokenizer.json"


# ---- GGUF metadata ---------------------------------------------------------------------------


def _byte_level_metadata(pre: str) -> dict:
    spell = bytes_to_unicode()
    tokens = ["<|endoftext|>"] + [spell[b] for b in range(256)] + ["12", "123", "Ġh", "Ġhi"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": ["1 2", "12 3", "Ġ h", "Ġh i"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }


@pytest.mark.parametrize(
    "pre, pieces",
    [
        ("smollm", ["1", "2", "3", "4", "5", "Ġhi"]),  # every digit alone (llama.cpp's smollm/starcoder split)
        ("gpt2", ["123", "4", "5", "Ġhi"]),  # digits in one run
        ("llama-bpe", ["123", "4", "5", "Ġhi"]),  # runs of up to 3 digits
        ("qwen2", ["1", "2", "3", "4", "5", "Ġhi"]),
    ],
)
def test_gguf_byte_level_pre_tokenizers(pre, pieces):
    tok = Tokenizer.from_gguf_metadata(_byte_level_metadata(pre))
    ids = tok.encode("12345 hi")
    assert tok.convert_ids_to_tokens(ids) == pieces
    assert tok.decode(ids) == "12345 hi"


def test_gguf_unsupported_tokenizer_model():
    with pytest.raises(ValidationError) as e:
        Tokenizer.from_gguf_metadata({**_byte_level_metadata("gpt2"), "tokenizer.ggml.model": "bert"})
    assert e.value.field == "tokenizer.ggml.model" and e.value.value == "bert"
    assert str(e.value) == (
        "tokenizer.ggml.model='bert' is invalid: unsupported tokenizer; supported: 'gpt2' (byte-level BPE), "
        "'llama' (SentencePiece BPE)"
    )


def test_smollm2_tokenizer_quirks():
    tok = load_tokenizer("smollm2")
    assert tok.convert_ids_to_tokens(tok.encode("2024")) == ["2", "0", "2", "4"]
    assert tok.encode("<|im_start|>assistant\n") == [1, 520, 9531, 198]
    assert tok.decode(tok.encode("Hello, world!")) == "Hello, world!"
    assert tok.eos_token_ids == (2,) and tok.is_special(0) and tok.is_special(2) and not tok.is_special(520)


def _write_sentencepiece_gguf(path) -> None:
    """A tiny SentencePiece-style vocabulary (byte tokens, scored pieces, no merges)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    pieces = ["▁", "e", "h", "l", "o", "w", "r", "d", "t", "s", "▁h", "▁w", "he", "ll", "llo", "▁he", "▁hello",
              "or", "orl", "orld", "▁wor", "▁world", "▁t", "▁th", "▁the", "st", "te", "▁te", "▁test"]
    for i, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


TEXTS = ["hello world", " hello  world the test", "héllo\nworld", "the <s> test</s>", "x", "tested"]


def test_gguf_sentencepiece_tokenizer(tmp_path):
    _write_sentencepiece_gguf(tmp_path / "spm.gguf")
    tok = load_tokenizer(tmp_path / "spm.gguf")
    ids = tok.encode("hello world", add_special_tokens=True)
    assert ids[0] == 1  # a SentencePiece vocabulary gets BOS unless the file says otherwise
    assert tok.convert_ids_to_tokens(ids[1:]) == ["▁hello", "▁world"]
    assert tok.encode("hello world") == ids[1:]
    assert tok.convert_ids_to_tokens(tok.encode("é")) == ["▁", "<0xC3>", "<0xA9>"]  # byte fallback
    for text in ("hello world", "héllo\nworld", "x", "tested", "the  test"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[INST] hi [/INST]"


def test_gguf_sentencepiece_matches_transformers(tmp_path):
    transformers = import_transformers()
    _write_sentencepiece_gguf(tmp_path / "spm.gguf")
    ours = load_tokenizer(tmp_path / "spm.gguf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=True) == ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
