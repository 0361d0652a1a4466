"""What each `gemma4-eqx` command does, once `cli.main` has parsed and checked its flags (`cli.checks`): info,
generate, chat, verify, convert, serve. Each takes the parsed `argparse.Namespace` and returns the exit status."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..assets import SMALL_CHECKPOINT
from .checks import CliError, as_flag, check_cache_fits


def _resolve_model(name: str | None) -> str:
    return os.fspath(SMALL_CHECKPOINT) if name is None else name


def _jnp_dtype(name: str | None) -> Any:
    import jax.numpy as jnp

    return None if name is None else {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def cmd_info(args: argparse.Namespace) -> int:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from ..config.gemma4 import Gemma4Config
    from ..io import hub
    from ..model.cache import cache_bytes
    from ..model.gemma4 import Gemma4, count_parameters

    name = _resolve_model(args.model)
    if os.path.isfile(name):  # a bare config.json is enough: nothing else is read
        cfg = Gemma4Config.from_pretrained(name)
    else:
        cfg = Gemma4Config.from_pretrained(hub.resolve(name, allow_patterns=("config.json",)))
    dtype = _jnp_dtype(args.dtype) or jnp.bfloat16
    abstract = eqx.filter_eval_shape(lambda: Gemma4(cfg, key=jax.random.key(0), dtype=dtype))
    total = count_parameters(abstract)
    mm = count_parameters(abstract.embed_vision) + count_parameters(abstract.embed_audio)
    t = cfg.text
    n_full = sum(lt == "full_attention" for lt in t.layer_types)
    itemsize = jnp.dtype(dtype).itemsize
    info = {
        "model": _resolve_model(args.model),
        "layers": f"{t.num_hidden_layers} ({t.num_hidden_layers - n_full} sliding, {n_full} full)",
        "layer pattern": [(kind.value, n) for kind, n in abstract.layers.pattern], "pattern repeats": abstract.layers.num_repeats,
        "hidden / intermediate": f"{t.hidden_size} / {t.intermediate_size}",
        "sliding attention": f"{t.num_attention_heads} q heads x {t.head_dim}, {t.num_key_value_heads} kv heads, "
                             f"window {t.sliding_window}",
        "full attention": f"{t.num_attention_heads} q heads x {t.global_head_dim}, "
                          f"{t.layer_geometry_for_type('full_attention').num_key_value_heads} kv head(s), "
                          f"keys as values: {t.attention_k_eq_v}",
        "vocab": t.vocab_size, "final logit softcap": t.final_logit_softcapping,
        "parameters (total)": f"{total:,}", "parameters (text)": f"{total - mm:,}",
        "parameters (vision + audio)": f"{mm:,}",
        f"weights in {jnp.dtype(dtype).name}": f"{total * itemsize / 2**30:.2f} GiB",
    }
    from ..quant.format import QuantError
    from ..quant.modules import quantize, weight_bytes

    for mode, what in (("int8", "per channel"), ("int4", "groups of 32, fp16 scales")):
        try:  # a mode the config's shapes do not allow (e.g. 48 input features in groups of 32) is "n/a: why"
            mem = [weight_bytes(eqx.filter_eval_shape(lambda m, mode=mode, emb=emb: quantize(m, mode, embedding=emb), abstract))
                   for emb in (True, False)]
            value = f"{mem[0] / 2**30:.2f} GiB / {mem[1] / 2**30:.2f} GiB"
        except QuantError as e:
            value = f"n/a: {str(e).split(': ', 1)[-1].split('; ')[0]}"
        info[f"weights in {mode} ({what}; embedding {mode} / {jnp.dtype(dtype).name})"] = value
    for ctx in args.context:
        raw, separate = (cache_bytes(cfg, ctx, dtype, raw_keys=r) / 2**30 for r in (True, False))
        label = f"KV cache at {ctx:,} tokens (batch 1, {jnp.dtype(dtype).name})"
        info[label] = f"{raw:.3f} GiB" if raw == separate else f"{raw:.3f} GiB (raw keys; {separate:.3f} GiB with K and V)"
        info[f"KV cache at {ctx:,} tokens (batch 1, int8, KVCache.init(int8=True))"] = (
            f"{cache_bytes(cfg, ctx, dtype, int8=True) / 2**30:.3f} GiB")
    if args.json:
        print(json.dumps({k: str(v) for k, v in info.items()}, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0


def _generation_defaults(folder: str, vocab_size: int | None = None) -> dict[str, Any]:
    """stop ids, suppressed ids and sampling defaults from the checkpoint's generation_config.json, if any; each
    value checked by `generate.settings` (a NaN temperature, a string id or, given `vocab_size`, an id outside the
    vocabulary there is an error naming the file and the field)."""
    from ..config.fields import read_config_file
    from ..generate import settings
    from ..utils.files import FileMissingError

    path = os.path.join(folder, "generation_config.json")
    try:  # through utils.files: a regular file of at most 8 MiB, the folder's symlink rule
        g, path = read_config_file(folder, CliError, name="generation_config.json")
    except FileMissingError:
        return {}
    if not isinstance(g, dict):
        raise CliError(f"{path}: expected a JSON object")

    def bad(key: str, what: str) -> CliError:
        return CliError(f"{path}: {key}: expected {what}, found {json.dumps(g[key])[:60]}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    out: dict[str, Any] = {}
    if g.get("eos_token_id") is not None:
        eos = g["eos_token_id"]
        ids = eos if isinstance(eos, list) else [eos]
        if not ids or not all(map(is_int, ids)):
            raise bad("eos_token_id", "a token id or a non-empty list of token ids")
        out["stop_ids"] = tuple(ids)
    if g.get("suppress_tokens") is not None:
        if not isinstance(g["suppress_tokens"], list) or not all(map(is_int, g["suppress_tokens"])):
            raise bad("suppress_tokens", "a list of token ids")
        out["suppress_ids"] = tuple(g["suppress_tokens"])
    try:  # the rules generate applies, read here so that a bad file is refused before the model loads
        for key, check in (("temperature", settings.check_temperature), ("top_k", settings.check_top_k),
                           ("top_p", settings.check_top_p)):
            if g.get(key) is not None:
                out[key] = check(g[key])
        if vocab_size is not None:
            settings.check_token_ids(out.get("stop_ids", ()), "eos_token_id", vocab_size)
            settings.check_suppress_ids(out.get("suppress_ids", ()), vocab_size, "suppress_tokens")
            if g.get("pad_token_id") is not None:
                settings.check_pad_id(g["pad_token_id"], vocab_size, "pad_token_id")
    except settings.SettingsError as e:
        raise CliError(f"{path}: {e}") from None
    if "do_sample" in g and not isinstance(g["do_sample"], bool):
        raise bad("do_sample", "true or false")
    if g.get("do_sample") is False:
        out["temperature"] = 0.0
    if out.get("top_k") == 0:
        out["top_k"] = None  # transformers' convention: 0 turns top-k off
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    import time

    import jax
    import numpy as np

    from ..config.gemma4 import Gemma4Config
    from ..generate.generation import generate
    from ..generate.settings import SettingsError, check_max_new_tokens
    from ..generate.streaming import TextStreamer
    from ..io import hub
    from ..processing import Processor, load_audio

    name = _resolve_model(args.model)
    folder = hub.resolve(name, allow_patterns=hub.MODEL_FILES + hub.PROCESSOR_FILES)
    cfg = Gemma4Config.from_pretrained(folder)
    _generation_defaults(folder, cfg.text.vocab_size)  # a bad field is one line naming it; generate reads it below
    proc = Processor.from_pretrained(folder)  # the prompt is rendered before the load: its length is checked too
    content = []
    for image in args.image or []:
        content.append({"type": "image", "image": image})
    for audio in args.audio or []:
        content.append({"type": "audio", "audio": load_audio(audio, resample=args.resample, downmix=args.downmix)})
    content.append({"type": "text", "text": args.prompt})
    conversation = []
    if args.system:
        conversation.append({"role": "system", "content": args.system})
    conversation.append({"role": "user", "content": content})
    batch = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     enable_thinking=args.thinking)
    inputs = {k: np.asarray(v)[0] for k, v in batch.items()
              if k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for k in ("pixel_values", "image_position_ids", "input_features", "input_features_mask",
              "pixel_values_videos", "video_position_ids"):
        if batch.get(k) is not None:
            inputs[k] = np.asarray(batch[k])
    ids = inputs.pop("input_ids")
    try:
        check_max_new_tokens(args.max_new_tokens, prompt_length=len(ids), context=cfg.text.max_position_embeddings)
    except SettingsError as e:
        raise as_flag(e, {"max_new_tokens": "--max-new-tokens"}) from None
    check_cache_fits(cfg, folder, slots=len(ids) + args.max_new_tokens, spare=0, dtype=args.dtype,
                     flag="--max-new-tokens")
    # unset settings come from the checkpoint's generation_config.json, inside generate (one source of defaults)
    settings = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None}
    t0 = time.perf_counter()
    model = hub.load(folder, dtype=_jnp_dtype(args.dtype), layout="serving")
    print(f"[{name}: loaded in {time.perf_counter() - t0:.1f} s; prompt {len(ids)} tokens]", file=sys.stderr)
    streamer = TextStreamer(proc.tokenizer, skip_special_tokens=not args.show_special)
    try:
        result = generate(model, ids, max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                          streamer=streamer, generation_config=folder, return_result=True, **settings, **inputs)
    except KeyboardInterrupt:  # Ctrl-C before the first token (loading, compiling)
        print("\n[interrupted]", file=sys.stderr)
        return 130
    streamer.end()
    sys.stdout.write("\n")  # the reply ends its line (and a closed stdout is noticed even if it was empty)
    sys.stdout.flush()
    dt = time.perf_counter() - streamer.start
    ttft, n = streamer.time_to_first_token, streamer.tokens
    rate = f"{(n - 1) / (dt - ttft):.1f} tokens/s" if n > 1 and dt > ttft else "-"
    print(f"[{n} tokens in {dt:.2f} s, including compilation; time to first token {ttft:.2f} s; "
          f"decode {rate}]" + (" [interrupted]" if result.interrupted else ""), file=sys.stderr)
    return 130 if result.interrupted else 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive conversation (`g4.ChatSession`): one user turn per stdin line; /reset, /quit."""
    import time

    import jax

    from ..config.gemma4 import Gemma4Config
    from ..generate.chat import ChatSession, ContextFullError
    from ..generate.streaming import TextStreamer
    from ..io import hub
    from ..processing import Processor

    name = _resolve_model(args.model)
    folder = hub.resolve(name, allow_patterns=hub.MODEL_FILES + hub.PROCESSOR_FILES)
    cfg = Gemma4Config.from_pretrained(folder)
    _generation_defaults(folder, cfg.text.vocab_size)
    # the conversation's cache within the model's context and beside the weights in memory, before the load
    check_cache_fits(cfg, folder, slots=args.max_context, spare=args.max_new_tokens, dtype=args.dtype,
                     flag="--max-context")
    model = hub.load(folder, dtype=_jnp_dtype(args.dtype), layout="serving")
    proc = Processor.from_pretrained(folder)
    settings = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p") if getattr(args, k) is not None}
    chat = ChatSession(model, proc, system=args.system, generation_config=folder, key=jax.random.key(args.seed),
                       max_new_tokens=args.max_new_tokens, max_context=args.max_context,
                       enable_thinking=args.thinking, **settings)
    interactive = sys.stdin.isatty()
    print(f"[{name}: chatting; /reset starts over, /quit or end of input leaves]", file=sys.stderr)
    number = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line, bad = _read_line()
        number += 1
        if line is None or line.strip() == "/quit":
            return 0
        if bad:
            print(f"[line {number} of stdin is not valid UTF-8 ({bad}); it was not sent, the conversation is kept]",
                  file=sys.stderr)
            continue
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            chat.reset()
            print("[conversation reset]", file=sys.stderr)
            continue
        streamer = TextStreamer(proc.tokenizer, stop_ids=chat.stop_ids)
        try:
            reply = chat.send(line, streamer=streamer)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
            return 130
        except ContextFullError as e:
            print(f"[this turn does not fit: the conversation with it is {e.tokens} tokens, plus {e.max_new_tokens} "
                  f"for the reply, more than --max-context {e.max_context}; it was not sent and the conversation is "
                  "kept: send a shorter turn, or /reset to start over]", file=sys.stderr)
            continue
        streamer.end()
        print(flush=True)  # each reply on its own line of stdout (piped output keeps the turns apart)
        dt = time.perf_counter() - streamer.start
        ttft, n = streamer.time_to_first_token, streamer.tokens
        rate = f"{(n - 1) / (dt - ttft):.1f} tokens/s" if n > 1 and dt > ttft else "- tokens/s"
        print(f"[{n} tokens; prefilled {reply.prefilled}, reused {reply.reused} from the cache; time to first "
              f"token {ttft:.2f} s; decode {rate}]", file=sys.stderr)


def _read_line() -> tuple[str | None, str | None]:
    """(one line of stdin, or None at its end; what is wrong with it, or None): read as bytes and decoded here, so
    a line of invalid UTF-8 is named and skipped rather than ending the conversation."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream without bytes (io.StringIO): its text may still hold lone surrogates
        line = sys.stdin.readline()
        if not line:
            return None, None
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as e:
            return line, f"a lone surrogate at character {e.start}"
        return line, None
    data = raw.readline()
    if not data:
        return None, None
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return "", f"the byte 0x{data[e.start]:02x} at byte offset {e.start}"


def _verify_cases(folder: str, cfg: Any) -> list[tuple]:
    """(name, batch inputs, recorded transformers logits or None, mask mode) to run both models on."""
    import numpy as np

    path = os.path.join(folder, "hf_reference.npz")
    if os.path.isfile(path):
        data = np.load(path)
        mode = json.loads(str(data["meta"]))["mask_mode"]
        names = sorted({k.split("/")[0] for k in data.files if "/" in k})
        return [(n, {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(n + "/") and
                     not k.endswith("/logits")}, data[f"{n}/logits"], mode) for n in names]
    rng = np.random.default_rng(0)
    ids = rng.integers(3, min(cfg.text.vocab_size, cfg.image_token_id) - 8, size=(2, 3 * cfg.text.sliding_window // 2 + 8))
    mask = np.ones(ids.shape, bool)
    mask[1, :5] = False
    positions = np.where(mask, np.cumsum(mask, axis=1) - 1, 0)
    return [("text", {"input_ids": ids.astype(np.int32), "attention_mask": mask,
                      "positions": positions.astype(np.int32)}, None, "intended")]


def _verify_against_transformers(args: argparse.Namespace) -> int:
    """Layer by layer against transformers (run in a subprocess with `--reference-python`): exit 0 when every
    state is within the tolerance, 1 when one is not, 2 when no Python with transformers is found."""
    import jax.numpy as jnp

    from .. import reference
    from ..config.gemma4 import Gemma4Config
    from ..io import hub

    try:
        python = reference.find_reference_python(args.reference_python)
    except reference.ReferenceUnavailable as e:
        print(f"gemma4-eqx: error: {e}", file=sys.stderr)
        return 2
    folder = hub.resolve(_resolve_model(args.model))
    inputs = reference.verify_inputs(Gemma4Config.from_pretrained(folder))
    print(f"[{folder}: transformers in {python}; prompt {reference.describe_inputs(inputs)}]", file=sys.stderr)
    theirs, meta = reference.run_transformers(python, folder, inputs)  # before ours: never both in memory
    model = hub.load(folder, dtype=jnp.float32)
    rows = reference.compare(reference.our_layers(model, inputs), theirs, meta["layer_types"], args.tolerance)
    print(f"gemma4-eqx vs transformers {meta['transformers']} (torch {meta['torch']}), float32, mask_mode intended")
    text, ok = reference.report(rows, args.tolerance)
    print(text)
    return 0 if ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    if args.against_transformers:
        return _verify_against_transformers(args)
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from .. import nnx as g4nnx
    from ..generate.batching import split_batch, stack_samples
    from ..io import hub

    folder = hub.resolve(_resolve_model(args.model))
    model = hub.load(folder, dtype=jnp.float32)
    ref = g4nnx.load(folder, dtype=jnp.float32)
    # Both models compiled, each as one program with the model as an argument (eagerly, every operation of the NNX
    # reference was compiled on its own: hundreds of small programs).
    eqx_forward = eqx.filter_jit(lambda m, batch, mode: jax.vmap(lambda b: m(**b, mask_mode=mode))(batch))
    nnx_forward = nnx.jit(lambda r, batch, mode: r.logits(**batch, mask_mode=mode), static_argnames="mode")
    ok = True
    print(f"{'case':<8} {'mask mode':<11} {'|eqx - nnx|':>12} {'|eqx - hf|':>12} {'|nnx - hf|':>12}")
    for name, inputs, hf, mode in _verify_cases(folder, model.config):
        samples = split_batch({("position_ids" if k == "positions" else k): v for k, v in inputs.items()},
                              model.config)
        eqx_logits = np.asarray(eqx_forward(model, stack_samples(samples), mode))
        nnx_logits = np.asarray(nnx_forward(ref, {k: jnp.asarray(v) for k, v in inputs.items()}, mode))
        valid = np.asarray(inputs.get("attention_mask", np.ones(inputs["input_ids"].shape, bool)), bool)
        d = lambda a, b, valid=valid: float(np.abs(a - b)[valid].max())
        row = [d(eqx_logits, nnx_logits)] + ([d(eqx_logits, hf), d(nnx_logits, hf)] if hf is not None else [])
        ok &= all(x <= args.tolerance for x in row)
        cells = [f"{x:>12.2e}" for x in row] + [f"{'-':>12}"] * (3 - len(row))
        print(f"{name:<8} {mode:<11} " + " ".join(cells))
    print(("OK" if ok else "MISMATCH") + f": every max |diff| <= {args.tolerance:g} (fp32 logits, valid positions)")
    return 0 if ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    """Load, then write a complete folder atomically: weights, config.json and the source's generation_config.json
    and tokenizer/processor files (so `generate`, `verify` and transformers read the result as is)."""
    from ..io import checkpoint, hub

    folder = hub.resolve(_resolve_model(args.model),
                         allow_patterns=hub.MODEL_FILES + hub.PROCESSOR_FILES)
    model = hub.load(folder, dtype=_jnp_dtype(args.dtype))
    names = [*checkpoint.PROCESSOR_FILES, checkpoint.GENERATION_CONFIG]
    extra = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    missing = [n for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json",
                           checkpoint.GENERATION_CONFIG) if not os.path.isfile(os.path.join(folder, n))]
    checkpoint.save(model, args.out, max_shard_size=args.max_shard_size, extra_files=extra, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    if missing:
        print(f"note: {folder} has no {', '.join(missing)}; the converted folder lacks them too"
              + (" (a generation_config.json was written from the config)" if checkpoint.GENERATION_CONFIG in missing
                 else ""), file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """An OpenAI-compatible server (`gemma4_eqx.serve`); needs the `serve` extra."""
    from ..serve import missing_extra

    missing = missing_extra()
    if missing is not None:
        print(f"gemma4-eqx: error: serve needs the serve extra: pip install 'gemma4-eqx[serve]' ({missing} is not "
              "installed)", file=sys.stderr)
        return 2
    from ..config.gemma4 import Gemma4Config
    from ..io import hub
    from ..serve.main import run
    from ..serve.service import served_name

    name = _resolve_model(args.model)
    folder = hub.resolve(name, allow_patterns=hub.MODEL_FILES + hub.PROCESSOR_FILES)
    # every slot's cache within the model's context and beside the weights in memory, before anything loads
    check_cache_fits(Gemma4Config.from_pretrained(folder), folder, slots=args.max_context, spare=0, dtype=args.dtype,
                     flag="--max-context", batch=args.slots)
    return run(folder, host=args.host, port=args.port, slots=args.slots, max_context=args.max_context,
               name=args.served_model_name or served_name(name), dtype=_jnp_dtype(args.dtype),
               allow_files=not args.no_local_files, max_queue=args.max_queue, log_level=args.log_level)
