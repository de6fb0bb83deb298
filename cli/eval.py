"""llasm-eval --bundle DIR [--asr M.jsonl] [--qa M.jsonl] [--out items.jsonl] [--json]: score a bundle offline."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .common import one_line_errors, setup_logging

PROG = "llasm-eval"


def main(argv=None) -> None:
    from ..runtime.evaluate import MODES  # numpy only: --help stays fast

    p = argparse.ArgumentParser(prog=PROG, description="ASR error rates and spoken-QA accuracy of a LLaSM bundle. "
                                "Manifest formats: see `python -c 'import llasm.runtime.evaluate as e; help(e)'`.")
    p.add_argument("--bundle", help="bundle directory (default: the default bundle)")
    p.add_argument("--asr", metavar="MANIFEST", help='JSONL of {"audio", "text", "lang"?}: WER (en) / CER (zh)')
    p.add_argument("--qa", metavar="MANIFEST",
                   help='JSONL of {"audio", "question", "answers": [...], "lang"?, "instruction"?, "content"?, '
                        '"instruction_audio"?, "content_audio"?}: accuracy per mode')
    p.add_argument("--modes", default=None,
                   help=f"comma-separated QA modes (default: {','.join(MODES)}, and cascade with --reference-whisper)")
    p.add_argument("--out", metavar="JSONL", help="per-item results: one row per item and mode")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N rows of each manifest")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reference-whisper", metavar="DIR",
                   help="also score Whisper alone (faster-whisper on this CTranslate2 model, greedy) on the --asr "
                        "clips, and the cascade on the --qa rows: its transcript typed to the same bundle")
    p.add_argument("--n-gpu-layers", type=int, default=0)
    p.add_argument("--listen", action="store_true",
                   help="give the LLM each clip's rows as push-to-talk does (encoded in passes while spoken, "
                        "llasm.runtime.listen), not the whole clip's")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not (args.asr or args.qa):
        p.error("give --asr MANIFEST and/or --qa MANIFEST")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    setup_logging(quiet=not args.verbose, verbose=args.verbose)
    with one_line_errors(PROG):
        from ..runtime.chat import LLaSM
        from ..runtime.evaluate import check_modes, evaluate, read_asr_manifest, read_qa_manifest

        cascade = bool(args.reference_whisper and args.qa)
        default = ",".join(MODES + (("cascade",) if cascade else ()))
        modes = check_modes((m.strip() for m in (args.modes or default).split(",") if m.strip()), cascade=cascade)
        asr = read_asr_manifest(args.asr, args.limit) if args.asr else None  # bad manifests fail before loading
        qa = read_qa_manifest(args.qa, args.limit) if args.qa else None
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        reference = None
        if args.reference_whisper:
            from ..runtime.evaluate import WhisperReference

            reference = WhisperReference(args.reference_whisper, threads=args.threads)
        model = LLaSM.load(args.bundle, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, verbose=args.verbose)
        if args.listen:
            from ..runtime.listen import ListenedEncoder

            model.encoder = ListenedEncoder(model.encoder)
        with open(args.out or os.devnull, "w", encoding="utf-8") as out:
            def write(item) -> None:
                out.write(json.dumps(item.to_dict(), ensure_ascii=False) + "\n")
                out.flush()

            try:
                result = evaluate(model, asr, qa, modes=modes, max_tokens=args.max_tokens, progress=not args.quiet,
                                  on_item=write, bundle=str(model.bundle.path), reference=reference)
            finally:
                model.close()
        alone = None
        if reference is not None and asr:
            from ..runtime.evaluate import evaluate_asr

            alone = evaluate_asr(reference, asr, progress=not args.quiet)
    summary = result.summary()
    if args.listen:
        summary["listen"] = True
    if alone is not None:
        summary["reference_whisper_asr"] = alone.summary()
    lines = result.lines() + (["", "Whisper alone (reference):"] + alone.lines() if alone is not None else [])
    print(json.dumps(summary, ensure_ascii=False) if args.json else "\n".join(lines))


if __name__ == "__main__":
    main()
