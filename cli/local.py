"""llasm-local: talk to a bundle on this machine. Files, text, or an interactive session."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from .common import fail, known_errors, setup_logging

PROG = "llasm-local"
HELP = """commands:
  TEXT               ask in text
  /audio FILE [TEXT] ask with an audio file (and text in the same turn)
  /reset             start a new conversation
  /help              this help
  /quit              leave (also Ctrl-D)"""


def _turn(chat, args, audio=None, text=None) -> None:
    """One turn, streamed to stdout (or one JSON line with --json)."""
    from ..runtime.chat import Reply

    reply = Reply("")
    pieces = chat.stream(audio=audio, text=text, max_tokens=args.max_tokens, temperature=args.temperature,
                         _reply=reply)
    for piece in pieces:
        if not args.json:
            print(piece, end="", flush=True)
    if args.json:
        print(json.dumps({"text": reply.text, "audio_seconds": reply.audio_seconds,
                          "timings_ms": {k: round(v, 2) for k, v in reply.timings.items()},
                          "tokens": reply.tokens, "tokens_per_s": round(reply.tokens_per_s, 2)},
                         ensure_ascii=False), flush=True)
    else:
        print(flush=True)


def _interactive(chat, args) -> None:
    print(f"llasm: type a question, /audio FILE to ask with speech, /help for commands.", file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")  # no prompt in piped output
        except EOFError:
            print(file=sys.stderr)
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/help":
            print(HELP, file=sys.stderr)
            continue
        if line == "/reset":
            chat.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        try:
            if line.startswith("/audio"):
                words = shlex.split(line)
                if len(words) < 2:
                    print("usage: /audio FILE [TEXT]", file=sys.stderr)
                    continue
                _turn(chat, args, audio=words[1], text=" ".join(words[2:]) or None)
            elif line.startswith("/"):
                print(f"unknown command {line.split()[0]}; /help lists them", file=sys.stderr)
            else:
                _turn(chat, args, text=line)
        except known_errors() as e:  # a broken file never ends the session
            print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog=PROG, description="Ask a LLaSM bundle with speech and/or text, offline.")
    p.add_argument("--bundle", help="bundle directory (default: the default bundle)")
    p.add_argument("--audio", help="audio file (wav/flac/ogg, any rate; stereo is mixed down)")
    p.add_argument("--text", help="text, alone or with --audio in the same turn")
    p.add_argument("--transcribe", action="store_true", help="transcribe --audio instead of answering it")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--json", action="store_true", help="one JSON object per turn")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.transcribe and not args.audio:
        p.error("--transcribe needs --audio")
    setup_logging(quiet=not args.verbose, verbose=args.verbose)
    try:
        from ..runtime.audio import load_audio
        from ..runtime.chat import LLaSM

        if args.audio:
            load_audio(args.audio)  # a bad file fails before the model loads

        model = LLaSM.load(args.bundle, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, verbose=args.verbose)
        if args.transcribe:
            text = model.transcribe(args.audio)
            print(json.dumps({"text": text}, ensure_ascii=False) if args.json else text)
            return
        chat = model.chat(system=args.system)
        if args.audio or args.text:
            _turn(chat, args, audio=args.audio, text=args.text)
        else:
            _interactive(chat, args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except known_errors() as e:
        fail(PROG, e)


if __name__ == "__main__":
    main()
