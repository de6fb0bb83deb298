"""Whisper's encoder and its greedy decoder step as ONNX graphs, written from numpy weights with onnx's own helpers:
no torch, so the default bundle builds on first use from the packaged CTranslate2 weights alone.

    encoder   mel (1, n_mels, T) -> cross_k, cross_v (L, 1, H, S, d_head): every decoder layer's cross-attention
              keys and values over the S = ceil(T / 2) encoder frames, computed once per clip
    decoder   tokens (1, n) int64, past_k, past_v (L, 1, H, P, d_head), cross_k, cross_v
              [, lora_gate (1,) float, where the graph carries a LoRA of the decoder: its low-rank terms are
              added times this gate, so one graph is Whisper as shipped (0) or as tuned (1)]
              -> logits (1, V) and hidden (1, D) of the last position, present_k, present_v (L, 1, H, P + n, d_head)
              positions P..P+n-1; causal among the new tokens; P = 0 starts a transcript

Weights stay float16 in the file, as CTranslate2 ships them (a Cast to float32 that onnxruntime folds at load), so
the graphs compute exactly what the packaged weights say. Parameter names follow the state dicts of
training/ct2.py (transformers' names). Batch size is 1: the runtime transcribes one clip at a time.
"""
from __future__ import annotations

import math

import numpy as np

from ..runtime.whisper_decode import LORA_GATE  # the input's name, as the runtime feeds it

OPSET = 17  # LayerNormalization
LN_EPS = 1e-5
ENCODER_INPUTS = ("mel",)
ENCODER_OUTPUTS = ("cross_k", "cross_v")
DECODER_INPUTS = ("tokens", "past_k", "past_v", "cross_k", "cross_v")
DECODER_OUTPUTS = ("logits", "hidden", "present_k", "present_v")


class _Graph:
    """Nodes and float16-stored initializers of one graph; op() returns its output's name."""

    def __init__(self, weight_dtype, d_head: int):
        self.nodes, self.inits, self.n, self.dtype = [], [], 0, weight_dtype
        self.scale = 1.0 / math.sqrt(d_head)  # attention scores are q k^T / sqrt(d_head)

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{hint}_{self.n}"

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs):
        from onnx import helper

        outs = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, value, hint: str = "c") -> str:
        """An exact constant (ints, shapes, scalars), stored as given."""
        from onnx import numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, value: np.ndarray, hint: str) -> str:
        """A float weight, stored in the graph's weight dtype and cast to float32 where it is used."""
        from onnx import TensorProto, numpy_helper

        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=self.dtype), name))
        if self.dtype == np.float32:
            return name
        return self.op("Cast", name, to=TensorProto.FLOAT)

    def linear(self, x: str, state: dict, prefix: str, lora: tuple | None = None) -> str:
        """x @ W.T + b for a (out, in) weight, as transformers stores it; no bias where the state has none.
        lora: (pairs, scale, gate): + gate * scale * (x @ A.T) @ B.T where pairs hold this weight's A and B."""
        y = self.op("MatMul", x, self.weight(state[f"{prefix}.weight"].T, prefix))
        bias = state.get(f"{prefix}.bias")
        y = y if bias is None else self.op("Add", y, self.weight(bias, prefix + ".b"))
        if lora is not None and f"{prefix}.lora_a" in lora[0]:
            pairs, scale, gate = lora
            a, b = pairs[f"{prefix}.lora_a"].astype(np.float32), pairs[f"{prefix}.lora_b"].astype(np.float32)
            low = self.op("MatMul", self.op("MatMul", x, self.weight(a.T, prefix + ".lora_a")),
                          self.weight((b * np.float32(scale)).T, prefix + ".lora_b"))
            y = self.op("Add", y, self.op("Mul", low, gate))
        return y

    def layer_norm(self, x: str, state: dict, prefix: str) -> str:
        return self.op("LayerNormalization", x, self.weight(state[f"{prefix}.weight"], prefix),
                       self.weight(state[f"{prefix}.bias"], prefix + ".b"), axis=-1, epsilon=LN_EPS)

    def gelu(self, x: str) -> str:
        """Exact GELU (Whisper's): x/2 (1 + erf(x / sqrt 2))."""
        e = self.op("Erf", self.op("Div", x, self.const(np.float32(math.sqrt(2.0)))))
        return self.op("Mul", self.op("Mul", x, self.const(np.float32(0.5))), self.op("Add", e, self.const(np.float32(1))))

    def heads(self, x: str, n_heads: int, d_head: int) -> str:
        """(1, T, D) -> (1, H, T, d_head)."""
        return self.op("Transpose", self.op("Reshape", x, self.const(np.array([1, -1, n_heads, d_head], np.int64))),
                       perm=[0, 2, 1, 3])

    def attend(self, q: str, k: str, v: str, d_model: int, mask: str | None = None) -> str:
        """softmax(q k^T / sqrt(d_head) + mask) v for (1, H, T, d_head) q and (1, H, S, d_head) k, v -> (1, T, D)."""
        scores = self.op("MatMul", q, self.op("Transpose", k, perm=[0, 1, 3, 2]))
        scores = self.op("Mul", scores, self.const(np.float32(self.scale)))
        if mask is not None:
            scores = self.op("Add", scores, mask)
        y = self.op("MatMul", self.op("Softmax", scores, axis=-1), v)
        return self.op("Reshape", self.op("Transpose", y, perm=[0, 2, 1, 3]),
                       self.const(np.array([1, -1, d_model], np.int64)))

    def model(self, inputs: list, outputs: list, doc: str):
        from onnx import helper

        graph = helper.make_graph(self.nodes, "whisper", inputs, outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="llasm")
        m.doc_string = doc
        return m


def _check_lora(pairs: dict, dec_state: dict) -> None:
    """Every pair names a decoder weight the graph computes, and fits it (the cross-attention keys and values are
    the encoder graph's)."""
    for name in sorted({k.rsplit(".lora_", 1)[0] for k in pairs}):
        a, b, w = pairs.get(f"{name}.lora_a"), pairs.get(f"{name}.lora_b"), dec_state.get(f"{name}.weight")
        if a is None or b is None or w is None or name.endswith(("encoder_attn.k_proj", "encoder_attn.v_proj")):
            raise ValueError(f"Whisper LoRA {name!r}: incomplete pair, or not a decoder step weight")
        if a.ndim != 2 or b.ndim != 2 or (b.shape[0], a.shape[1], a.shape[0]) != (*w.shape, b.shape[1]):
            raise ValueError(f"Whisper LoRA {name!r}: A {a.shape} and B {b.shape} do not fit the weight {w.shape}")


def _stack_layers(g: _Graph, tensors: list[str]) -> str:
    """L tensors (1, H, S, d) -> (L, 1, H, S, d)."""
    return g.op("Concat", *[g.op("Unsqueeze", t, g.const(np.array([0], np.int64))) for t in tensors], axis=0)


def encoder_model(enc_state: dict, enc_cfg, dec_state: dict, dec_cfg, weight_dtype=np.float16):
    """The encoder graph (see the module docstring); enc_cfg/dec_cfg: WhisperEncoderConfig/WhisperDecoderConfig."""
    from onnx import TensorProto, helper

    D, H = enc_cfg.d_model, enc_cfg.n_heads
    if dec_cfg.d_model != D or D % dec_cfg.n_heads or dec_cfg.n_heads != H:
        raise ValueError(f"Whisper encoder has d_model {D} and {H} heads, the decoder {dec_cfg.d_model} and "
                         f"{dec_cfg.n_heads}: expected the same")
    g = _Graph(weight_dtype, D // H)
    x = g.op("Conv", "mel", g.weight(enc_state["conv1.weight"], "conv1"), g.weight(enc_state["conv1.bias"], "conv1.b"),
             kernel_shape=[3], pads=[1, 1])
    x = g.gelu(x)
    x = g.op("Conv", x, g.weight(enc_state["conv2.weight"], "conv2"), g.weight(enc_state["conv2.bias"], "conv2.b"),
             kernel_shape=[3], pads=[1, 1], strides=[2])
    x = g.op("Transpose", g.gelu(x), perm=[0, 2, 1])  # (1, D, S) -> (1, S, D)
    n_frames = g.op("Slice", g.op("Shape", x), g.const(np.array([1], np.int64)), g.const(np.array([2], np.int64)))
    pos = g.op("Slice", g.weight(enc_state["embed_positions.weight"], "positions"), g.const(np.array([0], np.int64)),
               n_frames, g.const(np.array([0], np.int64)))  # (S, D): the table sliced to the real length
    x = g.op("Add", x, pos)
    for i in range(enc_cfg.n_layers):
        p = f"layers.{i}"
        h = g.layer_norm(x, enc_state, f"{p}.self_attn_layer_norm")
        q, k, v = (g.heads(g.linear(h, enc_state, f"{p}.self_attn.{n}_proj"), H, D // H) for n in "qkv")
        x = g.op("Add", x, g.linear(g.attend(q, k, v, D), enc_state, f"{p}.self_attn.out_proj"))
        h = g.layer_norm(x, enc_state, f"{p}.final_layer_norm")
        x = g.op("Add", x, g.linear(g.gelu(g.linear(h, enc_state, f"{p}.fc1")), enc_state, f"{p}.fc2"))
    frames = g.layer_norm(x, enc_state, "layer_norm")
    ks = [g.heads(g.linear(frames, dec_state, f"layers.{i}.encoder_attn.k_proj"), H, D // H)
          for i in range(dec_cfg.n_layers)]
    vs = [g.heads(g.linear(frames, dec_state, f"layers.{i}.encoder_attn.v_proj"), H, D // H)
          for i in range(dec_cfg.n_layers)]
    g.nodes.append(helper.make_node("Identity", [_stack_layers(g, ks)], ["cross_k"]))
    g.nodes.append(helper.make_node("Identity", [_stack_layers(g, vs)], ["cross_v"]))
    kv_shape = [dec_cfg.n_layers, 1, H, "frames", D // H]
    return g.model([helper.make_tensor_value_info("mel", TensorProto.FLOAT, [1, enc_cfg.n_mels, "mel_frames"])],
                   [helper.make_tensor_value_info(n, TensorProto.FLOAT, kv_shape) for n in ENCODER_OUTPUTS],
                   "Whisper encoder on the real length: log-mel -> every decoder layer's cross-attention keys, values")


def decoder_model(dec_state: dict, dec_cfg, token_table: np.ndarray, weight_dtype=np.float16, lora=None):
    """The decoder step graph (see the module docstring). token_table: (V, D), also the output projection. lora:
    (pairs, scale) of training/whisper_lora.py, behind the lora_gate input."""
    from onnx import TensorProto, helper

    D, H, L = dec_cfg.d_model, dec_cfg.n_heads, dec_cfg.n_layers
    if token_table.shape[1] != D:
        raise ValueError(f"token table has shape {list(token_table.shape)}, the decoder's d_model is {D}")
    g = _Graph(weight_dtype, D // H)
    i64 = lambda *v: g.const(np.array(v, np.int64))  # noqa: E731
    if lora is not None:
        _check_lora(lora[0], dec_state)
        lora = (lora[0], lora[1], LORA_GATE)
    table = g.weight(token_table, "tokens")
    n = g.op("Slice", g.op("Shape", "tokens"), i64(1), i64(2))  # (1,) new tokens
    past = g.op("Slice", g.op("Shape", "past_k"), i64(3), i64(4))  # (1,) positions already decoded
    total = g.op("Add", past, n)
    half = token_table.astype(np.float16)
    if g.dtype == np.float32 and np.array_equal(half.astype(np.float32), token_table):
        # float32 weights are what int8 quantization reads: the output projection becomes int8, and the lookup
        # gathers from its own float16 copy (exact: the packaged weights are float16), half the size of a float32 one
        x = g.op("Cast", g.op("Gather", g.const(half, "token_lookup"), "tokens", axis=0), to=TensorProto.FLOAT)
    else:
        x = g.op("Gather", table, "tokens", axis=0)  # (1, n, D)
    x = g.op("Add", x, g.op("Slice", g.weight(dec_state["embed_positions.weight"], "positions"), past, total, i64(0)))
    # causal mask over (new query i, key j): key j is allowed when j <= past + i
    q_pos = g.op("Unsqueeze", g.op("Add", g.op("Range", i64(0), g.op("Squeeze", n), i64(1)), past), i64(1))  # (n, 1)
    k_pos = g.op("Unsqueeze", g.op("Range", i64(0), g.op("Squeeze", total), i64(1)), i64(0))  # (1, P + n)
    mask = g.op("Mul", g.op("Cast", g.op("Less", q_pos, k_pos), to=TensorProto.FLOAT), g.const(np.float32(-1e9)))
    present_k, present_v = [], []
    for i in range(L):
        p = f"layers.{i}"
        h = g.layer_norm(x, dec_state, f"{p}.self_attn_layer_norm")
        q, k, v = (g.heads(g.linear(h, dec_state, f"{p}.self_attn.{n_}_proj", lora), H, D // H) for n_ in "qkv")
        layer = g.const(np.array(i, np.int64))
        k = g.op("Concat", g.op("Gather", "past_k", layer, axis=0), k, axis=2)  # (1, H, P + n, d_head)
        v = g.op("Concat", g.op("Gather", "past_v", layer, axis=0), v, axis=2)
        present_k.append(k)
        present_v.append(v)
        x = g.op("Add", x, g.linear(g.attend(q, k, v, D, mask), dec_state, f"{p}.self_attn.out_proj", lora))
        h = g.layer_norm(x, dec_state, f"{p}.encoder_attn_layer_norm")
        q = g.heads(g.linear(h, dec_state, f"{p}.encoder_attn.q_proj", lora), H, D // H)
        ck, cv = (g.op("Gather", name, layer, axis=0) for name in ("cross_k", "cross_v"))
        x = g.op("Add", x, g.linear(g.attend(q, ck, cv, D), dec_state, f"{p}.encoder_attn.out_proj", lora))
        h = g.layer_norm(x, dec_state, f"{p}.final_layer_norm")
        x = g.op("Add", x, g.linear(g.gelu(g.linear(h, dec_state, f"{p}.fc1", lora)), dec_state, f"{p}.fc2", lora))
    x = g.layer_norm(x, dec_state, "layer_norm")
    last = g.op("Reshape", g.op("Slice", x, i64(-1), i64(2**62), i64(1)), i64(1, D))  # (1, D)
    g.nodes.append(helper.make_node("Identity", [last], ["hidden"]))
    g.nodes.append(helper.make_node("Gemm", ["hidden", table], ["logits"], transB=1))
    g.nodes.append(helper.make_node("Identity", [_stack_layers(g, present_k)], ["present_k"]))
    g.nodes.append(helper.make_node("Identity", [_stack_layers(g, present_v)], ["present_v"]))
    kv = lambda name, n_: helper.make_tensor_value_info(name, TensorProto.FLOAT, [L, 1, H, n_, D // H])  # noqa: E731
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, "new"]), kv("past_k", "past"),
              kv("past_v", "past"), kv("cross_k", "frames"), kv("cross_v", "frames")]
    if lora is not None:
        inputs.append(helper.make_tensor_value_info(LORA_GATE, TensorProto.FLOAT, [1]))
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, token_table.shape[0]]),
               helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, D]),
               kv("present_k", "total"), kv("present_v", "total")]
    return g.model(inputs, outputs, "Whisper decoder step with self-attention keys and values carried between calls")
