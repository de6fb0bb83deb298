"""Scoring (normalization, WER/CER, answer matching), manifests, the evaluation loop and the llasm-eval CLI."""
import json
import subprocess
import sys

import pytest

import tiny
from llasm.runtime.audio import AudioError, NoSpeech
from llasm.runtime.evaluate import (MODES, Evaluation, ManifestError, QaRow, evaluate_asr, evaluate_qa,
                                    read_asr_manifest, read_qa_manifest)
from llasm.runtime.scoring import (EditCounts, answer_correct, cer, corpus_rate, detect_lang, edit_counts,
                                   normalization, normalize_en, normalize_zh, score, wer)

# ---- normalization -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("  HELLO\tworld\n", "hello world"),
    ("Don't stop—it's fine.", "dont stop its fine"),
    ("twenty five", "25"), ("Twenty-five", "25"), ("25", "25"),
    ("one hundred and five apples", "105 apples"),
    ("two thousand and twenty", "2020"),
    ("one million two hundred thousand three hundred forty five", "1200345"),
    ("3 thousand", "3000"), ("1,000 people", "1000 people"),
    ("three point one four", "3.14"), ("It costs 3.14.", "it costs 3.14"),
    ("five six", "5 6"), ("zero five", "0 5"), ("nineteen ninety", "19 90"),
    ("50%", "50 percent"), ("fifty percent", "50 percent"),
    ("one and two", "1 and 2"),
    ("a hundred", "a hundred"),
])
def test_normalize_en(text, expected):
    assert normalize_en(text) == expected


def test_normalize_zh():
    assert normalize_zh("你好，世界！ 今天　天气很好。") == "你好世界今天天气很好"
    assert normalize_zh("ＡＢＣ１２３") == "abc123"  # full-width -> half-width
    assert normalize_zh("ＡＢＣ", halfwidth=False) == "ａｂｃ"
    assert detect_lang("今天天气很好") == "zh" and detect_lang("hello 123") == "en"


@pytest.mark.parametrize("text, expected", [
    ("十", "10"), ("十二", "12"), ("二十三", "23"), ("四十", "40"), ("一百零五", "105"), ("一百一十一", "111"),
    ("两千", "2000"), ("兩千", "2000"), ("一千零五十", "1050"), ("十万", "100000"), ("一万零五百", "10500"),
    ("一百二十万", "1200000"), ("一亿两千万", "120000000"),
    ("两千五", "2500"), ("一百五", "150"), ("三万五", "35000"),  # a digit after a unit scales to the next unit down
    ("二〇二四年", "2024年"), ("一二三", "123"),  # runs of digits are read digit by digit
    ("十二加七等于几", "12加7等于几"), ("第一百", "第100"), ("两个", "2个"), ("三十多", "30多"), ("零", "0"),
    ("百姓", "百姓"), ("千万不要", "千万不要"), ("万一", "万1"),  # no digit before 百/千/万: not a number
    ("三四百人", "34百人"), ("两百三四", "2304"),  # ranges are not numbers: a number has one digit per unit
    ("二十三百", "23百"), ("一万三亿", "13000亿"),  # units decrease, small ones within a group, big ones overall
    ("一亿万", "100000000万"),  # and each has a number before it
])
def test_normalize_zh_numerals(text, expected):
    assert normalize_zh(text) == expected


def test_normalize_zh_traditional_to_simplified():
    pytest.importorskip("zhconv")
    assert normalize_zh("中國的首都是哪裡？") == "中国的首都是哪里"
    assert normalize_zh("頭髮、發展") == "头发发展"
    assert "zhconv" in normalization()["zh"]


def test_normalize_leaves_english_alone():
    text = "The quick brown fox, 12 years old!"
    assert normalize_en(text) == "the quick brown fox 12 years old"
    assert normalize_zh(text) == "thequickbrownfox12yearsold"  # only the punctuation and spaces go, as before


# ---- error rates ---------------------------------------------------------------------------------------------------


def test_wer_cases():
    assert wer("the cat sat", "The cat, sat!") == 0.0  # identical after normalization
    assert score("It is twenty five", "it is 25", "en").errors == 0
    assert score("a b c", "", "en") == EditCounts(deletions=3, ref_len=3)  # empty hypothesis: all deletions
    assert score("a b", "x a b y z", "en") == EditCounts(insertions=3, ref_len=2)  # insertions only
    assert wer("a b", "x a b y z") == 1.5  # WER is not capped at 1
    assert score("a b c d", "a x c", "en") == EditCounts(substitutions=1, deletions=1, ref_len=4)


def test_empty_reference_rule():
    assert score("", "", "en") == EditCounts() and wer("", "") == 0.0
    assert score("...", "hello there", "en") == EditCounts(insertions=2)
    assert wer("...", "hello there") == 1.0  # no rate of its own: 1.0 when anything was said


def test_edit_counts_is_a_minimum():
    assert edit_counts("kitten", "sitting") == EditCounts(substitutions=2, insertions=1, ref_len=6)
    assert edit_counts("", "abc") == EditCounts(insertions=3)
    assert edit_counts("abc", "abc") == EditCounts(ref_len=3)


def test_cer_chinese_with_punctuation():
    assert cer("你好，世界。", "你好世界") == 0.0
    c = score("今天天气很好。", "今天天汽很好啊！", "zh")
    assert c == EditCounts(substitutions=1, insertions=1, ref_len=6)
    assert c.rate == pytest.approx(2 / 6)


def test_cer_traditional_and_digits_match_simplified_hanzi():
    pytest.importorskip("zhconv")
    assert cer("中国的首都是哪里", "中國的首都是哪裡") == 0.0  # Whisper often writes Mandarin in traditional
    assert cer("十二加七等于几", "12加7等於幾") == 0.0  # ... and numbers in digits
    assert cer("一百零五个人", "105個人") == 0.0
    assert score("十二加七等于几", "13加7等于几", "zh") == EditCounts(substitutions=1, ref_len=7)  # "12" vs "13"


def test_corpus_wer_is_total_edits_over_total_words():
    pairs = [("a", "b"), ("a b c d e f g h i j", "a b c d e f g h i j")]  # per-item rates 1.0 and 0.0
    total = corpus_rate(pairs, "en")
    assert (total.errors, total.ref_len) == (1, 11)
    assert total.rate == pytest.approx(1 / 11)  # not the mean of per-item rates (0.5)
    assert corpus_rate([("", "x y")] + pairs, "en").rate == pytest.approx(3 / 11)  # insertions on empty refs count


def test_answer_matching():
    assert answer_correct("I think it's Paris, France.", ["paris"], "en")
    assert not answer_correct("Parisian food", ["Paris"], "en")  # whole words
    assert answer_correct("The answer is twenty-five.", ["25"], "en")
    assert not answer_correct("125", ["25"], "en")
    assert answer_correct("no idea", ["London", "no idea"], "en")
    assert not answer_correct("anything", ["..."], "en")  # an answer that normalizes to nothing never matches
    assert answer_correct("答案是：北京！", ["北京"], "zh")
    assert not answer_correct("上海", ["北京"], "zh")
    assert answer_correct("十二加七等于十九。", ["19"], "zh") and answer_correct("答案是19", ["十九"], "zh")
    assert answer_correct("有五个", ["五"], "zh")
    assert not answer_correct("答案是十九", ["九"], "zh")  # whole numbers: 9 is not in 19
    assert not answer_correct("答案是19", ["1"], "zh")


def test_answer_matching_traditional():
    pytest.importorskip("zhconv")
    assert answer_correct("中國的首都是北京。", ["中国"], "zh")
    assert answer_correct("答案是两千", ["兩千"], "zh")


# ---- manifests -----------------------------------------------------------------------------------------------------


def _write(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l, ensure_ascii=False)) + "\n" for l in lines))
    return path


def test_read_manifests(tmp_path):
    asr = read_asr_manifest(_write(tmp_path / "asr.jsonl", [
        {"audio": "a.wav", "text": "hello"}, "", {"audio": "/abs/b.wav", "text": "你好", "id": 7},
        {"audio": "c.wav", "text": "hi", "lang": "zh"}]))
    assert [r.lang for r in asr] == ["en", "zh", "zh"]
    assert asr[0].audio == tmp_path / "a.wav" and str(asr[1].audio) == "/abs/b.wav" and asr[1].id == "7"
    assert asr[1].where == f"{tmp_path / 'asr.jsonl'}:3"
    assert len(read_asr_manifest(tmp_path / "asr.jsonl", limit=2)) == 2
    qa = read_qa_manifest(_write(tmp_path / "qa.jsonl", [
        {"audio": "q.wav", "question": "Capital of France?", "answers": ["Paris"]},
        {"audio": "q.wav", "question": "Capital of France?", "answers": ["Paris"], "instruction": "Answer this.",
         "content": "Capital of France?", "content_audio": "c.wav"}]))
    assert [qa[0].query(m) for m in MODES] == [(tmp_path / "q.wav", None), (None, "Capital of France?"),
                                               None, None, None]
    assert [qa[1].query(m) for m in MODES[2:]] == [(tmp_path / "c.wav", "Answer this."), None,
                                                   (tmp_path / "q.wav", None)]


@pytest.mark.parametrize("kind, line, message", [
    ("asr", "{not json", "not JSON"),
    ("asr", "[1, 2]", "expected a JSON object, found list"),
    ("asr", {"audio": "a.wav"}, "missing key 'text' (ASR rows need audio, text)"),
    ("asr", {"audio": "a.wav", "text": "x", "lang": "fr"}, "'lang' must be one of ('en', 'zh'), found 'fr'"),
    ("qa", {"audio": "a.wav", "question": "q"}, "missing key 'answers'"),
    ("qa", {"audio": "a.wav", "question": "q", "answers": "Paris"}, "'answers' must be a non-empty list"),
    ("qa", {"audio": "a.wav", "question": "q", "answers": ["x"], "instruction": "i"}, "go together"),
    ("qa", {"audio": 3, "question": "q", "answers": ["x"]}, "'audio' must be a non-empty string, found 3"),
])
def test_manifest_errors_name_file_and_line(tmp_path, kind, line, message):
    good = {"audio": "a.wav", "text": "x", "question": "q", "answers": ["x"]}
    path = _write(tmp_path / "m.jsonl", [good, "", line, good])
    read = read_asr_manifest if kind == "asr" else read_qa_manifest
    with pytest.raises(ManifestError) as e:
        read(path)
    assert str(e.value).startswith(f"{path}:3: ") and message in str(e.value)
    assert "\n" not in str(e.value)
    assert len(read(path, limit=1)) == 1  # lines past the limit are not read


# ---- the evaluation loop, with a stand-in model --------------------------------------------------------------------


class FakeModel:
    """Answers text questions correctly and audio with 'no idea'; a missing file raises like the real model."""

    def __init__(self):
        self.chats = 0
        self.sent = []

    def _audio(self, audio):
        if audio is not None and "missing" in str(audio):
            raise AudioError(f"audio file not found: {audio}")
        if audio is not None and "mumbled" in str(audio):
            raise NoSpeech("heard no speech in the audio")

    def transcribe(self, audio, max_tokens=256):
        self._audio(audio)
        return "hello world" if "en" in str(audio) else "你好世界啊"

    def chat(self):
        from llasm.runtime.chat import Reply

        self.chats += 1
        model = self

        class Chat:
            def send(self, audio=None, text=None, max_tokens=256, temperature=0.0):
                assert temperature == 0.0
                model._audio(audio)
                model.sent.append((audio, text))
                return Reply("Paris" if text else "no idea", timings={"total": 1.0}, tokens=1)

        return Chat()


def test_evaluate_asr_counts_errors_and_pools_edits(tmp_path):
    rows = read_asr_manifest(_write(tmp_path / "asr.jsonl", [
        {"audio": "en1.wav", "text": "Hello, world!"}, {"audio": "en2.wav", "text": "hello big world"},
        {"audio": "missing.wav", "text": "gone"}, {"audio": "zh.wav", "text": "你好，世界。"}]))
    result = evaluate_asr(FakeModel(), rows)
    assert result.wer == pytest.approx(1 / 5) and result.cer == pytest.approx(1 / 4)
    s = result.summary()
    assert s["errors"] == 1 and s["by_lang"]["en"]["errors"] == 1 and s["by_lang"]["en"]["deletions"] == 1
    bad = result.items[2].to_dict()
    assert bad["error"].startswith("audio file not found") and bad["correct"] is None and bad["score"] is None
    assert result.items[0].to_dict()["correct"] is True
    head = Evaluation(asr=result).lines()[:2]
    assert [l.split(":")[0] for l in head] == ["normalization en", "normalization zh"]  # the languages scored
    head = Evaluation(asr=evaluate_asr(FakeModel(), rows[:1])).lines()[:2]
    assert head[0].startswith("normalization en: ") and head[1].startswith("ASR  1 rows")


def test_evaluate_qa_modes_accuracy_and_fresh_chats(tmp_path):
    rows = [QaRow(tmp_path / "q.wav", "Capital of France?", ("Paris",), "en", "m:1"),
            QaRow(tmp_path / "q.wav", "Capital of France?", ("Paris",), "en", "m:2", None, "Answer.", "France?",
                  tmp_path / "missing.wav", tmp_path / "c.wav")]
    model = FakeModel()
    result = evaluate_qa(model, rows)
    scores = {m: s.to_dict() for m, s in result.scores().items()}
    assert scores["speech"] == {"n": 2, "correct": 0, "errors": 0, "accuracy": 0.0}
    assert scores["text"] == {"n": 2, "correct": 2, "errors": 0, "accuracy": 1.0}
    assert scores["instruction_text+content_audio"] == {"n": 1, "correct": 1, "errors": 0, "accuracy": 1.0}
    assert scores["instruction_audio+content_text"] == {"n": 1, "correct": 0, "errors": 1, "accuracy": None}
    assert scores["pure_audio"]["n"] == 1 and result.speech_text_ratio == 0.0
    # one fresh chat per distinct input: pure_audio shares the speech reply of the same row
    assert model.chats == len(model.sent) + 1 == 2 + 2 + 1 + 1
    with pytest.raises(ValueError, match="QA modes must be among"):
        evaluate_qa(model, rows, modes=["speech", "video"])


def test_a_question_the_model_heard_nothing_in_is_answered_wrong_not_skipped(tmp_path):
    rows = [QaRow(tmp_path / "mumbled.wav", "Capital of France?", ("Paris",), "en", "m:1")]
    result = evaluate_qa(FakeModel(), rows, modes=["speech", "text"])
    assert result.scores()["speech"].to_dict() == {"n": 1, "correct": 0, "errors": 0, "accuracy": 0.0}
    item = [i.to_dict() for i in result.items if i.mode == "speech"][0]
    assert (item["reply"], item["correct"], item["error"], item["heard"]) == ("", False, None, "")


def test_cascade_mode_types_the_reference_transcript(tmp_path):
    class Reference:  # a Whisper that hears "capital of France"
        def __init__(self):
            self.heard = []

        def transcribe(self, audio, max_tokens=256):
            self.heard.append(audio)
            return "capital of France" if "q" in audio else ""

    rows = [QaRow(tmp_path / "q.wav", "Capital of France?", ("Paris",), "en", "m:1"),
            QaRow(tmp_path / "silent.wav", "Capital of France?", ("Paris",), "en", "m:2")]
    model, reference = FakeModel(), Reference()
    result = evaluate_qa(model, rows, modes=["speech", "cascade"], reference=reference)
    assert result.scores()["cascade"].to_dict() == {"n": 2, "correct": 2, "errors": 0, "accuracy": 1.0}
    assert reference.heard == [str(tmp_path / "q.wav"), str(tmp_path / "silent.wav")]
    assert (None, "capital of France") in model.sent and (None, ".") in model.sent  # nothing heard: a full stop
    cascade = [i.to_dict() for i in result.items if i.mode == "cascade"]
    assert [c["heard"] for c in cascade] == ["capital of France", "."]
    with pytest.raises(ValueError, match="cascade needs --reference-whisper"):
        evaluate_qa(model, rows, modes=["cascade"])


# ---- the command, on the tiny bundle -------------------------------------------------------------------------------


def _eval(*args):
    return subprocess.run([sys.executable, "-m", "llasm.cli.eval", *args], capture_output=True, text=True,
                          timeout=300)


def test_eval_modules_import_no_torch():
    code = ("import sys, llasm.runtime.evaluate, llasm.runtime.scoring, llasm.cli.eval; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_cli_malformed_manifest_is_one_line_error(tmp_path):
    path = _write(tmp_path / "qa.jsonl", [{"audio": "a.wav", "question": "q", "answers": ["x"]}, "{oops"])
    r = _eval("--bundle", str(tmp_path / "no-bundle"), "--qa", str(path))  # fails before the bundle is read
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and lines == [f"llasm-eval: error: {path}:2: not JSON (Expecting property name "
                                           f"enclosed in double quotes at column 2)"], r.stderr


def test_cli_end_to_end(bundle, tmp_path):
    sf = pytest.importorskip("soundfile")
    for i in range(3):
        sf.write(tmp_path / f"clip{i}.wav", tiny.speech(0.6 + 0.2 * i, seed=i), 16_000)
    asr = _write(tmp_path / "asr.jsonl", [{"audio": "clip0.wav", "text": "Hello world."},
                                          {"audio": "clip1.wav", "text": "你好，世界。"}])
    qa = _write(tmp_path / "qa.jsonl", [
        {"audio": "clip0.wav", "question": "What is the capital of France?", "answers": ["Paris"]},
        {"audio": "clip1.wav", "question": "Repeat: hello world", "answers": ["hello world"],
         "instruction": "Repeat:", "content": "hello world", "content_audio": "clip2.wav",
         "instruction_audio": "missing.wav"}])
    out = tmp_path / "res" / "items.jsonl"
    r = _eval("--bundle", str(bundle), "--asr", str(asr), "--qa", str(qa), "--out", str(out), "--json",
              "--max-tokens", "4", "--threads", "2", "-q")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert set(summary) == {"bundle", "normalization", "asr", "qa"}
    assert set(summary["normalization"]) == {"en", "zh"} and "numerals -> digits" in summary["normalization"]["zh"]
    a = summary["asr"]
    assert (a["n"], a["errors"], set(a["by_lang"])) == (2, 0, {"en", "zh"})
    assert a["wer"] >= 0 and a["cer"] >= 0
    assert (a["by_lang"]["en"]["ref_len"], a["by_lang"]["zh"]["ref_len"]) == (2, 4)  # words, characters
    q = summary["qa"]
    assert q["n"] == 2 and list(q["modes"]) == list(MODES) and set(q) == {"n", "modes", "speech_text_ratio"}
    assert [q["modes"][m]["n"] for m in MODES] == [2, 2, 1, 1, 1]
    assert q["modes"]["instruction_audio+content_text"] == {"n": 1, "correct": 0, "errors": 1, "accuracy": None}
    for m in ("speech", "text", "instruction_text+content_audio", "pure_audio"):
        assert 0 <= q["modes"][m]["accuracy"] <= 1 and q["modes"][m]["errors"] == 0

    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 2 + 7 and [r["task"] for r in rows] == ["asr"] * 2 + ["qa"] * 7
    assert all({"mode", "where", "reply", "correct", "error", "timings"} <= set(r) for r in rows)
    assert rows[0]["where"] == f"{asr}:1" and rows[1]["unit"] == "char"
    ok = [r for r in rows if r["error"] is None]
    assert len(ok) == 8 and all(isinstance(r["correct"], bool) and r["timings"]["total"] > 0 for r in ok)
    bad = [r for r in rows if r["error"]]
    assert [(b["mode"], b["correct"]) for b in bad] == [("instruction_audio+content_text", None)]
    assert "audio file not found" in bad[0]["error"]
    assert all(r["tokens"] <= 4 for r in ok if r["task"] == "qa")

    out2 = tmp_path / "again.jsonl"
    again = _eval("--bundle", str(bundle), "--asr", str(asr), "--limit", "1", "--max-tokens", "4", "-q",
                  "--out", str(out2))
    assert again.returncode == 0, again.stderr
    head = again.stdout.splitlines()[:2]  # the summary table, headed by the normalization of the one row's language
    assert head[0].startswith("normalization en: ") and head[1] == "ASR  1 rows, 0 errors" and "WER" in again.stdout
    first = json.loads(out2.read_text())
    assert first["reply"] == rows[0]["reply"] and first["score"] == rows[0]["score"]  # greedy: deterministic

    heard = _eval("--bundle", str(bundle), "--asr", str(asr), "--limit", "1", "--max-tokens", "4", "--listen", "--json")
    assert heard.returncode == 0, heard.stderr
    assert json.loads(heard.stdout)["listen"] is True and json.loads(heard.stdout)["asr"]["n"] == 1
