"""Packaged text sources: plain sentences only, chosen to cover vocabulary, spoken by a build as ASR + repeat rows."""
import importlib.util
import json

import pytest

from llasm.training import texts
from llasm.training.speech_data import BuildConfig, build

from test_speech_data import SineVoice


def _has(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.fixture
def tiny_zipf(monkeypatch):
    """wordfreq stand-in: every word worth 1 except 'zzglued' (unknown) and 'rare' (worth 3)."""
    monkeypatch.setattr(texts, "zipf", lambda lang, w: {"zzglued": 0.0, "rare": 3.0}.get(w, 1.0))


def test_english_sentences_read_aloud_one_way(tiny_zipf):
    passages = ["“Q: Why is the sky blue today, my friend?” A: Because it likes being blue.  -- Anon",
                "It was 1951 and we were all there together. Too short.",
                "In the beginning, God zzglued the heavens and the earth. Go (quickly) to the big red house now!",
                "the old dog's bone was buried under the tree.", "Why is the sky blue today, my friend?"]
    assert texts.sentences("en", passages) == ["Why is the sky blue today, my friend?",
                                               "Because it likes being blue."]
    assert texts._wordnet_example("he breathed a sigh of relief") == "He breathed a sigh of relief."


@pytest.mark.skipif(not _has("zhconv", "jieba"), reason="needs zhconv and jieba: pip install zhconv jieba")
def test_mandarin_sentences_are_simplified_han_of_six_to_thirty_characters():
    passages = ["萬民是若，我們一起去學校。", "短句。", "他用Python写了3个程序。",
                "我们明天早上八点在学校门口见面吧！这个句子实在是太长太长太长太长太长太长太长太长太长太长太长太长了。"]
    assert texts.sentences("zh", passages) == ["万民是若，我们一起去学校。", "我们明天早上八点在学校门口见面吧！"]


def test_coverage_prefers_sentences_with_words_the_data_lacks(tiny_zipf):
    candidates = ["the cat sat on the mat", "the cat sat on a mat", "a rare bird flew over", "the cat sat here",
                  "dogs bark at night too"]
    order = texts.coverage_order("en", candidates, known=["the cat sat"])
    assert order[:2] == ["a rare bird flew over", "dogs bark at night too"]  # all new words; 'rare' is worth more
    assert sorted(order) == sorted(candidates) and order == texts.coverage_order("en", candidates, ["the cat sat"])
    assert texts.coverage_order("en", candidates, known=["the cat sat"], count=1) == ["a rare bird flew over"]
    # then more new words per word spoken; the near-duplicate of a chosen sentence comes last
    assert order[2:] == ["the cat sat on a mat", "the cat sat here", "the cat sat on the mat"]


@pytest.mark.parametrize("source", list(texts.SOURCES))
def test_each_installed_source_gives_thousands_of_sentences(source):
    lang = texts.SOURCES[source]
    try:
        passages = texts.read(source)
    except texts.TextSourceError as e:
        pytest.skip(str(e))
    if not _has("wordfreq", "jieba", "zhconv"):
        pytest.skip("needs pip install wordfreq jieba zhconv")
    got = texts.sentences(lang, passages)
    assert len(got) > 3000, len(got)
    assert len({" ".join(texts.words(lang, t)) for t in got}) == len(got)


def test_a_missing_source_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setattr(texts, "WORDNET", tmp_path / "nowhere")
    with pytest.raises(texts.TextSourceError, match="apt-get install wordnet-base"):
        texts.read("wordnet")
    with pytest.raises(ValueError, match="text source fortunes is 'en', which langs"):
        BuildConfig(out=tmp_path, langs=("zh",), sources=("fortunes",))


def test_a_build_speaks_packaged_texts_after_the_questions(tmp_path, monkeypatch, tiny_zipf):
    pool = [f"The {w} walked over to the market with a basket." for w in ("farmer", "teacher", "baker", "rare")]
    monkeypatch.setattr(texts, "read", lambda source: pool + pool[:1])
    config = BuildConfig(out=tmp_path / "d", langs=("en",), limit=24, seed=1, heldout_fraction=0.2,
                         sources=("facts", "wordnet"))
    build(config, engines={"en": SineVoice()}, progress=False)
    asr = [json.loads(line) for name in ("asr.jsonl", "asr.heldout.jsonl")
           for line in (config.out / name).read_text(encoding="utf-8").splitlines()]
    assert [r["source"] for r in asr].count("wordnet") == 4 and len(asr) == 24
    conv = [json.loads(line) for name in ("conv.jsonl", "conv.heldout.jsonl")
            for line in (config.out / name).read_text(encoding="utf-8").splitlines()]
    assert {r["kind"] for r in conv if r["source"] == "wordnet"} == {"instruction+speech"}  # no reference answer
    assert any("rare" in r["text"] for r in asr)


def test_with_an_llm_a_spoken_statement_comes_with_a_task(tmp_path, monkeypatch, tiny_zipf):
    from llasm.training.conversations import JOINER, TASKS

    pool = [f"The {w} walked over to the market with a basket." for w in
            ("farmer", "teacher", "baker", "rare", "miller", "weaver", "potter", "tailor", "singer", "driver")]
    monkeypatch.setattr(texts, "read", lambda source: pool)
    config = BuildConfig(out=tmp_path / "d", langs=("en",), limit=30, seed=1, heldout_fraction=0.3, responses="llm",
                         sources=("facts", "wordnet", "answers"))
    asked = []

    def answer(question):  # a task's answer retells its sentence in other words, as an explanation does
        asked.append(question)
        if JOINER in question:
            told = [line for line in question.split(JOINER) if line in pool][0]
            return f"So one {told.split()[1]} went off shopping for the day."
        return f"Here is my answer to {question.rstrip('?')} now."

    build(config, answer=answer, engines={"en": SineVoice()}, progress=False)

    def read(name):
        return [json.loads(line) for line in (config.out / name).read_text(encoding="utf-8").splitlines()]

    conv = read("conv.jsonl") + read("conv.heldout.jsonl")
    stated = [r for r in conv if r["source"] == "wordnet"]
    assert not set(asked) & set(pool)  # the LLM is never asked a bare statement
    assert {r["kind"] for r in stated} == {"instruction+speech", "speech+instruction", "text"}
    for r in stated:
        user, reply = r["turns"][0]["content"], r["turns"][1]["content"]
        if r["kind"] == "text":  # the text path types exactly what the LLM was asked
            assert user in asked and reply == answer(user) and user.split(JOINER)[0] in TASKS["en"]
            continue
        typed = [p["text"] for p in user if "text" in p][0]
        first = "audio" if r["kind"] == "speech+instruction" else "text"
        assert first in user[0] and len(user) == 2  # the runtime sends a recording, then the typed text
        if typed in TASKS["en"]:
            assert reply.startswith("So one ")
        else:  # every fourth sentence is repeated
            assert r["kind"] == "instruction+speech" and reply in pool
    spoken = read("asr.jsonl")
    assert [r for r in spoken if r["source"] == "answers"]  # the answers to the spoken questions are heard ...
    assert not [r for r in spoken if "shopping" in r["text"]]  # ... those retelling a statement are not
