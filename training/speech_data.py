"""Offline speech-instruction data: packaged text -> TTS clips -> ASR and conversation manifests (see data.py).

    texts       chatterbot-corpus Q/A (en, zh), templated arithmetic, a few hand-written facts; optionally the
                sentences of the LLM's answers to training questions, remixes (the start of one training
                sentence, the end of another), word lists (training words in random order) and sentences the
                LLM writes around words of a word list that no training text has (vocab), spoken as extra
                ASR-only rows
    split       sha1 of the normalized question decides train / held-out (and dev, if asked), so a sentence never
                lands on two sides
    clips       one clip per question: clips/<lang>-<id>.wav, 16 kHz mono; the id hashes voice, text and variation,
                so an existing file is a finished clip and a rerun skips it
    manifests   asr.jsonl + conv.jsonl (train), asr.heldout.jsonl + conv.heldout.jsonl (and .dev.), dataset.json,
                README.md

Conversation rows cycle through four kinds: the spoken question alone; spoken question + a text instruction; a text
instruction about spoken content (repeat it); the question as text only. Answers come from the corpus, or from an
`answer(question) -> str` callback (an LLM) whose results are cached in answers.jsonl.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.audio import MIN_SAMPLES, SAMPLE_RATE
from .tts import Variation, render
from .voices import Engine, check_training, make_engine, parse

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LANGS = ("en", "zh")
RESPONSES = ("corpus", "llm")
SOURCES = ("chatterbot", "math", "facts", "answers", "remix", "words", "vocab")
DEFAULT_SOURCES = ("chatterbot", "math", "facts")
DEFAULT_VOICES = {"en": "piper", "zh": "kokoro:jf_alpha"}
KINDS = ("speech", "speech+instruction", "instruction+speech", "text")
MAX_CLIP_S = 30.0  # one Whisper window
ANSWER_INSTRUCTIONS = {
    "en": ["Answer the question in the audio.", "Listen and reply briefly.", "Respond to what you hear."],
    "zh": ["回答音频里的问题。", "听一听，然后简短地回答。", "请回应你听到的内容。"],
}
REPEAT_INSTRUCTIONS = {
    "en": ["Repeat what the speaker said.", "Write down the speaker's words.", "What did the speaker say?"],
    "zh": ["重复说话人说的话。", "写下你听到的内容。", "说话人说了什么？"],
}
FACTS = {
    "en": [
        ("What is the capital of France?", "Paris."), ("What is the capital of Japan?", "Tokyo."),
        ("What is the capital of Italy?", "Rome."), ("What is the capital of Canada?", "Ottawa."),
        ("How many days are in a week?", "Seven."), ("How many hours are in a day?", "Twenty-four."),
        ("How many legs does a spider have?", "Eight."), ("What color is the sky on a clear day?", "Blue."),
        ("What is the largest ocean on Earth?", "The Pacific Ocean."), ("What planet do we live on?", "Earth."),
        ("Which planet is closest to the sun?", "Mercury."), ("What is frozen water called?", "Ice."),
        ("At what temperature does water boil at sea level?", "One hundred degrees Celsius."),
        ("How many continents are there?", "Seven."), ("What do bees make?", "Honey."),
        ("What gas do plants take in from the air?", "Carbon dioxide."), ("How many months are in a year?", "Twelve."),
        ("What is the opposite of hot?", "Cold."), ("Which animal is known as the king of the jungle?", "The lion."),
        ("What is the tallest mountain in the world?", "Mount Everest."),
    ],
    "zh": [
        ("中国的首都是哪里？", "北京。"), ("日本的首都是哪里？", "东京。"), ("法国的首都是哪里？", "巴黎。"),
        ("一个星期有几天？", "七天。"), ("一天有多少个小时？", "二十四个小时。"), ("一年有几个月？", "十二个月。"),
        ("蜘蛛有几条腿？", "八条。"), ("晴天的天空是什么颜色？", "蓝色。"), ("世界上最大的海洋是什么？", "太平洋。"),
        ("我们住在哪个星球上？", "地球。"), ("离太阳最近的行星是哪一颗？", "水星。"), ("水结冰以后叫什么？", "冰。"),
        ("蜜蜂会酿什么？", "蜂蜜。"), ("世界上最高的山是哪座？", "珠穆朗玛峰。"), ("热的反义词是什么？", "冷。"),
        ("中国最长的河是哪条？", "长江。"), ("一小时有多少分钟？", "六十分钟。"), ("熊猫最喜欢吃什么？", "竹子。"),
    ],
}
MATH_TEMPLATES = {
    "en": {"+": "What is {a} plus {b}?", "-": "What is {a} minus {b}?", "*": "What is {a} times {b}?",
           "/": "What is {a} divided by {b}?"},
    "zh": {"+": "{a}加{b}等于多少？", "-": "{a}减{b}等于多少？", "*": "{a}乘以{b}等于多少？", "/": "{a}除以{b}等于多少？"},
}
CORPUS_DIRS = {"en": "english", "zh": "chinese"}


QA_SOURCES = ("math", "facts", "chatterbot/trivia", "chatterbot/science", "chatterbot/history")
QA_MAX_WORDS = 4  # longer reference answers cannot be matched inside a free-form reply


class DataBuildError(ValueError):
    pass


@dataclass(frozen=True)
class BuildConfig:
    out: Path
    langs: tuple = LANGS
    limit: int | None = None  # spoken sentences per language; None = all
    seed: int = 0
    noise: bool = False
    responses: str = "corpus"
    engines: tuple = ()  # (lang, voice name) pairs overriding DEFAULT_VOICES
    heldout_fraction: float = 0.1
    dev_fraction: float = 0.0  # sentences to choose checkpoints by (keep_best), apart from the held-out ones
    sources: tuple = DEFAULT_SOURCES
    math_count: int = 200  # arithmetic questions generated per language
    max_chars: int = 200  # longer questions are not spoken
    remix_count: int = 1000  # remixed sentences per language, with the "remix" source
    words_count: int = 1000  # word lists per language, with the "words" source
    vocab: str | None = None  # word list of the "vocab" source: one word per line, most useful first
    vocab_count: int = 500  # new words per language the "vocab" source writes sentences around

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "langs", tuple(self.langs))
        object.__setattr__(self, "engines", tuple(tuple(e) for e in self.engines))
        object.__setattr__(self, "sources", tuple(self.sources))
        bad = [lang for lang in self.langs if lang not in LANGS] or ([] if self.langs else ["(none)"])
        if bad:
            raise ValueError(f"langs must be among {LANGS}, got {bad}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        bad = [s for s in self.sources if s not in SOURCES] or ([] if self.sources else ["(none)"])
        if bad:
            raise ValueError(f"sources must be among {SOURCES}, got {bad}")
        if self.responses not in RESPONSES:
            raise ValueError(f"responses must be one of {RESPONSES}, got {self.responses!r}")
        if "answers" in self.sources and self.responses != "llm":
            raise ValueError("the 'answers' source speaks the LLM's cached answers: it needs responses 'llm'")
        for lang, voice in self.engines:
            check_training(parse(voice, lang))  # a held-out voice, or an unknown one, fails here
        if self.remix_count < 1 or self.words_count < 1:
            raise ValueError(f"remix_count and words_count must be >= 1, got {self.remix_count}, {self.words_count}")
        if "vocab" in self.sources and (self.responses != "llm" or not self.vocab or self.vocab_count < 1):
            raise ValueError("the 'vocab' source has the LLM write sentences around the words of a word list: it "
                             "needs responses 'llm', a vocab file and vocab_count >= 1")
        if not (0.0 <= self.heldout_fraction and 0.0 <= self.dev_fraction
                and self.heldout_fraction + self.dev_fraction < 1.0):
            raise ValueError(f"heldout_fraction and dev_fraction must be >= 0 with a sum below 1, got "
                             f"{self.heldout_fraction} and {self.dev_fraction}")

    def engine_for(self, lang: str) -> str:
        return dict(self.engines).get(lang, DEFAULT_VOICES[lang])

    @property
    def splits(self) -> tuple:
        return ("train", "dev", "heldout") if self.dev_fraction else ("train", "heldout")

    def split(self, text: str) -> str:
        return split_of(text, self.heldout_fraction, self.dev_fraction)


@dataclass(frozen=True)
class Sentence:
    """One spoken question with its reference answers."""

    lang: str
    text: str
    source: str
    answers: tuple

    @property
    def key(self) -> str:
        return normalize(self.text)


@dataclass
class BuildSummary:
    out: Path
    rows: Counter = field(default_factory=Counter)  # (split, lang, "asr"|"conv") -> rows
    clips_written: int = 0
    clips_reused: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> sentences left out
    answers_computed: int = 0
    answers_cached: int = 0
    vocab_computed: int = 0  # the vocab source's LLM replies
    vocab_cached: int = 0
    audio_seconds: float = 0.0

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def lines(self) -> list[str]:
        out = [f"{split:8s} {lang}  asr {self.rows[split, lang, 'asr']:6d}  conv {self.rows[split, lang, 'conv']:6d}"
               for split, lang in sorted({k[:2] for k in self.rows})]
        out.append(f"clips: {self.clips_written} written, {self.clips_reused} already there, "
                   f"{self.audio_seconds / 60:.1f} min of audio")
        if self.answers_computed or self.answers_cached:
            out.append(f"answers: {self.answers_computed} computed, {self.answers_cached} from the cache")
        if self.vocab_computed or self.vocab_cached:
            out.append(f"vocab replies: {self.vocab_computed} computed, {self.vocab_cached} from the cache")
        out.append(f"skipped: {self.n_skipped}" + (f" ({dict(self.skipped)})" if self.skipped else ""))
        return out


def normalize(text: str) -> str:
    """The identity of a sentence: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c)[0] in "PZS" else c for c in text)
    return " ".join(text.split())


def split_of(text: str, heldout_fraction: float, dev_fraction: float = 0.0) -> str:
    """'heldout' below heldout_fraction of the sentence's hash range, 'dev' in the next dev_fraction, else 'train':
    asking for a dev split takes it from the training sentences and leaves the held-out ones as they were."""
    digest = hashlib.sha1(normalize(text).encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "heldout" if u < heldout_fraction else "dev" if u < heldout_fraction + dev_fraction else "train"


def _stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).digest()[:8], "big")


# ---- texts -------------------------------------------------------------------------------------------------------

def corpus_pairs(lang: str) -> list[tuple[str, str, str]]:
    """(question, answer, source) from chatterbot-corpus: each statement of a conversation answers the previous one."""
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as e:
        raise DataBuildError(f"texts need chatterbot-corpus and pyyaml: pip install chatterbot-corpus pyyaml ({e})"
                             ) from None
    root = Path(chatterbot_corpus.__file__).parent / "data" / CORPUS_DIRS[lang]
    pairs = []
    for path in sorted(root.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            conv = [" ".join(str(s).split()) for s in conv]
            pairs += [(q, a, f"chatterbot/{path.stem}") for q, a in zip(conv, conv[1:]) if q and a]
    if not pairs:
        raise DataBuildError(f"no conversations found under {root}")
    return pairs


def math_pairs(lang: str, count: int, seed: int) -> list[tuple[str, str, str]]:
    """Templated arithmetic with small whole numbers: ('What is 17 plus 25?', '42')."""
    rng = random.Random(_stable_int("math", lang, seed))
    out = []
    for _ in range(count):
        op = rng.choice("+-*/")
        if op in "+-":
            a, b = rng.randint(0, 100), rng.randint(0, 100)
            a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
            result = a + b if op == "+" else a - b
        else:
            b, result = rng.randint(2, 12), rng.randint(1, 12)
            a = b * result
            a, b, result = (b, result, a) if op == "*" else (a, b, result)
        out.append((MATH_TEMPLATES[lang][op].format(a=a, b=b), str(result), "math"))
    return out


def sentences(lang: str, config: BuildConfig) -> list[Sentence]:
    """The language's spoken questions in a seeded order, unique by normalized text, at most config.limit."""
    pairs = corpus_pairs(lang) if "chatterbot" in config.sources else []
    pairs += math_pairs(lang, config.math_count, config.seed) if "math" in config.sources else []
    pairs += [(q, a, "facts") for q, a in FACTS[lang]] if "facts" in config.sources else []
    by_key: dict[str, list] = {}
    for q, a, source in pairs:
        key = normalize(q)
        if key and len(q) <= config.max_chars and re.search(r"\w", key):
            by_key.setdefault(key, [q, source, []])[2].append(a)
    keys = _seeded_order(by_key, "order", lang, config)
    return [Sentence(lang, by_key[k][0], by_key[k][1], tuple(dict.fromkeys(by_key[k][2]))) for k in keys]


def _seeded_order(keys, tag: str, lang: str, config: BuildConfig) -> list:
    """Sorted, then shuffled by (tag, lang, seed), then cut at config.limit: the same list on every machine."""
    keys = sorted(keys)
    random.Random(_stable_int(tag, lang, config.seed)).shuffle(keys)
    return keys[: config.limit] if config.limit else keys


ANSWER_SENTENCE = {"en": re.compile(r"[^.!?]*\w[^.!?]*[.!?]+"), "zh": re.compile(r"[^。！？!?]*\w[^。！？!?]*[。！？!?]+")}
ANSWER_MIN_WORDS = {"en": 4, "zh": 6}  # words (en) or characters (zh); shorter sentences say little


def answer_sentences(lang: str, answer: str, max_chars: int) -> list[str]:
    """The complete sentences of one answer: a fragment without end punctuation (cut off by the token cap) is
    dropped, and so are sentences shorter than ANSWER_MIN_WORDS, longer than max_chars, opening a numbered list
    ("... as follows: 1."), or holding a number of four digits or more (a voice reads years and counts in
    different ways) or markup."""
    out = []
    for m in ANSWER_SENTENCE[lang].finditer(" ".join(answer.split())):
        text = m.group(0).strip()
        size = len(text.split()) if lang == "en" else len(re.sub(r"\W", "", text))
        listed = re.search(r"[:：]\s*\d+[.)]$", text)  # "...including: 1." opens a numbered list and says little
        if ANSWER_MIN_WORDS[lang] <= size and len(text) <= max_chars and not listed \
                and not re.search(r"\d{4,}|[`*#_<>{}\[\]|\\]", text):
            out.append(text)
    return out


def answer_texts(lang: str, known: dict, config: BuildConfig, spoken: set) -> list[Sentence]:
    """ASR-only sentences from the cached answers to training questions, in a seeded order: none is a held-out
    sentence by the split rule, none repeats a sentence spoken as a question (`spoken`: normalized keys)."""
    by_key = {}
    for (row_lang, question), answer in known.items():
        if row_lang != lang or config.split(question) != "train":
            continue
        for text in answer_sentences(lang, answer, config.max_chars):
            key = normalize(text)
            if key not in spoken and config.split(text) == "train":
                by_key.setdefault(key, text)
    return [Sentence(lang, by_key[k], "answers", ()) for k in _seeded_order(by_key, "answers", lang, config)]


REMIX_WORDS = {"en": (4, 20), "zh": (6, 30)}  # words (en) or characters (zh) of a remixed sentence
JOINER = {"en": " ", "zh": ""}


def _units(lang: str, text: str) -> list[str]:
    return text.split() if lang == "en" else list(text)


def remix_texts(lang: str, pool: list[str], config: BuildConfig, spoken: set) -> list[Sentence]:
    """config.remix_count new ASR-only sentences, each the start of one training sentence followed by the end of
    another ("What is the capital of" + "bees make?"): a model that has learnt its training sentences by heart
    cannot finish these from their first words, it has to keep listening. `pool`: training sentences only, so no
    part of a held-out sentence is spoken; a remix that the split rule would hold out, one already spoken
    (`spoken`: normalized keys) and one that is a sentence of the pool are left out."""
    lo, hi = REMIX_WORDS[lang]
    spoken = spoken | {normalize(t) for t in pool}
    pool = sorted({t for t in pool if len(_units(lang, t)) >= 3 and config.split(t) == "train"})
    if len(pool) < 2:
        return []
    rng = random.Random(_stable_int("remix", lang, config.seed))

    def remix() -> str:
        a, b = (_units(lang, t) for t in rng.sample(pool, 2))
        return JOINER[lang].join(a[: rng.randint(2, len(a) - 1)] + b[rng.randint(1, len(b) - 2):])

    return _new_texts(lang, "remix", config.remix_count, remix, config, spoken,
                      lambda text: lo <= len(_units(lang, text)) <= hi)


def _new_texts(lang: str, source: str, count: int, make: Callable[[], str], config: BuildConfig, spoken: set,
               ok: Callable[[str], bool] = lambda text: True) -> list[Sentence]:
    """Up to `count` distinct ASR-only sentences drawn from make() (at most 50 draws each). A text that fails ok(),
    is too long, is already spoken (`spoken`: normalized keys) or would be held out by the split rule is left out."""
    out: dict[str, str] = {}
    for _ in range(50 * count):
        if len(out) == count:
            break
        text = make()
        key = normalize(text)
        if ok(text) and len(text) <= config.max_chars and key not in spoken and key not in out \
                and config.split(text) == "train":
            out[key] = text
    return [Sentence(lang, text, source, ()) for text in out.values()]


WORDS_LEN = {"en": (3, 10), "zh": (3, 8)}  # words (en) or two-character pieces (zh) of a word list


def vocabulary(lang: str, pool: list[str]) -> list[str]:
    """The words of `pool`, sorted: English words without their punctuation (lower case unless the pool only has
    them capitalised: names), or Mandarin two-character pieces of runs of Han characters."""
    if lang == "zh":
        runs = [r for t in pool for r in re.findall(r"[\u4e00-\u9fff]+", t)]
        return sorted({r[i: i + 2] for r in runs for i in range(len(r) - 1)})
    words = {w.strip(".,;:!?\"'()“”‘’") for t in pool for w in t.split()}
    words = {w for w in words if re.fullmatch(r"[A-Za-z]+(?:['’-][A-Za-z]+)*", w) and (len(w) > 1 or w in ("a", "I"))}
    return sorted({w if w.lower() not in words or w == "I" else w.lower() for w in words})


def word_texts(lang: str, pool: list[str], config: BuildConfig, spoken: set) -> list[Sentence]:
    """config.words_count ASR-only word lists: words of the training sentences in random order ("ocean bees
    why carrots"). Nothing in them can be guessed from context, so a model learns from them to hear each word.
    `pool`: training sentences only; a list that the split rule would hold out, or one already spoken, is left out."""
    lo, hi = WORDS_LEN[lang]
    vocab = vocabulary(lang, [t for t in pool if config.split(t) == "train"])
    if not vocab:
        return []
    rng = random.Random(_stable_int("words", lang, config.seed))
    return _new_texts(lang, "words", config.words_count,
                      lambda: JOINER[lang].join(rng.choice(vocab) for _ in range(rng.randint(lo, hi))), config, spoken)


def read_vocab(path: Path) -> list[str]:
    """The words of a word list (UTF-8, one word per line), in its order, each once."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataBuildError(f"cannot read the vocab file {path}: {e}") from None
    words = list(dict.fromkeys(w.strip() for w in text.splitlines() if w.strip()))
    if not words:
        raise DataBuildError(f"the vocab file {path} has no words")
    return words


VOCAB_PROMPTS = {  # two sentences per word, so a word can be heard in training and tested in another sentence
    "en": ('Write one short, simple English sentence that uses the word "{word}". Reply with the sentence only.',
           'Write a short English sentence about everyday life with the word "{word}" in it. Reply with the sentence '
           'only.'),
    "zh": ("用“{word}”造一个简单的短句。只回答这个句子。", "用“{word}”写一个关于日常生活的短句。只回答这个句子。"),
}


def _has_word(lang: str, text: str, word: str) -> bool:
    if lang == "zh":
        return word in text
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text, re.IGNORECASE) is not None


def vocab_texts(lang: str, pool: list[str], config: BuildConfig, spoken: set, write: Callable[[str, str], str]
                ) -> list[Sentence]:
    """ASR-only sentences around new words: the first config.vocab_count words of the config.vocab list that no
    training text has (`pool`: training sentences), each given to the LLM (`write(lang, prompt)`, cached) with the
    VOCAB_PROMPTS. The first complete sentence of a reply that holds its word and no quotation mark is kept, unless
    already spoken (`spoken`: normalized keys). The split rule decides each sentence's side, so some are held out:
    a test of words heard only in other sentences."""
    known = {w.lower() for w in vocabulary(lang, pool)}
    new = [w for w in read_vocab(config.vocab) if w.lower() not in known][: config.vocab_count]
    out: dict[str, Sentence] = {}
    for word in new:
        for prompt in VOCAB_PROMPTS[lang]:
            try:
                reply = write(lang, prompt.format(word=word))
            except Exception as e:  # the callback is user code (an LLM); a failure drops this sentence only
                log.warning("no sentence for %r: %s", word, e)
                continue
            text = next((t for t in answer_sentences(lang, reply, config.max_chars)
                         if _has_word(lang, t, word) and not re.search("[\"“”]", t)), None)  # quotes: the prompt echoed
            if text and normalize(text) not in spoken and normalize(text) not in out:
                out[normalize(text)] = Sentence(lang, text, "vocab", ())
    return list(out.values())


# ---- answers -----------------------------------------------------------------------------------------------------

class AnswerCache:
    """answers.jsonl: one {"lang", "question", "answer"} per line, appended as answers are computed."""

    def __init__(self, path: Path, answer: Callable[[str], str]):
        self.path, self.answer, self.computed, self.cached = path, answer, 0, 0
        self.known: dict[tuple, str] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.known[(row["lang"], row["question"])] = row["answer"]

    def __call__(self, lang: str, question: str) -> str:
        if (lang, question) in self.known:
            self.cached += 1
            return self.known[(lang, question)]
        text = str(self.answer(question)).strip()
        if not text:
            raise ValueError("the answer callback returned an empty answer")
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"lang": lang, "question": question, "answer": text}, ensure_ascii=False) + "\n")
        self.known[(lang, question)] = text
        self.computed += 1
        return text


# ---- rows --------------------------------------------------------------------------------------------------------

def conversation(kind: str, s: Sentence, clip: str, answer: str, rng: random.Random) -> list[dict]:
    if kind == "speech":
        user = [{"audio": clip}]
    elif kind == "speech+instruction":
        user = [{"text": rng.choice(ANSWER_INSTRUCTIONS[s.lang])}, {"audio": clip}]
    elif kind == "instruction+speech":
        user, answer = [{"text": rng.choice(REPEAT_INSTRUCTIONS[s.lang])}, {"audio": clip}], s.text
    else:
        user = s.text
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _write_clip(path: Path, samples: np.ndarray) -> None:
    import soundfile

    tmp = path.with_name(path.name + ".part")
    soundfile.write(str(tmp), samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)  # a clip file exists only once it is complete


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def build(config: BuildConfig, answer: Callable[[str], str] | None = None,
          engines: dict[str, Engine] | None = None, progress: bool = True) -> BuildSummary:
    """Build (or finish building) the data set in config.out; clips that already exist are kept, not respoken."""
    import soundfile
    from tqdm import tqdm

    if config.responses == "llm" and answer is None:
        raise DataBuildError("responses 'llm' needs an answer(question) -> str callback")
    if "vocab" in config.sources:
        read_vocab(config.vocab)  # a bad word list fails now, not after the questions are spoken
    out = config.out
    engines = dict(engines or {})
    for lang in config.langs:
        if lang not in engines:
            engines[lang] = make_engine(lang, config.engine_for(lang))
    (out / "clips").mkdir(parents=True, exist_ok=True)
    answers = AnswerCache(out / "answers.jsonl", answer) if config.responses == "llm" else None
    summary = BuildSummary(out)
    plan = [(j, s) for lang in config.langs for j, s in enumerate(sentences(lang, config))]
    manifests: dict[str, dict[str, list]] = {split: {"asr": [], "conv": [], "qa": []} for split in config.splits}

    def speak(s: Sentence) -> tuple[str, dict] | None:
        """The sentence's clip (spoken now, or found from an earlier run) and its manifest metadata; None if the
        voice failed or the clip is out of bounds (counted in the summary)."""
        rng = np.random.default_rng([config.seed, _stable_int("clip", s.lang, s.key)])
        voice = engines[s.lang].name
        variation = Variation.sample(rng, config.noise)
        clip_id = hashlib.sha1(json.dumps([voice, s.text, variation.to_dict()]).encode("utf-8")).hexdigest()[:16]
        clip = f"clips/{s.lang}-{clip_id}.wav"
        path = out / clip
        if path.is_file():
            summary.clips_reused += 1
        else:
            try:
                samples = render(engines[s.lang], s.text, variation, rng)
            except Exception as e:  # any engine failure (onnxruntime, espeak, a callback) skips only this sample
                summary.skipped["tts failed"] += 1
                log.warning("skipped %r: %s", s.text, str(e).splitlines()[0] if str(e) else type(e).__name__)
                return None
            if samples.size < MIN_SAMPLES or samples.size > MAX_CLIP_S * SAMPLE_RATE:
                summary.skipped["too short" if samples.size < MIN_SAMPLES else "too long"] += 1
                return None
            _write_clip(path, samples)
            summary.clips_written += 1
        seconds = soundfile.info(str(path)).duration
        summary.audio_seconds += seconds
        return clip, {"voice": voice, "variation": variation.to_dict(), "seconds": round(seconds, 3)}

    for j, s in tqdm(plan, desc="speech data", unit="clip", disable=not progress):
        pick = random.Random(_stable_int("pick", s.lang, s.key, config.seed))
        spoken = speak(s)
        if spoken is None:
            continue
        clip, audio_meta = spoken
        kind = KINDS[j % len(KINDS)]  # j counts this language's sentences: kinds stay put when limit grows
        try:
            reply = answers(s.lang, s.text) if answers and kind != "instruction+speech" else pick.choice(s.answers)
        except Exception as e:  # the callback is user code (an LLM); a failure drops this sentence only
            summary.skipped["answer failed"] += 1
            log.warning("no answer for %r: %s", s.text, e)
            continue
        split = config.split(s.text)
        meta = {"lang": s.lang, "source": s.source, "split": split}
        manifests[split]["asr"].append({"audio": clip, "text": s.text, **meta, **audio_meta})
        turns = conversation(kind, s, clip, reply, pick)
        audio_meta = audio_meta if kind != "text" else {}
        manifests[split]["conv"].append({"turns": turns, "kind": kind, **meta, **audio_meta})
        short = [a for a in s.answers if 0 < len(a.split()) <= QA_MAX_WORDS]
        if s.source in QA_SOURCES and short:  # questions with a short checkable answer: spoken-QA evaluation
            manifests[split]["qa"].append({"audio": clip, "question": s.text, "answers": short, **meta})

    spoken_keys = {s.key for _, s in plan}
    extra = []
    if "answers" in config.sources:  # after the questions, so that this run's own answers are in the cache
        extra += [s for lang in config.langs for s in answer_texts(lang, answers.known, config, spoken_keys)]
    makers = [make for name, make in (("remix", remix_texts), ("words", word_texts)) if name in config.sources]
    if "vocab" in config.sources:  # the LLM's sentences are cached apart from its answers to questions
        writer = AnswerCache(out / "vocab.jsonl", answer)
        makers.append(lambda lang, pool, config, spoken: vocab_texts(lang, pool, config, spoken, writer))
    for lang in config.langs if makers else ():  # their pool: every training question, and the cached answers
        pool = [s.text for s in sentences(lang, replace(config, sources=DEFAULT_SOURCES, limit=None))]
        pool += [s.text for s in answer_texts(lang, answers.known, config, spoken_keys)] if answers else []
        for make in makers:
            extra += make(lang, pool, config, spoken_keys | {s.key for s in extra})
    if extra:
        for s in tqdm(extra, desc="extra ASR sentences", unit="clip", disable=not progress):
            spoken = speak(s)
            if spoken is not None:
                clip, audio_meta = spoken
                split = config.split(s.text)  # only vocab sentences can be held out (or dev)
                manifests[split]["asr"].append({"audio": clip, "text": s.text, "lang": s.lang, "source": s.source,
                                                "split": split, **audio_meta})

    for split, names in manifests.items():
        for name, rows in names.items():
            _write_jsonl(out / (f"{name}.jsonl" if split == "train" else f"{name}.{split}.jsonl"), rows)
            for r in rows:
                summary.rows[(split, r["lang"], name)] += 1
    for name in () if config.dev_fraction else ("asr", "conv", "qa"):  # an earlier build's dev rows now train
        (out / f"{name}.dev.jsonl").unlink(missing_ok=True)
    if answers:
        summary.answers_computed, summary.answers_cached = answers.computed, answers.cached
    if "vocab" in config.sources:
        summary.vocab_computed, summary.vocab_cached = writer.computed, writer.cached
    _write_metadata(config, engines, summary)
    return summary


def _write_metadata(config: BuildConfig, engines: dict[str, Engine], summary: BuildSummary) -> None:
    voices = {lang: engines[lang].name for lang in config.langs}
    dev = (f"; dev (to choose checkpoints by, never to report): the next {config.dev_fraction} of the hash range"
           if config.dev_fraction else "")
    heldout = (f"by sentence: sha1 of the normalized question < {config.heldout_fraction}{dev}; no sentence is on "
               "two sides. Each language has one voice, so no voice is held out: held-out clips use the training voice "
               "and the same variation ranges (speed 0.85-1.15, pitch +-1.5 semitones, peak -12..-1 dBFS"
               + (", white noise 5-30 dB SNR on 80% of clips)" if config.noise else ", no noise)"))
    meta = {
        "format": "llasm.speech_data", "version": FORMAT_VERSION,
        "config": {**asdict(config), "out": str(config.out), "engines": dict(config.engines)},
        "voices": voices, "heldout": heldout,
        "manifests": {split: [f"asr{suffix}.jsonl", f"conv{suffix}.jsonl"]
                      for split in config.splits for suffix in ["" if split == "train" else f".{split}"]},
        "rows": {"/".join(k): v for k, v in sorted(summary.rows.items())},
        "skipped": dict(summary.skipped), "audio_seconds": round(summary.audio_seconds, 1),
    }
    (config.out / "dataset.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    readme = [
        "# Synthetic speech data (llasm-data build)", "",
        "- `asr.jsonl`, `conv.jsonl`: training manifests; `asr.heldout.jsonl`, `conv.heldout.jsonl`: held out"
        + ("; `asr.dev.jsonl`, `conv.dev.jsonl`: dev, to choose checkpoints by." if config.dev_fraction else "."),
        "- Clips: `clips/<lang>-<id>.wav`, 16 kHz mono; each row records its voice and variation.",
        f"- Voices: {', '.join(f'{k}: {v}' for k, v in voices.items())}.",
        f"- Held out {heldout}.",
        f"- Responses: {config.responses}" + (" (cached in answers.jsonl)." if config.responses == "llm" else "."),
        f"- Texts: {', '.join(config.sources)} (chatterbot = chatterbot-corpus Q/A; math = templated arithmetic; "
        f"answers = complete sentences of the cached LLM answers to training questions, ASR rows only; remix = the "
        f"start of one training sentence and the end of another, ASR rows only; words = training words in random "
        f"order, ASR rows only; vocab = the LLM's sentences around words of the --vocab list that no training text "
        f"has, ASR rows only, some held out)" + (f"; vocab list: {config.vocab}." if config.vocab else "."), "",
    ]
    (config.out / "README.md").write_text("\n".join(readme), encoding="utf-8")
