#!/usr/bin/env python
"""Load a base checkpoint + a PEFT adapter folder in transformers + PEFT and write the logits: the PEFT oracle.

For tests that check that an adapter written by gemma4-eqx loads in PEFT (``PeftModel.from_pretrained``) and
gives our logits. Runs in ``.venv-hf`` with ``peft`` installed (see DEVELOPERS.md), fp32, eager attention, CPU;
each sequence alone (batch of 1, no attention mask)::

    .venv-hf/bin/python scripts/peft_oracle.py --base gemma4_eqx/assets/small \\
        --adapter tests/fixtures/peft/adapter --ids '[[2, 841, 872], [2, 672]]' --out /tmp/peft.npz

``--ids``: a JSON list of token ids (one sequence) or of lists (several), as transformers takes them (``<bos>``
included), or ``@file.json`` holding that JSON. Writes ``--out`` (npz): ``ids/<i>`` (int32), ``logits/<i>``
(float32 ``[len, vocab]``), ``meta`` (0-d JSON: versions, and PEFT's ``r`` / ``scaling`` for every module it
adapted, by module path in transformers' model).

Stricter than PEFT, which loads some broken adapters with at most a warning: exits with status 1 and one line
``peft_oracle: <problem>`` on stderr (the last line) when PEFT raises while reading the config or the weights,
when the config has keys this PEFT does not know, when no module was adapted, when a module PEFT wrapped (from
``target_modules``) has no tensors in the file (it keeps its random or zero init; PEFT only warns), when the file
holds a tensor that no wrapped module takes (PEFT drops it silently), when the tensor names are not exactly the
ones ``save_pretrained`` writes (PEFT 0.21.2 also takes names without the ``base_model.model.`` prefix or with the
adapter name ``.default.`` inserted, but writes neither), or when a loaded LoRA weight differs from the file's.
Status 2 is a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings


def fail(msg: str) -> None:
    sys.stderr.flush()
    sys.exit(f"peft_oracle: {' '.join(str(msg).split())}")


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    head = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
    return f"{type(exc).__name__}: {head}"


def parse_ids(text: str) -> list[list[int]]:
    if text.startswith("@"):
        try:
            with open(text[1:]) as f:
                text = f.read()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"--ids {text}: {e.strerror}") from None
    try:
        ids = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--ids is not JSON: {e}") from None
    if isinstance(ids, list) and ids and all(isinstance(t, int) for t in ids):
        ids = [ids]
    if not (isinstance(ids, list) and ids and all(isinstance(s, list) and s and all(isinstance(t, int) for t in s)
                                                  for s in ids)):
        raise argparse.ArgumentTypeError("--ids must be a non-empty list of ints or of non-empty lists of ints")
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="transformers checkpoint folder (config.json + safetensors)")
    ap.add_argument("--adapter", required=True, help="PEFT adapter folder (adapter_config.json + "
                                                     "adapter_model.safetensors)")
    ap.add_argument("--ids", required=True, type=parse_ids, help="JSON list of ids, or of lists; or @file.json")
    ap.add_argument("--out", required=True, help="npz to write")
    args = ap.parse_args()

    import numpy as np
    import peft
    import torch
    import transformers
    from peft import PeftConfig, PeftModel
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not os.path.isfile(os.path.join(args.adapter, name)):
            fail(f"{args.adapter} has no {name}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = PeftConfig.from_pretrained(args.adapter)
        except Exception as e:  # noqa: BLE001 - any rejection is reported as one line
            fail(f"adapter_config.json rejected: {first_line(e)}")
    unknown = [str(w.message) for w in caught if "Unexpected keyword arguments" in str(w.message)]
    if unknown:
        fail(f"adapter_config.json has keys peft {peft.__version__} does not know: {unknown[0].split(' for ')[0]}")
    try:
        file_tensors = load_file(os.path.join(args.adapter, "adapter_model.safetensors"))
    except Exception as e:  # noqa: BLE001
        fail(f"adapter_model.safetensors unreadable: {first_line(e)}")

    try:
        arch = transformers.AutoConfig.from_pretrained(args.base).architectures[0]
        base = getattr(transformers, arch).from_pretrained(args.base, dtype=torch.float32,
                                                           attn_implementation="eager").eval()
    except Exception as e:  # noqa: BLE001
        fail(f"base checkpoint {args.base} does not load: {first_line(e)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = PeftModel.from_pretrained(base, args.adapter).eval()
        except Exception as e:  # noqa: BLE001
            fail(f"PEFT rejected the adapter: {first_line(e)}")
    missing_warning = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]

    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)} if config.peft_type == "LORA" else {}
    canonical = get_peft_model_state_dict(model)  # names and values as save_pretrained would write them
    if not canonical:
        fail(f"no module adapted (target_modules {config.target_modules!r} matched nothing)")
    if missing_warning:  # PEFT's own signal: wrapped modules that found no tensor keep their init
        keys = re.findall(r"'([^']+)'", missing_warning[0])
        fail(f"PEFT found no tensor for {len(keys)} adapted weights (they keep their init; PEFT only warns), "
             f"e.g. {keys[:3]}")
    # PEFT drops file tensors that fit no wrapped module without a word: load the file again (same values) to
    # get load_state_dict's unexpected keys, which are the dropped tensors after PEFT's renaming
    dropped = set_peft_model_state_dict(model, file_tensors).unexpected_keys
    if dropped:
        fail(f"{len(dropped)} tensors in adapter_model.safetensors that no adapted module takes (PEFT drops "
             f"them), e.g. {sorted(dropped)[:3]}")
    if set(file_tensors) != set(canonical):
        odd = sorted(set(file_tensors) - set(canonical))
        fail(f"tensor names are not PEFT's own: {len(odd)} like {odd[:2]} (PEFT {peft.__version__} loads them, "
             f"but save_pretrained names them like {sorted(set(canonical) - set(file_tensors))[:2]})")
    for key, loaded in canonical.items():
        if not torch.equal(loaded, file_tensors[key].to(loaded.dtype)):
            fail(f"{key}: the loaded weight differs from the file's")

    arrays, meta_modules = {}, {}
    for path, m in sorted(layers.items()):
        name = model.active_adapter
        meta_modules[path] = {"r": int(m.r[name]), "scaling": float(m.scaling[name])}
    with torch.no_grad():
        for i, seq in enumerate(args.ids):
            x = torch.tensor([seq], dtype=torch.long)
            arrays[f"ids/{i}"] = np.asarray(seq, np.int32)
            arrays[f"logits/{i}"] = model(input_ids=x, use_cache=False).logits[0].numpy()
    meta = {"base": args.base, "adapter": args.adapter, "dtype": "float32", "attn_implementation": "eager",
            "peft": peft.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "modules": meta_modules, "script": "scripts/peft_oracle.py"}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez(args.out, **arrays)
    print(f"peft_oracle: {len(meta_modules)} modules adapted, {len(args.ids)} sequences -> {args.out}")


if __name__ == "__main__":
    main()
