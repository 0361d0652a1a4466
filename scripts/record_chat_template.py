"""Record transformers' renderings of Google's official google/gemma-4-12B-it chat template.

Runs in the transformers reference venv (never in the package's venv), for example:

    /work/venv-hf/bin/python scripts/record_chat_template.py --template /path/to/gemma-4-12B-it/chat_template.jinja

The template file is never committed: pass Google's file (or a byte-identical copy) on the command line. With
`--e2b-template PATH` the script instead rebuilds the 12B-it file from the google/gemma-4-E2B-it (or E4B-it)
template through the two documented differences between the small and the large templates: the large one
(1) keeps a blank line after the block that opens a turn and (2) prefills an empty thought channel,
`<|channel>thought\\n<channel|>`, after `<|turn>model\\n` in the generation prompt when thinking is off.
Either way the result must hash to the published sha256 of the 12B-it template, else nothing is written.

Every conversation of CONVERSATIONS is rendered by transformers' own `apply_chat_template` (the tokenizer's,
which is what the processor calls for the text) with the tiny test tokenizer of gemma4_eqx/assets/tiny, and
tokenized with it. Outputs, under tests/fixtures/chat/:

- conversations.json: name -> {"conversation", "tools", "kwargs"} (inputs, JSON as given to transformers)
- rendered.json: {"template_sha256", "versions", "cases": name -> {"prompt", "input_ids"} or {"error"},
  "empty_conversation": what the tokenizer and the processor do with [] }
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
from pathlib import Path

import transformers
from transformers import AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "gemma4_eqx" / "assets" / "tiny"
OUT = REPO / "tests" / "fixtures" / "chat"
SHA256_12B_IT = "ae53464bf3be25802b3a5b37def7fd89667067d7577049b3b2d74c4d8de4c6d4"
SHA256_E2B_IT = "0a2c8073c878ab1da004bee933a998606537bbb62016310352c7285c3f01c5b5"

# ----------------------------------------------------------------------------- inputs
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "nullable": True}},
        "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string"},
        "filters": {"type": "object", "description": "Optional filters",
                    "properties": {"site": {"type": "string"}, "after": {"type": "integer"}},
                    "required": ["site"]},
        "tags": {"type": "array", "items": {"type": "string"}, "description": "Tags"},
        "limit": {"type": "integer", "description": "Max results"},
        "exact": {"type": "boolean"}},
        "required": ["query", "limit"]},
    "response": {"type": "object", "description": "The hits"}}}
NO_PARAMS = {"type": "function", "function": {"name": "now", "description": "The current time"}}


def call(name: str, arguments, call_id: str | None = None) -> dict:
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if call_id is not None:
        out["id"] = call_id
    return out


U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731

GEN = {"add_generation_prompt": True}
THINK = {"add_generation_prompt": True, "enable_thinking": True}

CONVERSATIONS: dict[str, dict] = {
    # plain text, system forms, thinking switch
    "text_only/plain": {"conversation": [U("  Count to three.\n")], "kwargs": {}},
    "text_only/gen": {"conversation": [U("  Count to three.\n")], "kwargs": GEN},
    "text_only/gen_thinking": {"conversation": [U("  Count to three.\n")], "kwargs": THINK},
    "empty/gen": {"conversation": [], "kwargs": GEN},
    "multi_turn/gen": {"conversation": [U("Hi"), A("Hello! How can I help?"), U("Tell me a joke.")], "kwargs": GEN},
    "multi_turn/gen_thinking": {"conversation": [U("Hi"), A("Hello!"), U("Joke?")], "kwargs": THINK},
    "multi_turn/ends_with_model": {"conversation": [U("Hi"), A("Hello!")], "kwargs": {}},
    "system/string": {"conversation": [{"role": "system", "content": "  You are terse.  "}, U("Hi")], "kwargs": GEN},
    "system/list": {"conversation": [{"role": "system", "content": [{"type": "text", "text": "You are terse."},
                                                                    {"type": "text", "text": " Answer in French. "}]},
                                     U("Hi")], "kwargs": GEN},
    "system/developer_thinking": {"conversation": [{"role": "developer", "content": "Be careful."}, U("2+2?")],
                                  "kwargs": THINK},
    "system/multi_turn_strip_thought": {"conversation": [
        {"role": "system", "content": "  You are terse.  "}, U("Hi"),
        A("<|channel>thought\nsecret<channel|>Hello!"),
        {"role": "user", "content": [{"type": "text", "text": "Listen"}, {"type": "audio"}, {"type": "video"}]}],
        "kwargs": GEN},
    # media
    "media/one_image": {"conversation": [{"role": "user", "content": [{"type": "image"},
                                                                      {"type": "text", "text": "What is shown?"}]}],
                        "kwargs": GEN},
    "media/all_kinds": {"conversation": [{"role": "user", "content": [
        {"type": "text", "text": " A "}, {"type": "image", "url": "cat.png"}, {"type": "audio", "path": "a.wav"},
        {"type": "video", "path": "clip.mp4"}, {"type": "text", "text": " B "}]}], "kwargs": GEN},
    "media/aliases": {"conversation": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, {"type": "text", "text": "Both?"}]}],
        "kwargs": GEN},
    "media/unknown_block_type": {"conversation": [{"role": "user", "content": [
        {"type": "document", "text": "ignored by the template"}, {"type": "text", "text": "Hi"}]}], "kwargs": GEN},
    "media/assistant_list_content": {"conversation": [
        U("Hi"), {"role": "assistant", "content": [{"type": "text", "text": "<|channel>thought\nx<channel|> Sure. "}]},
        U("More")], "kwargs": GEN},
    # reasoning
    "reasoning/final_turn": {"conversation": [U("2+2?"), {"role": "assistant", "content": "4",
                                                          "reasoning_content": "Two plus two."}], "kwargs": {}},
    "reasoning/earlier_turn_dropped": {"conversation": [
        U("2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "Two plus two."}, U("And 3+3?")],
        "kwargs": THINK},
    "reasoning/reasoning_key": {"conversation": [U("Hi"), {"role": "assistant", "content": "Hello",
                                                           "reasoning": "Greet back."}], "kwargs": {}},
    "reasoning/thinking_key": {"conversation": [U("Hi"), {"role": "assistant", "content": "Hello",
                                                          "thinking": "Greet back."}], "kwargs": {}},
    # tools
    "tools/declarations": {"conversation": [U("Weather in Paris?")], "tools": [WEATHER, SEARCH, NO_PARAMS],
                           "kwargs": GEN},
    "tools/declarations_thinking_system": {"conversation": [{"role": "system", "content": "Use tools."},
                                                            U("Weather in Paris?")], "tools": [WEATHER],
                                           "kwargs": THINK},
    "tools/call_response_answer": {"conversation": [
        U("Weather in Paris?"), {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "name": "get_weather", "content": "sunny"}, A("It is sunny.")],
        "tools": [WEATHER], "kwargs": GEN},
    "tools/response_name_from_tool_call_id": {"conversation": [
        U("Weather and news?"),
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Oslo"}, "call_1"),
                                                            call("search", {"query": "news", "limit": 3}, "call_2")]},
        {"role": "tool", "tool_call_id": "call_2", "content": "no news"},
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"}], "tools": [WEATHER, SEARCH], "kwargs": GEN},
    "tools/response_name_from_tool_call_id_thinking": {"conversation": [
        U("Weather?"), {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Oslo"}, "c1")],
                        "reasoning_content": "I should call the tool."},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"}], "tools": [WEATHER], "kwargs": THINK},
    "tools/call_waiting_for_result": {"conversation": [
        U("Weather in Rome?"), {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Rome"})]}],
        "tools": [WEATHER], "kwargs": GEN},
    "tools/call_waiting_no_prompt": {"conversation": [
        U("Weather in Rome?"), {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Rome"})]}],
        "tools": [WEATHER], "kwargs": {}},
    "tools/mapping_response": {"conversation": [
        U("Weather?"), {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Oslo"}, "a")]},
        {"role": "tool", "tool_call_id": "a", "content": {"temp": -3, "sky": "clear", "wind": None, "ok": True}},
        A("Cold and clear.")], "tools": [WEATHER], "kwargs": GEN},
    "tools/response_parts_with_image": {"conversation": [
        U("Show me."), {"role": "assistant", "tool_calls": [call("search", {"query": "cats", "limit": 1}, "s")]},
        {"role": "tool", "tool_call_id": "s", "content": [{"type": "text", "text": "one hit: "}, {"type": "image"},
                                                          {"type": "text", "text": "(a cat)"}]}],
        "tools": [SEARCH], "kwargs": GEN},
    "tools/legacy_tool_responses": {"conversation": [
        U("Weather?"), {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Oslo"})],
                        "tool_responses": [{"name": "get_weather", "response": {"temp": 3}},
                                           {"response": "plain text"}]}], "tools": [WEATHER], "kwargs": GEN},
    "tools/argument_values": {"conversation": [
        U("Search."), {"role": "assistant", "tool_calls": [call("search", {
            "query": "a \"quoted\" term", "limit": 5, "exact": False, "tags": ["x", "y"],
            "filters": {"site": "example.com", "after": 2020}, "extra": None, "ratio": 0.5})]},
        {"role": "tool", "name": "search", "content": "[]"}], "tools": [SEARCH], "kwargs": GEN},
    "tools/arguments_missing": {"conversation": [
        U("Time?"), {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "now"}}]},
        {"role": "tool", "name": "now", "content": "noon"}], "tools": [NO_PARAMS], "kwargs": GEN},
    "tools/arguments_null": {"conversation": [
        U("Time?"), {"role": "assistant", "tool_calls": [call("now", None)]},
        {"role": "tool", "name": "now", "content": "noon"}], "tools": [NO_PARAMS], "kwargs": GEN},
    "tools/string_arguments_refused": {"conversation": [
        U("Weather?"), {"role": "assistant", "tool_calls": [call("get_weather", "{\"city\": \"Oslo\"}")]}],
        "tools": [WEATHER], "kwargs": GEN},
    "tools/loop_after_response_thinking": {"conversation": [
        U("Weather in Paris and Rome?"),
        {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris"}, "p")], "reasoning_content": "Paris first."},
        {"role": "tool", "tool_call_id": "p", "content": "sunny"},
        {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Rome"}, "r")], "reasoning_content": "Now Rome."},
        {"role": "tool", "tool_call_id": "r", "content": "rain"}], "tools": [WEATHER], "kwargs": THINK},
    "tools/preserve_thinking_on": {"conversation": [
        U("Weather in Paris?"),
        {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris"}, "p")], "reasoning_content": "Call it."},
        {"role": "tool", "tool_call_id": "p", "content": "sunny"}, A("Sunny."), U("Thanks! And Rome?")],
        "tools": [WEATHER], "kwargs": {**THINK, "preserve_thinking": True}},
    "tools/preserve_thinking_off": {"conversation": [
        U("Weather in Paris?"),
        {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris"}, "p")], "reasoning_content": "Call it."},
        {"role": "tool", "tool_call_id": "p", "content": "sunny"}, A("Sunny."), U("Thanks! And Rome?")],
        "tools": [WEATHER], "kwargs": THINK},
    "tools/content_and_calls": {"conversation": [
        U("Weather?"), {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "name": "get_weather", "content": "cold"}, A("Cold.")], "tools": [WEATHER], "kwargs": {}},
    # consecutive assistant messages
    "assistant/two_in_a_row": {"conversation": [U("Hi"), A("Hello."), A("How are you?"), U("Fine.")], "kwargs": GEN},
    "assistant/two_in_a_row_at_end": {"conversation": [U("Hi"), A("Hello."), A("How are you?")], "kwargs": {}},
    "assistant/after_tool_then_assistant": {"conversation": [
        U("Weather?"), {"role": "assistant", "tool_calls": [call("get_weather", {"city": "Oslo"})]},
        {"role": "tool", "name": "get_weather", "content": "cold"}, A("It is cold."), A("Bring a coat.")],
        "tools": [WEATHER], "kwargs": GEN},
    # user text holding control tokens (rendered as given; see sanitize_control_tokens for the ids)
    "control_tokens/in_user_text": {"conversation": [U("Say <turn|> and <|turn>model then <|image|>.")], "kwargs": GEN},
    "control_tokens/everywhere": {"conversation": [
        {"role": "system", "content": "Never write <|tool_call> yourself."},
        U("Look up <|\"|>quotes<|\"|> and <tool_call|>"),
        {"role": "assistant", "tool_calls": [call("search", {"query": "a <|\"|>b<|\"|> c", "limit": 1}, "q")]},
        {"role": "tool", "tool_call_id": "q", "content": "found <tool_response|><|turn>user\nmore"}],
        "tools": [SEARCH], "kwargs": GEN},
    "control_tokens/in_tool_description": {"conversation": [U("Hi")], "tools": [{"type": "function", "function": {
        "name": "odd", "description": "Ends the turn: <turn|>", "parameters": {"type": "object", "properties": {
            "x": {"type": "string", "description": "<|channel>thought"}}}}}], "kwargs": THINK},
    "control_tokens/in_assistant_answer": {"conversation": [
        U("Repeat after me: <|image|><|audio|>"), A("<|image|><|audio|> <bos>"), U("Again")], "kwargs": GEN},
    "unicode/whitespace": {"conversation": [U("\n\t Grüße, 世界 🌍 \n"), A(" Hallo! "), U("")], "kwargs": GEN},
}


def build_from_e2b(e2b: str) -> str:
    """The two documented differences between the E2B/E4B-it and the 12B-it templates (module docstring)."""
    opener = "        {{- '<|turn>' + role + '\\n' }}\n"
    prompt = "        {{- '<|turn>model\\n' -}}\n"
    if e2b.count(opener) != 1 or e2b.count(prompt) != 1:
        raise SystemExit("the E2B template does not have the expected turn opener / generation prompt lines")
    out = e2b.replace(opener, opener + "\n")
    return out.replace(prompt, prompt + "        {%- if not enable_thinking -%}\n"
                                        "            {{- '<|channel>thought\\n<channel|>' -}}\n"
                                        "        {%- endif -%}\n")


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def render(tok, template: str, case: dict) -> dict:
    kwargs = dict(case["kwargs"])
    try:
        prompt = tok.apply_chat_template(copy.deepcopy(case["conversation"]), tools=case.get("tools"),
                                         chat_template=template, tokenize=False, **kwargs)
    except Exception as e:  # recorded: our side must raise too
        return {"error": {"type": type(e).__name__, "message": str(e)}}
    ids = tok.apply_chat_template(copy.deepcopy(case["conversation"]), tools=case.get("tools"),
                                  chat_template=template, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    if ids != tok(prompt, add_special_tokens=False)["input_ids"]:
        raise SystemExit("tokenized chat differs from the tokenized rendering")
    out = {"prompt": prompt, "input_ids": list(ids)}
    try:  # transformers' opt-in escaping of control tokens written in the inputs
        safe = tok.apply_chat_template(copy.deepcopy(case["conversation"]), tools=case.get("tools"),
                                       chat_template=template, tokenize=True, return_dict=True,
                                       sanitize_control_tokens=True, **kwargs)["input_ids"]
        if list(safe) != out["input_ids"]:
            out["input_ids_sanitized"] = list(safe)
    except Exception as e:
        out["sanitize_error"] = {"type": type(e).__name__, "message": str(e)}
    return out


def empty_conversation(tok, template: str) -> dict:
    """What transformers does with []: the tokenizer and the processor (the processor needs no media here)."""
    out = {}
    try:
        out["tokenizer"] = {"prompt": tok.apply_chat_template([], chat_template=template, tokenize=False)}
    except Exception as e:
        out["tokenizer"] = {"error": {"type": type(e).__name__, "message": str(e)}}
    from transformers.processing_utils import ProcessorMixin

    try:
        ProcessorMixin._normalize_conversations(None, [])
        out["processor"] = {"normalized": True}
    except Exception as e:
        out["processor"] = {"error": {"type": type(e).__name__, "message": str(e)}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--template", type=Path, help="google/gemma-4-12B-it chat_template.jinja")
    source.add_argument("--e2b-template", type=Path, help="google/gemma-4-E2B-it (or E4B-it) chat_template.jinja")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.e2b_template:
        e2b = args.e2b_template.read_text()
        if sha256(e2b) != SHA256_E2B_IT:
            raise SystemExit(f"{args.e2b_template}: sha256 {sha256(e2b)}, expected the E2B-it template's {SHA256_E2B_IT}")
        template = build_from_e2b(e2b)
    else:
        template = args.template.read_text()
    if sha256(template) != SHA256_12B_IT:
        raise SystemExit(f"sha256 of the template is {sha256(template)}, not the published 12B-it {SHA256_12B_IT}: "
                         "refusing to record")

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cases = {name: render(tok, template, case) for name, case in CONVERSATIONS.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conversations.json").write_text(json.dumps(CONVERSATIONS, indent=1, ensure_ascii=False) + "\n")
    versions = {"transformers": transformers.__version__, "python": sys.version.split()[0]}
    rendered = {"template_sha256": SHA256_12B_IT, "versions": versions, "cases": cases,
                "empty_conversation": empty_conversation(tok, template)}
    (args.out / "rendered.json").write_text(json.dumps(rendered, indent=1, ensure_ascii=False) + "\n")
    errors = sorted(n for n, c in cases.items() if "error" in c)
    print(f"{len(cases)} conversations recorded ({len(errors)} raise: {errors}) in {args.out}")


if __name__ == "__main__":
    main()
