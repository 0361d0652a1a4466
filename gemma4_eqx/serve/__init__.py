"""`gemma4-eqx serve`: an OpenAI-compatible HTTP server over the continuous-batching engine
(`generate.engine`). The layer just below the command line: it may use every part of the package but the CLI.

    protocol   the OpenAI wire format's requests: field checks, sampling, chat messages to the template's
    replies    tokens to text (UTF-8, stop strings), the streaming reply parser, the response objects
    service    the model, processor and engine; the chat and completions paths (no web framework)
    app        the FastAPI application: routes, errors in OpenAI's shape, server-sent events, disconnects
    main       the command: load with a progress bar (503 meanwhile), print the URL, uvicorn; Ctrl-C drains

FastAPI and uvicorn come with the `serve` extra (`pip install "gemma4-eqx[serve]"`); only `app` and `main`
import them, and nothing outside this package imports those two.
"""

import importlib

EXTRA_MODULES = ("fastapi", "uvicorn")


def missing_extra() -> str | None:
    """The first module of the `serve` extra that cannot be imported, or None."""
    for name in EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


__all__ = ["EXTRA_MODULES", "missing_extra"]
