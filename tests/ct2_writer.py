"""A minimal CTranslate2 model.bin writer (binary version 6), the inverse of what training/ct2.py reads, and
transformers Whisper weights under faster-whisper's variable names."""
import struct

import numpy as np

_DTYPE_IDS = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3,
              np.dtype(np.float16): 4}


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_ct2(path, variables: dict, aliases: dict = None, spec: str = "WhisperSpec") -> None:
    out = [struct.pack("<I", 6), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, a in sorted(variables.items()):
        a = np.asarray(a, order="C")  # (np.ascontiguousarray would turn scalars 1-d)
        out += [_string(name), struct.pack(f"<B{a.ndim}I", a.ndim, *a.shape),
                struct.pack("<BI", _DTYPE_IDS[a.dtype], a.nbytes), a.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def ct2_encoder_variables(hf_encoder, n_heads: int, dtype=np.float16) -> dict:
    """A transformers WhisperEncoder's weights under faster-whisper's names (fused q|k|v, zero k bias)."""
    s = {k: v.detach().numpy().astype(dtype) for k, v in hf_encoder.state_dict().items()}
    v = {"encoder/num_heads": np.array(n_heads, np.int16),
         "encoder/position_encodings/encodings": s["embed_positions.weight"],
         "encoder/layer_norm/gamma": s["layer_norm.weight"], "encoder/layer_norm/beta": s["layer_norm.bias"]}
    for conv in ("conv1", "conv2"):
        v[f"encoder/{conv}/weight"], v[f"encoder/{conv}/bias"] = s[f"{conv}.weight"], s[f"{conv}.bias"]
    for i in range(len(hf_encoder.layers)):
        h, c = f"layers.{i}.", f"encoder/layer_{i}/"
        a = h + "self_attn."
        v[c + "self_attention/linear_0/weight"] = np.concatenate(
            [s[a + "q_proj.weight"], s[a + "k_proj.weight"], s[a + "v_proj.weight"]])
        v[c + "self_attention/linear_0/bias"] = np.concatenate(
            [s[a + "q_proj.bias"], np.zeros_like(s[a + "q_proj.bias"]), s[a + "v_proj.bias"]])
        v[c + "self_attention/linear_1/weight"], v[c + "self_attention/linear_1/bias"] = (
            s[a + "out_proj.weight"], s[a + "out_proj.bias"])
        v[c + "self_attention/layer_norm/gamma"] = s[h + "self_attn_layer_norm.weight"]
        v[c + "self_attention/layer_norm/beta"] = s[h + "self_attn_layer_norm.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            v[c + f"ffn/linear_{j}/weight"], v[c + f"ffn/linear_{j}/bias"] = s[h + fc + ".weight"], s[h + fc + ".bias"]
        v[c + "ffn/layer_norm/gamma"] = s[h + "final_layer_norm.weight"]
        v[c + "ffn/layer_norm/beta"] = s[h + "final_layer_norm.bias"]
    return v


def _ct2_linear(v: dict, name: str, s: dict, prefix: str) -> None:
    v[name + "/weight"], v[name + "/bias"] = s[prefix + ".weight"], s[prefix + ".bias"]


def _ct2_norm(v: dict, name: str, s: dict, prefix: str) -> None:
    v[name + "/gamma"], v[name + "/beta"] = s[prefix + ".weight"], s[prefix + ".bias"]


def _fused(s: dict, prefix: str, projs) -> tuple:
    """Projections fused along the output dim; k has no bias, stored as zeros."""
    w = np.concatenate([s[f"{prefix}.{p}.weight"] for p in projs])
    b = np.concatenate([s[f"{prefix}.{p}.bias"] if p != "k_proj" else np.zeros_like(s[f"{prefix}.{p}.weight"][:, 0])
                        for p in projs])
    return w, b


def ct2_decoder_variables(hf_decoder, n_heads: int, dtype=np.float16) -> dict:
    """A transformers WhisperDecoder's weights under faster-whisper's names: fused self-attention q|k|v,
    cross-attention query (linear_0), fused k|v (linear_1), output (linear_2)."""
    s = {k: v.detach().numpy().astype(dtype) for k, v in hf_decoder.state_dict().items()}
    v = {"decoder/num_heads": np.array(n_heads, np.int16), "decoder/scale_embeddings": np.array(0, np.int8),
         "decoder/embeddings/weight": s["embed_tokens.weight"],
         "decoder/position_encodings/encodings": s["embed_positions.weight"]}
    _ct2_norm(v, "decoder/layer_norm", s, "layer_norm")
    for i in range(len(hf_decoder.layers)):
        h, c = f"layers.{i}.", f"decoder/layer_{i}/"
        v[c + "self_attention/linear_0/weight"], v[c + "self_attention/linear_0/bias"] = _fused(
            s, h + "self_attn", ("q_proj", "k_proj", "v_proj"))
        _ct2_linear(v, c + "self_attention/linear_1", s, h + "self_attn.out_proj")
        _ct2_norm(v, c + "self_attention/layer_norm", s, h + "self_attn_layer_norm")
        _ct2_linear(v, c + "attention/linear_0", s, h + "encoder_attn.q_proj")
        v[c + "attention/linear_1/weight"], v[c + "attention/linear_1/bias"] = _fused(
            s, h + "encoder_attn", ("k_proj", "v_proj"))
        _ct2_linear(v, c + "attention/linear_2", s, h + "encoder_attn.out_proj")
        _ct2_norm(v, c + "attention/layer_norm", s, h + "encoder_attn_layer_norm")
        for j, fc in enumerate(("fc1", "fc2")):
            _ct2_linear(v, c + f"ffn/linear_{j}", s, h + fc)
        _ct2_norm(v, c + "ffn/layer_norm", s, h + "final_layer_norm")
    return v
