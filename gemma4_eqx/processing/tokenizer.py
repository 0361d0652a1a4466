"""Tokenizer over the `tokenizers` library (tokenizer.json + tokenizer_config.json), docs/spec/processors.md §4 and §11.4.

The special tokens are named in tokenizer_config.json (boi_token = "<|image>", image_token = "<|image|>",
...) and their ids are looked up in tokenizer.json, so a small tokenizer with other ids works the same.
Whether `<bos>` is added comes from tokenizer.json's post-processor, as in transformers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as _BackendTokenizer

from ..utils.files import FileMissingError, read_folder_text
from ._batch import BatchFeature, check_return_tensors
from .files import MAX_TOKENIZER_BYTES, read_json

# tokenizer_config.json attribute -> default token string (the real Gemma 4 names, docs/spec/processors.md §4).
SPECIAL_TOKEN_DEFAULTS = {
    "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
    "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
    "video_token": "<|video|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>", "std_token": "<|tool>", "etd_token": "<tool|>",
    "stc_token": "<|tool_call>", "etc_token": "<tool_call|>", "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>", "escape_token": '<|"|>',
}


def _token_string(value: Any) -> str | None:
    if isinstance(value, dict):  # serialised AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> ids. `tokenizer(texts)` pads on `padding_side` (left for Gemma 4) and returns numpy arrays."""

    def __init__(self, backend: _BackendTokenizer, config: dict | None = None):
        self.backend = backend
        self.config = dict(config or {})
        self.padding_side = self.config.get("padding_side", "left")
        self.truncation_side = self.config.get("truncation_side", "right")
        self.chat_template = self.config.get("chat_template")
        self.special_tokens: dict[str, str] = {}
        for name, default in SPECIAL_TOKEN_DEFAULTS.items():
            token = _token_string(self.config.get(name, default))
            if token is not None and backend.token_to_id(token) is not None:
                self.special_tokens[name] = token
        for name, value in self.config.items():
            token = _token_string(value)
            if name.endswith("_token") and isinstance(token, str) and backend.token_to_id(token) is not None:
                self.special_tokens.setdefault(name, token)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        folder = Path(path)
        tokenizer_json = folder / "tokenizer.json"
        try:
            text = read_folder_text(tokenizer_json, MAX_TOKENIZER_BYTES, "a tokenizers-format tokenizer.json")
        except FileMissingError:
            raise FileMissingError(f"{tokenizer_json} not found (gemma4_eqx needs the tokenizers-format "
                                   "tokenizer.json)") from None
        config = read_json(folder / "tokenizer_config.json")  # {} when there is none
        try:
            backend = _BackendTokenizer.from_str(text)
        except Exception as e:  # the tokenizers library says only e.g. "key must be a string at line 1 column 2"
            raise ValueError(f"{tokenizer_json}: not a valid tokenizers-format tokenizer.json ({str(e)[:300]})") from e
        return cls(backend, config)

    def __getattr__(self, name: str) -> Any:
        # bos_token, image_token, boi_token, ... and their *_id twins, looked up by token string.
        specials = self.__dict__.get("special_tokens", {})
        if name in specials:
            return specials[name]
        if name.endswith("_id") and name[:-3] in specials:
            return self.backend.token_to_id(specials[name[:-3]])
        if name.endswith("_token") or (name.endswith("_token_id")):
            return None
        raise AttributeError(f"Tokenizer has no attribute {name!r}")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The token strings a chat template can refer to (bos_token, eos_token, ...)."""
        return dict(self.special_tokens)

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Any) -> Any:
        if isinstance(ids, (int, np.integer)):
            return self.backend.id_to_token(int(ids))
        return [self.backend.id_to_token(int(i)) for i in ids]

    def adds_bos(self) -> bool:
        """True when the post-processor prepends `<bos>` (a base-model tokenizer, docs/spec/processors.md §11.4)."""
        bos = self.bos_token_id
        return bos is not None and self.backend.encode("", add_special_tokens=True).ids[:1] == [bos]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def added_tokens(self) -> dict[str, bool]:
        """Every added token of tokenizer.json -> whether it is special."""
        return {t.content: bool(t.special) for t in self.backend.get_added_tokens_decoder().values()}

    def encode_plain(self, text: str) -> list[int]:
        """`text` as plain text: no added token, special or not, is matched (transformers'
        `_encode_without_added_tokens`: the normalizer, the pre-tokenizer and the model, nothing else)."""
        backend = self.backend
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        splits = [text] if backend.pre_tokenizer is None else [s for s, _ in backend.pre_tokenizer.pre_tokenize_str(text)]
        return [token.id for split in splits for token in backend.model.tokenize(split)]

    def encode_marked(self, text: str) -> list[int]:
        """Encode a chat rendered from inputs marked by `chat_template.mark_control_tokens`: marked control tokens
        become plain text, everything else (the template's own control tokens) is encoded as usual."""
        from .chat_template import control_token_patterns

        _, markers = control_token_patterns(tuple(self.added_tokens()))
        pieces = markers.split(text)
        newline = self.encode("\n", add_special_tokens=False)
        ids = self.encode(pieces[0], add_special_tokens=False)
        for i, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            as_text = i % 2 == 1  # odd pieces are marked tokens
            encode = self.encode_plain if as_text else (lambda t: self.encode(t, add_special_tokens=False))
            # After a newline, so no prefix space is added at the start of the piece; the newline is removed again.
            piece_ids = encode("\n" + piece)
            piece_ids = piece_ids[len(newline):] if piece_ids[: len(newline)] == newline else encode(piece)
            if as_text and self.convert_tokens_to_ids(piece) in piece_ids:
                raise ValueError(f"cannot sanitize {piece!r}: the tokenizer produces it from plain text")
            ids += piece_ids
        return ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: Any, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(
        self,
        text: str | list[str],
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool = True,
        return_tensors: str | None = "np",
        **kwargs: Any,
    ) -> BatchFeature:
        """input_ids and attention_mask. padding: True / "longest" or "max_length" (needs max_length)."""
        check_return_tensors(return_tensors)
        sanitize = bool(kwargs.pop("sanitize_control_tokens", False))
        unknown = set(kwargs) - {"return_token_type_ids", "verbose"}
        if unknown:
            raise TypeError(f"tokenizer: unexpected keyword argument(s) {sorted(unknown)}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        if sanitize:  # texts rendered from marked chat inputs (Processor.apply_chat_template)
            if add_special_tokens and self.backend.post_processor is not None and \
                    self.backend.post_processor.num_special_tokens_to_add(False):
                raise ValueError("sanitize_control_tokens=True needs add_special_tokens=False (the template writes <bos>)")
            ids = [self.encode_marked(t) for t in texts]
        else:
            ids = [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
            ids = [s[:max_length] if self.truncation_side == "right" else s[len(s) - max_length:] for s in ids]
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding in (True, "longest"):
            target = max((len(s) for s in ids), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError('padding="max_length" needs max_length')
            target = max_length
        elif padding in (False, "do_not_pad", None):
            target = None
        else:
            raise ValueError(f'padding must be True, False, "longest" or "max_length", got {padding!r}')

        masks = [[1] * len(s) for s in ids]
        if target is not None:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("padding needs a pad_token in the tokenizer")
            for i, s in enumerate(ids):
                n = target - len(s)
                if n > 0:
                    ids[i] = [pad_id] * n + s if side == "left" else s + [pad_id] * n
                    masks[i] = [0] * n + masks[i] if side == "left" else masks[i] + [0] * n
        if return_tensors == "np":
            if len({len(s) for s in ids}) > 1:
                raise ValueError("sequences have different lengths: pass padding=True to stack them")
            out = BatchFeature(input_ids=np.asarray(ids, dtype=np.int64).reshape(len(ids), -1))
            if return_attention_mask:
                out["attention_mask"] = np.asarray(masks, dtype=np.int64).reshape(len(ids), -1)
        else:
            out = BatchFeature(input_ids=ids[0] if single else ids)
            if return_attention_mask:
                out["attention_mask"] = masks[0] if single else masks
        return out
