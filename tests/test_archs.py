"""Every supported LLM family through the LLaSM module and llama.cpp: Qwen2, Llama, Gemma3 (scaled embeddings)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import tiny  # noqa: E402
from llasm.export.gguf import write_gguf  # noqa: E402
from llasm.runtime.features import log_mel  # noqa: E402
from llasm.runtime.llm import LLM  # noqa: E402
from llasm.runtime.prompt import Turn  # noqa: E402
from llasm.training.adaptor import AdaptorConfig  # noqa: E402
from llasm.training.base import prompt_format  # noqa: E402
from llasm.training.model import Batch, LLaSMConfig, LLaSMModel  # noqa: E402
from llasm.training.whisper import WhisperEncoder, encoder_config_from_hf, encoder_state_from_hf  # noqa: E402


def _model(arch):
    tok = tiny.tokenizer()
    llm = tiny.lm(arch, len(tok))
    torch.manual_seed(1)
    hf = transformers.WhisperModel(tiny.whisper_config())
    enc = WhisperEncoder(encoder_config_from_hf(hf.config))
    enc.load_state_dict(encoder_state_from_hf(hf.state_dict()))
    cfg = LLaSMConfig(encoder=enc.cfg, adaptor=AdaptorConfig(enc.cfg.d_model, llm.config.hidden_size, stack_factor=3),
                      prompt=prompt_format(tok), llm_arch=llm.config.model_type)
    return LLaSMModel(cfg, enc.requires_grad_(False), llm), tok


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_arch_trains_and_matches_llama_cpp(arch, tmp_path):
    model, tok = _model(arch)
    x = tiny.speech(1.3, seed=4)
    mel = torch.from_numpy(log_mel(x))
    segments = model.cfg.prompt.render([Turn("user", (x, "What is this?")), Turn("assistant", ("A sound.",))],
                                       add_generation_prompt=False)
    items = []
    for s in segments:
        if s.is_audio:
            items.append(("audio", [0]))
        else:
            ids = torch.tensor(tok(s.text, add_special_tokens=False)["input_ids"])
            items.append(("text", ids, ids.clone() if s.labelled else torch.full_like(ids, -100)))
    batch = Batch(mel=mel[None], n_frames=torch.tensor([mel.shape[1]]), items=[items])
    model.requires_grad_(False)
    model.adaptor.requires_grad_(True)
    assert model.shared_prefix(batch) > 0  # the system header's keys and values are computed once, without grad
    loss = model(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.adaptor.out.weight.grad.abs().sum() > 0
    model.shared_prefix = lambda b: 0
    with torch.no_grad():  # the same loss as one forward over the whole sequence (Gemma: sliding-window layers too)
        torch.testing.assert_close(model(batch), loss.detach(), atol=1e-5, rtol=1e-5)
    del model.shared_prefix

    # llama.cpp reads the same rows the same way (Gemma: rows live in the sqrt(d)-scaled embedding space).
    path = tmp_path / "llm.gguf"
    write_gguf(model.llm, tok, path, dtype="f32")
    with torch.no_grad():
        rows = model.audio_rows(mel[None], torch.tensor([mel.shape[1]]))[0]
    prompt = model.cfg.prompt.render([Turn("user", (x, "What is this?"))])
    llm = LLM(path, n_ctx=256, n_batch=32)
    parts = []
    for s in prompt:
        if s.is_audio:
            llm.eval_embeddings(rows.numpy())
            parts.append(rows)
        else:
            ids = tok(s.text, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(s.text) == ids
            llm.eval_tokens(ids)
            with torch.no_grad():
                parts.append(model.embed_tokens(torch.tensor(ids)))
    got = llm.logits()
    llm.close()
    want = model.logits(torch.cat(parts)[None])[0, -1].numpy()
    assert int(got.argmax()) == int(want.argmax())
    assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("dtype", ["f32", "q8_0"])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_token_rows_from_the_gguf_give_the_token_path(arch, dtype, tmp_path):
    """Text fed as the GGUF's own token rows (dequantized; Gemma's scaled by sqrt(d) as llama.cpp scales token
    input) gives exactly the token path's logits, so a turn's text and audio can share one llama_decode."""
    from llasm.export.quantize import quantize_gguf
    from llasm.runtime.token_rows import TokenRows

    tok = tiny.tokenizer()
    path = tmp_path / "llm.gguf"
    write_gguf(tiny.lm(arch, len(tok)), tok, path, dtype="f32")
    if dtype != "f32":
        quantize_gguf(path, tmp_path / f"{dtype}.gguf", dtype)
        path = tmp_path / f"{dtype}.gguf"
    rows = TokenRows(path)
    assert rows.qtype.name == dtype.upper()
    llm = LLM(path, n_ctx=256, n_batch=64)
    ids = llm.tokenize("<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    llm.eval_tokens(ids)
    want = llm.logits()
    llm.truncate(0)
    llm.eval_embeddings(rows.rows(ids))
    np.testing.assert_array_equal(llm.logits(), want)
    llm.truncate(0)
    llm.warm_up()
    assert llm.token_rows is not None
    llm.close()
