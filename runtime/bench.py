"""Speed and memory of a bundle, side by side with the cascade baseline, on the same clips.

LLaSM path:   audio -> log-mel -> ONNX encoder+adaptor -> embedding rows -> llama.cpp -> first token
Listening:    the same model fed the audio in real time (Chat.listen, as push-to-talk feeds it); timed from the
              last sample, when only the last rows are left to encode and prefill; and again with `pause`
              seconds of quiet after the speech before the end (the user lets go of the key a moment after speaking)
Cascade path: audio -> faster-whisper (CTranslate2 int8, same Whisper weights) -> transcript -> the same GGUF
              answering the transcript as text -> first token

Each path runs in its own process (peak RSS is per path); every figure is the median of `repeats` runs after
one warm-up run. Nothing here asserts on time: the numbers go to BENCHMARKS.md.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, load_audio
from .mic import trim_silence

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    bundle: str
    clips: list  # paths of speech clips; tiled/cropped to each length
    lengths: list = field(default_factory=lambda: [1.0, 2.0, 5.0, 10.0, 20.0, 30.0])
    repeats: int = 5
    threads: int | None = None
    max_tokens: int = 32
    cascade_whisper: str | None = None  # CTranslate2 Whisper directory for the cascade; None: no cascade
    decode_tokens: int = 64
    listen: bool = True  # also time the listening path (each run takes the audio's length in real time)
    pause: float = 0.5  # seconds of quiet after the speech in the listening path's second run


@dataclass
class PathResult:
    """Medians per audio length (seconds -> ms), plus process-wide figures."""

    first_token_ms: dict = field(default_factory=dict)
    encode_ms: dict = field(default_factory=dict)  # features + encoder (LLaSM) / transcription (cascade)
    prefill_ms: dict = field(default_factory=dict)
    rows: dict = field(default_factory=dict)  # LLM positions the audio became (LLaSM) / transcript tokens /
    #                                           audio rows already prefilled at the end of speech (listening)
    peak_rss_mb: float = 0.0
    load_s: float = 0.0


@dataclass
class BenchResult:
    llasm: PathResult
    cascade: PathResult | None
    decode_tokens_per_s: float
    plain_llama_tokens_per_s: float
    bundle_mb: float
    machine: str
    listening: PathResult | None = None
    listening_pause: PathResult | None = None

    @property
    def ratios(self) -> dict:
        out = {"decode_vs_plain_llama": self.decode_tokens_per_s / max(self.plain_llama_tokens_per_s, 1e-9)}
        if self.cascade:
            out["first_token_vs_cascade"] = {
                L: self.llasm.first_token_ms[L] / self.cascade.first_token_ms[L] for L in self.llasm.first_token_ms}
        for name, path in (("listening", self.listening), ("listening_pause", self.listening_pause)):
            if path:
                out[f"{name}_first_token_vs_whole_clip"] = {
                    L: path.first_token_ms[L] / self.llasm.first_token_ms[L] for L in self.llasm.first_token_ms}
        out["encoder_ms_per_audio_s"] = {L: self.llasm.encode_ms[L] / L for L in self.llasm.encode_ms}
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratios"] = self.ratios
        return d


def clip_of_length(clips: list[np.ndarray], seconds: float) -> np.ndarray:
    """Speech of exactly `seconds`: the clips one after another, repeated as needed, then cropped."""
    n = int(seconds * SAMPLE_RATE)
    joined = np.concatenate(clips)
    reps = int(np.ceil(n / joined.size))
    return np.tile(joined, reps)[:n].astype(np.float32)


def _median(values) -> float:
    return float(statistics.median(values))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


DECODE_QUESTION = "Count from one to one hundred."


def _sweep(cfg: BenchConfig, clips: list[np.ndarray], chat, ask) -> PathResult:
    """Per audio length: one warm-up, then `repeats` timed runs of ask(x) -> (first_token, encode, prefill, rows)
    in ms (rows: LLM positions), each from a fresh conversation whose KV cache holds the system header only (an
    earlier run's rows of the same audio would be reused); medians."""
    res = PathResult()
    for L in cfg.lengths:
        x = clip_of_length(clips, L)
        runs = []
        for i in range(cfg.repeats + 1):
            chat.reset()
            chat.model.kv.forget()
            run = ask(x)
            if i:  # the first run is the warm-up
                runs.append(run)
        res.first_token_ms[L], res.encode_ms[L], res.prefill_ms[L] = (_median(r[k] for r in runs) for k in range(3))
        res.rows[L] = runs[-1][3]
    return res


def _llasm_path(cfg: BenchConfig, clips: list[np.ndarray]) -> dict:
    from .chat import LLaSM

    t = time.perf_counter()
    model = LLaSM.load(cfg.bundle, n_threads=cfg.threads)
    load_s = time.perf_counter() - t
    chat = model.chat()

    def ask(x):
        reply = chat.send(audio=x, max_tokens=1)
        r = reply.timings
        return r["first_token"], r["features"] + r["encode"], r["prefill"], reply.audio_rows

    res = _sweep(cfg, clips, chat, ask)
    res.load_s = load_s
    listening = pause = None
    if cfg.listen:
        listening = _sweep(cfg, clips, chat, lambda x: _listen(chat, x))
        pause = _sweep(cfg, clips, chat, lambda x: _listen(chat, x, pause=cfg.pause))
    decode = _decode_rate(model, _decode_prompt(model.bundle), cfg.decode_tokens, cfg.repeats)
    res.peak_rss_mb = _peak_rss_mb()
    model.close()
    return {"result": res, "decode": decode, "listening": listening, "listening_pause": pause}


FEED_SECONDS = 0.1  # block size of the real-time feed (a microphone's callback delivers 10-100 ms)
PAUSE_DBFS = -60.0  # level of the quiet after the speech: a quiet room through a laptop microphone


def _listen(chat, x: np.ndarray, pause: float = 0.0) -> tuple:
    """x fed to a Listener block by block at the pace it would be spoken, then answered; ms from the last block.
    pause: seconds of quiet fed after x, trimmed as push-to-talk trims; 0: x as it is (the whole-clip path's)."""
    from .chat import Reply

    if pause:
        rng = np.random.default_rng(0)
        quiet = (10 ** (PAUSE_DBFS / 20) * rng.standard_normal(int(pause * SAMPLE_RATE))).astype(np.float32)
        x = np.concatenate([x, quiet])
    listener = chat.listen(trim=bool(pause))
    block = int(FEED_SECONDS * SAMPLE_RATE)
    start = time.perf_counter()
    for i in range(0, x.size, block):
        time.sleep(max(0.0, start + (i + block) / SAMPLE_RATE - time.perf_counter()))  # the block has been spoken
        listener.feed(x[i:i + block])
    reply = Reply("")
    for _ in listener.answer(max_tokens=1, _reply=reply):
        pass
    r = reply.timings
    return r["first_token"], r["features"] + r["encode"], r["prefill"], listener.rows_ahead


def _decode_prompt(bundle) -> str:
    """The decode benchmark's prompt in the bundle's own chat format (bos, default system, question)."""
    from .prompt import Turn

    return "".join(seg.text for seg in bundle.prompt.render([Turn("user", (DECODE_QUESTION,))]))


def _decode_rate(model, prompt: str, n: int, repeats: int) -> float:
    """Tokens/s of the runtime's own greedy step (logits read, argmax, piece, eval through the KV ledger), EOS
    ignored."""
    llm, kv = model.llm, model.kv
    ids = llm.tokenize(prompt)
    rates = []
    for _ in range(repeats + 1):
        kv.load([ids])
        t = time.perf_counter()
        for _ in range(n):
            token = int(np.argmax(llm.logits(copy=False)))
            llm.piece(token)
            kv.extend([[token]])
        rates.append(n / (time.perf_counter() - t))
    kv.truncate(0)
    return _median(rates[1:])


def _plain_llama_rate(cfg: BenchConfig) -> dict:
    """Tokens/s of llama.cpp alone generating greedily from the same GGUF: its own greedy sampler, the token fed back
    with llama_batch_get_one, no Python per token but the loop (the baseline for the runtime's own step)."""
    import llama_cpp

    from .bundle import read_bundle
    from .llm import LLM

    b = read_bundle(cfg.bundle, verify=False)
    llm = LLM(b.llm, n_ctx=2048, n_threads=cfg.threads, lora_path=b.llm_lora)
    prompt = llm.tokenize(_decode_prompt(b))
    sampler = llama_cpp.llama_sampler_init_greedy()
    one = (llama_cpp.llama_token * 1)()
    rates = []
    try:
        for _ in range(cfg.repeats + 1):
            llm.truncate(0)
            llm.eval_tokens(prompt)
            t = time.perf_counter()
            for _ in range(cfg.decode_tokens):
                one[0] = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
                if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(one, 1)) != 0:
                    raise RuntimeError("llama_decode failed in the plain llama.cpp baseline")
            rates.append(cfg.decode_tokens / (time.perf_counter() - t))  # truncate(0) clears what it decoded
    finally:
        llama_cpp.llama_sampler_free(sampler)
        llm.close()
    return {"rate": _median(rates[1:])}


def _cascade_path(cfg: BenchConfig, clips: list[np.ndarray]) -> dict:
    try:
        from faster_whisper import WhisperModel
    except ImportError as e:
        raise ValueError("the cascade baseline needs faster-whisper: pip install 'llasm[bench]'") from e
    from .chat import LLaSM

    t = time.perf_counter()
    asr = WhisperModel(cfg.cascade_whisper, device="cpu", compute_type="int8", cpu_threads=cfg.threads or 0)
    model = LLaSM.load(cfg.bundle, n_threads=cfg.threads)
    load_s = time.perf_counter() - t
    chat = model.chat()

    def ask(x):
        a = time.perf_counter()
        segments, _ = asr.transcribe(x, beam_size=1, language="en", temperature=0.0, vad_filter=False,
                                     condition_on_previous_text=False, without_timestamps=True)
        text = " ".join(s.text.strip() for s in segments)
        t_asr = 1e3 * (time.perf_counter() - a)
        r = chat.send(text=text or ".", max_tokens=1).timings
        return t_asr + r["first_token"], t_asr, r["prefill"], len(model.llm.tokenize(text))

    res = _sweep(cfg, clips, chat, ask)
    res.load_s = load_s
    res.peak_rss_mb = _peak_rss_mb()
    model.close()
    return {"result": res}


def _in_child(fn, *args):
    """Run fn in a fresh process (its own peak RSS); its exception is raised here."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        result = pool.apply(fn, args)
        pool.close()  # let the child exit on its own: a terminated child leaves its semaphores to the resource tracker
        pool.join()
    return result


def run_bench(cfg: BenchConfig) -> BenchResult:
    import platform

    from .bundle import read_bundle

    b = read_bundle(cfg.bundle)
    clips = [trim_silence(load_audio(c), margin=0.0) for c in cfg.clips]  # speech end to end: an N-s crop is speech
    clips = [c for c in clips if c.size]
    if not clips:
        raise ValueError("the benchmark needs at least one speech clip (--audio)")
    log.info("LLaSM path")
    llasm = _in_child(_llasm_path, cfg, clips)
    log.info("plain llama.cpp decode")
    plain = _in_child(_plain_llama_rate, cfg)
    cascade = None
    if cfg.cascade_whisper:
        log.info("cascade path")
        cascade = _in_child(_cascade_path, cfg, clips)["result"]
    size = sum(e["size"] for e in b.manifest["files"].values()) / 1e6
    machine = f"{platform.processor() or platform.machine()}, {mp.cpu_count()} cores, threads={cfg.threads or 'auto'}"
    return BenchResult(llasm["result"], cascade, llasm["decode"], plain["rate"], size, machine, llasm["listening"],
                       llasm["listening_pause"])


def plot(result: BenchResult, path) -> None:
    """First-token time vs audio length for both paths (matplotlib PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ValueError("plotting needs matplotlib: pip install 'llasm[bench]'") from e
    fig, ax = plt.subplots(figsize=(6, 4))
    L = sorted(result.llasm.first_token_ms)
    ax.plot(L, [result.llasm.first_token_ms[x] for x in L], "o-", label="LLaSM (audio embeddings)")
    if result.listening:
        ax.plot(L, [result.listening.first_token_ms[x] for x in L], "^-", label="LLaSM listening (real-time feed)")
        ax.plot(L, [result.listening_pause.first_token_ms[x] for x in L], "v-",
                label="LLaSM listening, a pause before the end")
    if result.cascade:
        ax.plot(L, [result.cascade.first_token_ms[x] for x in L], "s-", label="cascade (faster-whisper + LLM)")
    ax.set_xlabel("audio length (s)")
    ax.set_ylabel("end of speech -> first token (ms)")
    ax.set_title(f"llasm-bench: {result.machine}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
