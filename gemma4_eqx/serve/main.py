"""`gemma4-eqx serve`: listen at once (503 while loading), load the checkpoint with a progress bar, compile the
engine's programs, print the URL and what is served; Ctrl-C stops taking connections and drains the requests
in flight (a second Ctrl-C stops at once)."""

from __future__ import annotations

import sys
import time

import uvicorn

from .app import create_app
from .service import Service, served_name


class Server(uvicorn.Server):
    """uvicorn's server, saying where it listens and what a Ctrl-C does."""

    def __init__(self, config: uvicorn.Config, say):
        super().__init__(config)
        self.say = say
        self.url = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
            self.say(f"listening on {self.url}/v1 (OpenAI API; /health says when the model is ready, requests get "
                     "503 until then); Ctrl-C drains and stops")

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.say("stopping: no new connections; finishing the requests in flight (Ctrl-C again to stop now)")
        super().handle_exit(sig, frame)


def run(model: str, *, host: str = "127.0.0.1", port: int = 8000, slots: int = 8, max_context: int = 4096,
        name: str | None = None, dtype=None, allow_files: bool = True, max_queue: int = 1024,
        log_level: str = "warning") -> int:
    import jax.numpy as jnp

    from ..io import hub
    from ..model.gemma4 import count_parameters
    from ..processing import Processor

    def say(text: str) -> None:
        print(f"gemma4-eqx serve: {text}", file=sys.stderr, flush=True)

    name = name or served_name(model)
    started = time.perf_counter()

    def load() -> Service:
        folder = hub.resolve(model, allow_patterns=hub.MODEL_FILES + hub.PROCESSOR_FILES)
        say(f"loading {folder}")
        loaded = hub.load(folder, dtype=dtype, progress=True)
        processor = Processor.from_pretrained(folder)
        say(f"compiling the engine's programs ({slots} slots x {max_context} tokens of context)")
        return Service(loaded, processor, name=name, slots=slots, max_context=max_context,
                       generation_config=folder, allow_files=allow_files, max_queue=max_queue)

    def ready(svc: Service) -> None:
        cfg = svc.model.config
        media = [m for m, present in (("images", svc.model.embed_vision is not None),
                                      ("audio", svc.model.embed_audio is not None)) if present]
        say(f"ready: model {svc.name!r} ({count_parameters(svc.model):,} parameters, "
            f"{jnp.dtype(svc.model.dtype).name}, "
            f"vocabulary {cfg.text.vocab_size:,}, text{''.join(' + ' + m for m in media)}), {svc.engine.slots} slots x "
            f"{svc.max_context:,} tokens of context, in {time.perf_counter() - started:.1f} s")

    app = create_app(loader=load, on_ready=ready)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=None)
    server = Server(config, say)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down
        pass
    if server.force_exit:
        say("stopped at once (a second Ctrl-C): requests in flight were dropped")
        return 130
    say("stopped")
    return 0
