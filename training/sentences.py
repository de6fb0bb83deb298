"""What a speech-data build speaks: sentences, their split, and where they come from (see speech_data.py).

    questions   chatterbot-corpus Q/A (en, zh), templated arithmetic, a few hand-written facts: each with its
                reference answers
    texts       packaged sentences (texts.py: fortunes, the World English Bible, WordNet examples, fortunes-zh, HSK)
                chosen greedily to cover vocabulary, after the questions; no reference answers
    derived     the sentences of the LLM's answers to training questions, remixes (the start of one training
                sentence, the end of another), word lists (training words in random order) and sentences the LLM
                writes around words of a word list that no training text has (vocab): ASR rows only
    split       sha1 of the normalized sentence decides train / held-out (and dev, if asked), so a sentence never
                lands on two sides
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from . import texts as text_sources
from .conversations import is_task

if TYPE_CHECKING:
    from .speech_data import BuildConfig

log = logging.getLogger(__name__)

QUESTION_SOURCES = ("chatterbot", "math", "facts")
DERIVED_SOURCES = ("answers", "remix", "words", "vocab")
SOURCES = QUESTION_SOURCES + tuple(text_sources.SOURCES) + DERIVED_SOURCES
DEFAULT_SOURCES = QUESTION_SOURCES

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


class DataBuildError(ValueError):
    pass



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


def stable_int(*parts) -> int:
    return int.from_bytes(hashlib.sha1("\x1f".join(map(str, parts)).encode("utf-8")).digest()[:8], "big")



# ---- texts ---------------------------------------------------------------------------------------------------------

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
    rng = random.Random(stable_int("math", lang, seed))
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
    """The language's spoken sentences, unique by normalized text, at most config.limit: the questions in a seeded
    order, then the packaged texts of config.sources in coverage order (their vocabulary after the questions')."""
    pairs = corpus_pairs(lang) if "chatterbot" in config.sources else []
    pairs += math_pairs(lang, config.math_count, config.seed) if "math" in config.sources else []
    pairs += [(q, a, "facts") for q, a in FACTS[lang]] if "facts" in config.sources else []
    by_key: dict[str, list] = {}
    for q, a, source in pairs:
        key = normalize(q)
        if key and len(q) <= config.max_chars and re.search(r"\w", key):
            by_key.setdefault(key, [q, source, []])[2].append(a)
    keys = _seeded_order(by_key, "order", lang, config)
    out = [Sentence(lang, by_key[k][0], by_key[k][1], tuple(dict.fromkeys(by_key[k][2]))) for k in keys]
    if config.limit is None or len(out) < config.limit:
        out += packaged_texts(lang, config, [s.text for s in out],
                              None if config.limit is None else config.limit - len(out))
    return out


def packaged_texts(lang: str, config: BuildConfig, known: list[str], count: int | None) -> list[Sentence]:
    """`count` sentences of the packaged text sources in config.sources for `lang`, in coverage order after the
    vocabulary of `known` (texts.coverage_order), none repeating a known one or longer than config.max_chars."""
    seen, candidates = {normalize(t) for t in known}, []
    for source in (s for s in config.sources if text_sources.SOURCES.get(s) == lang):
        for text in text_sources.sentences(lang, text_sources.read(source)):
            key = normalize(text)
            if key not in seen and len(text) <= config.max_chars:
                seen.add(key)
                candidates.append((text, source))
    source_of = dict(candidates)
    chosen = text_sources.coverage_order(lang, [t for t, _ in candidates], known, count)
    return [Sentence(lang, text, source_of[text], ()) for text in chosen]


def _seeded_order(keys, tag: str, lang: str, config: BuildConfig) -> list:
    """Sorted, then shuffled by (tag, lang, seed), then cut at config.limit: the same list on every machine."""
    keys = sorted(keys)
    random.Random(stable_int(tag, lang, config.seed)).shuffle(keys)
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
    sentence by the split rule, none repeats a sentence spoken as a question (`spoken`: normalized keys). Answers
    to tasks about statements are left out: they explain or translate their sentence, so they hold its words, and
    the question's split is not the sentence's."""
    by_key = {}
    for (row_lang, question), answer in known.items():
        if row_lang != lang or is_task(question) or config.split(question) != "train":
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
    rng = random.Random(stable_int("remix", lang, config.seed))

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
    rng = random.Random(stable_int("words", lang, config.seed))
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




def derived(config: BuildConfig, spoken: set, known: dict | None, write: Callable[[str, str], str] | None
            ) -> list[Sentence]:
    """The ASR-only sentences of config.sources: the cached answers' (`known`: (lang, question) -> answer),
    remixes, word lists and vocab sentences (`write`: the LLM, cached). `spoken`: normalized keys of the questions.
    Their pool: every training question, and the cached answers."""
    extra = []
    if "answers" in config.sources:
        extra += [s for lang in config.langs for s in answer_texts(lang, known, config, spoken)]
    makers = [make for name, make in (("remix", remix_texts), ("words", word_texts)) if name in config.sources]
    if "vocab" in config.sources:
        makers.append(lambda lang, pool, config, spoken: vocab_texts(lang, pool, config, spoken, write))
    for lang in config.langs if makers else ():
        pool = [s.text for s in sentences(lang, replace(config, sources=DEFAULT_SOURCES, limit=None))]
        pool += [s.text for s in answer_texts(lang, known, config, spoken)] if known is not None else []
        for make in makers:
            extra += make(lang, pool, config, spoken | {s.key for s in extra})
    return extra
