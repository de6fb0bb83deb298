"""llasm-serve: a bundle behind a local OpenAI-compatible server (chat completions with audio, transcriptions)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

from .common import default_bundle, fail, known_errors, setup_logging

PROG = "llasm-serve"
API_KEY_ENV = "LLASM_API_KEY"
log = logging.getLogger("llasm.cli.serve")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog=PROG, description="Serve a LLaSM bundle over the OpenAI API on this machine: "
                                "POST /v1/chat/completions (text and input_audio), /v1/audio/transcriptions.")
    p.add_argument("--bundle", help="bundle directory (default: the default bundle)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"clients must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; none: no check)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--n-ctx", type=int, default=4096, help="context positions, audio rows included (default 4096)")
    p.add_argument("--max-tokens", type=int, default=512, help="answer length where a request gives none")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="where a request gives none (default 0: greedy, the same answer each time)")
    p.add_argument("--max-body-mb", type=float, default=25.0, help="largest request body in MiB (default 25)")
    p.add_argument("--max-audio-seconds", type=float, default=120.0, help="longest clip (default 120)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get a 503")
    p.add_argument("--rows-cache", type=int, default=32,
                   help="clips whose rows are kept, so a conversation sent again is not encoded again (default 32)")
    p.add_argument("-v", "--verbose", action="store_true", help="llama.cpp's log and every request")
    args = p.parse_args(argv)
    for name in ("max_tokens", "max_body_mb", "max_audio_seconds", "max_queue", "rows_cache", "n_ctx"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    setup_logging(verbose=args.verbose)
    try:
        try:
            from ..runtime.serve.app import bind, create_app, server
        except ImportError as e:
            raise RuntimeError(f"the server needs the serve extra ({e.name} is missing): "
                               f"pip install 'llasm[serve]'") from None
        from ..runtime.chat import LLaSM
        from ..runtime.serve.api import Limits
        from ..runtime.serve.engine import Engine

        sock = bind(args.host, args.port)  # a taken port fails before the model loads
        bundle = args.bundle or default_bundle()
        model = LLaSM.load(bundle, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, n_ctx=args.n_ctx,
                           verbose=args.verbose, rows_cache=args.rows_cache)
        engine = Engine(model, max_queue=args.max_queue)
        limits = Limits(max_audio_seconds=args.max_audio_seconds, max_tokens=args.max_tokens,
                        temperature=args.temperature)
        model_id = model.bundle.path.resolve().name
        app = create_app(engine, model_id, api_key=args.api_key, limits=limits,
                         max_body=int(args.max_body_mb * (1 << 20)))
        host, port = sock.getsockname()[:2]
        if not _loopback(args.host) and not args.api_key:
            log.warning("listening on %s without --api-key: anyone who reaches this port can use the model", host)
        print(f"{PROG}: serving {model_id} at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
        try:
            server(app, log_level="info" if args.verbose else "warning").run(sockets=[sock])
        finally:
            engine.close()
            model.close()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except known_errors() as e:
        fail(PROG, e)


if __name__ == "__main__":
    main()
