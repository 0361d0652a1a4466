"""Differential check of the built-in chat template against Google's 12B-it template on random conversations.

    .venv/bin/python scripts/fuzz_chat_template.py /path/to/gemma-4-12B-it/chat_template.jinja [seed] [cases]

Both templates are rendered in the package's sandbox (the one transformers uses) on random messages, tools,
tool calls and results, content blocks and keyword switches, odd ones included (missing fields, numbers as
tool results, schemas without properties); every rendering, and every error message, must be the same.
The official file is not in the repository (pass it on the command line; its sha256 is checked).
"""
import copy
import hashlib
import json
import random
import sys

from gemma4_eqx.processing.chat_template import builtin_template, render_chat_template

OFF = open(sys.argv[1]).read()
if hashlib.sha256(OFF.encode()).hexdigest() != "ae53464bf3be25802b3a5b37def7fd89667067d7577049b3b2d74c4d8de4c6d4":
    raise SystemExit(f"{sys.argv[1]} is not the google/gemma-4-12B-it template (sha256 differs)")
OURS = builtin_template()
SP = {"bos_token": "<bos>", "eos_token": "<eos>"}
R = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
def word(): return R.choice(["", " ", "hi", "a b", " x\n", "<|channel>t<channel|>ans", "q\"u", "Ünï", "<channel|>z", "<|channel>open"])
def val(d=0):
    c = R.randrange(8 if d < 2 else 5)
    return [lambda: word(), lambda: R.randint(-5, 99), lambda: R.choice([True, False]), lambda: None, lambda: R.choice([0.5, 1e-3, 2.0]),
            lambda: [val(d+1) for _ in range(R.randrange(3))], lambda: {R.choice(["k", "B", "a", "Z"]) + str(i): val(d+1) for i in range(R.randrange(3))},
            lambda: {"type": "text", "text": word()}][c]()
def schema(d=0):
    t = R.choice(["string", "integer", "number", "boolean", "array", "object", "STRING", ["string", "null"], None])
    s = {}
    if t is not None: s["type"] = t
    if R.random() < .5: s["description"] = word()
    if R.random() < .3: s["enum"] = [word(), word()]
    if R.random() < .3: s["nullable"] = R.choice([True, False])
    if t in ("array",) or R.random() < .2:
        s["items"] = R.choice([{}, {"type": R.choice(["string", ["a", "b"]])}, {"type": "object", "properties": {"p": schema(d+1)} if d < 2 else {}, "required": ["p"]}, {"x": None, "extra": [1, "a"]}, "notmap"])
    if t in ("object", None) and d < 2:
        if R.random() < .7: s["properties"] = {R.choice(["b", "A", "c", "description"]) + str(i): schema(d+1) for i in range(R.randrange(3))}
        else: s["weird"] = schema(d+1)
        if R.random() < .5: s["required"] = ["b0", "x"]
    return s
def tool():
    f = {"name": R.choice(["f", "get_x", "now"])}
    if R.random() < .8: f["description"] = word()
    if R.random() < .8:
        p = {}
        if R.random() < .8: p["type"] = R.choice(["object", "OBJECT"])
        if R.random() < .8: p["properties"] = {("p%d" % i): schema() for i in range(R.randrange(4))}
        if R.random() < .5: p["required"] = ["p0"]
        f["parameters"] = p if R.random() < .9 else {}
    if R.random() < .3: f["response"] = R.choice([{"type": "object", "description": word()}, {"type": "string"}, {}])
    return {"type": "function", "function": f}
def content():
    c = R.randrange(4)
    if c == 0: return word()
    if c == 1: return None
    return [R.choice([{"type": "text", "text": word()}, {"type": "image"}, {"type": "audio"}, {"type": "video"}, {"type": "image_url", "image_url": {"url": "u"}}, {"type": "input_audio"}]) for _ in range(R.randrange(4))]
def message(i, ids):
    role = R.choice(["user", "assistant", "assistant", "tool", "tool", "system", "developer", "model"])
    m = {"role": role}
    cc = content()
    if cc is not None: m["content"] = cc
    if role == "assistant":
        if R.random() < .5:
            calls = []
            for j in range(R.randrange(1, 3)):
                cid = "c%d" % R.randrange(3)
                call = {"type": "function", "function": {"name": R.choice(["f", "g"]), "arguments": R.choice([{}, {"a": val(), "B": val()}, None, {"z": {"n": val()}}])}}
                if R.random() < .7: call["id"] = cid
                calls.append(call)
            m["tool_calls"] = calls
        if R.random() < .4: m[R.choice(["reasoning_content", "reasoning", "thinking"])] = word() or "r"
        if R.random() < .1: m["tool_responses"] = [{"name": R.choice(["f", None, ""]), "response": val()} for _ in range(R.randrange(1, 3))]
    if role == "tool":
        if R.random() < .5: m["tool_call_id"] = "c%d" % R.randrange(3)
        if R.random() < .5: m["name"] = R.choice(["f", "", "g"])
        m["content"] = R.choice([word(), [{"type": "text", "text": word()}, {"type": "image"}], R.randint(0, 9), [], [{"type": "text"}]])
    return m
def kwargs():
    k = {"add_generation_prompt": R.random() < .6}
    if R.random() < .5: k["enable_thinking"] = R.choice([True, False])
    if R.random() < .3: k["preserve_thinking"] = R.choice([True, False])
    return k
n = bad = errs = 0
for it in range(int(sys.argv[3]) if len(sys.argv) > 3 else 2000):
    conv = [message(i, None) for i in range(R.randrange(0, 7))]
    tools = [tool() for _ in range(R.randrange(3))] if R.random() < .5 else None
    kw = kwargs()
    outs = []
    for tpl in (OFF, OURS):
        try: outs.append(("ok", render_chat_template(tpl, copy.deepcopy(conv), tools=copy.deepcopy(tools), special_tokens=SP, **kw)))
        except Exception as e: outs.append(("err", type(e).__name__ + ": " + str(e)))
    n += 1
    if outs[0][0] == "err": errs += 1
    if outs[0] != outs[1]:
        bad += 1
        if bad <= 3:
            print("MISMATCH", json.dumps(conv)[:1500], json.dumps(tools)[:800], kw)
            print(" OFF:", repr(outs[0][1])[:1500]); print(" OUR:", repr(outs[1][1])[:1500])
print("cases", n, "mismatches", bad, "official errors", errs)
sys.exit(1 if bad else 0)
