"""`gemma4_eqx.serve` with the official `openai` client, against a server this module starts (uvicorn in a thread)
over the trained small checkpoint: chat plain and streamed, tool calls both ways, images, 16 concurrent greedy
requests equal to `g4.generate` for each alone, `echo` + `logprobs` equal to `g4.score`, and errors in OpenAI's
shape (400 / 404 / 429 / 503) with nothing lost for the other requests. lm-eval and the command line:
tests/test_serve_cli.py."""

import asyncio
import base64
import io
import json
import socket
import threading
import time

import requests
import numpy as np
import openai
import PIL.Image
import pytest
import uvicorn

import gemma4_eqx as g4
from gemma4_eqx.serve.app import create_app
from gemma4_eqx.serve.service import Service

PATH = g4.assets.SMALL_CHECKPOINT
NAME = "gemma4-small"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'


def scripted(body: dict) -> str | None:
    """The test hook: the model's reply to a user turn that offers tools is a call of get_weather (the small
    checkpoint never writes one by itself); anything else is generated."""
    if body.get("tools") and body["messages"][-1]["role"] == "user":
        return CALL
    return None


def start(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def model():
    return g4.load(PATH)


@pytest.fixture(scope="module")
def proc():
    return g4.Processor.from_pretrained(PATH)


@pytest.fixture(scope="module")
def service(model, proc):
    svc = Service(model, proc, name=NAME, slots=4, max_context=1024, generation_config=PATH,
                  reply_override=scripted)
    yield svc
    svc.close(drain=False)


@pytest.fixture(scope="module")
def url(service):
    server, thread, url = start(create_app(service))
    yield url
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def rendered(proc, messages, **kwargs) -> np.ndarray:
    batch = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True, **kwargs)
    return np.asarray(batch["input_ids"])[0]


def test_chat_plain_and_streamed(client):
    messages = [{"role": "system", "content": "You read licenses."},
                {"role": "user", "content": "What may I do with the software?"}]
    plain = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert plain.usage.completion_tokens == 24 and plain.object == "chat.completion"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_logprobs_and_stop(client):
    messages = [{"role": "user", "content": "Redistribution of the program"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob == max(t.logprob for t in entry.top_logprobs)
    text = r.choices[0].message.content
    word = text.split()[1]
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0, stop=[word])
    assert cut.choices[0].message.content == text[:text.index(word)].strip()
    assert cut.choices[0].finish_reason == "stop"


def test_tool_call_round_trip(client, proc):
    """The reply holding a call comes back as `tool_calls` (plain and streamed); the call and the tool's answer
    sent back are rendered as the chat template renders them."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.chat.completions.create(model=NAME, messages=ask, tools=TOOLS, max_tokens=16, temperature=0)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content is None
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(model=NAME, messages=ask, tools=TOOLS, max_tokens=16, temperature=0,
                                                 stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0 and deltas[0].id and deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    back = ask + [message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}]
    answer = client.chat.completions.create(model=NAME, messages=back, tools=TOOLS, max_tokens=8, temperature=0)
    expected = ask + [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": "Sunny, 21 C"}]
    ids = rendered(proc, expected, tools=TOOLS)
    assert answer.usage.prompt_tokens == len(ids)
    assert "<|tool_response>response:get_weather{value:" in proc.tokenizer.decode(ids)
    assert answer.choices[0].message.content is not None and not answer.choices[0].message.tool_calls


def test_image_message(client, proc, tmp_path):
    """An image as a data URL and as a file path: the same prompt as the processor renders, the same greedy reply."""
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path = tmp_path / "image.png"
    path.write_bytes(buf.getvalue())
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    replies = []
    for url in (data_url, str(path)):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What is shown?"}]}]
        r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
        replies.append(r.choices[0].message.content)
        ids = rendered(proc, [{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                            {"type": "text", "text": "What is shown?"}]}])
        assert r.usage.prompt_tokens == len(ids) and (ids == proc.tokenizer.convert_tokens_to_ids("<|image|>")).any()
    assert replies[0] == replies[1]
    with pytest.raises(openai.BadRequestError, match="remote image URLs"):
        client.chat.completions.create(model=NAME, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])


def test_concurrent_greedy_requests_equal_generate(url, model, proc):
    """16 requests at once (4 slots: most wait for one), prompts and lengths all different: each gets exactly the
    tokens `g4.generate` gives it alone."""
    words = (PATH / "heldout.txt").read_text().split()
    rng = np.random.default_rng(3)
    cases = []
    for i in range(16):
        start = int(rng.integers(0, len(words) - 120))
        text = " ".join(words[start:start + int(rng.integers(40, 70))])
        cases.append(([{"role": "user", "content": text}], int(rng.integers(4, 40))))

    async def ask_all():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
        return await asyncio.gather(*[client.chat.completions.create(
            model=NAME, messages=m, max_tokens=n, temperature=0, extra_body={"return_token_ids": True})
            for m, n in cases])

    results = asyncio.run(ask_all())
    for (messages, n), r in zip(cases, results):
        ids = rendered(proc, messages)
        ref = g4.generate(model, ids, max_new_tokens=n, temperature=0.0, generation_config=PATH,
                          return_result=True).sequences[0]
        assert r.choices[0].model_extra["token_ids"] == ref.tolist()
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref)


def test_completions_echo_logprobs_equal_score(client, model, proc):
    """`echo` + `logprobs` (lm-eval's loglikelihood request) gives `g4.score`'s log-probs of the prompt's tokens
    (after the <bos> the server puts in front), plus exactly one generated token with max_tokens=1."""
    texts = ["This License applies to any program", "You may convey verbatim copies of the Program's source code",
             "the Licensor"]
    r = client.completions.create(model=NAME, prompt=texts, max_tokens=1, echo=True, logprobs=1, temperature=0)
    tok = proc.tokenizer
    worst = 0.0
    for text, choice in zip(texts, sorted(r.choices, key=lambda c: c.index)):
        ids = tok.encode(text, add_special_tokens=False)
        ref = g4.score(model, [2], ids)
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1 and len(lp.top_logprobs) == len(ids) + 1
        worst = max(worst, float(np.abs(np.asarray(lp.token_logprobs[:-1]) - ref.logprobs).max()))
        assert choice.text.startswith(text)
        for t, (value, top) in enumerate(zip(lp.token_logprobs[:-1], lp.top_logprobs[:-1])):
            assert (value == max(top.values())) == bool(ref.greedy[t])  # lm-eval's is_greedy
    assert worst <= 1e-5, worst
    # token ids that start with <bos>: the first has no log-prob (null), as OpenAI echoes it
    ids = [2] + tok.encode(texts[0], add_special_tokens=False)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], g4.score(model, ids[:1], ids[1:]).logprobs, atol=1e-5)


def test_malformed_and_too_long_requests(client, url):
    """400 in OpenAI's shape naming the field (never FastAPI's 422), 404 for another model or route; the server
    answers normally after them."""
    raw = requests.post(url + "/v1/chat/completions", data=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    cases = [({"messages": "hi"}, "messages"), ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"},
                                                  "max_tokens"),
             ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
             ({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}, "top_p"),
             ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3}, "top_logprobs")]
    for body, param in cases:
        r = requests.post(url + "/v1/chat/completions", json={"model": NAME, **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"].startswith(param)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=NAME, max_tokens=64,
                                       messages=[{"role": "user", "content": "license " * 1100}])
    assert e.value.code == "context_length_exceeded" and "maximum context length is 1024" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert requests.get(url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=3)
    assert r.usage.completion_tokens <= 3


def test_cancelled_stream_frees_its_slot(client, url, service):
    """A client that drops its stream frees its slot at once; a request running beside it gets its own full
    answer, token for token what it gets alone."""
    beside = dict(model=NAME, messages=[{"role": "user", "content": "Copyright notice"}], max_tokens=40,
                  temperature=0, extra_body={"return_token_ids": True})
    alone = client.chat.completions.create(**beside).choices[0].model_extra["token_ids"]
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=client.chat.completions.create(**beside)))
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Warranty"}],
                                            max_tokens=400, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    thread.start()
    chunks = iter(stream)
    next(chunks), next(chunks)
    stream.close()  # the client goes away mid-answer
    thread.join(300)
    deadline = time.monotonic() + 30
    while service.engine.running:
        assert time.monotonic() < deadline, "the dropped stream's slot was not freed"
        time.sleep(0.05)
    assert result["r"].choices[0].model_extra["token_ids"] == alone


def test_full_queue_is_429(client, service):
    engine = service.engine
    engine.max_queue = 0
    streams = []
    try:
        for _ in range(engine.slots):
            streams.append(client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": "Licenses"}], max_tokens=900, stream=True,
                extra_body={"ignore_eos": True}))  # seconds of work: still running when the next one comes
            next(iter(streams[-1]))
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
    finally:
        engine.max_queue = 1024
        for s in streams:
            s.close()


def test_models_and_tokenizer_routes(client, url, proc):
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    info = requests.get(url + "/tokenizer_info").json()
    assert info["eos_token"] == "<eos>" and info["bos_token"] == "<bos>"
    tokens = requests.post(url + "/tokenize", json={"prompt": "<bos>The Program", "add_special_tokens": False}).json()
    assert tokens["tokens"] == proc.tokenizer.encode("<bos>The Program", add_special_tokens=False)
    assert requests.post(url + "/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "<bos>The Program"
    health = requests.get(url + "/health").json()
    assert health["status"] == "ready" and health["slots"] == 4


def test_loading_is_503():
    """Until the model is loaded every route answers 503 (the client retries it); a failed load says why."""
    release = threading.Event()

    def loader():
        release.wait(60)
        raise RuntimeError("no weights here")

    server, thread, url = start(create_app(loader=loader))
    try:
        r = requests.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading" and r.headers["retry-after"]
        assert requests.get(url + "/health").status_code == 503
        release.set()
        deadline = time.monotonic() + 30
        while requests.get(url + "/health").json()["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = requests.get(url + "/v1/models")
        assert r.status_code == 503 and "no weights here" in r.json()["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(30)


REPLIES = [
    "  Plain answer with trailing space  ",
    "<|channel>thought\nLet me think.\nStill thinking\n<channel|>The answer.",
    "Before <|channel>thought\nA<channel|> middle <|channel>thought\nB\n<channel|>after",
    'I will call. <|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>',
    '<|tool_call>call:a{x:1}<tool_call|><|tool_call>call:b{y:[1,2]}<tool_call|>',
    "<|tool_call>call:broken{x:<tool_call|> kept as text",
    "Cut here<turn|>not this",
]


@pytest.mark.parametrize("text", REPLIES)
def test_reply_stream_joins_to_parse_response(text):
    """Streamed in pieces of every size, the reply's content, reasoning and tool calls join to what the
    non-streamed answer gives (`parse_response`; a call that cannot be read stays text)."""
    from gemma4_eqx.serve import replies

    whole = replies.parse_reply(text)
    for size in (1, 2, 3, 7, len(text)):
        stream = replies.ReplyStream()
        parts = []
        for i in range(0, len(text), size):
            parts += stream.feed(text[i:i + size])
        parts += stream.feed("", final=True)
        content = "".join(v for k, v in parts if k == "content")
        reasoning = "".join(v for k, v in parts if k == "reasoning") or None
        calls = [v for k, v in parts if k == "tool_call"]
        if text.startswith("<|tool_call>call:broken"):  # parse_response refuses it: all of it is content
            assert calls == [] and content.startswith("<|tool_call>call:broken"), size
            continue
        assert (content, reasoning, calls) == (whole["content"], whole["reasoning"], whole["tool_calls"]), size


def test_stop_strings_and_detokenizer(proc):
    from gemma4_eqx.serve import replies

    stops = replies.StopStrings(["END", "\n\n"])
    out = "".join(stops.push(p) for p in ["abc E", "N", "xy E", "ND tail"])
    assert out == "abc ENxy " and stops.hit
    text = "Licensed work — naïve café 日本"
    ids = proc.tokenizer.encode(text, add_special_tokens=False)
    detok = replies.Detokenizer(proc.tokenizer, skip_special_tokens=True)
    pieces = [detok.push([t]) for t in ids] + [detok.flush()]
    assert "".join(pieces) == proc.tokenizer.decode(ids) and all("\ufffd" not in p for p in pieces)
