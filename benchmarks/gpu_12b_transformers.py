"""transformers on the same card as `benchmarks/gpu_12b.py`: the 12B shapes, random bf16 weights, prefill and decode.

    python3 benchmarks/gpu_12b_transformers.py --config CONFIG_JSON --out $OUT      # on the device (torch + transformers)
    .venv-hf/bin/python benchmarks/gpu_12b_transformers.py --config c.json --small   # CPU smoke run, small shapes

CONFIG_JSON is our preset written in transformers' format (`g4.Gemma4Config.gemma4_12b().save_pretrained(dir)`),
so both sides run exactly the same shapes. The model is built on the device directly in bf16 with random weights
(`attn_implementation="sdpa"`, eager PyTorch: what `from_pretrained(...).generate()` gives a user). Measured as our
script measures it: prefill of 8,192 tokens (median of 3 after a warm-up, `logits_to_keep=1`), and decode tokens/s
at batch 1 after 1,024- and 8,192-token prompts, as the difference of two greedy `generate` calls (1 and 1 + 32 new
tokens) divided by 32, so prefill is not counted. Each figure is appended to `<out>/gpu_12b_transformers.jsonl` as
soon as it exists (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="config.json of the preset (transformers' format)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--small", action="store_true", help="CPU smoke run: short prompts, fp32")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers.models.gemma4_unified import modeling_gemma4_unified as mg
    from transformers.models.gemma4_unified.configuration_gemma4_unified import Gemma4UnifiedConfig

    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "gpu_12b_transformers.jsonl"), "a")

    def add(key, value):
        log.write(json.dumps({"key": key, "value": value}) + "\n")
        log.flush()
        print(f"{key}: {value}", flush=True)

    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    dtype = torch.float32 if args.small else torch.bfloat16
    add("versions", dict(torch=torch.__version__, transformers=transformers.__version__, device=device,
                         card=torch.cuda.get_device_name() if device == "cuda" else "cpu"))
    with open(args.config) as f:
        config = Gemma4UnifiedConfig.from_dict(json.load(f))
    config._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    with torch.device(device):
        model = mg.Gemma4UnifiedForConditionalGeneration._from_config(config, dtype=dtype).eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    add("model.init_s", time.perf_counter() - t0)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.do_sample = None, 0, False
    gc.temperature, gc.top_k, gc.top_p = None, None, None
    vocab = config.text_config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)

    def prompt(n):
        return torch.randint(3, vocab - 16, (1, n), generator=gen).to(device)

    prefill_len = 256 if args.small else 8192
    ids = prompt(prefill_len)
    with torch.inference_mode():
        times = []
        for i in range(4):
            sync()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times[1:])
        add(f"prefill.{prefill_len}", dict(s=t, tokens_per_s=prefill_len / t, first_s=times[0]))
        if device == "cuda":
            add("prefill.peak_GiB", torch.cuda.max_memory_allocated() / 2**30)
        steps = 8 if args.small else 32
        for context in ((64, 128) if args.small else (1024, 8192)):
            ids = prompt(context)

            def generate(new):
                sync()
                t0 = time.perf_counter()
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                     min_new_tokens=new, do_sample=False)
                sync()
                assert out.shape[1] == context + new
                return time.perf_counter() - t0

            generate(1), generate(1 + steps)  # warm-up
            per = statistics.median((generate(1 + steps) - generate(1)) / steps for _ in range(3))
            add(f"decode.{context}", dict(ms_per_token=per * 1e3, tokens_per_s=1 / per))
    if device == "cuda":
        add("peak_device_memory_GiB", torch.cuda.max_memory_allocated() / 2**30)


if __name__ == "__main__":
    main()
