"""Scoring text against references, torch-free: normalization, WER / CER with S/D/I counts, answer matching.

    English   normalize_en: NFKC, case-folded; apostrophes dropped ("don't" -> "dont"); other punctuation and
              symbols become spaces, except "." and "," inside numbers ("3.5", "1,000" -> "1000"); "%" -> "percent";
              number words become digits ("twenty-five" / "twenty five" -> "25", "one hundred and five" -> "105",
              "two point five" -> "2.5", "3 thousand" -> "3000"); whitespace collapsed. Scored in words (WER).
    Chinese   normalize_zh: NFKC (full-width -> half-width), traditional -> simplified characters, case-folded;
              Chinese numerals become digits ("十二" -> "12", "一百零五" -> "105", "两千五" -> "2500",
              "二〇二四" -> "2024"); punctuation, symbols and spaces removed. Scored in characters (CER), so a
              number counts its digits ("一百零五" is 3 characters).

Traditional -> simplified uses zhconv ("zh-hans": character conversion, no regional vocabulary swaps), which comes
with `pip install 'llasm[bench]'`. Without it Chinese is scored unconverted (traditional characters count as errors
against a simplified reference) and a warning is logged once; `normalization()` says which was used, and
llasm-eval prints it with its results.

Chinese numerals (traditional 兩萬億 included, with or without zhconv): a run of two or more digits is read digit by
digit (years, phone numbers); otherwise a number is digit-unit pairs in decreasing units (十百千 within 万 and 亿
groups), with 零 marking a gap ("一千零五" -> "1005"), 十 with no digit before it meaning 一十 ("十二" -> "12") and
a digit after a unit scaling to the next unit down ("一百五" -> "150", "三万五" -> "35000"). 百, 千, 万 and 亿 with
no digit before them stay characters ("百姓", "千万", "万一"). The conversion is the same on both sides, so words
with numerals in them ("一起" -> "1起") still compare equal; "点" is not read as a decimal point.

Error rates: rate = (substitutions + deletions + insertions) / reference length. A corpus rate adds the counts of
all items first (total edits / total reference units), never averages per-item rates. An empty reference has no
rate of its own: its rate is 0.0 when the hypothesis is empty too and 1.0 otherwise; its insertions still count
in the corpus total.
"""
from __future__ import annotations

import logging
import math
import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

log = logging.getLogger(__name__)

LANGS = ("en", "zh")

# ---- language ------------------------------------------------------------------------------------------------------

_CJK = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")


def detect_lang(text: str) -> str:
    """'zh' when the text has any CJK ideograph, else 'en'."""
    return "zh" if _CJK.search(text) else "en"


# ---- normalization -------------------------------------------------------------------------------------------------

_ONES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine".split())}
_TEENS = {w: 10 + i for i, w in enumerate(
    "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 20 + 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split())}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_APOSTROPHES = "'\u2019\u02bc`"
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _is_small(word: str) -> bool:
    """A number word that can follow 'and' inside a number: one..ninety-nine."""
    return (word in _ONES and word != "zero") or word in _TEENS or word in _TENS


def _parse_number(tokens: Sequence[str], i: int) -> tuple[str | None, int]:
    """The longest spelled number starting at tokens[i]: (its digits, index after it), or (None, i)."""
    if tokens[i] == "zero":
        return "0", i + 1
    total, group = 0, 0  # completed scale groups; the current group below the last scale (< 1000)
    last, last_scale = None, float("inf")  # kind of the previous token; scales must decrease
    decimals = ""
    j = i
    while j < len(tokens):
        w = tokens[j]
        if last is None and w.isascii() and w.isdigit() and j + 1 < len(tokens) and (
                tokens[j + 1] == "hundred" or tokens[j + 1] in _SCALES):
            group, last = int(w), "digits"  # "3 thousand": digits only start a number before a scale word
        elif w in _ONES and w != "zero" and last in (None, "tens", "hundred", "scale"):
            group, last = group + _ONES[w], "unit"
        elif w in _TEENS and last in (None, "hundred", "scale"):
            group, last = group + _TEENS[w], "teen"
        elif w in _TENS and last in (None, "hundred", "scale"):
            group, last = group + _TENS[w], "tens"
        elif w == "hundred" and last in ("unit", "teen", "tens", "digits") and group < 100:
            group, last = group * 100, "hundred"
        elif w in _SCALES and last in ("unit", "teen", "tens", "hundred", "digits") and _SCALES[w] < last_scale:
            total, group, last, last_scale = total + group * _SCALES[w], 0, "scale", _SCALES[w]
        elif w == "and" and last in ("hundred", "scale") and j + 1 < len(tokens) and _is_small(tokens[j + 1]):
            pass  # "one hundred and five"
        elif w == "point" and last is not None and j + 1 < len(tokens) and tokens[j + 1] in _ONES:
            j += 1
            while j < len(tokens) and tokens[j] in _ONES:
                decimals += str(_ONES[tokens[j]])
                j += 1
            break
        else:
            break
        j += 1
    if last is None:
        return None, i
    return str(total + group) + ("." + decimals if decimals else ""), j


def _numbers_to_digits(tokens: Sequence[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(tokens):
        value, j = _parse_number(tokens, i)
        if value is None:
            out.append(tokens[i])
            i += 1
        else:
            out.append(value)
            i = j
    return out


def _strip_punctuation(text: str) -> str:
    chars = []
    for k, c in enumerate(text):
        if c in _APOSTROPHES:
            continue
        if c == "." and 0 < k < len(text) - 1 and text[k - 1].isdigit() and text[k + 1].isdigit():
            chars.append(c)  # a decimal point
        elif unicodedata.category(c)[0] in "PSZC":
            chars.append(" ")
        else:
            chars.append(c)
    return "".join(chars)


def normalize_en(text: str) -> str:
    """English text in one canonical form for WER and answer matching (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = _DIGIT_COMMA.sub("", text).replace("%", " percent ")
    return " ".join(_numbers_to_digits(_strip_punctuation(text).split()))


_ZH_DIGITS = {c: d for d, cs in enumerate(("零〇", "一", "二两兩", "三", "四", "五", "六", "七", "八", "九")) for c in cs}
_ZH_SMALL_UNITS = {"十": 10, "百": 100, "千": 1000}
_ZH_BIG_UNITS = {"万": 10**4, "萬": 10**4, "亿": 10**8, "億": 10**8}


def _parse_zh_number(s: str, i: int) -> tuple[str | None, int]:
    """The longest Chinese number starting at s[i]: (its digits, index after it), or (None, i)."""
    j = i
    while j < len(s) and s[j] in _ZH_DIGITS:
        j += 1
    if j - i >= 2 or (j - i == 1 and (j == len(s) or (s[j] not in _ZH_SMALL_UNITS and s[j] not in _ZH_BIG_UNITS))):
        return "".join(str(_ZH_DIGITS[c]) for c in s[i:j]), j  # digit by digit: 二〇二四, 一
    if j == i and s[i] != "十":
        return None, i
    total, section = 0, 0  # completed 万/亿 groups; the current group below the last big unit (< 10^4)
    digit = None  # a digit waiting for its unit
    unit = None  # the last unit read (scales a trailing digit: 一百五 -> 150); None at the start or after 零
    small, big = math.inf, math.inf  # units must decrease: small ones within a group, big ones overall
    best, end = None, i
    k = i
    while k < len(s):
        c = s[k]
        if c in _ZH_DIGITS:
            if digit is not None or (_ZH_DIGITS[c] == 0 and unit is None and k > i):
                break
            if _ZH_DIGITS[c] == 0:
                unit = None  # 零 marks a gap: the next digit is not scaled (一百零五 -> 105)
                k += 1
                continue
            digit = _ZH_DIGITS[c]
        elif c in _ZH_SMALL_UNITS:
            u = _ZH_SMALL_UNITS[c]
            if (digit is None and c != "十") or u >= small:
                break
            section, digit, unit, small = section + (1 if digit is None else digit) * u, None, u, u
        elif c in _ZH_BIG_UNITS:
            u = _ZH_BIG_UNITS[c]
            if (digit is None and section == 0) or u >= big:
                break
            total += (section + (digit or 0)) * u
            section, digit, unit, small, big = 0, None, u, math.inf, u
        else:
            break
        k += 1
        if digit is None:
            best, end = total + section, k
        else:
            best, end = total + section + digit * (unit // 10 if unit else 1), k
    return (None, i) if best is None else (str(best), end)


def _zh_numerals_to_digits(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        value, j = _parse_zh_number(text, i)
        if value is None:
            out.append(text[i])
            i += 1
        else:
            out.append(value)
            i = j
    return "".join(out)


@lru_cache(maxsize=None)
def _to_simplified():
    """zhconv's converter to simplified characters, or None (with one warning) when zhconv is not installed."""
    try:
        import zhconv
    except ImportError:
        log.warning("zhconv is not installed: Chinese is scored without traditional -> simplified conversion "
                    "(pip install 'llasm[bench]')")
        return None
    return lambda text: zhconv.convert(text, "zh-hans")


def normalization() -> dict:
    """How text is normalized before scoring in this environment (llasm-eval reports it with its results)."""
    if _to_simplified() is None:
        simplified = "off (zhconv not installed: pip install 'llasm[bench]')"
    else:
        from importlib.metadata import PackageNotFoundError, version
        try:
            simplified = f"zhconv {version('zhconv')} zh-hans"
        except PackageNotFoundError:
            simplified = "zhconv zh-hans"
    return {"en": "NFKC, case-folded, punctuation removed, number words -> digits",
            "zh": f"NFKC, traditional -> simplified: {simplified}, numerals -> digits, punctuation removed"}


def normalize_zh(text: str, halfwidth: bool = True) -> str:
    """Chinese text for CER and answer matching (see the module docstring); halfwidth=False skips NFKC."""
    if halfwidth:
        text = unicodedata.normalize("NFKC", text)
    simplify = _to_simplified()
    if simplify is not None:
        text = simplify(text)
    text = "".join(c for c in text.casefold() if unicodedata.category(c)[0] not in "PSZC")
    return _zh_numerals_to_digits(text)


def normalize(text: str, lang: str) -> str:
    if lang == "en":
        return normalize_en(text)
    if lang == "zh":
        return normalize_zh(text)
    raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")


def units(text: str, lang: str) -> list[str]:
    """What an error rate counts: normalized words (en) or characters (zh)."""
    norm = normalize(text, lang)
    return norm.split() if lang == "en" else list(norm)


# ---- edit distance -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EditCounts:
    """Levenshtein alignment of a hypothesis against a reference, in words or characters."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_len: int = 0

    def __post_init__(self):
        if min(self.substitutions, self.deletions, self.insertions, self.ref_len) < 0:
            raise ValueError(f"edit counts must be >= 0, got {self}")
        if self.substitutions + self.deletions > self.ref_len:
            raise ValueError(f"substitutions + deletions exceed the reference length in {self}")

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def hits(self) -> int:
        return self.ref_len - self.substitutions - self.deletions

    @property
    def rate(self) -> float:
        """errors / ref_len; an empty reference scores 0.0 against an empty hypothesis, else 1.0."""
        if self.ref_len == 0:
            return 0.0 if self.errors == 0 else 1.0
        return self.errors / self.ref_len

    def __add__(self, other: "EditCounts") -> "EditCounts":
        return EditCounts(self.substitutions + other.substitutions, self.deletions + other.deletions,
                          self.insertions + other.insertions, self.ref_len + other.ref_len)

    def to_dict(self) -> dict:
        return {"substitutions": self.substitutions, "deletions": self.deletions, "insertions": self.insertions,
                "edits": self.errors, "ref_len": self.ref_len, "rate": self.rate}


def edit_counts(ref: Sequence, hyp: Sequence) -> EditCounts:
    """Minimum-edit alignment by dynamic programming; ties prefer substitution, then deletion, then insertion."""
    # Each cell: (cost, substitutions, deletions, insertions) of the best alignment of ref[:i] with hyp[:j].
    prev = [(j, 0, 0, j) for j in range(len(hyp) + 1)]
    for i in range(1, len(ref) + 1):
        cur = [(i, 0, i, 0)]
        for j in range(1, len(hyp) + 1):
            if ref[i - 1] == hyp[j - 1]:
                cur.append(prev[j - 1])  # a match is always part of some optimal alignment
                continue
            c, s, d, n = prev[j - 1]
            best = (c + 1, s + 1, d, n)
            c, s, d, n = prev[j]
            if c + 1 < best[0]:
                best = (c + 1, s, d + 1, n)
            c, s, d, n = cur[j - 1]
            if c + 1 < best[0]:
                best = (c + 1, s, d, n + 1)
            cur.append(best)
        prev = cur
    _, s, d, n = prev[-1]
    return EditCounts(substitutions=s, deletions=d, insertions=n, ref_len=len(ref))


def score(reference: str, hypothesis: str, lang: str) -> EditCounts:
    """Word edits (en) or character edits (zh) after normalization."""
    return edit_counts(units(reference, lang), units(hypothesis, lang))


def wer(reference: str, hypothesis: str) -> float:
    return score(reference, hypothesis, "en").rate


def cer(reference: str, hypothesis: str) -> float:
    return score(reference, hypothesis, "zh").rate


def corpus_rate(pairs: Sequence[tuple[str, str]], lang: str) -> EditCounts:
    """Summed counts over (reference, hypothesis) pairs; .rate is total edits / total reference units."""
    return sum((score(r, h, lang) for r, h in pairs), EditCounts())


# ---- answers -------------------------------------------------------------------------------------------------------

def answer_correct(reply: str, answers: Sequence[str], lang: str) -> bool:
    """True when an accepted answer, normalized, occurs in the normalized reply.

    English matches whole words ("5" is not in "25", "paris" is not in "parish"); Chinese matches a substring of
    the CER-normalized reply, whole numbers only ("五" is in "五个" but not in "十五": "5" vs "15"). An answer that
    normalizes to nothing never matches.
    """
    said = normalize(reply, lang)
    for answer in answers:
        want = normalize(answer, lang)
        if not want:
            continue
        if lang == "en":
            if f" {want} " in f" {said} ":
                return True
        elif re.search(("(?<![0-9])" if want[0].isdigit() else "") + re.escape(want)
                       + ("(?![0-9])" if want[-1].isdigit() else ""), said):
            return True
    return False
