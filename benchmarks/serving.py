"""Serving with continuous batching (`gemma4_eqx.generate.engine.Engine`) vs one request at a time.

Requests of mixed prompt and output lengths arrive over time (Poisson arrivals, a fixed seed); the same arrivals
are served by an engine with N slots and by one with a single slot (each request alone, the others queued), both
warmed up first (compilation is not timed) and run from the engine's thread, as `gemma4-eqx serve` runs them.

    .venv/bin/python benchmarks/serving.py                         # 64 requests, 8 slots vs 1, small checkpoint
    .venv/bin/python benchmarks/serving.py --slots 4 8 --requests 32 --rate 20 --temperature 1.0
    .venv/bin/python benchmarks/serving.py --http                  # the same through gemma4-eqx serve's HTTP API
    .venv/bin/python benchmarks/serving.py --model /tmp/g4-vs-transformers/65m   # a bigger, bandwidth-bound model

The engine runs the model in the layout `gemma4-eqx serve` loads (`--layout serving`, the default). `--model`: any
checkpoint folder; one without a tokenizer (the random 65 M checkpoint `benchmarks/vs_transformers.py` writes) is
fed prompts made with the small checkpoint's tokenizer, whose ids are valid in any vocabulary of 1,024 or more.

Reports per configuration: the time from the first arrival to the last answer, generated tokens per second, time
to first token and latency (arrival to last token) at the 50th / 90th / 99th percentile, and the speed-up of each
configuration over one slot. Greedy runs check that every request got the same tokens in every configuration.
The machine (lscpu's model name, cores), the date and the load average before and after are printed: measure on
a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import threading
import time

import jax
import numpy as np

import gemma4_eqx as g4
from gemma4_eqx.generate.engine import Engine


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     platform.processor())
    except (OSError, subprocess.CalledProcessError):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores"


def workload(tokenizer, n: int, rate: float, seed: int, max_prompt: int = 200, max_new: int = 128,
             mean_new: float = 48.0) -> list[dict]:
    """n requests: prompts of held-out license text (<bos> first), half of 8-32 tokens and half of 64-`max_prompt`;
    8-`max_new` new tokens (8 + an exponential of mean `mean_new - 8`: most are short); arrival times of a Poisson
    process of `rate` requests per second."""
    words = (g4.assets.SMALL_CHECKPOINT / "heldout.txt").read_text().split()
    rng = np.random.default_rng(seed)
    at = np.cumsum(rng.exponential(1.0 / rate, n))
    at -= at[0]
    out = []
    for i in range(n):
        length = int(rng.choice([rng.integers(8, 33), rng.integers(64, max_prompt + 1)], p=[0.5, 0.5]))
        start = int(rng.integers(0, len(words) - 2 * length))
        ids = tokenizer.encode(" ".join(words[start:start + 2 * length]), add_special_tokens=False)[:length - 1]
        new = int(min(max_new, 8 + rng.exponential(mean_new - 8)))
        out.append(dict(at=float(at[i]), prompt=np.asarray([2] + ids, np.int32), max_new_tokens=new, seed=i))
    return out


def serve_engine(model, requests: list[dict], slots: int, max_context: int, temperature: float) -> dict:
    engine = Engine(model, slots=slots, max_context=max_context, generation_config=g4.assets.SMALL_CHECKPOINT)
    engine.warmup()
    engine.start()
    handles = []
    t0 = time.perf_counter()
    for r in requests:
        wait = t0 + r["at"] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        handles.append(engine.submit(r["prompt"], max_new_tokens=r["max_new_tokens"], temperature=temperature,
                                     seed=r["seed"]))
    results = [h.result(timeout=3600) for h in handles]
    engine.stop()
    arrivals = np.array([t0 + r["at"] for r in requests])
    return dict(tokens=[r.tokens for r in results], arrival=arrivals,
                first=np.array([r.first_token_at for r in results]), end=np.array([r.finished_at for r in results]),
                stats=dict(engine.stats))


def serve_http(model_path, requests: list[dict], slots: int, max_context: int, temperature: float) -> dict:
    """The same workload through `gemma4-eqx serve` (a subprocess) with the openai client, one thread per
    request (streamed, for the time to first token)."""
    import socket
    import sys

    import openai

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "gemma4_eqx.cli", "serve", "--model", str(model_path), "--port",
                             str(port), "--slots", str(slots), "--max-context", str(max_context)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "ready:" in line:
            break
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=3600)
    name = client.models.list().data[0].id
    n = len(requests)
    first, end, tokens = np.zeros(n), np.zeros(n), [None] * n

    def one(i: int, r: dict) -> None:
        got = []
        stream = client.completions.create(model=name, prompt=r["prompt"].tolist(),
                                           max_tokens=r["max_new_tokens"], temperature=temperature, seed=r["seed"],
                                           stream=True, extra_body={"return_token_ids": True})
        for chunk in stream:
            ids = chunk.choices[0].model_extra.get("token_ids") or []
            if ids and not got:
                first[i] = time.perf_counter()
            got += ids
        end[i], tokens[i] = time.perf_counter(), np.asarray(got)

    threads = []
    t0 = time.perf_counter()
    for i, r in enumerate(requests):
        wait = t0 + r["at"] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        threads.append(threading.Thread(target=one, args=(i, r)))
        threads[-1].start()
    for t in threads:
        t.join()
    proc.send_signal(2)
    proc.wait(60)
    return dict(tokens=tokens, arrival=np.array([t0 + r["at"] for r in requests]), first=first, end=end, stats={})


def step_cost(model, slots: int, max_context: int) -> float:
    """ms per decode step with every slot running (the best of 6 compiled chunks of 16 steps)."""
    from gemma4_eqx.generate.slots import decode_slots

    engine = Engine(model, slots=slots, max_context=max_context, generation_config=g4.assets.SMALL_CHECKPOINT)
    engine.warmup()
    for _ in range(slots):
        engine.submit(np.array([2] + [300, 301, 302] * 20, np.int32), max_new_tokens=max_context - 128,
                      temperature=0.0, stop_ids=())
    engine.step()  # admits every request, one chunk
    times = []
    for _ in range(6):
        t = time.perf_counter()
        engine.state, _, _ = decode_slots(engine._leaves, engine._treedef, engine.state, engine._params, np.int32(16),
                                          np.bool_(False), size=16)
        engine.state.done.block_until_ready()
        times.append(time.perf_counter() - t)
    return min(times) / 16 * 1e3


def summary(name: str, run: dict) -> dict:
    new = sum(len(t) for t in run["tokens"])
    wall = float(run["end"].max() - run["arrival"].min())
    ttft = run["first"] - run["arrival"]
    latency = run["end"] - run["arrival"]
    pct = lambda x: " / ".join(f"{np.percentile(x, q):.2f}" for q in (50, 90, 99))
    return dict(name=name, wall=wall, tokens=new, rate=new / wall, ttft=pct(ttft), latency=pct(latency))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--slots", type=int, nargs="+", default=[8])
    p.add_argument("--rate", type=float, default=50.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prompt", type=int, default=200, help="the longer half of the prompts: 64 to this")
    p.add_argument("--max-new", type=int, default=128)
    p.add_argument("--mean-new", type=float, default=48.0, help="mean max_new_tokens before the --max-new cap")
    p.add_argument("--http", action="store_true", help="through gemma4-eqx serve and the openai client")
    p.add_argument("--model", default=str(g4.assets.SMALL_CHECKPOINT), help="checkpoint folder (default: small)")
    p.add_argument("--layout", choices=["serving", "stored"], default="serving",
                   help="the model's layout (serving: what gemma4-eqx serve loads)")
    args = p.parse_args()

    path = args.model
    model = g4.load(path, layout=args.layout)
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer.json"))
    if args.http and not has_tokenizer:
        p.error(f"--http: {path} has no tokenizer.json, which gemma4-eqx serve needs")
    tokenizer = g4.Processor.from_pretrained(path if has_tokenizer else g4.assets.SMALL_CHECKPOINT).tokenizer
    requests = workload(tokenizer, args.requests, args.rate, args.seed, args.max_prompt, args.max_new, args.mean_new)
    prompt_lengths = [len(r["prompt"]) for r in requests]
    new_lengths = [r["max_new_tokens"] for r in requests]
    print(f"machine: {machine()}; {datetime.datetime.now().isoformat(timespec='minutes')}; load average before "
          f"{os.getloadavg()[0]:.2f}")
    text, megabytes = model.config.text, sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(model)) / 1e6
    print(f"model: {path} ({args.layout} layout; hidden {text.hidden_size}, {text.num_hidden_layers} layers, "
          f"vocabulary {text.vocab_size}, {megabytes:.1f} MB of weights)")
    print(f"workload: {args.requests} requests, {args.rate:g}/s Poisson arrivals over {requests[-1]['at']:.2f} s; "
          f"prompts {min(prompt_lengths)}-{max(prompt_lengths)} tokens (mean {np.mean(prompt_lengths):.0f}), "
          f"max_new_tokens {min(new_lengths)}-{max(new_lengths)} (mean {np.mean(new_lengths):.0f}); "
          f"temperature {args.temperature:g}; {'HTTP (gemma4-eqx serve + openai client)' if args.http else 'engine'}")
    serve = (lambda s: serve_http(path, requests, s, args.max_context, args.temperature)) if args.http else (
        lambda s: serve_engine(model, requests, s, args.max_context, args.temperature))
    runs = {1: serve(1)}
    for s in args.slots:
        runs[s] = serve(s)
    base = summary("1 slot (one at a time)", runs[1])
    rows = [base] + [summary(f"{s} slots", runs[s]) for s in args.slots]
    print("\n| serving | wall (s) | tokens | tokens/s | speed-up | TTFT p50 / p90 / p99 (s) | "
          "latency p50 / p90 / p99 (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['name']} | {row['wall']:.2f} | {row['tokens']} | {row['rate']:.0f} | "
              f"{base['wall'] / row['wall']:.2f}x | {row['ttft']} | {row['latency']} |")
    if args.temperature == 0:
        same = all(all(np.array_equal(a, b) for a, b in zip(runs[1]["tokens"], runs[s]["tokens"])) for s in args.slots)
        print(f"\ngreedy tokens identical in every configuration: {same}")
    for s, run in runs.items():
        if run["stats"]:
            print(f"{s} slot(s): {run['stats']}")
    if not args.http:
        costs = {s: step_cost(model, s, args.max_context) for s in [1] + args.slots}
        print("\ndecode step with every slot running: " + "; ".join(
            f"{s} slot(s) {c:.3f} ms ({s / c * 1e3:.0f} tokens/s, {s * costs[1] / c:.2f}x one slot's)"
            for s, c in costs.items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
