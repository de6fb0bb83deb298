"""What Whisper heard: its own greedy transcript of a clip on onnxruntime, with what the whisper-decoder adaptor needs
to turn it into LLM rows (each token's posterior and decoder state).

    samples -> log-mel (real length + pad_seconds of silence, at most 30 s a pass)
            -> encoder graph: every decoder layer's cross-attention keys and values, once per pass
            -> decoder graph with a KV cache: [<|startoftranscript|>] gives the language (among `languages`) and the
               no-speech probability; [<|lang|>, <|transcribe|>, <|notimestamps|>] then one token a step, greedily,
               until <|endoftext|>

Whisper's own guards: timestamps and other special tokens are suppressed, and so are the tokens of its
suppress list (and a blank or <|endoftext|> as the first token); a pass stops at MAX_TOKENS_PER_S tokens per second
of audio (+ MIN_TOKEN_CAP) or when its tail repeats a block of 4 tokens or more (loops.py; one copy kept: without
the 30 s of padding Whisper was trained on, it sometimes starts the sentence over at its end); a pass whose no-speech
probability is above NO_SPEECH_P while its tokens average a log-probability below NO_SPEECH_LOGPROB gives nothing.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .audio import SAMPLE_RATE, AudioGeometry
from .features import log_mel
from .loops import loop_excess

LORA_GATE = "lora_gate"  # export/whisper_onnx.py: the decoder graph's LoRA, 0 off, 1 on

log = logging.getLogger(__name__)

MAX_TOKENS_PER_S = 10  # read speech: ~3 Whisper tokens a second in English, ~5 in Mandarin
MIN_TOKEN_CAP = 10
NO_SPEECH_P = 0.6  # Whisper's transcribe() thresholds
NO_SPEECH_LOGPROB = -1.0
TOP_K = 8  # candidates kept per token (the rows mix at most these)
REPEATS, REPEAT_MIN_TOKENS = 2, 8  # on the real length Whisper may say a sentence again: 2 copies of >= 4 tokens


class WhisperVocabError(ValueError):
    pass


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte, inverted."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


@dataclass(frozen=True)
class WhisperVocab:
    """Whisper's tokens as bytes, its special ids and its suppress lists (whisper_tokens.json in a bundle)."""

    pieces: tuple  # bytes per token id; special tokens give b""
    specials: dict  # name -> id: endoftext, startoftranscript, transcribe, notimestamps, nospeech
    languages: dict  # code -> id, e.g. {"en": 50259, "zh": 50260}
    timestamp_begin: int
    suppress: tuple = ()  # never sampled
    suppress_begin: tuple = ()  # not as the first token

    NAMES = {"endoftext": "<|endoftext|>", "startoftranscript": "<|startoftranscript|>",
             "transcribe": "<|transcribe|>", "notimestamps": "<|notimestamps|>"}

    @classmethod
    def from_tokens(cls, tokens: list[str], suppress=(), suppress_begin=()) -> "WhisperVocab":
        """tokens: the byte-level BPE strings of every id in order (CTranslate2's vocabulary.txt)."""
        index = {t: i for i, t in enumerate(tokens)}
        missing = [t for t in cls.NAMES.values() if t not in index]
        if missing:
            raise WhisperVocabError(f"Whisper vocabulary has no {missing[0]}: not a multilingual Whisper tokenizer")
        specials = {name: index[t] for name, t in cls.NAMES.items()}
        nospeech = index.get("<|nospeech|>", index.get("<|nocaptions|>"))
        if nospeech is not None:
            specials["nospeech"] = nospeech
        if "<|0.00|>" not in index:
            raise WhisperVocabError("Whisper vocabulary has no timestamp tokens (<|0.00|>)")
        sot = specials["startoftranscript"]
        languages = {}
        for i in range(sot + 1, len(tokens)):
            t = tokens[i]
            if not (t.startswith("<|") and t.endswith("|>") and 2 <= len(t) - 4 <= 3 and t[2:-2].isalpha()):
                break
            languages[t[2:-2]] = i
        decoder = _byte_decoder()
        pieces = []
        for t in tokens:
            if t.startswith("<|") and t.endswith("|>") and t in index and index[t] >= specials["endoftext"]:
                pieces.append(b"")
            else:
                pieces.append(bytes(decoder[c] for c in t if c in decoder))
        return cls(tuple(pieces), specials, languages, index["<|0.00|>"], tuple(sorted(set(suppress))),
                   tuple(sorted(set(suppress_begin))))

    @classmethod
    def from_file(cls, path) -> "WhisperVocab":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.from_tokens(data["tokens"], data.get("suppress", ()), data.get("suppress_begin", ()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WhisperVocabError(f"cannot read Whisper's vocabulary from {path}: {e}") from None

    def text(self, ids) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", "replace")

    @property
    def n_text(self) -> int:
        """Ids below this are text; the rest are special."""
        return self.specials["endoftext"]


@dataclass
class Heard:
    """One clip as Whisper heard it. Per text token: its id, its top candidates with their probabilities, and the
    decoder state that chose it."""

    tokens: list = field(default_factory=list)
    top_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, TOP_K), np.int64))
    top_p: np.ndarray = field(default_factory=lambda: np.zeros((0, TOP_K), np.float32))
    hidden: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    text: str = ""
    lang: str = ""
    no_speech: float = 0.0  # of the first pass
    looped: bool = False
    capped: bool = False
    forced: int = 0  # the first tokens were given, not decoded (a listener's agreed prefix)

    def extend(self, other: "Heard") -> None:
        self.tokens += other.tokens
        self.top_ids = np.concatenate([self.top_ids, other.top_ids])
        self.top_p = np.concatenate([self.top_p, other.top_p])
        self.hidden = other.hidden if not self.hidden.size else np.concatenate([self.hidden, other.hidden])
        self.looped |= other.looped
        self.capped |= other.capped


class Pass(NamedTuple):
    """One encoder pass: its log-mel (1, n_mels, n_frames), silence pad included, and the seconds of audio in it."""

    mel: np.ndarray
    seconds: float


def _session(path, n_threads: int | None):
    import onnxruntime as ort

    from .encoder import providers

    opts = ort.SessionOptions()
    if n_threads:
        opts.intra_op_num_threads = n_threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # llama.cpp's prefill comes next
    return ort.InferenceSession(str(path), opts, providers=providers())


class Transcriber:
    """Whisper's greedy transcript of a clip (see the module docstring)."""

    def __init__(self, encoder_path, decoder_path, vocab: WhisperVocab, geometry: AudioGeometry,
                 languages=("en", "zh"), pad_seconds: float = 0.0, n_threads: int | None = None,
                 tuned=()):
        bad = [code for code in languages if code not in vocab.languages]
        if bad or not languages:
            raise WhisperVocabError(f"Whisper has no language {bad[0] if bad else '(none given)'}; it knows "
                                    f"{', '.join(sorted(vocab.languages))}")
        self.encoder = _session(encoder_path, n_threads)
        self.decoder = _session(decoder_path, n_threads)
        self.vocab, self.geometry, self.languages = vocab, geometry, tuple(languages)
        gated = LORA_GATE in {i.name for i in self.decoder.get_inputs()}
        if tuned and not gated:
            raise WhisperVocabError(f"Whisper is declared tuned for {', '.join(tuned)} but its decoder graph has no "
                                    f"{LORA_GATE} input")
        self.tuned = frozenset(tuned)  # languages decoded with the decoder's LoRA (its gate at 1)
        self._gate = {g: np.full(1, g, np.float32) for g in (0.0, 1.0)} if gated else None
        self.pad = int(pad_seconds * SAMPLE_RATE)
        k = self.encoder.get_outputs()[0].shape  # (L, 1, H, frames, d_head)
        self.n_layers, self.n_heads, self.d_head = int(k[0]), int(k[2]), int(k[4])
        self.n_vocab = int(self.decoder.get_outputs()[0].shape[1])
        if self.n_vocab != len(vocab.pieces):
            raise WhisperVocabError(f"Whisper's decoder has {self.n_vocab} tokens, its vocabulary {len(vocab.pieces)}")
        never = np.zeros(self.n_vocab, bool)
        never[vocab.n_text:] = True  # specials and timestamps...
        never[vocab.specials["endoftext"]] = False  # ...but the end
        never[[i for i in vocab.suppress if 0 <= i < self.n_vocab]] = True
        self._never = never
        self._never_first = never.copy()
        self._never_first[[i for i in vocab.suppress_begin if 0 <= i < self.n_vocab]] = True
        self._never_first[vocab.specials["endoftext"]] = True

    def features(self, samples: np.ndarray) -> list[Pass]:
        """Per pass of at most 30 s: log-mel (1, n_mels, n_frames) of the real length plus the silence pad."""
        out = []
        for s, e in self.geometry.chunks(samples.size):
            x = samples[s:e]
            pad = min(self.pad, self.geometry.max_chunk_samples - x.size)
            out.append(Pass(log_mel(np.pad(x, (0, pad)) if pad > 0 else x, self.geometry.n_mels)[None],
                            x.size / SAMPLE_RATE))
        return out

    def _step(self, tokens: list[int], past: tuple, cross: tuple, tuned: bool = False) -> tuple:
        feed = {"tokens": np.asarray([tokens], np.int64), "past_k": past[0], "past_v": past[1],
                "cross_k": cross[0], "cross_v": cross[1]}
        if self._gate is not None:
            feed[LORA_GATE] = self._gate[float(tuned)]
        logits, hidden, k, v = self.decoder.run(None, feed)
        return logits[0], hidden[0], (k, v)

    def decode(self, part: Pass, lang: str | None = None, prefix: tuple = ()) -> Heard:
        """One pass -> what Whisper heard in it. prefix: tokens the transcript starts with, fed in one call with
        the prompt and never doubted (a listener's tokens agreed on while the user spoke): only the rest is decoded
        step by step. Their candidates are themselves alone, their states zeros."""
        sp = self.vocab.specials
        cross = tuple(self.encoder.run(None, {"mel": part.mel}))
        empty = np.zeros((self.n_layers, 1, self.n_heads, 0, self.d_head), np.float32)
        logits, hidden, past = self._step([sp["startoftranscript"]], (empty, empty), cross)
        p0 = _softmax(logits)
        no_speech = float(p0[sp["nospeech"]]) if "nospeech" in sp else 0.0
        if lang is None:
            lang = max(self.languages, key=lambda code: logits[self.vocab.languages[code]])
        prefix = [int(t) for t in prefix]
        prompt = [self.vocab.languages[lang], sp["transcribe"], sp["notimestamps"]] + prefix
        tuned = lang in self.tuned
        if tuned:  # the language was told by Whisper as shipped; the tuned decoder starts over, as it was trained
            prompt, past = [sp["startoftranscript"]] + prompt, (empty, empty)
        logits, hidden, past = self._step(prompt, past, cross, tuned)
        cap = int(MAX_TOKENS_PER_S * part.seconds) + MIN_TOKEN_CAP
        heard = Heard(tokens=list(prefix), lang=lang, no_speech=no_speech, forced=len(prefix))
        tops = [np.array([t] + [t] * (TOP_K - 1)) for t in prefix]
        probs = [np.array([1.0] + [0.0] * (TOP_K - 1), np.float32) for _ in prefix]
        states, logprob = [np.zeros(hidden.size, np.float32) for _ in prefix], 0.0
        if no_speech > NO_SPEECH_P and prefix:
            no_speech = 0.0  # words were heard and agreed on already: this pass is not judged free of speech
        while True:
            z = np.where(self._never_first if not heard.tokens else self._never, -np.inf, logits)
            p = _softmax(z)
            token = int(np.argmax(p))
            if token == sp["endoftext"]:
                break
            if len(heard.tokens) >= cap:
                heard.capped = True
                break
            top = np.argpartition(-p, TOP_K)[:TOP_K]
            top = top[np.argsort(-p[top])]
            heard.tokens.append(token)
            tops.append(top)
            probs.append(p[top].astype(np.float32))
            states.append(hidden.astype(np.float32))
            logprob += math.log(max(float(p[token]), 1e-30))
            excess = loop_excess(heard.tokens, REPEATS, REPEAT_MIN_TOKENS)
            if excess:
                keep = max(len(heard.tokens) - excess, heard.forced)
                del heard.tokens[keep:], tops[keep:], probs[keep:], states[keep:]
                heard.looped = True
                break
            logits, hidden, past = self._step([token], past, cross, tuned)
        avg = logprob / max(len(heard.tokens) - heard.forced, 1)
        if no_speech > NO_SPEECH_P and avg < NO_SPEECH_LOGPROB:  # Whisper's test: nothing was said
            log.debug("Whisper heard no speech (p %.2f, mean log-probability %.2f)", no_speech, avg)
            return Heard(lang=lang, no_speech=no_speech, hidden=np.zeros((0, hidden.size), np.float32))
        if tops:
            heard.top_ids, heard.top_p, heard.hidden = np.stack(tops), np.stack(probs), np.stack(states)
        else:
            heard.hidden = np.zeros((0, hidden.size), np.float32)
        return heard

    def __call__(self, samples: np.ndarray, lang: str | None = None) -> Heard:
        return self.transcribe(self.features(samples), lang)

    def transcribe(self, passes: list[Pass], lang: str | None = None, prefix: tuple = ()) -> Heard:
        """Every pass decoded; the language is detected on the first and kept; prefix: the first pass's (decode)."""
        heard = None
        for p in passes:
            part = self.decode(p, lang if heard is None else heard.lang, prefix if heard is None else ())
            if heard is None:
                heard = part
            else:
                heard.extend(part)
        heard.text = self.vocab.text(heard.tokens).strip()
        return heard


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()
