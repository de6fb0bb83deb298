"""llasm-bench --bundle DIR --audio CLIP [...]: speed and memory, LLaSM path vs the cascade baseline."""
from __future__ import annotations

import argparse
import json

from .common import one_line_errors, setup_logging


def _table(result) -> str:
    r = result
    lines = [f"machine: {r.machine}; bundle {r.bundle_mb:.0f} MB",
             f"{'audio s':>8} {'rows':>5} {'enc ms':>8} {'prefill':>8} {'1st tok':>8}" +
             (f" | {'listening':>9} {'ahead':>5} | {'paused':>7} {'ahead':>5}" if r.listening else "") +
             (f" | {'cascade asr':>11} {'1st tok':>8} {'ratio':>6}" if r.cascade else "")]
    for L in sorted(r.llasm.first_token_ms):
        line = (f"{L:8.1f} {r.llasm.rows[L]:5d} {r.llasm.encode_ms[L]:8.1f} {r.llasm.prefill_ms[L]:8.1f} "
                f"{r.llasm.first_token_ms[L]:8.1f}")
        if r.listening:
            line += (f" | {r.listening.first_token_ms[L]:9.1f} {r.listening.rows[L]:5d}"
                     f" | {r.listening_pause.first_token_ms[L]:7.1f} {r.listening_pause.rows[L]:5d}")
        if r.cascade:
            line += (f" | {r.cascade.encode_ms[L]:11.1f} {r.cascade.first_token_ms[L]:8.1f} "
                     f"{r.llasm.first_token_ms[L] / r.cascade.first_token_ms[L]:6.2f}")
        lines.append(line)
    lines.append(f"decode: {r.decode_tokens_per_s:.1f} tok/s vs plain llama.cpp "
                 f"{r.plain_llama_tokens_per_s:.1f} tok/s ({r.ratios['decode_vs_plain_llama']:.2f}x)")
    lines.append(f"peak RSS: LLaSM {r.llasm.peak_rss_mb:.0f} MB" +
                 (f", cascade {r.cascade.peak_rss_mb:.0f} MB" if r.cascade else ""))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="llasm-bench", description="Benchmark a bundle against the cascade baseline.")
    p.add_argument("--bundle", required=True)
    p.add_argument("--audio", nargs="+", required=True, help="speech clips (tiled/cropped to each length)")
    p.add_argument("--lengths", default="1,2,5,10,20,30", help="audio lengths in seconds, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median), after one warm-up")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cascade-whisper", help="CTranslate2 Whisper directory for the cascade baseline")
    p.add_argument("--no-listen", action="store_true",
                   help="skip the listening path (it feeds each clip in real time: its length, per run)")
    p.add_argument("--pause", type=float, default=0.5,
                   help="seconds of quiet after the speech in the second listening run (default 0.5)")
    p.add_argument("--plot", help="write first-token time vs audio length as a PNG")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    with one_line_errors("llasm-bench"):
        from ..runtime.bench import BenchConfig, plot, run_bench

        try:
            lengths = [float(x) for x in args.lengths.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--lengths takes seconds like 1,2,5; got {args.lengths!r}") from None
        if args.repeats < 1 or not lengths or min(lengths) <= 0:
            raise ValueError("--repeats must be >= 1 and --lengths positive")
        if args.pause <= 0:
            raise ValueError(f"--pause must be > 0 seconds, got {args.pause}")
        cfg = BenchConfig(bundle=args.bundle, clips=args.audio, lengths=lengths, repeats=args.repeats,
                          threads=args.threads, cascade_whisper=args.cascade_whisper, listen=not args.no_listen,
                          pause=args.pause)
        result = run_bench(cfg)
        if args.plot:
            plot(result, args.plot)
    print(json.dumps(result.to_dict(), default=str) if args.json else _table(result))


if __name__ == "__main__":
    main()
