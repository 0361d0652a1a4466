"""Chat template rendering (spec processors.md §5) with jinja2, in the sandbox transformers uses.

The template is the checkpoint folder's `chat_template.jinja` when it has one (else `chat_template.json`
or the `chat_template` of tokenizer_config.json), and otherwise the built-in Gemma 4 template next to
this file. Templates see `messages`, `tools`, `documents`, `add_generation_prompt`, the special token
strings (`bos_token`, ...) and any extra keyword such as `enable_thinking`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

BUILTIN_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")


def builtin_template() -> str:
    return BUILTIN_TEMPLATE_PATH.read_text()


def find_chat_template(folder: str | Path, tokenizer_config: dict | None = None) -> str | None:
    """The folder's own template, in the order transformers looks for it; None when it has none."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").is_file():
        template = json.loads((folder / "chat_template.json").read_text()).get("chat_template")
        if template:
            return template
    template = (tokenizer_config or {}).get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template or None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


@lru_cache(maxsize=16)
def template_variables(source: str) -> frozenset[str]:
    """The names a template reads from its context (Jinja2's undeclared variables)."""
    env = compile_template(source).environment
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))


def render_chat_template(
    template: str,
    conversation: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """Render one conversation (a list of {"role", "content"} messages) to the prompt string."""
    if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
        raise TypeError("a conversation must be a list of message dicts with 'role' and 'content'")
    for i, message in enumerate(conversation):
        if "role" not in message:
            raise ValueError(f"message {i} has no 'role': {message}")
    messages = [{k: v for k, v in m.items() if v is not None} for m in conversation]
    variables = {**(special_tokens or {}), **kwargs}
    return compile_template(template).render(
        messages=messages, tools=tools, documents=documents, add_generation_prompt=add_generation_prompt,
        **variables,
    )


def normalize_conversations(conversation: Any) -> tuple[list[list[dict]], bool]:
    """One conversation or a batch of them -> (list of conversations, is_batched); message copies
    without None values, with OpenAI-style {"type": "image_url"} blocks turned into image blocks."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise TypeError("conversation must be a non-empty list of messages (or a list of such lists)")
    batched = isinstance(conversation[0], (list, tuple))
    conversations = list(conversation) if batched else [conversation]
    out = []
    for conv in conversations:
        messages = []
        for message in conv:
            if not isinstance(message, dict):
                raise TypeError(f"messages must be dicts with 'role' and 'content', got {type(message).__name__}")
            message = {k: v for k, v in message.items() if v is not None}
            content = message.get("content")
            if isinstance(content, (list, tuple)):
                blocks = []
                for block in content:
                    if isinstance(block, dict) and block.get("type") == "image_url" and "image_url" in block:
                        url = block["image_url"]
                        blocks.append({"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url})
                    else:
                        blocks.append(dict(block))
                message["content"] = blocks
            messages.append(message)
        out.append(messages)
    return out, batched


def extract_media(conversations: list[list[dict]]) -> tuple[list[list[Any]], list[list[Any]], list[dict | None], list[Any]]:
    """Media of the content blocks, in order: images and videos nested per conversation, the video
    metadata of each video (a block's "video_metadata", or its "fps"), and audio as one flat list."""
    images, videos, video_metadata, audio = [], [], [], []
    for conv in conversations:
        conv_images, conv_videos = [], []
        for message in conv:
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for block in content:
                kind = block.get("type")
                if kind == "image":
                    conv_images.extend(block[k] for k in ("image", "url", "path", "base64") if k in block)
                elif kind == "video":
                    found = [block[k] for k in ("video", "url", "path") if k in block]
                    conv_videos.extend(found)
                    meta = block.get("video_metadata")
                    if meta is None and "fps" in block:
                        meta = {"fps": block["fps"]}
                    video_metadata.extend([meta] * len(found))
                elif kind in ("audio", "input_audio"):
                    audio.extend(block[k] for k in ("audio", "url", "path") if k in block)
        images.append(conv_images)
        videos.append(conv_videos)
    return images, videos, video_metadata, audio
