"""llasm-local: talk to a bundle on this machine. Files, text, or an interactive session with push-to-talk."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading

from .common import default_bundle, fail, known_errors, setup_logging

PROG = "llasm-local"
HELP = """commands:
  TEXT               ask in text
  (empty line)       push-to-talk: Enter starts recording, Enter stops and asks (Ctrl-C cancels)
  /audio FILE [TEXT] ask with an audio file (and text in the same turn)
  /reset             start a new conversation
  /help              this help
  /quit              leave (also Ctrl-D)"""


def _turn(chat, args, audio=None, text=None, listener=None) -> None:
    """One turn, streamed to stdout (or one JSON line with --json); with a listener, the turn it heard."""
    from ..runtime.chat import Reply

    reply = Reply("")
    if listener is not None:
        pieces = listener.answer(text=text, max_tokens=args.max_tokens, temperature=args.temperature, _reply=reply)
    else:
        pieces = chat.stream(audio=audio, text=text, max_tokens=args.max_tokens, temperature=args.temperature,
                             _reply=reply)
    for piece in pieces:
        if not args.json:
            print(piece, end="", flush=True)
    if args.json:
        print(json.dumps({"text": reply.text, "heard": reply.heard, "audio_seconds": reply.audio_seconds,
                          "timings_ms": {k: round(v, 2) for k, v in reply.timings.items()},
                          "tokens": reply.tokens, "tokens_per_s": round(reply.tokens_per_s, 2)},
                         ensure_ascii=False), flush=True)
    else:
        print(flush=True)


METER_CELLS = 8
METER_RANGE_DB = (-60.0, 0.0)  # dBFS shown as an empty and a full meter


def _meter_line(recorder) -> str:
    lo, hi = METER_RANGE_DB
    full = round(METER_CELLS * min(max((recorder.level_db - lo) / (hi - lo), 0.0), 1.0))
    return f"● REC {recorder.seconds:4.1f} s  {'▮' * full}{'▯' * (METER_CELLS - full)}  (Enter stops)"


def _show_meter(recorder, done: threading.Event, err) -> None:
    """Redraw the meter in place on a terminal (elsewhere print one line); say so when the length cap is hit."""
    cr, clear = ("\r", "\033[K") if err.isatty() else ("", "")
    err.write(f"{cr}{_meter_line(recorder)}{clear}" if cr else "● REC (Enter stops)\n")
    err.flush()
    told = False
    while not done.wait(0.1):
        if recorder.capped and not told:
            told = True
            err.write(f"{cr}recording stopped at the {recorder.max_seconds:g} s limit: press Enter to send{clear}\n")
        elif cr and not told:
            err.write(f"{cr}{_meter_line(recorder)}{clear}")
        err.flush()


def _talk(chat, args, recorder, read_line, err) -> None:
    """One push-to-talk turn: Enter was pressed; record until the next Enter, then ask with the recording. The
    recording is encoded and prefilled while it is spoken (Chat.listen): Enter leaves only its last rows to do."""
    from ..runtime.audio import MIN_SAMPLES, SAMPLE_RATE
    from ..runtime.mic import MicError

    listener = chat.listen()
    try:
        recorder.start(sink=listener.feed)
    except MicError as e:
        listener.cancel()
        print(f"no microphone: {str(e).strip().splitlines()[0]}", file=err)  # typing still works
        return
    done = threading.Event()
    meter = threading.Thread(target=_show_meter, args=(recorder, done, err), daemon=True)
    meter.start()
    cancelled = False
    try:
        read_line("")
    except EOFError:
        pass
    except KeyboardInterrupt:
        cancelled = True
    finally:
        done.set()
        meter.join()
        if err.isatty():
            err.write("\r\033[K")
        try:
            samples = recorder.stop()
        except BaseException:  # the device went away: the turn is dropped, the conversation stays as it was
            listener.cancel()
            raise
    if cancelled or samples.size < MIN_SAMPLES:
        listener.cancel()
    if cancelled:
        print("(recording cancelled)", file=err)
        return
    if samples.size < MIN_SAMPLES:
        print("error: heard no speech (the recording is silent after trimming); press Enter to try again", file=err)
        return
    print(f"(asking with {samples.size / SAMPLE_RATE:.1f} s of speech)", file=err)
    _turn(chat, args, listener=listener)


def interactive(chat, args, recorder=None, read_line=input, err=None) -> None:
    """The session loop: text lines, /commands, and an empty line for push-to-talk with `recorder` (a
    runtime.mic.Recorder or anything with its start(sink=)/stop/level_db/seconds/capped/max_seconds); without one,
    empty lines are skipped."""
    err = err or sys.stderr
    talk = "or press Enter to talk; " if recorder is not None else ""
    print(f"llasm: type a question, {talk}/audio FILE asks with a file, /help lists commands.", file=err)
    while True:
        try:
            line = read_line("> " if sys.stdin.isatty() else "")  # no prompt in piped output
        except EOFError:
            print(file=err)
            return
        line = line.strip()
        if line in ("/quit", "/exit"):
            return
        if line == "/help":
            print(HELP, file=err)
            continue
        if line == "/reset":
            chat.reset()
            print("(new conversation)", file=err)
            continue
        try:
            if not line:
                if recorder is not None:
                    _talk(chat, args, recorder, read_line, err)
            elif line.startswith("/audio"):
                words = shlex.split(line)
                if len(words) < 2:
                    print("usage: /audio FILE [TEXT]", file=err)
                    continue
                _turn(chat, args, audio=words[1], text=" ".join(words[2:]) or None)
            elif line.startswith("/"):
                print(f"unknown command {line.split()[0]}; /help lists them", file=err)
            else:
                _turn(chat, args, text=line)
        except known_errors() as e:  # a broken file or a failing microphone never ends the session
            print(f"error: {str(e).strip().splitlines()[0]}", file=err)


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
    p.add_argument("--mic", action="store_true",
                   help="push-to-talk session: Enter starts recording, Enter stops (fails without a microphone)")
    p.add_argument("--mic-device", help="input device index or name (python -m sounddevice lists them)")
    p.add_argument("--max-record", type=float, default=60.0, help="longest recording in seconds (default 60)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.transcribe and not args.audio:
        p.error("--transcribe needs --audio")
    if args.mic and (args.audio or args.text):
        p.error("--mic starts a session; it does not take --audio or --text")
    if args.max_record <= 0:
        p.error(f"--max-record must be > 0 seconds, got {args.max_record}")
    setup_logging(quiet=not args.verbose, verbose=args.verbose)
    try:
        from ..runtime.audio import load_audio
        from ..runtime.chat import LLaSM
        from ..runtime.mic import Recorder, input_device

        if args.audio:
            load_audio(args.audio)  # a bad file fails before the model loads
        recorder = None  # piped input has no one to press Enter: its empty lines stay empty
        if args.mic or (sys.stdin.isatty() and not (args.audio or args.text)):
            recorder = Recorder(args.mic_device, max_seconds=args.max_record)  # sounddevice loads on first use
        if args.mic:
            input_device(args.mic_device)  # so does a missing microphone (without --mic, text still works)

        bundle = args.bundle or default_bundle()
        model = LLaSM.load(bundle, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, verbose=args.verbose)
        if args.transcribe:
            text = model.transcribe(args.audio)
            print(json.dumps({"text": text}, ensure_ascii=False) if args.json else text)
            return
        chat = model.chat(system=args.system)
        if args.audio or args.text:
            _turn(chat, args, audio=args.audio, text=args.text)
        else:
            interactive(chat, args, recorder)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except known_errors() as e:
        fail(PROG, e)


if __name__ == "__main__":
    main()
