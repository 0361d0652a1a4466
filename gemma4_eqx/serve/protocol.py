"""The OpenAI wire format's requests, without a web framework: reading and checking request bodies (every error
an `ApiError` in OpenAI's shape, naming the field), sampling settings, and converting chat messages to what the
chat template takes (images from data URLs or files, audio, tool calls with JSON arguments). `serve.replies` turns
generated tokens into the responses.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
import os
from typing import Any

import numpy as np

from ..processing.chat_parser import CALL_START
from ..processing.image import load_image

MAX_TOP_LOGPROBS = 8  # the engine's top log-probs per step (generate.sampling.NUM_TOP)
MAX_STOP_STRINGS = 16
MAX_IMAGE_BYTES = 32 * 2**20  # a data URL's decoded image
MAX_AUDIO_BYTES = 32 * 2**20
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def from_value_error(e: Exception, default_param: str | None = None) -> ApiError:
    """A ValueError of the package ("name: what is wrong") as a 400 naming that field."""
    text = str(e)
    head = text.split(":", 1)[0]
    param = head if head.replace("_", "").replace(".", "").isalnum() and " " not in head else default_param
    return ApiError(400, text, param=param)


# ---- field readers -----------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def get_int(body: dict, name: str, lo: int, hi: int | None = None, default: Any = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(name, f"expected an integer {span}, found {json.dumps(v)[:40]}")
    return v


def get_number(body: dict, name: str, lo: float, hi: float | None = None, default: Any = None,
               lo_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
        span = f"{'(' if lo_open else '['}{lo:g}, {f'{hi:g}]' if hi is not None else 'inf)'}"
        raise bad(name, f"expected a number in {span}, found {json.dumps(v)[:40]}")
    return float(v)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"expected true or false, found {json.dumps(v)[:40]}")
    return v


def get_str(body: dict, name: str, default: Any = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, str):
        raise bad(name, f"expected a string, found {json.dumps(v)[:40]}")
    return v


def get_stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "expected a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, found {len(stops)}")
    return [s for s in stops if s]


# ---- sampling settings -------------------------------------------------------------------------------------------
UNSUPPORTED = {  # field: (value(s) that mean "off", why)
    "frequency_penalty": (0, "penalties are not supported (0 is accepted)"),
    "presence_penalty": (0, "penalties are not supported (0 is accepted)"),
    "repetition_penalty": (1, "repetition_penalty is not supported (1 is accepted)"),
    "best_of": (1, "best_of is not supported (1 is accepted)"),
    "min_p": (0, "min_p is not supported (0 is accepted)"),
    "min_tokens": (0, "min_tokens is not supported (0 is accepted)"),
}


@dataclasses.dataclass
class Sampling:
    max_tokens: int | None
    temperature: float | None  # None: the checkpoint's generation_config
    top_p: float  # -1.0: the checkpoint's generation_config
    top_k: int | None  # -1: the checkpoint's generation_config
    seed: int | None
    stop: list[str]
    ignore_eos: bool

    def engine_kwargs(self) -> dict:
        out: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                               "seed": self.seed}
        if self.ignore_eos:
            out["stop_ids"] = ()
        return out


def read_sampling(body: dict, *, chat: bool) -> Sampling:
    n = get_int(body, "n", 1, default=1)
    if n != 1:
        raise bad("n", f"only n=1 is supported (one choice per request), found {n}")
    for name, (off, why) in UNSUPPORTED.items():
        v = body.get(name)
        if v is not None and v != off:
            raise bad(name, why)
    if body.get("logit_bias"):
        raise bad("logit_bias", "logit_bias is not supported")
    if chat:
        fmt = body.get("response_format")
        if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            raise bad("response_format", "only {\"type\": \"text\"} is supported (no constrained decoding)")
        new = get_int(body, "max_completion_tokens", 1)
        old = get_int(body, "max_tokens", 1)
        max_tokens = new if new is not None else old
    else:
        if body.get("suffix"):
            raise bad("suffix", "suffix (insertion) is not supported")
        max_tokens = get_int(body, "max_tokens", 0, default=16)
    top_k = get_int(body, "top_k", -1, default=-1)
    return Sampling(max_tokens=max_tokens, temperature=get_number(body, "temperature", 0.0),
                    top_p=get_number(body, "top_p", 0.0, 1.0, default=-1.0, lo_open=True),
                    top_k=None if top_k == 0 else top_k, seed=get_int(body, "seed", 0, 2**63 - 1),
                    stop=get_stops(body), ignore_eos=get_bool(body, "ignore_eos"))


def read_stream_options(body: dict) -> tuple[bool, bool]:
    stream = get_bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad("stream_options", "expected an object")
    if not stream:
        raise bad("stream_options", "only allowed with stream: true")
    return stream, get_bool(options, "include_usage")


# ---- chat requests -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]  # in the chat template's form
    tools: list[dict] | None
    forced_call: str | None  # text the reply is made to start with (tool_choice "required" or a named function)
    sampling: Sampling
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    template_kwargs: dict
    return_token_ids: bool
    body: dict


def read_chat(body: dict, *, allow_files: bool = True) -> ChatRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of messages")
    tools = read_tools(body.get("tools"))
    choice = body.get("tool_choice")
    forced = None
    if choice is None or choice == "auto":
        pass
    elif choice == "none":
        tools = None  # the model is not told about them
    elif choice == "required":
        if not tools:
            raise bad("tool_choice", "\"required\" needs tools")
        forced = CALL_START
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not tools or name not in [t["function"]["name"] for t in tools]:
            raise bad("tool_choice", f"names the function {json.dumps(name)[:60]}, which tools does not declare")
        forced = CALL_START + name + "{"
    else:
        raise bad("tool_choice", "expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                                 "\"function\": {\"name\": ...}}")
    logprobs = get_bool(body, "logprobs")
    top = get_int(body, "top_logprobs", 0, 20, default=0)
    if top > MAX_TOP_LOGPROBS:
        raise bad("top_logprobs", f"at most {MAX_TOP_LOGPROBS} are available from this server, found {top}")
    if top and not logprobs:
        raise bad("top_logprobs", "needs logprobs: true")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", "expected an object")
    kwargs = dict(kwargs)
    if "reasoning_effort" in body and body["reasoning_effort"] not in (None, "none", "minimal"):
        kwargs.setdefault("enable_thinking", True)
    stream, include_usage = read_stream_options(body)
    return ChatRequest(model=get_str(body, "model"), messages=to_template_messages(messages, allow_files),
                       tools=tools, forced_call=forced, sampling=read_sampling(body, chat=True), stream=stream,
                       include_usage=include_usage, logprobs=logprobs, top_logprobs=top, template_kwargs=kwargs,
                       return_token_ids=get_bool(body, "return_token_ids"), body=body)


def read_tools(tools: Any) -> list[dict] | None:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad("tools", "expected a list of {\"type\": \"function\", \"function\": {...}}")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad(f"tools[{i}]", "expected {\"type\": \"function\", \"function\": {\"name\", ...}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}].function.name", "expected a non-empty string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", "expected a JSON schema object")
        out.append({"type": "function", "function": {k: v for k, v in fn.items()
                                                     if k in ("name", "description", "parameters")}})
    return out or None


def to_template_messages(messages: list, allow_files: bool = True) -> list[dict]:
    """OpenAI messages -> the chat template's: content parts to text / image / audio blocks, assistant tool calls
    with their arguments parsed from JSON, tool results named after the call they answer."""
    out: list[dict] = []
    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, "expected an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"expected one of {', '.join(ROLES)}, found {json.dumps(role)[:40]}")
        msg: dict[str, Any] = {"role": role, "content": read_content(m.get("content"), f"{where}.content",
                                                                     role, allow_files)}
        if role == "assistant":
            for key in ("reasoning_content", "reasoning"):
                if isinstance(m.get(key), str) and m[key]:
                    msg["reasoning_content"] = m[key]
            calls = m.get("tool_calls")
            if calls:
                if not isinstance(calls, list):
                    raise bad(f"{where}.tool_calls", "expected a list")
                msg["tool_calls"] = []
                for j, call in enumerate(calls):
                    fn = call.get("function") if isinstance(call, dict) else None
                    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                        raise bad(f"{where}.tool_calls[{j}]", "expected {\"id\", \"type\": \"function\", "
                                                               "\"function\": {\"name\", \"arguments\"}}")
                    args = fn.get("arguments") or "{}"
                    if isinstance(args, str):
                        try:
                            args = json.loads(args)
                        except json.JSONDecodeError as e:
                            raise bad(f"{where}.tool_calls[{j}].function.arguments",
                                      f"not valid JSON ({e.msg} at character {e.pos})") from None
                    if not isinstance(args, dict):
                        raise bad(f"{where}.tool_calls[{j}].function.arguments", "expected a JSON object")
                    if isinstance(call.get("id"), str):
                        call_names[call["id"]] = fn["name"]
                    msg["tool_calls"].append({"type": "function", "function": {"name": fn["name"],
                                                                               "arguments": args}})
            if msg["content"] is None:
                msg["content"] = ""
        elif role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id"))
            if not name:
                raise bad(f"{where}.tool_call_id", "names no tool call of an earlier assistant message (or give "
                                                    "name)")
            msg["name"] = name
            if m.get("tool_call_id") is not None:
                msg["tool_call_id"] = m["tool_call_id"]
        elif msg["content"] is None:
            raise bad(f"{where}.content", "expected a string or a list of content parts")
        out.append(msg)
    return out


def read_content(content: Any, where: str, role: str, allow_files: bool) -> Any:
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad(where, "expected a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"{at}.text", "expected a string")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad(f"{at}.image_url.url", "expected a data URL or a file path")
            if role not in ("user", "system", "developer"):
                raise bad(at, f"images are only read in user messages, found one in a {role} message")
            parts.append({"type": "image", "image": read_image(url, f"{at}.image_url.url", allow_files)})
        elif kind == "input_audio":
            audio = part.get("input_audio")
            if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
                raise bad(f"{at}.input_audio", "expected {\"data\": base64, \"format\": \"wav\" | \"flac\"}")
            parts.append({"type": "audio", "audio": read_audio(audio["data"], f"{at}.input_audio.data")})
        else:
            raise bad(f"{at}.type", f"expected \"text\", \"image_url\" or \"input_audio\", found "
                                    f"{json.dumps(kind)[:40]}")
    return parts


def _decode_base64(data: str, where: str, limit: int) -> bytes:
    if len(data) > limit * 4 // 3 + 8:
        raise bad(where, f"more than {limit // 2**20} MiB of data")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(where, f"not valid base64 ({e})") from None


def read_image(url: str, where: str, allow_files: bool):
    """A data URL (`data:image/png;base64,...`) or a local file (`file:///path` or a path) -> an RGB PIL image."""
    import PIL.Image
    import PIL.ImageOps

    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64") or not head[5:].startswith("image/"):
            raise bad(where, "expected a data URL of the form data:image/<type>;base64,<data>")
        raw = _decode_base64(data, where, MAX_IMAGE_BYTES)
        try:
            image = PIL.Image.open(io.BytesIO(raw))
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
        except (PIL.UnidentifiedImageError, OSError, SyntaxError, PIL.Image.DecompressionBombError) as e:
            raise bad(where, f"not a readable image ({e})") from None
    if url.startswith(("http://", "https://")):
        raise bad(where, "remote image URLs are not fetched by this server; send a data URL or a file path")
    if not allow_files:
        raise bad(where, "file paths are not allowed by this server (--no-local-files); send a data URL")
    path = url[len("file://"):] if url.startswith("file://") else url
    try:
        return load_image(os.path.expanduser(path))
    except (OSError, ValueError) as e:
        raise bad(where, str(e)) from None


def read_audio(data: str, where: str) -> np.ndarray:
    """base64 wav / flac / ogg at 16 kHz -> float32 mono samples."""
    import soundfile

    raw = _decode_base64(data, where, MAX_AUDIO_BYTES)
    try:
        samples, rate = soundfile.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except (RuntimeError, ValueError, soundfile.LibsndfileError) as e:
        raise bad(where, f"not readable audio ({e})") from None
    if rate != 16_000:
        raise bad(where, f"expected audio sampled at 16000 Hz, found {rate} Hz")
    return samples.mean(axis=1).astype(np.float32)


# ---- completions requests ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]
    echo: bool
    logprobs: int | None
    sampling: Sampling
    stream: bool
    include_usage: bool
    return_token_ids: bool
    skip_special_tokens: bool
    body: dict


def read_completion(body: dict, vocab_size: int) -> CompletionRequest:
    p = body.get("prompt")
    if isinstance(p, str):
        prompts: list = [p]
    elif isinstance(p, list) and p and all(_is_int(x) for x in p):
        prompts = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(isinstance(x, list) and all(_is_int(t) for t in x) for x in p):
        prompts = list(p)
    else:
        raise bad("prompt", "expected a string, a list of strings, a list of token ids or a list of lists of token "
                            "ids (none empty)")
    for i, row in enumerate(prompts):
        if not row:
            raise bad("prompt", f"prompt {i} is empty")
        if isinstance(row, list) and (min(row) < 0 or max(row) >= vocab_size):
            raise bad("prompt", f"prompt {i}: token ids must lie in [0, {vocab_size}) (the vocabulary)")
    logprobs = get_int(body, "logprobs", 0, 20)
    if logprobs is not None and logprobs > MAX_TOP_LOGPROBS:
        raise bad("logprobs", f"at most {MAX_TOP_LOGPROBS} are available from this server, found {logprobs}")
    echo = get_bool(body, "echo")
    sampling = read_sampling(body, chat=False)
    if sampling.max_tokens == 0 and not echo:
        raise bad("max_tokens", "0 is only allowed with echo: true (scoring the prompt)")
    stream, include_usage = read_stream_options(body)
    return CompletionRequest(model=get_str(body, "model"), prompts=prompts, echo=echo, logprobs=logprobs,
                             sampling=sampling, stream=stream, include_usage=include_usage,
                             return_token_ids=get_bool(body, "return_token_ids"),
                             skip_special_tokens=get_bool(body, "skip_special_tokens", True), body=body)
