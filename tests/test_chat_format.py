"""The built-in chat template renders as Google's google/gemma-4-12B-it template does under transformers.

tests/fixtures/chat/ holds conversations rendered and tokenized by transformers' own apply_chat_template with
the official template (sha256 ae53464b..., scripts/record_chat_template.py); the built-in template, written
for this package, must give every string and every id, and raise where the official one raises.
"""

import copy
import functools
import json

import jinja2
import pytest
from processing_reference import REPO, processing, processor

CHAT = REPO / "tests" / "fixtures" / "chat"
OFFICIAL_SHA256 = "ae53464bf3be25802b3a5b37def7fd89667067d7577049b3b2d74c4d8de4c6d4"


@functools.cache
def conversations() -> dict:
    return json.loads((CHAT / "conversations.json").read_text())


@functools.cache
def rendered() -> dict:
    return json.loads((CHAT / "rendered.json").read_text())


def render(name: str, **extra):
    """Through the processor, which also validates the conversation."""
    case = conversations()[name]
    return processor().apply_chat_template(copy.deepcopy(case["conversation"]), tools=case.get("tools"),
                                           **case["kwargs"], **extra)


def render_template(name: str):
    """The built-in template alone, fed as transformers feeds a template (no validation)."""
    case = conversations()[name]
    return processing.render_chat_template(processing.builtin_template(), copy.deepcopy(case["conversation"]),
                                           tools=case.get("tools"), special_tokens=processor().tokenizer.special_tokens_map,
                                           **case["kwargs"])


def has_media(conversation: list[dict]) -> bool:
    """Media blocks, or a media marker typed in the text (the processor would ask for the media)."""
    text = json.dumps(conversation)
    return any(isinstance(m.get("content"), list) and any(b.get("type") != "text" for b in m["content"])
               for m in conversation) or any(k in text for k in ("<|image|>", "<|audio|>", "<|video|>"))


RENDERED = sorted(n for n, c in rendered()["cases"].items() if "prompt" in c)
REFUSED = sorted(n for n, c in rendered()["cases"].items() if "error" in c and n != "empty/gen")
# What the official template drops silently or fails on obscurely, the processor refuses with a clear error.
PROCESSOR_REFUSES = {"media/unknown_block_type": (ValueError, "unknown block type 'document'"),
                     "tools/mapping_response": (TypeError, r"message 2 \(role 'tool'\): content must be a string")}


def test_recorded_against_the_official_template():
    assert rendered()["template_sha256"] == OFFICIAL_SHA256
    assert len(rendered()["cases"]) >= 35 and set(rendered()["cases"]) == set(conversations())


def test_bundled_checkpoint_uses_the_builtin_template():
    bundled = REPO / "gemma4_eqx" / "assets" / "tiny" / "chat_template.jinja"
    assert bundled.read_text() == processing.builtin_template()


@pytest.mark.parametrize("name", RENDERED)
def test_template_string_identical(name):
    assert render_template(name) == rendered()["cases"][name]["prompt"]


@pytest.mark.parametrize("name", sorted(set(RENDERED) - set(PROCESSOR_REFUSES)))
def test_processor_string_identical(name):
    assert render(name) == rendered()["cases"][name]["prompt"]


@pytest.mark.parametrize("name", sorted(PROCESSOR_REFUSES))
def test_processor_refuses_what_the_template_would_mangle(name):
    kind, message = PROCESSOR_REFUSES[name]
    with pytest.raises(kind, match=message):
        render(name)


@pytest.mark.parametrize("name", RENDERED)
def test_ids_identical(name):
    case, ref = conversations()[name], rendered()["cases"][name]
    ids = processor().tokenizer.encode(render_template(name), add_special_tokens=False)
    assert list(ids) == ref["input_ids"]
    if not has_media(case["conversation"]) and name not in PROCESSOR_REFUSES:  # media would be loaded and expanded
        out = processor().apply_chat_template(copy.deepcopy(case["conversation"]), tools=case.get("tools"),
                                              tokenize=True, **case["kwargs"])
        assert out[0].tolist() == ref["input_ids"]


@pytest.mark.parametrize("name", REFUSED)
def test_refused_where_the_official_template_refuses(name):
    expected = rendered()["cases"][name]["error"]
    with pytest.raises(jinja2.TemplateError) as info:
        render_template(name)
    assert str(info.value) == expected["message"]
    if name not in PROCESSOR_REFUSES:
        with pytest.raises(jinja2.TemplateError, match="must be a JSON object"):
            render(name)


def test_empty_conversation_as_transformers():
    ref = rendered()["empty_conversation"]["tokenizer"]["error"]
    with pytest.raises(ValueError) as info:
        processor().apply_chat_template([], add_generation_prompt=True)
    assert (type(info.value).__name__, str(info.value)) == (ref["type"], ref["message"])


def test_sanitized_ids_as_transformers():
    names = [n for n, c in rendered()["cases"].items() if "input_ids_sanitized" in c]
    assert names
    for name in names:
        case = conversations()[name]
        ids = processor().apply_chat_template(copy.deepcopy(case["conversation"]), tools=case.get("tools"),
                                              tokenize=True, sanitize_control_tokens=True, **case["kwargs"])
        assert ids[0].tolist() == rendered()["cases"][name]["input_ids_sanitized"], name


# ----------------------------------------------------------------------------- parsing the model's turn
def expected_message(message: dict) -> dict:
    """What a model turn rendered from `message` says: thinking written in the content is dropped and the text
    trimmed, as the template does; arguments None render as no arguments."""
    content = message.get("content") or ""
    blocks = [content] if isinstance(content, str) else [b["text"] for b in content if b.get("type") == "text"]
    text = "".join(_without_thinking(b) for b in blocks)
    reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if message.get(k)), None)
    calls = [{"type": "function", "function": {"name": c["function"]["name"],
                                               "arguments": c["function"].get("arguments") or {}}}
             for c in message.get("tool_calls") or []]
    return {"content": text, "reasoning": reasoning, "tool_calls": calls}


def _without_thinking(text: str) -> str:
    return "".join(piece.split("<|channel>")[0] for piece in text.split("<channel|>")).strip()


# A message whose own strings hold the turn's delimiters cannot be read back unambiguously (an answer holding a
# stop token, an argument holding a tool-call marker): those are written but not parsed back. A tool argument holding
# the quote token is read back (the closing quote is the one the syntax can continue after).
DELIMITERS = ("<|tool_call>", "<tool_call|>", "<turn|>", "<|tool_response>", "<eos>")


def assistant_turns() -> list[tuple[str, int]]:
    out = []
    for name, case in conversations().items():
        if "prompt" not in rendered()["cases"][name]:
            continue
        for i, message in enumerate(case["conversation"]):
            strings = list(_strings({k: v for k, v in message.items() if k != "tool_responses"}))
            if message["role"] == "assistant" and not any(d in t for d in DELIMITERS for t in strings):
                out.append((name, i))
    return out


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_every_assistant_turn_is_parsed_back():
    total = sum(m["role"] == "assistant" for n, c in conversations().items() if "prompt" in rendered()["cases"][n]
                for m in c["conversation"])
    assert len(assistant_turns()) == total


@pytest.mark.parametrize("name,index", assistant_turns())
def test_parse_response_inverts_the_model_turn(name, index):
    case = conversations()[name]
    message = {k: v for k, v in case["conversation"][index].items() if k != "tool_responses"}
    prompt = processing.render_chat_template(processing.builtin_template(), [{"role": "user", "content": "q"}, message],
                                             tools=case.get("tools"), special_tokens=processor().tokenizer.special_tokens_map)
    turn = prompt[prompt.rindex("<|turn>model\n") + len("<|turn>model\n"):]
    expected = expected_message(message)
    assert processing.parse_response(turn) == expected
    ids = processor().tokenizer.encode(turn, add_special_tokens=False)
    assert processing.parse_response(ids, processor().tokenizer) == expected


def test_parse_response_reads_a_generated_turn():
    text = ('<|channel>thought\nThe user wants weather.\n<channel|><|tool_call>call:get_weather{city:<|"|>Paris, FR<|"|>,'
            'days:3,hourly:false,opts:{unit:<|"|>c<|"|>,levels:[1,2.5,null]}}<tool_call|><|tool_response>')
    assert processing.parse_response(text) == {
        "content": "", "reasoning": "The user wants weather.",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {
            "city": "Paris, FR", "days": 3, "hourly": False, "opts": {"unit": "c", "levels": [1, 2.5, None]}}}}]}
    assert processing.parse_response("<|channel>thought\n<channel|>Hello there.<turn|>") == {
        "content": "Hello there.", "reasoning": None, "tool_calls": []}


@pytest.mark.parametrize("text,message", [
    ("<|tool_call>call:f{a:<|\"|>open}<tool_call|>", "not closed"),
    ("<|tool_call>call:f{a 1}<tool_call|>", "expected ':'"),
    ("<|tool_call>call:{a:1}<tool_call|>", "without a name"),
    ("<|tool_call>call:f{a:1}", "not closed with <tool_call|>"),
])
def test_parse_response_names_unreadable_tool_calls(text, message):
    with pytest.raises(ValueError, match=message):
        processing.parse_response(text)


def test_parse_response_needs_a_tokenizer_for_ids():
    with pytest.raises(TypeError, match="tokenizer="):
        processing.parse_response([1, 2, 3])


def test_template_sees_plain_data_as_in_transformers():
    """numpy values in tool arguments render as their Python values (np.bool_ as true, not True)."""
    import numpy as np

    conv = [{"role": "user", "content": [{"type": "image", "image": np.zeros((4, 4, 3), np.uint8)},
                                         {"type": "text", "text": "x"}]},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                "name": "f", "arguments": {"flag": np.bool_(True), "n": np.int64(3), "r": np.float32(0.5)}}}]}]
    out = processor().apply_chat_template(conv)
    assert "<|tool_call>call:f{flag:true,n:3,r:0.5}<tool_call|><|tool_response>" in out
