"""The `gemma4-eqx` command line. With no `--model`, every command uses the small bundled checkpoint.

Every input (files, folders, numbers) is checked before a model is loaded; a problem is one line on stderr
naming the flag, exit status 1 (`--debug` shows the traceback instead); sampling flags follow the rules of
`generate.settings`, and a cache beyond the model's context or the memory is refused before the load. A reader
that goes away (`| head`) ends the command quietly (status 1); a stdout (or, for `chat`, stdin) closed before the
start is refused by name. `chat` keeps the conversation when a turn does not fit (it says so and suggests /reset).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from .checks import (
    CliError,
    Parser,
    check_chat,
    check_convert,
    check_generate,
    check_info,
    check_stdout,
    check_verify,
    float_in,
    int_in,
    setting,
    shard_size,
)
from .commands import (
    cmd_chat,
    cmd_convert,
    cmd_generate,
    cmd_info,
    cmd_serve,
    cmd_verify,
)

DTYPES = ("float32", "bfloat16", "float16")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint folder or Hub repo id (default: the small trained checkpoint bundled in the "
                        "package, g4.assets.SMALL_CHECKPOINT)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags `generate` and `chat` share (their rules: `generate.settings`)."""
    p.add_argument("--temperature", type=setting("check_temperature", float), default=None,
                   help="0 = greedy (default: generation_config)")
    p.add_argument("--top-k", type=setting("check_top_k", int), default=None,
                   help="0 = no top-k (default: generation_config)")
    p.add_argument("--top-p", type=setting("check_top_p", float), default=None)
    p.add_argument("--seed", type=int_in(0, 2**63 - 1), default=0)
    p.add_argument("--thinking", action="store_true", help="let the model think first (enable_thinking)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(prog="gemma4-eqx", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"gemma4-eqx {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func: Callable[[argparse.Namespace], int],
                check: Callable[[argparse.Namespace], None] | None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback of an error")
        p.set_defaults(func=func, check=check)
        return p

    p = command("generate", "chat with a model: the prompt through the chat template, tokens streamed",
                cmd_generate, check_generate)
    _model_arg(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None)
    p.add_argument("--image", action="append", help="image file (repeatable)")
    p.add_argument("--audio", action="append", help="16 kHz mono wav/flac file (repeatable)")
    p.add_argument("--resample", action="store_true", help="resample audio of another rate to 16 kHz")
    p.add_argument("--downmix", action="store_true", help="average multi-channel audio to mono")
    p.add_argument("--max-new-tokens", type=int_in(1, 1_000_000), default=64)
    _sampling_args(p)
    p.add_argument("--show-special", action="store_true", help="print special tokens too")
    p.add_argument("--dtype", choices=DTYPES, default=None)

    p = command("chat", "an interactive conversation that keeps its KV cache (stdin lines; /reset, /quit)",
                cmd_chat, check_chat)
    _model_arg(p)
    p.add_argument("--system", default=None)
    p.add_argument("--max-new-tokens", type=int_in(1, 1_000_000), default=256, help="per reply")
    p.add_argument("--max-context", type=int_in(1, 2**31), default=4096, help="cache slots for the conversation")
    _sampling_args(p)
    p.add_argument("--dtype", choices=DTYPES, default=None)

    p = command("info", "config, parameter counts, memory estimate (no weights are read)", cmd_info, check_info)
    p.add_argument("--model", default=None, help="checkpoint folder, Hub repo id or a config.json file "
                   "(default: the bundled small checkpoint)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--context", type=int_in(1, 2**40), nargs="*", default=[8192, 262144])
    p.add_argument("--json", action="store_true")

    p = command("verify", "Equinox vs the NNX reference (and vs recorded transformers logits) on the same weights",
                cmd_verify, check_verify)
    _model_arg(p)
    p.add_argument("--tolerance", type=float_in(0.0), default=1e-4)
    p.add_argument("--against-transformers", action="store_true",
                   help="run transformers too and print each layer's largest difference (embeddings, every decoder "
                        "layer, final norm, logits) on a short prompt, with an image when the model has a vision "
                        "tower; limit: tolerance x max(1, max |transformers|)")
    p.add_argument("--reference-python", default=None, metavar="PATH",
                   help="a Python with torch and transformers >= 5.24 for --against-transformers (default: this "
                        "one if it has them, else $GEMMA4_EQX_REFERENCE_PYTHON)")

    p = command("convert", "load a checkpoint and write a complete folder (e.g. in another dtype or sharding)",
                cmd_convert, check_convert)
    _model_arg(p)
    p.add_argument("--out", required=True, help="the folder to write (replaced atomically; its other files are kept)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete files in --out that the save did not write (another model's or an adapter's "
                        "*.safetensors); without it such a folder is refused, naming them")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--max-shard-size", type=shard_size, default="5GB")

    p = command("serve", "an OpenAI-compatible HTTP server with continuous batching (needs gemma4-eqx[serve])",
                cmd_serve, check_verify)
    _model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_in(0, 65535), default=8000, help="0 = any free port (printed)")
    p.add_argument("--slots", type=int_in(1, 4096), default=8, help="requests decoded together (rows of the cache)")
    p.add_argument("--max-context", type=int_in(1, 2**31), default=4096,
                   help="cache slots per request (prompt, padded to a multiple of 64, plus new tokens)")
    p.add_argument("--max-queue", type=int_in(0, 10**6), default=1024,
                   help="requests that may wait for a slot; beyond it, 429")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--no-local-files", action="store_true", help="refuse image file paths in messages (data URLs only)")
    p.add_argument("--dtype", choices=DTYPES, default=None)
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="warning",
                   help="uvicorn's log level (info logs every request)")
    return parser


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (CliError, ValueError, OSError, KeyError)) and text:
        return text.strip("'\"") if isinstance(e, KeyError) else text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _quiet_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        check_stdout()
        if args.check is not None:
            args.check(args)
        status = args.func(args)
        if sys.stdout is not None:
            sys.stdout.flush()
        return status
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        _quiet_stdout()
        return 1
    except KeyboardInterrupt:
        print("gemma4-eqx: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"gemma4-eqx: error: {_one_line(e)}" + ("" if isinstance(e, CliError) else
                                                      " (--debug shows the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
