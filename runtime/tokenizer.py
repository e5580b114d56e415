"""The tokenizer and chat template, over the Rust ``tokenizers`` package.

Two sources, one class:

``Tokenizer.from_hf_folder(folder)``
    ``tokenizer.json`` as it is (normaliser, pre-tokenizer, BPE model, post-processor, decoder),
    ``tokenizer_config.json`` (or ``chat_template.jinja``) for the chat template and the names of
    the special tokens, ``generation_config.json`` for extra end-of-sequence ids.

``Tokenizer.from_gguf_metadata(metadata)``
    Rebuilt from the ``tokenizer.ggml.*`` keys of a GGUF file: the vocabulary (``tokens``), the
    merges, the token types (3 CONTROL tokens become special added tokens, 4 USER_DEFINED plain
    added tokens), bos/eos ids and ``tokenizer.chat_template``.

    ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The pre-tokenizer follows
    ``tokenizer.ggml.pre`` as llama.cpp does: ``smollm`` (and ``starcoder``, ``refact``, ...)
    isolates every digit before the GPT-2 split, ``llama-bpe``/``llama3`` use the Llama 3 split
    regex (and take whole words found in the vocabulary before merging), ``qwen2`` its own regex,
    anything else the GPT-2 regex.
    ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE with byte fallback (``<0x0A>``
    tokens), a ``▁`` prefix on the first word when ``tokenizer.ggml.add_space_prefix`` (default
    true), merges from the file or, when absent, derived from the token scores.

``encode`` never adds BOS unless asked (``add_special_tokens=True``, and then only when the model
wants it: Llama 2/3 yes, SmolLM2 no). A rendered chat template already contains its special
tokens, so encode it with ``add_special_tokens=False``. Special tokens written in the text
(``<|im_start|>``) always encode to their single id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from .errors import ValidationError

__all__ = ["Tokenizer", "bytes_to_unicode"]

# Markers that end an assistant turn in common chat templates; when the template writes one,
# generation stops on it too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|END_OF_TURN_TOKEN|>")

# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre values whose pre-tokenization isolates each digit, then splits as GPT-2
# (llama.cpp's llama-vocab.cpp groups them).
_DIGIT_SPLIT_PRES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_PRES = ("llama3", "llama-bpe", "llama-v3", "falcon3", "smaug-bpe", "dbrx", "pixtral")
_QWEN2_PRES = ("qwen2", "deepseek-r1-qwen", "megrez")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Tokenizer:
    """Text <-> token ids, and chat messages -> prompt text.

    ``eos_token_ids`` holds every id that ends generation: the model's EOS, the ids of
    ``generation_config.json`` or GGUF ``eot``/``eom`` keys, and the end-of-turn marker of the
    chat template (``<|im_end|>``, ``<|eot_id|>``, ...) when the template writes one.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
        template_tokens: Mapping[str, str | None] | None = None,
    ) -> None:
        self._backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = self._id_of(bos_token)
        self._special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)
        eos: list[int] = []
        for token_id in (self._id_of(eos_token), *extra_eos_token_ids):
            if token_id is not None and token_id not in eos:
                eos.append(int(token_id))
        for marker in END_OF_TURN_TOKENS:
            token_id = self._id_of(marker)
            if chat_template and marker in chat_template and token_id is not None and token_id not in eos:
                eos.append(token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        self._template_tokens = {"bos_token": bos_token or "", "eos_token": eos_token or "", **(template_tokens or {})}
        self._compiled: jinja2.Template | None = None

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    # ---- sources -----------------------------------------------------------------------------

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike) -> Tokenizer:
        """From a Hugging Face model folder (tokenizer.json, tokenizer_config.json, ...)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ValidationError("model", str(folder), "a Hugging Face folder needs a tokenizer.json")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a bad file
            raise ValidationError("tokenizer.json", str(path), f"cannot be read by tokenizers: {e}") from None
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = folder / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        generation = _read_json(folder / "generation_config.json")
        extra = generation.get("eos_token_id", [])
        extra = [extra] if isinstance(extra, int) else list(extra or [])
        return cls(
            backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            extra_eos_token_ids=extra,
            chat_template=template,
            template_tokens={"unk_token": _token_text(config.get("unk_token")), "pad_token": _token_text(config.get("pad_token"))},
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """From the ``tokenizer.*`` keys of a GGUF file (see the module docstring)."""
        kind = metadata.get("tokenizer.ggml.model")
        tokens: list[str] | None = metadata.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValidationError("tokenizer.ggml.tokens", None, "a GGUF file needs its vocabulary to build a tokenizer")
        types = list(metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        if kind == "gpt2":
            backend, add_bos_default = _byte_level_bpe(metadata, tokens, types), False
        elif kind == "llama":
            backend, add_bos_default = _sentencepiece_bpe(metadata, tokens, types), True
        else:
            raise ValidationError("tokenizer.ggml.model", kind, "unsupported tokenizer; supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)")

        def token(key: str) -> str | None:
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        if metadata.get("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None:
            bos_id = metadata["tokenizer.ggml.bos_token_id"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            )
        extra = [metadata[f"tokenizer.ggml.{k}"] for k in ("eot_token_id", "eom_token_id") if f"tokenizer.ggml.{k}" in metadata]
        return cls(
            backend,
            bos_token=bos,
            eos_token=eos,
            extra_eos_token_ids=extra,
            chat_template=metadata.get("tokenizer.chat_template"),
            template_tokens={"unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")},
        )

    # ---- the interface -----------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added ones included (the model's may be padded larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> _Backend:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS where the model wants one."""
        if not isinstance(text, str):
            raise ValidationError("text", type(text).__name__, "must be a str")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; an incomplete UTF-8 sequence at the end decodes to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        """The vocabulary entry of each id (None for ids outside the vocabulary)."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is a special (control) token: BOS, EOS, chat markers, ..."""
        return token_id in self._special_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render ``messages`` ([{"role", "content"}]) to the prompt text, with jinja2.

        The template sees ``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``
        (``unk_token``, ``pad_token``), ``raise_exception(msg)``, ``strftime_now(fmt)`` and any
        ``kwargs`` (``tools=...``). A template that raises, or bad messages, give ValidationError.
        """
        if self.chat_template is None:
            raise ValidationError("chat_template", None, "this model has no chat template; pass a text prompt or prompt_token_ids")
        _check_messages(messages)
        if self._compiled is None:
            self._compiled = _jinja_env().from_string(self.chat_template)
        variables = {**self._template_tokens, **kwargs, "messages": [dict(m) for m in messages], "add_generation_prompt": add_generation_prompt}
        try:
            return self._compiled.render(**variables)
        except _TemplateRaised as e:
            raise ValidationError("messages", [m.get("role") for m in messages], f"rejected by the chat template: {e}") from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, eos_token_ids={self.eos_token_ids})"


# ---- chat template -----------------------------------------------------------------------------


class _TemplateRaised(Exception):
    """raise_exception() called by a chat template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # transformers' variant: no HTML escaping, unicode kept.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _jinja_env() -> jinja2.Environment:
    """The environment transformers renders chat templates in (sandboxed, trimmed blocks)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValidationError("messages", messages, "must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValidationError(f"messages[{i}]", m, "must be a dict with a str 'role' and a str 'content'")


# ---- building from GGUF metadata ----------------------------------------------------------------


def _byte_level_bpe(metadata: Mapping[str, Any], tokens: list[str], types: list[int]) -> _Backend:
    """Byte-level BPE (GPT-2 style) from the GGUF vocabulary and merges."""
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        raise ValidationError("tokenizer.ggml.merges", None, "a 'gpt2' tokenizer needs its merges")
    alphabet = set(bytes_to_unicode().values())
    spell = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind != _CONTROL and not set(tok) <= alphabet:  # a token stored as raw text: respell it in the byte alphabet
            tok = "".join(spell[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    pre = metadata.get("tokenizer.ggml.pre")
    backend = _Backend(
        models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in _LLAMA3_PRES)
    )
    if pre in _DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    elif pre in _LLAMA3_PRES or pre in _QWEN2_PRES:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(backend, vocab, tokens, types)
    return backend


def _sentencepiece_bpe(metadata: Mapping[str, Any], tokens: list[str], types: list[int]) -> _Backend:
    """SentencePiece-style BPE with byte fallback (Llama 2, Mistral v0.1 GGUF files)."""
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValidationError("tokenizer.ggml.scores", None, "a 'llama' tokenizer without merges needs token scores")
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    backend = _Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    _add_gguf_added_tokens(backend, vocab, tokens, types)
    return backend


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best-scored result first (ties: shorter left piece first), as transformers derives them."""
    merges: list[tuple[str, str, float]] = []
    for token, score in scores.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_gguf_added_tokens(backend: _Backend, vocab: Mapping[str, int], tokens: list[str], types: list[int]) -> None:
    """CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens, so each
    is matched whole in the text instead of being cut into pieces. Only tokens the vocabulary
    holds under their own spelling are added (adding any other would grow the vocabulary)."""
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == _CONTROL and t in vocab]
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _USER_DEFINED and t in vocab]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


# ---- small helpers ------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValidationError(path.name, str(path), f"is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValidationError(path.name, str(path), f"must hold a JSON object, not a {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None
