"""Chat template rendering (docs/spec/processors.md §5) with jinja2, in the sandbox transformers uses.

The template is the checkpoint folder's `chat_template.jinja` when it has one (else `chat_template.json`
or the `chat_template` of tokenizer_config.json), and otherwise the built-in Gemma 4 template next to
this file, which renders exactly as Google's google/gemma-4-12B-it template (tests/test_chat_format.py).
Templates see `messages`, `tools`, `documents`, `add_generation_prompt`, the special token strings
(`bos_token`, ...) and any extra keyword such as `enable_thinking` or `preserve_thinking`.

`render_chat_template` renders as transformers does (keys set to None dropped, `reasoning_content` /
`thinking` / `reasoning` filled from one another); `normalize_conversations` is the processor's stricter
entry point: it refuses what transformers would drop silently or render into a broken prompt.
`mark_control_tokens` implements transformers' opt-in `sanitize_control_tokens=True`.

A template is untrusted text: files are read through `gemma4_eqx.utils.files` (regular files, at most
MAX_TEMPLATE_BYTES, UTF-8; chat_template.json as JSON with a nesting limit) and every render runs in the budgeted
sandbox of `sandbox.py` (steps, sizes, produced text, wall clock: `TemplateLimits`), so a hostile template ends in a
`TemplateBudgetError` naming it and the budget within seconds.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import numpy as np

from ..utils.files import FileMissingError, FileReadError, read_folder_json, read_folder_text, read_text
from . import sandbox
from .files import MAX_CONFIG_BYTES, MAX_TEMPLATE_BYTES
from .sandbox import BudgetedSandboxedEnvironment, TemplateBudgetError, TemplateLimits, render_within

BUILTIN_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
BUILTIN_TEMPLATE_NAME = "(the built-in Gemma 4 template)"
EMPTY_CONVERSATION = "Cannot apply chat template to an empty conversation. Provide at least one message."
# Content block types the Gemma 4 template renders (image_url / input_audio are OpenAI's spellings).
BLOCK_TYPES = ("text", "image", "image_url", "audio", "input_audio", "video")
# The reasoning of a message under its three names; transformers fills each from the first one set.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Private-use characters wrapped around control tokens found in the inputs (transformers' markers).
CONTROL_TOKEN_START = "\U000f0000"
CONTROL_TOKEN_END = "\U000f0001"


@lru_cache(maxsize=1)
def builtin_template() -> str:
    return read_text(BUILTIN_TEMPLATE_PATH, MAX_TEMPLATE_BYTES, "a UTF-8 chat template")


def find_chat_template(folder: str | Path, tokenizer_config: dict | None = None) -> str | None:
    """The folder's own template, in the order transformers looks for it; None when it has none."""
    return locate_chat_template(folder, tokenizer_config)[0]


def locate_chat_template(folder: str | Path, tokenizer_config: dict | None = None) -> tuple[str | None, str | None]:
    """(the folder's own template, where it was found) in the order transformers looks for it: chat_template.jinja,
    chat_template.json, tokenizer_config.json's chat_template; (None, None) when there is none. A file that is no
    regular file, too large, not UTF-8 or not valid JSON, and a template of the wrong type, are `FileReadError`s
    naming the file."""
    folder = Path(folder)
    try:
        return read_folder_text(folder / "chat_template.jinja", MAX_TEMPLATE_BYTES, "a UTF-8 chat template"), \
            str(folder / "chat_template.jinja")
    except FileMissingError:
        pass
    path = folder / "chat_template.json"
    try:
        data = read_folder_json(path, MAX_CONFIG_BYTES, expect=dict, what='a JSON object {"chat_template": "..."}')
    except FileMissingError:
        data = None
    if data is not None:
        template = named_template(data.get("chat_template"), f"{path}: chat_template")
        if template:
            return template, str(path)
    template = named_template((tokenizer_config or {}).get("chat_template"),
                              f"{folder / 'tokenizer_config.json'}: chat_template")
    return (template, str(folder / "tokenizer_config.json")) if template else (None, None)


def named_template(value: Any, where: str) -> str | None:
    """A template given as a string, a {name: template} mapping or a [{"name", "template"}] list (transformers'
    named templates: "default" is used); None for none; FileReadError naming `where` for anything else."""
    if value is None or isinstance(value, str):
        template = value
    elif isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        template = value.get("default")
    elif isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str) and
                                         isinstance(t.get("template"), str) for t in value):
        template = {t["name"]: t["template"] for t in value}.get("default")
    else:
        from ..utils.files import json_type_name

        raise FileReadError(f"{where} must be a template string, a {{name: template}} object or a list of "
                            f"{{\"name\", \"template\"}} objects, found {json_type_name(value)}")
    if template is not None and len(template) > MAX_TEMPLATE_BYTES:
        raise FileReadError(f"{where}: a template of {len(template):,} characters, more than the limit of "
                            f"{MAX_TEMPLATE_BYTES:,}")
    return template


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_template(source: str, name: str = "(a template string)") -> jinja2.Template:
    """The template compiled in the budgeted sandbox (sandbox.py) with transformers' options and helpers; a source
    longer than the limit, or nested deeper than Python can compile, is a TemplateBudgetError naming `name`."""
    limit = sandbox.DEFAULT_LIMITS.max_source_chars
    if not isinstance(source, str):
        raise TypeError(f"chat template {name}: expected the template text as a string, got {type(source).__name__}")
    if len(source) > limit:
        raise TemplateBudgetError(f"chat template {name}: {len(source):,} characters, more than the limit of "
                                  f"{limit:,} for a template")
    try:
        return _compiled(source)
    except RecursionError:
        raise TemplateBudgetError(f"chat template {name}: nested deeper than Python can compile") from None


@lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    env = BudgetedSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    template = env.from_string(source)
    env.add_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return template


@lru_cache(maxsize=16)
def template_variables(source: str) -> frozenset[str]:
    """The names a template reads from its context (Jinja2's undeclared variables)."""
    env = compile_template(source).environment
    return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))


def alias_reasoning(messages: list[dict]) -> list[dict]:
    """transformers' `_alias_reasoning_fields`: a message with any of REASONING_FIELDS gets `thinking` (unless
    set) and `reasoning_content` set to it, so a template reading either name sees it."""
    out = []
    for message in messages:
        reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k) is not None), None)
        out.append(message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning})
    return out


@lru_cache(maxsize=16)
def template_literal_text(source: str) -> str:
    """The template's raw text and string constants, joined by NUL (where its control tokens are looked for)."""
    ast = compile_template(source).environment.parse(source)
    literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
    return "\0".join(sorted(literals))


def control_tokens(added_tokens: dict[str, bool], template: str) -> tuple[str, ...]:
    """The tokens `sanitize_control_tokens=True` turns into text in the inputs: the special added tokens and
    the added tokens the template writes itself (whitespace tokens excepted), as transformers chooses them."""
    literal = template_literal_text(template)
    return tuple(t for t, special in added_tokens.items() if special or (t in literal and not t.isspace()))


@lru_cache(maxsize=16)
def control_token_patterns(tokens: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """A regex for any of `tokens` (longest first), and one for a marked token or a lone marker."""
    any_token = re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")
    markers = re.compile(f"{CONTROL_TOKEN_START}({any_token.pattern}){CONTROL_TOKEN_END}|"
                         f"[{CONTROL_TOKEN_START}{CONTROL_TOKEN_END}]")
    return any_token, markers


def mark_control_tokens(obj: Any, tokens: re.Pattern) -> Any:
    """Wrap every control token in the strings of `obj` (messages, tools, ...; dict keys excepted) in the
    private markers, after removing markers already there so none can be forged."""
    if isinstance(obj, str):
        obj = obj.replace(CONTROL_TOKEN_START, "").replace(CONTROL_TOKEN_END, "")
        return tokens.sub(f"{CONTROL_TOKEN_START}\\g<0>{CONTROL_TOKEN_END}", obj)
    if isinstance(obj, dict):
        return {k: mark_control_tokens(v, tokens) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [mark_control_tokens(v, tokens) for v in obj]
    return obj


def render_chat_template(
    template: str,
    conversation: list[dict],
    *,
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    special_tokens: dict[str, str] | None = None,
    template_name: str | None = None,
    template_limits: TemplateLimits | None = None,
    **kwargs: Any,
) -> str:
    """Render one conversation (a list of {"role", "content"} messages) to the prompt string.

    The render runs under `template_limits` (default `sandbox.DEFAULT_LIMITS`, which may be replaced for every
    render): a template that runs past a budget raises TemplateBudgetError naming `template_name` (where the template
    came from) and the budget."""
    if not isinstance(conversation, (list, tuple)) or not all(isinstance(m, dict) for m in conversation):
        raise TypeError("a conversation must be a list of message dicts with 'role' and 'content'")
    for i, message in enumerate(conversation):
        if "role" not in message:
            raise ValueError(f"message {i} has no 'role': {message}")
    messages = alias_reasoning(plain_template_data([{k: v for k, v in m.items() if v is not None} for m in conversation]))
    variables = plain_template_data({**(special_tokens or {}), **kwargs})
    name = template_name or (BUILTIN_TEMPLATE_NAME if template == builtin_template() else "(a template string)")
    return render_within(
        compile_template(template, name), template_limits or sandbox.DEFAULT_LIMITS, name,
        messages=messages, tools=plain_template_data(tools), documents=plain_template_data(documents),
        add_generation_prompt=add_generation_prompt, **variables,
    )


def plain_template_data(value: Any) -> Any:
    """What a template may see, rebuilt from plain JSON types as transformers rebuilds it: numpy scalars become
    Python numbers (np.bool_ a real bool), str/int/float subclasses their base type, dataclasses and pydantic
    models dicts, and anything else (decoded images, arrays) an inert placeholder such as "<ndarray>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if isinstance(value, np.generic):
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def normalize_conversations(conversation: Any, control_tokens: tuple[str, ...] = ()) -> tuple[list[list[dict]], bool]:
    """One conversation or a batch of them -> (list of conversations, is_batched); message copies without None
    values, with OpenAI-style {"type": "image_url"} blocks turned into image blocks.

    Refused, each naming the message: an empty conversation (as transformers' tokenizer does), a message that
    is no dict or has no string role, a role holding a control token (`control_tokens`, e.g. <turn|>) or a
    line break, content that is neither a string nor a list of blocks (a dict, say), and blocks of a type the
    Gemma 4 template does not render (it would drop them silently).
    """
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"conversation must be a list of messages (or a list of such lists), got {type(conversation).__name__}")
    if not conversation:
        raise ValueError(EMPTY_CONVERSATION)
    batched = isinstance(conversation[0], (list, tuple))
    conversations = list(conversation) if batched else [conversation]
    out = []
    for b, conv in enumerate(conversations):
        where = f"conversation {b}, " if batched else ""
        if not isinstance(conv, (list, tuple)):
            raise TypeError(f"{where}expected a list of messages, got {type(conv).__name__}")
        if not conv:
            raise ValueError(f"{where}{EMPTY_CONVERSATION}")
        messages = []
        for i, message in enumerate(conv):
            at = f"{where}message {i}"
            if not isinstance(message, dict):
                raise TypeError(f"{at}: messages must be dicts with 'role' and 'content', got {type(message).__name__}")
            message = {k: v for k, v in message.items() if v is not None}
            role = message.get("role")
            if not isinstance(role, str) or not role:
                raise ValueError(f"{at}: 'role' must be a non-empty string (user, assistant, system, tool), got {role!r}")
            bad = [t for t in control_tokens if t in role] + (["a line break"] if "\n" in role or "\r" in role else [])
            if bad:
                raise ValueError(f"{at}: role {role!r} contains {', '.join(bad)}; a role is a plain name such as "
                                 "'user' or 'assistant'")
            content = message.get("content")
            if isinstance(content, (list, tuple)):
                message["content"] = [_normalize_block(block, f"{at}, content block {j}") for j, block in enumerate(content)]
            elif content is not None and not isinstance(content, str):
                raise TypeError(f"{at} (role {role!r}): content must be a string or a list of content blocks such as "
                                f"{{'type': 'text', 'text': ...}}, got {type(content).__name__}")
            messages.append(message)
        out.append(messages)
    return out, batched


def _normalize_block(block: Any, at: str) -> dict:
    if not isinstance(block, dict):
        raise TypeError(f"{at}: expected a dict such as {{'type': 'text', 'text': ...}}, got {type(block).__name__}")
    kind = block.get("type")
    if kind not in BLOCK_TYPES:
        raise ValueError(f"{at}: unknown block type {kind!r}; expected one of {', '.join(BLOCK_TYPES)}")
    if kind == "text" and not isinstance(block.get("text"), str):
        raise TypeError(f"{at}: a text block needs a string 'text', got {type(block.get('text')).__name__}")
    if kind == "image_url" and "image_url" in block:
        url = block["image_url"]
        return {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}
    return dict(block)


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
