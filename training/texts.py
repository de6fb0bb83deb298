"""Sentences at scale for speech data: packaged text sources, cut into plain sentences, ordered to cover vocabulary.

    fortunes     en  Debian `fortunes` (the clean set; fortunes-off is not read)
    bible        en  Debian `sword-text-web` + `diatheke`: the World English Bible (public domain), archaic; words the
                     markup glued together ("Godcreated") are unknown to wordfreq and drop their sentence
    wordnet      en  Debian `wordnet-base`: the quoted example phrases of the glosses, capitalised and ended with "."
    fortunes-zh  zh  Debian `fortunes-zh`, its collection "chinese" (sayings, much of it classical; traditional
                     characters made simplified; the Tang and Song poem collections are left out)
    hsk          zh  PyPI `hsk-sentences-audio`: HSK 1-6 example sentences (text only; CC-BY-SA-4.0)

A sentence is kept when it reads aloud one way: English of 5-20 words with letters and plain punctuation only (no
digits, brackets or symbols) and no word unknown to wordfreq; Mandarin of 6-30 Han characters with Chinese
punctuation only. `coverage_order` ranks sentences greedily by the vocabulary they add: each word is worth its
wordfreq Zipf value (common words first, junk nothing), halved each time the data already has it, per word spoken.
"""
from __future__ import annotations

import functools
import heapq
import logging
import re
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = {"fortunes": "en", "bible": "en", "wordnet": "en", "fortunes-zh": "zh", "hsk": "zh"}
HINTS = {
    "fortunes": "apt-get install fortunes",
    "bible": "apt-get install sword-text-web diatheke",
    "wordnet": "apt-get install wordnet-base",
    "fortunes-zh": "apt-get install fortunes-zh",
    "hsk": "pip install hsk-sentences-audio",
    "wordfreq": "pip install wordfreq",
    "jieba": "pip install jieba",
    "zhconv": "pip install zhconv",
}
FORTUNES = Path("/usr/share/games/fortunes")
ENGLISH_FORTUNES = ("art", "computers", "cookie", "definitions", "disclaimer", "drugs", "education", "ethnic",
                    "food", "fortunes", "goedel", "humorists", "kids", "knghtbrd", "law", "linux", "linuxcookie",
                    "literature", "love", "magic", "medicine", "men-women", "miscellaneous", "news", "paradoxum",
                    "people", "pets", "platitudes", "politics", "pratchett", "riddles", "science", "songs-poems",
                    "sports", "startrek", "tao", "translate-me", "wisdom", "work", "zippy")  # not ascii-art, perl
WORDNET = Path("/usr/share/wordnet")
BIBLE = ["diatheke", "-b", "engWEB2015eb", "-f", "plain", "-k", "Genesis 1:1-Revelation 22:21"]
EN_WORDS, ZH_CHARS = (5, 20), (6, 30)
REPEAT_DISCOUNT = 0.5  # a word's worth each time the data already has it


class TextSourceError(ValueError):
    """A text source that is not installed or gives nothing."""


# ---- reading the sources -----------------------------------------------------------------------------------------

def read(source: str) -> list[str]:
    """The raw passages of a source (each one or more sentences), in the source's order."""
    if source not in SOURCES:
        raise TextSourceError(f"text source must be one of {tuple(SOURCES)}, got {source!r}")
    try:
        passages = {"fortunes": _fortunes_en, "bible": _bible, "wordnet": _wordnet, "fortunes-zh": _fortunes_zh,
                    "hsk": _hsk}[source]()
    except (OSError, ImportError, subprocess.SubprocessError) as e:
        raise TextSourceError(f"text source {source} is not installed ({e}): {HINTS[source]}") from None
    if not passages:
        raise TextSourceError(f"text source {source} gave no text: {HINTS[source]}")
    return passages


def _fortune_entries(path: Path) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(encoding="utf-8", errors="replace"))  # colour codes
    entries = []
    for entry in re.split(r"\n%\n", text):
        lines = [ln for ln in entry.splitlines() if not re.match(r"\s*(--|——)", ln)]  # attributions
        entries.append(lines)
    return entries


def _fortunes_en() -> list[str]:
    files = [FORTUNES / name for name in ENGLISH_FORTUNES if (FORTUNES / name).is_file()]
    if not files:
        raise OSError(f"no fortune files in {FORTUNES}")
    return [" ".join(ln.strip() for ln in lines) for path in files for lines in _fortune_entries(path)]


def _fortunes_zh() -> list[str]:
    return ["".join(ln.strip().replace("\xa0", "") for ln in lines) for lines in _fortune_entries(FORTUNES / "chinese")]


def _bible() -> list[str]:
    """Verse texts and poetry lines, without their references; the glossary (one long line at the end) is left out."""
    out = subprocess.run(BIBLE, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
                         check=True).stdout
    lines = [re.sub(r"^\s*(?:[1-3] )?[A-Z][\w ()]*? \d+:\d+:\s*", "", ln) for ln in out.splitlines()]
    return [ln.strip() for ln in lines if ln.strip() and len(ln) < 2000 and not ln.startswith("(engWEB")]


def _wordnet() -> list[str]:
    """The quoted examples of WordNet glosses ("he breathed a sigh of relief"), capitalised, with an end mark."""
    out = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{part}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" "):
                continue  # the licence header
            out += [_wordnet_example(e) for e in re.findall(r'"([^"]+)"', line.partition(" | ")[2]) if e.strip()]
    return out


def _wordnet_example(text: str) -> str:
    text = text.strip()
    text = text[0].upper() + text[1:]
    return text if re.search(r"[.!?]$", text) else text + "."


def _hsk() -> list[str]:
    import hsk_sentences_audio

    return [row["chinese"] for row in hsk_sentences_audio.load_sentences()]


# ---- sentences ---------------------------------------------------------------------------------------------------

EN_SENTENCE = re.compile(r"[^.!?]+[.!?]+(?=\s|$)")
ZH_SENTENCE = re.compile(r"[^。！？]+[。！？]+")
EN_PLAIN = re.compile(r"[A-Z][A-Za-z' ,;:-]*[a-z][.!?]")
ZH_PLAIN = re.compile(r"[\u4e00-\u9fff][\u4e00-\u9fff，、；：]*[。！？]")


def sentences(lang: str, passages: list[str]) -> list[str]:
    """The plain sentences of `passages`, each once (by its words), in first-seen order."""
    out: dict[str, str] = {}
    for passage in passages:
        for text in (_english if lang == "en" else _mandarin)(passage):
            out.setdefault(" ".join(words(lang, text)), text)
    return list(out.values())


def _english(passage: str) -> list[str]:
    passage = " ".join(passage.replace("’", "'").replace("‘", "'").replace("—", ", ").split())
    passage = re.sub(r"[“”\"]|(?<![A-Za-z])'|'(?![A-Za-z])", "", passage)  # quotation marks, not apostrophes
    passage = re.sub(r"(?:^|(?<=\s))[A-Z]:\s", "", passage)  # "Q: ... A: ..."
    kept = []
    for m in EN_SENTENCE.finditer(passage):
        text = re.sub(r"\s+([,;:.!?])", r"\1", m.group(0).strip())
        if EN_PLAIN.fullmatch(text) and EN_WORDS[0] <= len(text.split()) <= EN_WORDS[1] \
                and all(zipf("en", w) > 0 for w in words("en", text)):
            kept.append(text)
    return kept


def _mandarin(passage: str) -> list[str]:
    passage = re.sub(r"\s+", "", _simplified(passage)).replace("“", "").replace("”", "").replace(",", "，")
    return [t for t in (m.group(0) for m in ZH_SENTENCE.finditer(passage))
            if ZH_PLAIN.fullmatch(t) and ZH_CHARS[0] <= len(re.sub(r"\W", "", t)) <= ZH_CHARS[1]]


def words(lang: str, text: str) -> list[str]:
    """English: lower-case words (apostrophes kept); Mandarin: jieba's words of its Han runs."""
    if lang == "en":
        return re.findall(r"[a-z]+(?:'[a-z]+)*", text.lower())
    return [w for run in re.findall(r"[\u4e00-\u9fff]+", text) for w in _jieba().lcut(run, HMM=False)]


def _simplified(text: str) -> str:
    try:
        import zhconv
    except ImportError:
        raise TextSourceError(f"Mandarin texts need zhconv (traditional -> simplified): {HINTS['zhconv']}") from None
    return zhconv.convert(text, "zh-cn")


@functools.lru_cache(maxsize=1)
def _jieba():
    try:
        import jieba
    except ImportError:
        raise TextSourceError(f"Mandarin words need jieba (its dict.txt): {HINTS['jieba']}") from None
    jieba.setLogLevel(logging.WARNING)
    return jieba


@functools.lru_cache(maxsize=None)
def zipf(lang: str, word: str) -> float:
    """wordfreq's Zipf value (log10 per billion words + 9; 'the' ~7.7, unknown 0)."""
    try:
        import wordfreq
    except ImportError:
        raise TextSourceError(f"choosing sentences by vocabulary needs wordfreq: {HINTS['wordfreq']}") from None
    return wordfreq.zipf_frequency(word, lang)


# ---- choosing sentences ------------------------------------------------------------------------------------------

def coverage_order(lang: str, candidates: list[str], known: list[str] = (), count: int | None = None) -> list[str]:
    """`count` of `candidates` (all by default), greedily: each next sentence is the one whose words add the most
    worth per word spoken, where a word is worth its Zipf value times REPEAT_DISCOUNT ** (times the data has it).
    `known`: sentences the data has already (their words count as had). Deterministic: ties go to the sentence
    first in `candidates`."""
    seen: dict[str, int] = {}
    for text in known:
        for w in set(words(lang, text)):
            seen[w] = seen.get(w, 0) + 1
    units = [sorted(set(words(lang, t))) for t in candidates]
    sizes = [max(1, len(words(lang, t))) for t in candidates]

    def gain(i: int) -> float:
        return sum(zipf(lang, w) * REPEAT_DISCOUNT ** seen.get(w, 0) for w in units[i]) / sizes[i]

    heap = [(-gain(i), i) for i in range(len(candidates))]  # lazy greedy: gains only fall as words are had
    heapq.heapify(heap)
    order = []
    while heap and (count is None or len(order) < count):
        neg, i = heapq.heappop(heap)
        now = gain(i)
        if heap and now < -heap[0][0] - 1e-12:
            heapq.heappush(heap, (-now, i))  # stale: someone else's words made it worth less
            continue
        order.append(candidates[i])
        for w in units[i]:
            seen[w] = seen.get(w, 0) + 1
    return order
