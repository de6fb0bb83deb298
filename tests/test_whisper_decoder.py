"""The whisper-decoder adaptor on tiny models: Whisper's graphs against torch, the transcriber's guards, the rows
against the LLM's own token path, and a bundle built without torch, loaded and talked to."""
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import tiny  # noqa: E402
from llasm.export.whisper_bundle import BuildError, build_whisper_bundle, write_graphs  # noqa: E402
from llasm.runtime import whisper_decode  # noqa: E402
from llasm.runtime.audio import AudioError, AudioGeometry  # noqa: E402
from llasm.runtime.bundle import BundleError, read_bundle  # noqa: E402
from llasm.runtime.chat import LLaSM  # noqa: E402
from llasm.runtime.features import log_mel  # noqa: E402
from llasm.runtime.heard_rows import RowMap  # noqa: E402
from llasm.runtime.llm import LLM  # noqa: E402
from llasm.runtime.whisper_decode import Heard, Transcriber, WhisperVocab  # noqa: E402
from llasm.training.ct2 import load_ct2_whisper_decoder, load_ct2_whisper_encoder, read_ct2  # noqa: E402


@pytest.fixture(scope="module")
def whisper_dir(whisper_ct2):
    return whisper_ct2


@pytest.fixture(scope="module")
def graphs(whisper_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs")
    enc, dec, _ = write_graphs(whisper_dir, out)
    return enc, dec


@pytest.fixture(scope="module")
def vocab(whisper_dir):
    from llasm.export.whisper_bundle import whisper_tokens

    data = whisper_tokens(whisper_dir)
    return WhisperVocab.from_tokens(data["tokens"], data["suppress"], data["suppress_begin"])


@pytest.fixture(scope="module")
def llm_gguf(tiny_llm_gguf):
    return tiny_llm_gguf


@pytest.fixture(scope="module")
def bundle(whisper_decoder_bundle):
    return whisper_decoder_bundle


@pytest.fixture(scope="module")
def model(bundle):
    m = LLaSM.load(bundle)
    yield m
    m.close()


# ---- Whisper's graphs against torch ---------------------------------------------------------------------------------

def torch_reference(whisper_dir):
    variables = read_ct2(whisper_dir / "model.bin")
    table = torch.from_numpy(variables["decoder/embeddings/weight"].astype(np.float32))
    decoder, _ = load_ct2_whisper_decoder(whisper_dir, 64)
    return load_ct2_whisper_encoder(whisper_dir), decoder, table


def test_graphs_match_torch_with_the_kv_cache(whisper_dir, graphs):
    encoder, decoder, table = torch_reference(whisper_dir)
    enc, dec = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in graphs)
    mel = log_mel(tiny.speech(1.3, seed=3))[None]
    cross_k, cross_v = enc.run(None, {"mel": mel})
    with torch.no_grad():
        frames = encoder(torch.from_numpy(mel))
        want_k = decoder.layers[1].encoder_attn.k_proj(frames)[0].numpy()
    L, _, H, S, d = cross_k.shape
    assert (L, H, S * 2) == (2, 4, mel.shape[-1] + (mel.shape[-1] % 2))
    np.testing.assert_allclose(cross_k[1, 0].transpose(1, 0, 2).reshape(S, H * d), want_k, atol=1e-4)
    tokens = [269, 270, 273, 277, 40, 41, 300 % 268]  # SOT, en, transcribe, notimestamps, then text tokens
    past = np.zeros((L, 1, H, 0, d), np.float32)
    pk = pv = past
    for n, feed in ((4, tokens[:4]), (5, tokens[4:5]), (7, tokens[5:7])):  # a prompt, a step, two steps at once
        logits, hidden, pk, pv = dec.run(None, {"tokens": np.array([feed], np.int64), "past_k": pk, "past_v": pv,
                                                "cross_k": cross_k, "cross_v": cross_v})
        with torch.no_grad():
            h = decoder(table[torch.tensor(tokens[:n])][None], frames)[0, -1]
        np.testing.assert_allclose(hidden[0], h.numpy(), atol=1e-4)
        np.testing.assert_allclose(logits[0], (h @ table.T).numpy(), atol=1e-3)
        assert pk.shape == (L, 1, H, n, d)


# ---- the transcriber -------------------------------------------------------------------------------------------------

def test_vocab_reads_bytes_specials_and_languages(vocab):
    assert vocab.specials == {"endoftext": 268, "startoftranscript": 269, "transcribe": 273, "notimestamps": 277,
                              "nospeech": 276}
    assert vocab.languages == {"en": 270, "zh": 271} and vocab.timestamp_begin == 278 and vocab.n_text == 268
    assert vocab.pieces[ord("a")] == b"a" and vocab.pieces[32] == b" " and vocab.pieces[10] == b"\n"
    assert vocab.text([256 + 3, 256 + 4, 256 + 8]) == "What is?" and vocab.text([256 + 10, 256 + 11]) == "你好"
    assert vocab.pieces[269] == b"" and vocab.suppress == (1, 2) and vocab.suppress_begin == (32, 268)
    with pytest.raises(whisper_decode.WhisperVocabError, match="no <|startoftranscript|>"):
        WhisperVocab.from_tokens([t for t in tiny.whisper_tokens() if t != "<|startoftranscript|>"])


def greedy_reference(whisper_dir, vocab, samples, lang):
    """Whisper's greedy transcript in torch, recomputing every position each step, with the same suppression."""
    encoder, decoder, table = torch_reference(whisper_dir)
    never = np.zeros(table.shape[0], bool)
    never[vocab.n_text:] = True
    never[vocab.specials["endoftext"]] = False
    never[list(vocab.suppress)] = True
    first = never.copy()
    first[list(vocab.suppress_begin)] = True
    sp = vocab.specials
    tokens = [sp["startoftranscript"], vocab.languages[lang], sp["transcribe"], sp["notimestamps"]]
    out = []
    with torch.no_grad():
        frames = encoder(torch.from_numpy(log_mel(samples)[None]))
        cap = int(whisper_decode.MAX_TOKENS_PER_S * samples.size / 16000) + whisper_decode.MIN_TOKEN_CAP
        while len(out) < cap:
            logits = (decoder(table[torch.tensor(tokens + out)][None], frames)[0, -1] @ table.T).numpy()
            token = int(np.argmax(np.where(first if not out else never, -np.inf, logits)))
            if token == sp["endoftext"]:
                break
            out.append(token)
    return out


def test_transcriber_is_torch_greedy_decoding(whisper_dir, graphs, vocab):
    samples = tiny.speech(1.0, seed=5)
    tr = Transcriber(*graphs, vocab, AudioGeometry(rows="tokens"), languages=("en", "zh"))
    heard = tr(samples, lang="en")
    want = greedy_reference(whisper_dir, vocab, samples, "en")
    keep = len(want) - whisper_decode.loop_excess(want, whisper_decode.REPEATS, whisper_decode.REPEAT_MIN_TOKENS)
    assert heard.tokens == want[:keep] or (heard.looped and heard.tokens == want[:len(heard.tokens)])
    assert all(t < vocab.n_text and t not in vocab.suppress for t in heard.tokens)
    assert heard.top_ids.shape == heard.top_p.shape == (len(heard.tokens), whisper_decode.TOP_K)
    assert (heard.top_ids[:, 0] == heard.tokens).all() and (np.diff(heard.top_p, axis=1) <= 1e-7).all()
    assert heard.hidden.shape == (len(heard.tokens), 32) and heard.text == vocab.text(heard.tokens).strip()


class ScriptedDecoder:
    """A decoder session whose next-token logits come from a script: script(step, fed tokens) -> logits."""

    def __init__(self, n_vocab, script):
        self.n_vocab, self.script, self.fed = n_vocab, script, []

    def run(self, _, feeds):
        self.fed.append(feeds["tokens"][0].tolist())
        k = feeds["past_k"]
        grown = np.zeros(k.shape[:3] + (k.shape[3] + feeds["tokens"].shape[1], k.shape[4]), np.float32)
        logits = np.full((1, self.n_vocab), -10.0, np.float32)
        self.script(len(self.fed) - 1, self.fed[-1], logits[0])
        return logits, np.ones((1, 32), np.float32), grown, grown

    def get_outputs(self):
        return [type("O", (), {"shape": [1, self.n_vocab]})()]


def scripted(graphs, vocab, script, **kw):
    tr = Transcriber(*graphs, vocab, AudioGeometry(rows="tokens"), **kw)
    tr.decoder = ScriptedDecoder(len(vocab.pieces), script)
    return tr


def test_transcriber_detects_the_language_among_those_allowed(graphs, vocab):
    def script(step, fed, z):
        if step == 0:
            z[[270, 271, 272]] = [1.0, 2.0, 9.0]  # <|translate|> is likeliest, then zh: only en and zh count
        else:
            z[268] = 5.0
            z[ord("a")] = 6.0 if step == 1 else -20  # one word, then the end
    tr = scripted(graphs, vocab, script)
    heard = tr(tiny.speech(1.0))
    assert heard.lang == "zh" and heard.tokens == [ord("a")] and tr.decoder.fed[1] == [271, 273, 277]
    assert scripted(graphs, vocab, script, languages=("en",))(tiny.speech(1.0)).lang == "en"


def test_transcriber_never_starts_with_a_blank_or_the_end(graphs, vocab):
    def script(step, fed, z):
        z[268], z[32], z[ord("b")] = 9.0, 8.0, 1.0  # the end, then a blank, then "b"
    heard = scripted(graphs, vocab, script)(tiny.speech(1.0))
    assert heard.tokens == [ord("b")]


def test_transcriber_stops_a_repeated_sentence_and_a_runaway(graphs, vocab):
    sentence = [256 + 3, 256 + 4, 256 + 5, 256 + 6, 256 + 7, 256 + 8]  # What is capital of France?

    def again(step, fed, z):
        z[sentence[(step - 1) % len(sentence)]] = 5.0  # says the sentence over and over
    heard = scripted(graphs, vocab, again)(tiny.speech(2.0))
    assert heard.tokens == sentence and heard.looped and heard.text == "What is capital of France?"

    def counting(step, fed, z):
        z[40 + step % 90] = 5.0  # never repeats, never ends
    heard = scripted(graphs, vocab, counting)(tiny.speech(1.0))
    cap = whisper_decode.MAX_TOKENS_PER_S * 1 + whisper_decode.MIN_TOKEN_CAP
    assert heard.capped and len(heard.tokens) == cap


def no_speech(step, fed, z):
    if step == 0:
        z[276] = 12.0  # <|nocaptions|>: nothing was said
    z[[ord(c) for c in "xyzuvw"]] = 1.0  # ...and doubtful words, six alike
    z[268] = 1.0 if step < 3 else 9.0


def test_transcriber_hears_nothing_where_whisper_says_no_speech(graphs, vocab):
    heard = scripted(graphs, vocab, no_speech)(tiny.speech(1.0))
    assert heard.no_speech > whisper_decode.NO_SPEECH_P and heard.tokens == [] and heard.hidden.shape == (0, 32)

    def sure(step, fed, z):  # the same no-speech probability, but words Whisper is sure of: they are kept
        no_speech(step, fed, z)
        if step in (1, 2):
            z[ord("x")] = 9.0
    heard = scripted(graphs, vocab, sure)(tiny.speech(1.0))
    assert heard.no_speech > whisper_decode.NO_SPEECH_P and heard.tokens == [ord("x")] * 2


# ---- rows --------------------------------------------------------------------------------------------------------------

def heard_of(vocab, ids, top=None):
    """A Heard for ids, each certain unless top gives (candidate ids, probabilities) for a position."""
    top_ids = np.array([[i] + [0] * (whisper_decode.TOP_K - 1) for i in ids], np.int64)
    top_p = np.array([[1.0] + [0.0] * (whisper_decode.TOP_K - 1) for _ in ids], np.float32)
    for pos, (cands, probs) in (top or {}).items():
        top_ids[pos, :len(cands)], top_p[pos, :len(probs)] = cands, probs
    return Heard(tokens=list(ids), top_ids=top_ids, top_p=top_p, hidden=np.ones((len(ids), 32), np.float32),
                 text=vocab.text(ids).strip())


@pytest.fixture(scope="module")
def llm(llm_gguf):
    model = LLM(llm_gguf, n_ctx=256, n_batch=64)
    model.warm_up()
    yield model
    model.close()


def test_hard_rows_are_the_transcripts_own_token_rows(llm, vocab):
    ids = [256 + 3, 256 + 4, 256 + 5, 256 + 6, 256 + 7, 256 + 8]  # "What is capital of France?"
    rows = RowMap(llm, vocab, rows="hard")(heard_of(vocab, ids))
    tokens = llm.tokenize("What is capital of France?", special=False)
    np.testing.assert_array_equal(rows, llm.token_rows.rows(tokens))
    quoted = RowMap(llm, vocab, rows="hard", begin='"', end='"')(heard_of(vocab, ids))
    assert quoted.shape[0] == rows.shape[0] + len(llm.tokenize('"', special=False)) * 2


def test_soft_rows_mix_the_candidates_where_tokens_align(llm, vocab):
    rm = RowMap(llm, vocab, rows="soft")
    the, of = 256 + 2, 256 + 6
    ids = [256 + 3, 256 + 4, the]  # What is the
    assert rm.single(the) >= 0 and rm.single(of) >= 0 and rm.single(256 + 3) == -1  # " the", " of": one LLM token
    soft = rm(heard_of(vocab, ids, {2: ([the, of], [0.75, 0.25])}))
    hard = RowMap(llm, vocab, rows="hard")(heard_of(vocab, ids))
    assert soft.shape == hard.shape
    np.testing.assert_array_equal(soft[:-1], hard[:-1])  # certain tokens keep their own rows
    table = llm.token_rows.rows([rm.single(the), rm.single(of)])
    np.testing.assert_allclose(soft[-1], 0.75 * table[0] + 0.25 * table[1], rtol=1e-5, atol=1e-7)
    unsure_first = rm(heard_of(vocab, ids, {0: ([256 + 3, of], [0.5, 0.5])}))  # "What" is two LLM tokens: exact
    np.testing.assert_array_equal(unsure_first, hard)


def test_a_character_split_across_whisper_tokens_keeps_exact_rows(llm, vocab):
    ni = "你".encode()  # three bytes, here three Whisper byte tokens
    ids = [ni[0], ni[1], ni[2]]  # the byte symbols' ids are their byte values
    rm = RowMap(llm, vocab, rows="soft")
    heard = heard_of(vocab, ids, {0: ([ni[0], ord("a")], [0.5, 0.5])})
    assert heard.text == "你"
    np.testing.assert_array_equal(rm(heard), llm.token_rows.rows(llm.tokenize("你", special=False)))


def test_a_learned_map_adds_to_aligned_rows(llm, vocab):
    ids = [256 + 4, 256 + 6]  # " is of": one LLM token per Whisper token
    w = np.zeros((llm.n_embd, 32), np.float32)
    w[0, 0] = 2.0
    b = np.full(llm.n_embd, 0.5, np.float32)
    base = RowMap(llm, vocab, rows="hard")(heard_of(vocab, ids))
    got = RowMap(llm, vocab, rows="hard", weight=w, bias=b)(heard_of(vocab, ids))
    np.testing.assert_allclose(got - base, np.tile(b + w @ np.ones(32, np.float32), (2, 1)), rtol=1e-6)
    with pytest.raises(ValueError, match="the LLM takes rows of 64"):
        RowMap(llm, vocab, weight=np.zeros((3, 32), np.float32), bias=np.zeros(3, np.float32))


# ---- the bundle ------------------------------------------------------------------------------------------------------

def test_bundle_declares_the_adaptor_and_its_files(bundle):
    b = read_bundle(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["version"] == 2 and b.adaptor["kind"] == "whisper-decoder" and b.adaptor["rows"] == "soft"
    assert b.geometry.rows == "tokens" and not b.geometry.streams
    assert {"audio_encoder", "text_decoder", "whisper_tokens", "llm"} <= set(manifest["files"])
    assert manifest["prompt"]["default_system"] == "You are a tiny test model." and b.n_embd == 64
    with pytest.raises(ValueError, match="depend on what was said"):
        b.geometry.n_embeddings(16000)


def test_a_bundle_missing_the_decoder_is_refused(bundle, tmp_path):
    import shutil

    broken = tmp_path / "b"
    shutil.copytree(bundle, broken)
    (broken / "text_decoder.onnx").unlink()
    with pytest.raises(BundleError, match="bundle file missing: .*text_decoder.onnx"):
        read_bundle(broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["version"] = 3
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="version 3 is not supported"):
        read_bundle(broken)


def test_a_spoken_turn_is_its_transcript_typed_with_hard_rows(model):
    """rows = hard: the LLM's answer to the audio is its answer to what Whisper heard, typed (embedding path vs token
    path, to the logits)."""
    from test_listen import sampled

    model.encoder.rowmap.rows = "hard"
    try:
        x = tiny.speech(1.2, seed=9)
        with sampled() as spoken:
            reply = model.chat().send(audio=x, max_tokens=3)
        assert reply.heard and reply.heard == model.encoder.transcriber(x).text
        with sampled() as typed:
            typed_reply = model.chat().send(text=reply.heard, max_tokens=3)
        assert reply.text == typed_reply.text
        np.testing.assert_allclose(spoken[0], typed[0], atol=1e-4)
    finally:
        model.encoder.rowmap.rows = "soft"


def test_transcribe_and_a_clip_with_no_speech(model):
    assert isinstance(model.transcribe(tiny.speech(1.0, seed=2)), str)
    tr = model.encoder.transcriber
    decoder, tr.decoder = tr.decoder, ScriptedDecoder(len(tr.vocab.pieces), no_speech)
    try:
        chat = model.chat()
        with pytest.raises(AudioError, match="heard no speech"):
            chat.send(audio=tiny.speech(1.0))
        assert chat.exchanges == []
        assert model.transcribe(tiny.speech(1.0)) == ""  # as Whisper transcribes a clip it judges free of speech
    finally:
        tr.decoder = decoder


def test_build_checks_the_probe(whisper_dir, llm_gguf, tmp_path):
    with pytest.raises(BuildError, match="expected 'the capital of France'"):
        build_whisper_bundle(whisper_dir, llm_gguf, tmp_path / "b", probe=tiny.speech(1.0),
                             expect="the capital of France")
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())  # nothing left behind
    with pytest.raises(ValueError, match="rows must be one of"):
        build_whisper_bundle(whisper_dir, llm_gguf, tmp_path / "c", adaptor={"rows": "fuzzy"})
    with pytest.raises(ValueError, match="unknown adaptor settings"):
        build_whisper_bundle(whisper_dir, llm_gguf, tmp_path / "c", adaptor={"stack": 2})


def test_history_is_the_conversation_the_chat_starts_from(model):
    from test_listen import sampled

    history = [("hello", "the quick brown fox"), ("one two", "three")]
    with sampled() as seen:
        model.chat(history=history).send(text="What is the capital of France?", max_tokens=2)
    llm, prompt = model.llm, model.bundle.prompt
    from llasm.runtime.prompt import Turn

    turns = []
    for u, a in history:
        turns += [Turn("user", (u,)), Turn("assistant", (a,))]
    text = "".join(s.text for s in prompt.render(turns + [Turn("user", ("What is the capital of France?",))]))
    llm.truncate(0)
    llm.eval_tokens(llm.tokenize(text))
    np.testing.assert_allclose(seen[0], llm.logits(), atol=1e-4)
    with pytest.raises(ValueError, match="history holds"):
        model.chat(history=[("a", 1)])
    assert math.isfinite(float(seen[0].max()))


def test_transcriptions_between_chat_turns_leave_the_chat_its_history(model, llm_gguf):
    """Transcriptions (their own system prompt and examples) between two turns of a chat: the second keeps the
    examples the first left in the KV cache, the chat's next turn computes only itself (the ledger parked its
    history and puts it back), and its first token's logits are those of its whole prompt computed at once."""
    from test_listen import sampled

    from llasm.runtime.kv import size

    kv, b = model.kv, model.bundle
    chat = model.chat()
    chat.send(text="What is the capital of France?", max_tokens=3)
    examples = model.chat(system=b.transcribe_system, history=b.transcribe_examples).history()
    assert size(examples) > size(chat.history()) > 16
    model.transcribe(tiny.speech(1.0, seed=2), max_tokens=4)
    assert kv.common(examples) == size(examples)
    computed = kv.computed
    model.transcribe(tiny.speech(1.2, seed=4), max_tokens=4)
    assert kv.computed - computed <= kv.size - size(examples)  # the examples were not computed again
    before = chat.history()
    with sampled() as seen:
        reply = chat.send(text="And of Spain?", max_tokens=3)
    prompt = chat.history()[:-1]  # history and turn, without the answer
    assert reply.prefilled == size(prompt) - size(before)
    fresh = LLM(llm_gguf, n_ctx=model.llm.n_ctx)
    fresh.eval_tokens([t for item in prompt for t in item])  # a text-only chat: tokens all
    np.testing.assert_allclose(seen[0], fresh.logits(), atol=1e-4)
    fresh.close()


def test_the_default_release_builds_without_torch_and_again_when_it_changes(whisper_dir, llm_gguf, tmp_path):
    """An llasm-release (the shipped default's format) builds its bundle with numpy, onnx and gguf: torch is made
    unimportable in the process that builds it."""
    import subprocess
    import sys

    release = tmp_path / "release"
    release.mkdir()
    config = {"format": "llasm-release", "version": 1, "adaptor": {"kind": "whisper-decoder", "rows": "hard"},
              "base": {"whisper": str(whisper_dir), "llm": str(llm_gguf)}}
    (release / "config.json").write_text(json.dumps(config))
    out = tmp_path / "cache" / "default"
    code = (f"import sys; sys.modules['torch'] = None; from pathlib import Path; import llasm.export.default as d; "
            f"d.RELEASE = Path({str(release)!r}); print(d.ensure_default_bundle()); "
            f"print('torch' in sys.modules and sys.modules['torch'] is not None)")

    def build():
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, "LLASM_BUNDLE": str(out)})
        assert r.returncode == 0, r.stderr
        return r.stdout.split()

    assert build() == [str(out), "False"]
    manifest = json.loads((out / "manifest.json").read_text())
    import llasm.export.default as default

    assert manifest["provenance"]["release"] == "default" and manifest["adaptor"]["rows"] == "hard"
    assert manifest["provenance"]["release_digest"] == default.release_digest(release)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert build() == [str(out), "False"] and (out / "manifest.json").stat().st_mtime_ns == stamp  # built once
    config["adaptor"]["rows"] = "soft"  # a new release
    (release / "config.json").write_text(json.dumps(config))
    assert build() == [str(out), "False"]
    assert json.loads((out / "manifest.json").read_text())["adaptor"]["rows"] == "soft"


def test_json_shows_what_whisper_heard(bundle, model, tmp_path):
    import subprocess
    import sys

    import soundfile as sf

    wav = tmp_path / "q.wav"
    sf.write(wav, tiny.speech(1.0, seed=4), 16000, subtype="FLOAT")
    r = subprocess.run([sys.executable, "-m", "llasm.cli.local", "--bundle", str(bundle), "--audio", str(wav),
                        "--json", "--max-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["heard"] == model.encoder.transcriber(tiny.speech(1.0, seed=4)).text and out["heard"]


@pytest.mark.parametrize("agrees", [True, False])
def test_int8_graphs_ship_only_where_they_hear_as_the_float_ones(whisper_dir, llm_gguf, tmp_path, monkeypatch, agrees):
    import onnx

    from llasm.export import whisper_bundle

    seen = []

    def check(reference, quantized, vocab, geometry, clips, cfg):
        seen.append((reference, quantized, len(clips)))
        assert all(p.is_file() for p in reference + quantized)
        return None if agrees else "probe 0: int8 heard 'x', the float graphs 'y'"

    monkeypatch.setattr(whisper_bundle, "int8_agrees", check)
    out = tmp_path / "b"
    report = build_whisper_bundle(whisper_dir, llm_gguf, out, precision="int8")
    manifest = json.loads((out / "manifest.json").read_text())
    ops = {n.op_type for n in onnx.load(out / "text_decoder.onnx").graph.node}
    assert len(seen) == 1 and seen[0][2] == 1  # no probe given: the synthetic clip only
    assert ("MatMulInteger" in ops) is agrees
    assert ("int8" in manifest["files"]["text_decoder"]["precision"]) is agrees
    assert report.checks["int8"] == ("agrees with the float graphs on the probes" if agrees else
                                     "probe 0: int8 heard 'x', the float graphs 'y'")
    assert sorted(p.name for p in out.iterdir()) == ["audio_encoder.onnx", "llm.gguf", "manifest.json",
                                                     "text_decoder.onnx", "whisper_tokens.json"]


def test_int8_quality_check_compares_transcripts(whisper_dir, graphs, vocab, tmp_path):
    from llasm.export.whisper_bundle import int8_agrees, quantized_graphs

    cfg = {"languages": ["en", "zh"], "pad_seconds": 0.5}
    geometry = AudioGeometry(rows="tokens")
    clips = [tiny.speech(1.0, seed=1)]
    assert int8_agrees(graphs, graphs, vocab, geometry, clips, cfg) is None  # a graph agrees with itself
    q = quantized_graphs(whisper_dir, tmp_path)
    assert all(p.is_file() for p in q) and not (tmp_path / "float32").exists()
    other = tmp_path / "other"
    tiny.ct2_whisper(other, seed=7)  # another Whisper hears the clip otherwise
    far = write_graphs(other, other)[:2]
    assert int8_agrees(graphs, far, vocab, geometry, clips, cfg).startswith("probe 0: int8 heard")


def test_int8_decoder_keeps_one_float_token_table_in_float16(whisper_dir, tmp_path):
    """The output projection is int8; the lookup gathers from a float16 copy, exact, not from a float32 one."""
    import onnx
    from onnx import numpy_helper

    from llasm.export.whisper_bundle import quantized_graphs
    from llasm.training.ct2 import _model_bin, float_variable, read_ct2

    table = float_variable(read_ct2(_model_bin(whisper_dir), spec="WhisperSpec"), "decoder/embeddings/weight")
    decoder = onnx.load(str(quantized_graphs(whisper_dir, tmp_path)[1]))
    tables = [numpy_helper.to_array(t) for t in decoder.graph.initializer if sorted(t.dims) == sorted(table.shape)]
    assert sorted(str(t.dtype) for t in tables) == ["float16", "int8"]  # the int8 one is stored transposed
    np.testing.assert_array_equal(next(t for t in tables if t.dtype == np.float16).astype(np.float32), table)


def test_llasm_export_builds_a_release_as_first_use_does(whisper_dir, llm_gguf, tmp_path, monkeypatch):
    import subprocess
    import sys

    import llasm.export.default as default

    release = tmp_path / "release"
    release.mkdir()
    (release / "config.json").write_text(json.dumps({
        "format": "llasm-release", "version": 1, "adaptor": {"kind": "whisper-decoder"},
        "base": {"whisper": str(whisper_dir), "llm": str(llm_gguf)}}))
    monkeypatch.setattr(default, "RELEASE", release)
    monkeypatch.setenv("LLASM_BUNDLE", str(tmp_path / "first-use"))
    first_use = default.ensure_default_bundle()
    r = subprocess.run([sys.executable, "-m", "llasm.cli.export", str(release), "-o", str(tmp_path / "exported")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "probe_heard" in r.stdout and "int8" in r.stdout
    x = tiny.speech(1.1, seed=11)
    replies = []
    for path in (first_use, tmp_path / "exported"):
        m = LLaSM.load(path)
        reply = m.chat().send(audio=x, max_tokens=4)
        replies.append((reply.heard, reply.text))
        m.close()
    assert replies[0] == replies[1]
    bad = subprocess.run([sys.executable, "-m", "llasm.cli.export", str(release), "-o", str(tmp_path / "b"),
                          "--onnx", "fp32"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "int8 or fp16" in bad.stderr


# ---- listening: Whisper transcribes while the user speaks --------------------------------------------------------

SENTENCE = [256 + 3, 256 + 4, 256 + 2, 32] + [ord(c) for c in "France"] + [256 + 8]  # What is the France?
#           "France" letter by letter: a word of several tokens, which passes must not cut


class PositionDecoder(ScriptedDecoder):
    """A decoder that says SENTENCE whatever it hears: token i of the transcript comes at position 4 + i, certain
    where the audio so far is long enough for it (1 s for 3 tokens), then the end."""

    def __init__(self, n_vocab, seconds):
        super().__init__(n_vocab, None)
        self.seconds = seconds  # of the audio being decoded, set before each pass

    def run(self, _, feeds):
        n = feeds["past_k"].shape[3] + feeds["tokens"].shape[1]
        self.script = lambda step, fed, z: self.say(n - 4, z)
        return super().run(_, feeds)

    def say(self, i, z):
        if i < 0:
            return
        heard = min(len(SENTENCE), int(3 * self.seconds()))
        z[SENTENCE[i] if i < heard else 268] = 9.0
        if i < heard:
            z[256 + 9] = 7.0  # " Paris", a doubt behind every word


@pytest.fixture
def said(model):
    """The model's Whisper decoder says SENTENCE as far as the audio it is given reaches."""
    tr = model.encoder.transcriber
    features, decoder = tr.features, tr.decoder
    length = {"s": 0.0}

    def measured(samples):
        length["s"] = samples.size / 16000
        return features(samples)

    tr.features = measured
    tr.decoder = PositionDecoder(len(tr.vocab.pieces), lambda: length["s"])
    yield
    tr.features, tr.decoder = features, decoder


def test_listening_keeps_agreed_words_and_answers_as_the_whole_clip(model, said):
    from test_listen import sampled

    x = tiny.speech(4.0, seed=12)
    with sampled() as whole:
        reply = model.chat().send(audio=x, max_tokens=3)
    assert reply.heard == "What is the France?"
    chat = model.chat()
    listener = chat.listen(trim=False)
    for i in range(0, x.size, 1600):
        listener.feed(x[i:i + 1600])
        listener.wait(30)
    passes = listener.passes
    assert passes.agreed == SENTENCE[:3]  # the passes agreed on more, but "France" had not ended
    assert listener.rows_ahead >= sum(len(r) for r in passes.kept) > 0  # prefilled while it was spoken
    from llasm.runtime.chat import Reply

    got = Reply("")
    with sampled() as listened:
        text = "".join(listener.answer(max_tokens=3, _reply=got))
    assert text == reply.text and got.heard == reply.heard and got.audio_rows == reply.audio_rows
    np.testing.assert_allclose(listened[0], whole[0], atol=1e-4)
    assert got.prefilled < reply.prefilled  # the kept rows were in the KV cache already


def test_listening_prefills_its_guess_of_the_words_not_yet_agreed(model, said):
    from llasm.runtime.chat import Reply
    from llasm.runtime.prompt import Turn

    x = tiny.speech(4.0, seed=12)
    one_row = [np.zeros((1, model.encoder.n_embd), np.float32)]
    tail = model.chat().feed(Turn("user", (x,)), one_row)[-1]  # the template after the audio: what is left to do
    listener = model.chat().listen(trim=False)
    for i in range(0, x.size, 1600):
        listener.feed(x[i:i + 1600])
        listener.wait(30)
    passes = listener.passes
    kept = sum(len(r) for r in passes.kept)
    assert passes.agreed == SENTENCE[:3] and len(passes.ahead) > 0  # "France?": heard, not yet agreed
    assert listener.rows_ahead == kept + len(passes.ahead)  # and in the KV cache
    got = Reply("")
    "".join(listener.answer(max_tokens=3, _reply=got))
    assert got.heard == "What is the France?"
    assert got.prefilled == len(tail)  # the last pass heard what the guess said: its rows were computed already


def test_speech_found_late_runs_only_the_last_pass_due(model, said, monkeypatch):
    """Speech from the first sample, with no pause to judge the noise floor by, is taken as speech only after
    UNDECIDED_SECONDS: of the passes due by then only the last one runs (each transcribes the whole turn so far)."""
    from llasm.runtime import listen
    from llasm.runtime.heard_passes import HeardPasses

    ran = []
    run = HeardPasses.run
    monkeypatch.setattr(HeardPasses, "run", lambda self, x: ran.append(x.size) or run(self, x))
    x = np.concatenate([tiny.speech(3.2, seed=12), np.zeros(8000, np.float32)])
    listener = model.chat().listen()
    for i in range(0, x.size, 1600):
        listener.feed(x[i:i + 1600])
        listener.wait(30)
    step = HeardPasses(model.encoder).step
    first = int(np.ceil(listen.UNDECIDED_SECONDS * 16000 / listener.check)) * listener.check  # the look that decides
    assert ran[0] == first // step * step and first // step > 1  # not the passes at 0.5, 1.0, 1.5 s
    assert ran == list(range(ran[0], ran[-1] + 1, step))  # and every one after it
    assert "".join(listener.answer(max_tokens=3)) and listener.passes.heard.startswith("What is the France")


def test_eval_listen_gives_what_a_listener_gives(model, said):
    from llasm.runtime.listen import ListenedEncoder, listened

    x = tiny.speech(4.0, seed=13)
    rows, heard = listened(model.encoder, x)
    assert heard == "What is the France?"
    enc = ListenedEncoder(model.encoder)
    got, h = enc.encode_heard(enc.features(x))
    np.testing.assert_array_equal(got, rows)
    assert h.text == heard


def test_agreed_words_end_where_a_word_or_clause_ends(model):
    from llasm.runtime.heard_passes import HeardPasses

    p = HeardPasses(model.encoder)
    f, r, a, n, c = ord("F"), ord("r"), ord("a"), ord("n"), ord("c")
    tokens = [256 + 3, 256 + 4, 32, f, r, a, n, c, 256 + 8]  # "What is France?" with "France" in letters
    starts = [j for j in range(len(tokens) + 1) if p._starts_word(tokens, j)]
    assert starts == [1, 2]  # " is", and the blank before "France": never inside it, never at the end
    zh = list("你好，世界".encode())  # Mandarin has no blanks: a clause ends after its comma
    assert [j for j in range(len(zh)) if p._starts_word(zh, j)] == [9]
