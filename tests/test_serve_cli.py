"""`gemma4-eqx serve` as a user runs it (a subprocess on the trained small checkpoint), with lm-evaluation-harness
(`lm-eval`, offline) running the repository's tasks (evals/) against it: `local-completions` (loglikelihood
multiple choice + generation) and `local-chat-completions` (generation). The multiple-choice accuracy equals the
one computed here directly with `g4.score`, request by request. Then Ctrl-C: the stream in flight finishes, the
server exits 0. The openai-client tests of the same server code: tests/test_serve.py."""

import glob
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import openai
import pytest
import requests

import gemma4_eqx as g4

ROOT = pathlib.Path(__file__).resolve().parent.parent
TASKS = ROOT / "evals" / "tasks"
NAME = "gemma4-small"
LM_EVAL = pathlib.Path(sys.executable).parent / "lm-eval"


def free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture(scope="module")
def server():
    """`python -m gemma4_eqx.cli serve` (the bundled small checkpoint is the default model), its stderr collected;
    yields (process, base URL, stderr lines) once it says it is ready."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gemma4_eqx.cli", "serve", "--port", str(port), "--slots", "4",
                             "--max-context", "512", "--served-model-name", NAME],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if "ready:" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    assert ready.wait(600) and proc.poll() is None, "".join(lines)
    yield proc, f"http://127.0.0.1:{port}", lines
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_startup_says_what_is_served(server):
    proc, url, lines = server
    text = "".join(lines)
    assert f"listening on {url}/v1" in text
    assert "loading" in text and f"ready: model '{NAME}'" in text and "4 slots x 512 tokens of context" in text
    assert requests.get(url + "/health").json()["status"] == "ready"


def lm_eval(url: str, out: pathlib.Path, model: str, endpoint: str, tasks: str, *extra: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(out / "hf"),
               TOKENIZERS_PARALLELISM="false")
    args = [str(LM_EVAL), "run", "--model", model, "--include_path", str(TASKS), "--tasks", tasks,
            "--model_args", f"model={NAME},base_url={url}{endpoint},max_retries=1,num_concurrent=4",
            "--output_path", str(out), "--log_samples", *extra]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900, cwd=out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    samples = {}
    for path in glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True):
        task = pathlib.Path(path).name.split("_20")[0].removeprefix("samples_")
        samples[task] = [json.loads(line) for line in open(path)]
    return {"results": json.load(open(results))["results"], "samples": samples}


def direct_mc(model, tokenizer) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """license_mc scored with `g4.score` on the tokens lm-eval sends (context_enc, then the rest of the whole
    text's encoding; the remote tokenizer adds no <bos>, the server puts one in front): (log-likelihoods
    [items, 4], accuracy per item, items)."""
    items = [json.loads(line) for line in open(TASKS / "license" / "license_mc.jsonl")]
    prompts, conts = [], []
    for item in items:
        context = tokenizer.encode(item["context"], add_special_tokens=False)
        for choice in item["choices"]:
            whole = tokenizer.encode(item["context"] + " " + choice, add_special_tokens=False)
            prompts.append([2] + context)
            conts.append(whole[len(context):])
    lls = g4.score(model, prompts, conts).sum.reshape(len(items), -1)
    correct = np.array([np.argmax(row) == item["gold"] for row, item in zip(lls, items)], float)
    return lls, correct, items


def test_lm_eval_runs_the_license_tasks(server, tmp_path):
    """lm-eval against the server: license_mc's accuracy equals the one from `g4.score`, every request's
    loglikelihood within 1e-4; license_gen runs through both endpoints."""
    proc, url, _ = server
    completions = lm_eval(url, tmp_path / "completions", "local-completions", "/v1/completions", "license",
                          "--batch_size", "1")
    chat = lm_eval(url, tmp_path / "chat", "local-chat-completions", "/v1/chat/completions", "license_gen",
                   "--apply_chat_template")
    model = g4.load(g4.assets.SMALL_CHECKPOINT)
    tokenizer = g4.Processor.from_pretrained(g4.assets.SMALL_CHECKPOINT).tokenizer
    lls, correct, items = direct_mc(model, tokenizer)
    acc = completions["results"]["license_mc"]["acc,none"]
    assert acc == pytest.approx(correct.mean(), abs=1e-12) and acc > 0.25  # chance is 0.25
    for sample in completions["samples"]["license_mc"]:
        theirs = [float(r[0][0]) for r in sample["resps"]]
        np.testing.assert_allclose(theirs, lls[sample["doc_id"]], atol=1e-4)
    for name, run in (("completions", completions), ("chat", chat)):
        metrics = run["results"]["license_gen"]
        assert {"exact_match,none", "first_word,none", "prefix_words,none"} <= set(metrics), name
        assert len(run["samples"]["license_gen"]) == 32
    assert completions["results"]["license_gen"]["first_word,none"] > 0  # the model continues its training text


def test_ctrl_c_drains_and_exits(server):
    """SIGINT: the stream in flight finishes (every token), then the process exits 0 saying so."""
    proc, url, lines = server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    stream = client.completions.create(model=NAME, prompt="This License", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = iter(stream)
    first = next(chunks)
    proc.send_signal(signal.SIGINT)
    rest = list(chunks)
    tokens = [t for c in [first] + rest for ch in c.choices for t in ch.model_extra.get("token_ids", [])]
    assert len(tokens) == 200 and rest[-1].choices[0].finish_reason == "length"
    assert proc.wait(60) == 0
    text = "".join(lines)
    assert "stopping: no new connections" in text and "stopped" in text


def test_serve_without_the_extra_says_what_to_install():
    code = ("import sys; sys.modules['fastapi'] = None; from gemma4_eqx.cli import main; "
            "sys.exit(main(['serve']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "pip install 'gemma4-eqx[serve]'" in done.stderr
