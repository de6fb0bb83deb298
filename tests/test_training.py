"""Training on tiny models, CPU: the loss moves and each stage changes exactly what it should."""
import json
import random
import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llasm.training.checkpoint import load_checkpoint  # noqa: E402
from llasm.training.ctc import ctc_rows_and_targets  # noqa: E402
from llasm.training.data import Collator, read_manifest  # noqa: E402
from llasm.training.model import IGNORE  # noqa: E402
from llasm.training.trainer import TrainConfig, build_model, train  # noqa: E402


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def stage1(tiny_bases, speech_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "stage1"
    cfg = TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(out), steps=2, batch_size=2,
                      lr=1e-2, warmup=1, **tiny_bases)
    torch.manual_seed(cfg.seed)  # the trainer's own seeding: `before` starts from the very same adaptor
    before, _, _ = build_model(cfg)
    path = train(cfg)
    return before, path


def test_stage1_trains_only_the_adaptor(stage1):
    before, path = stage1
    after, _, config = load_checkpoint(path)
    assert len(config["train"]["loss"]) == 2
    assert _changed(_snapshot(before.encoder), _snapshot(after.encoder)) == set()
    assert _changed(_snapshot(before.llm), _snapshot(after.llm)) == set()
    changed = _changed(_snapshot(before.adaptor), _snapshot(after.adaptor))
    assert changed == set(before.adaptor.state_dict())


def test_stage1_loss_moves(tiny_bases, speech_data, tmp_path):
    cfg = TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(tmp_path / "c"), steps=8,
                      batch_size=4, lr=3e-3, warmup=1, **tiny_bases)
    loss = load_checkpoint(train(cfg))[2]["train"]["loss"]
    assert loss[-1] < loss[0]  # the same 4 examples every step: a working step lowers the loss


def test_stage2_lora_changes_adaptor_and_lora_only(stage1, speech_data, tmp_path):
    _, s1 = stage1
    cfg = TrainConfig(stage=2, init=str(s1), data=str(speech_data / "conv.jsonl"), out=str(tmp_path / "s2"),
                      steps=2, batch_size=2, lr=1e-2, warmup=1, lora_rank=4)
    base, _, _ = load_checkpoint(s1)
    path = train(cfg)
    after, _, config = load_checkpoint(path, merge_lora=True)
    assert config["llm_mode"] == "lora" and (path / "lora").is_dir()
    assert sorted(f.name for f in (path / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert _changed(_snapshot(base.encoder), _snapshot(after.encoder)) == set()
    assert _changed(_snapshot(base.adaptor), _snapshot(after.adaptor)) == set(base.adaptor.state_dict())
    llm_changed = _changed(_snapshot(base.llm), _snapshot(after.llm))
    assert llm_changed, "LoRA training left the LLM unchanged"
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert all(any(t in k for t in targets) for k in llm_changed), sorted(llm_changed)


@pytest.fixture(scope="module")
def stage2_lora(stage1, speech_data, tmp_path_factory):
    _, s1 = stage1
    return train(TrainConfig(stage=2, init=str(s1), data=str(speech_data / "conv.jsonl"), steps=2, batch_size=2,
                             lr=1e-2, warmup=1, lora_rank=4, out=str(tmp_path_factory.mktemp("ckpt") / "s2")))


@pytest.mark.parametrize("stage, llm_mode", [(1, "lora"), (2, "frozen"), (2, "lora")])
def test_a_run_from_a_lora_checkpoint_keeps_its_lora(stage, llm_mode, stage2_lora, speech_data, tmp_path):
    """The checkpoint names the base LLM and one LoRA, so a run that starts from a LoRA checkpoint must carry that
    LoRA on, never fold it into weights it does not save. At lr 0 nothing moves: the LLM must come out the same."""
    path = train(TrainConfig(stage=stage, init=str(stage2_lora), data=str(speech_data / "conv.jsonl"),
                             out=str(tmp_path / "again"), steps=1, batch_size=2, lr=0.0, warmup=1, lora_rank=4,
                             llm_mode=llm_mode))
    before, _, _ = load_checkpoint(stage2_lora, merge_lora=True)
    after, _, config = load_checkpoint(path, merge_lora=True)
    assert config["llm_mode"] == "lora"
    assert _changed(_snapshot(before.llm), _snapshot(after.llm)) == set()


def test_a_lora_stage_from_a_lora_checkpoint_needs_its_shape(stage2_lora, speech_data, tmp_path):
    cfg = TrainConfig(stage=2, init=str(stage2_lora), data=str(speech_data / "conv.jsonl"), out=str(tmp_path / "x"),
                      steps=1, batch_size=2, lora_rank=8)
    with pytest.raises(ValueError, match="holds a rank-4 LoRA .* asks for rank 8"):
        train(cfg)


def test_labels_cover_assistant_tokens_only(tiny_bases, speech_data):
    cfg = TrainConfig(stage=1, data=str(speech_data / "conv.jsonl"), out="unused", **tiny_bases)
    model, tok, _ = build_model(cfg)
    examples = read_manifest(speech_data / "conv.jsonl", model.cfg.transcribe_instruction)
    batch = Collator(tok, model.cfg.prompt, model.cfg.geometry)([examples[0], examples[-1]])
    _, mask, labels = model.assemble(batch)
    for i, answer in enumerate(["You said hello world.", "Paris."]):
        labelled = labels[i][labels[i] != IGNORE].tolist()
        assert tok.decode(labelled) == answer + "<|im_end|>\n"
    n_audio = model.cfg.geometry.n_embeddings(int(0.6 * 16000))
    assert int(mask[0].sum()) == sum(len(p[1]) for p in batch.items[0] if p[0] == "text") + n_audio


def test_checkpoint_round_trip_is_identical(stage1, speech_data):
    _, path = stage1
    a, tok, _ = load_checkpoint(path)
    b, _, _ = load_checkpoint(path)
    examples = read_manifest(speech_data / "asr.jsonl", a.cfg.transcribe_instruction)
    batch = Collator(tok, a.cfg.prompt, a.cfg.geometry)(examples[:2])
    with torch.no_grad():
        assert torch.equal(a(batch), b(batch))


class _Killed(Exception):
    pass


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(stage, stage1, tiny_bases, speech_data, tmp_path):
    _, s1 = stage1
    common = dict(stage=stage, steps=4, batch_size=2, lr=1e-2, warmup=2, save_every=2, lora_rank=4,
                  data=str(speech_data / ("asr.jsonl" if stage == 1 else "conv.jsonl")))
    common.update(tiny_bases if stage == 1 else {"init": str(s1)})
    straight = train(TrainConfig(out=str(tmp_path / "straight"), **common))

    def kill_at_3(step, loss):
        if step == 3:
            raise _Killed()

    cfg = TrainConfig(out=str(tmp_path / "resumed"), **common)
    with pytest.raises(_Killed):
        train(cfg, on_step=kill_at_3)
    assert load_checkpoint(cfg.out)[2]["train"]["step"] == 2  # the last save survived the kill
    resumed = train(cfg)
    a, _, ca = load_checkpoint(straight, merge_lora=True)
    b, _, cb = load_checkpoint(resumed, merge_lora=True)
    assert ca["train"]["loss"] == pytest.approx(cb["train"]["loss"], abs=1e-6)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)


def test_resume_refuses_a_different_run(stage1, tiny_bases, speech_data, tmp_path):
    cfg = TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(tmp_path / "c"), steps=3,
                      save_every=1, batch_size=2, **tiny_bases)
    with pytest.raises(_Killed):
        train(cfg, on_step=lambda s, l: (_ for _ in ()).throw(_Killed()) if s == 2 else None)
    other = TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(tmp_path / "c"), steps=3,
                        save_every=1, batch_size=2, lr=5e-4, **tiny_bases)
    with pytest.raises(ValueError, match="different run"):
        train(other)


def test_a_finished_run_can_be_extended(tiny_bases, speech_data, tmp_path):
    common = dict(stage=1, data=str(speech_data / "asr.jsonl"), batch_size=2, lr=1e-2, warmup=1, **tiny_bases)
    straight = train(TrainConfig(out=str(tmp_path / "a"), steps=4, **common))
    train(TrainConfig(out=str(tmp_path / "b"), steps=2, **common))
    with pytest.raises(ValueError, match="raise steps"):
        train(TrainConfig(out=str(tmp_path / "b"), steps=2, **common))
    extended = train(TrainConfig(out=str(tmp_path / "b"), steps=4, **common))
    a, b = load_checkpoint(straight)[0], load_checkpoint(extended)[0]
    for (name, x), (_, y) in zip(a.adaptor.state_dict().items(), b.adaptor.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)


def test_encoder_cache_skips_the_encoder_and_changes_nothing(tiny_bases, speech_data):
    from llasm.training.model import EncoderCache

    cfg = TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out="unused", **tiny_bases)
    model, tok, _ = build_model(cfg)
    model.eval()
    examples = read_manifest(speech_data / "asr.jsonl", model.cfg.transcribe_instruction)
    collate = Collator(tok, model.cfg.prompt, model.cfg.geometry)
    with torch.no_grad():
        plain = model(collate(examples[:3]))
        model.encoder_cache = EncoderCache()
        first = model(collate(examples[:3]))
        calls = []
        model.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        second = model(collate(examples[1:4]))  # two chunks known, one new
        again = model(collate(examples[:3]))
    assert calls == [1]  # only the unseen chunk went through the encoder
    assert model.encoder_cache.hits == 5 and len(model.encoder_cache.frames) == 4
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=1e-5)
    model.encoder_cache = None
    with torch.no_grad():
        torch.testing.assert_close(model(collate(examples[1:4])), second, atol=1e-5, rtol=1e-5)


def test_ctc_warm_start_trains_only_the_adaptor_and_learns(tiny_bases, speech_data, tmp_path):
    cfg = TrainConfig(stage=1, objective="ctc", data=str(speech_data / "asr.jsonl"), out=str(tmp_path / "ctc"),
                      steps=12, batch_size=4, lr=1e-2, warmup=1, stack_factor=2, **tiny_bases)
    torch.manual_seed(cfg.seed)
    before, _, _ = build_model(cfg)
    after, _, config = load_checkpoint(train(cfg))
    loss = config["train"]["loss"]
    assert loss[-1] < loss[0]  # the same 4 clips every step
    assert _changed(_snapshot(before.llm), _snapshot(after.llm)) == set()
    assert _changed(_snapshot(before.encoder), _snapshot(after.encoder)) == set()
    assert "boundary" not in _changed(_snapshot(before.adaptor), _snapshot(after.adaptor))  # CTC ignores them
    with pytest.raises(ValueError, match="stage-1 warm start"):
        TrainConfig(stage=2, objective="ctc", data="x", out="o", init="c")


def test_ctc_targets_are_the_transcripts_of_the_asr_rows_only(tiny_bases, speech_data):
    cfg = TrainConfig(stage=1, data="unused", out="unused", **tiny_bases)
    model, tok, _ = build_model(cfg)
    asr = read_manifest(speech_data / "asr.jsonl", model.cfg.transcribe_instruction)
    conv = read_manifest(speech_data / "conv.jsonl", model.cfg.transcribe_instruction)
    assert [ex.asr for ex in asr] == [True] * 4 and not any(ex.asr for ex in conv)
    collate = Collator(tok, model.cfg.prompt, model.cfg.geometry)
    batch = collate([conv[1], asr[2], conv[2]])  # conversations hold one clip and an answer too
    n_end = len(collate.tokens(model.cfg.prompt.end_of_turn))
    with torch.no_grad():
        chunk_rows = model.audio_rows(batch.mel, batch.n_frames)
        rows, targets = ctc_rows_and_targets(model, batch, n_end, chunk_rows, samples=[1])
    assert len(rows) == 1 and targets[0].tolist() == collate.tokens("the quick brown fox")
    torch.testing.assert_close(rows[0], chunk_rows[1][1:-1])  # the clip's rows, without begin and end rows


def test_auxiliary_ctc_joins_the_llm_loss_and_resumes_exactly(tiny_bases, speech_data, tmp_path):
    common = dict(stage=1, data=[str(speech_data / "asr.jsonl"), str(speech_data / "conv.jsonl")], steps=6,
                  batch_size=4, lr=1e-2, warmup=1, save_every=3, stack_factor=2, **tiny_bases)
    plain = load_checkpoint(train(TrainConfig(out=str(tmp_path / "plain"), **common)))
    aux = dict(common, ctc_weight=0.5, ctc_head_lr=5e-2)
    straight = load_checkpoint(train(TrainConfig(out=str(tmp_path / "straight"), **aux)))
    loss, ctc = straight[2]["train"]["loss"], straight[2]["train"]["ctc_loss"]
    assert loss[0] == pytest.approx(plain[2]["train"]["loss"][0], abs=1e-6)  # `loss` is the LLM's, as without
    assert len(ctc) == 6 and all(c is None or c > 0 for c in ctc) and ctc[0] is not None
    assert not torch.equal(plain[0].adaptor.out.weight, straight[0].adaptor.out.weight)  # CTC moved it
    groups = torch.load(tmp_path / "straight" / "trainer_state.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-2, 5e-2]  # the head learns at its own rate (warmup done)

    no_asr = dict(aux, data=str(speech_data / "conv.jsonl"))  # spoken questions only: nothing for CTC to read
    quiet = load_checkpoint(train(TrainConfig(out=str(tmp_path / "no-asr"), **no_asr)))
    assert quiet[2]["train"]["ctc_loss"] == [None] * 6
    alone = load_checkpoint(train(TrainConfig(out=str(tmp_path / "conv"), **dict(common, data=no_asr["data"]))))
    assert quiet[2]["train"]["loss"] == pytest.approx(alone[2]["train"]["loss"], abs=1e-6)

    cfg = TrainConfig(out=str(tmp_path / "resumed"), **aux)
    with pytest.raises(_Killed):
        train(cfg, on_step=lambda s, l: (_ for _ in ()).throw(_Killed()) if s == 4 else None)
    resumed = load_checkpoint(train(cfg))
    assert resumed[2]["train"]["loss"] == pytest.approx(loss, abs=1e-6)
    assert resumed[2]["train"]["ctc_loss"] == pytest.approx(ctc, abs=1e-5)
    for (name, x), (_, y) in zip(straight[0].adaptor.state_dict().items(), resumed[0].adaptor.state_dict().items()):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5, msg=name)


def test_auxiliary_ctc_lowers_the_ctc_loss(tiny_bases, speech_data, tmp_path):
    cfg = TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(tmp_path / "c"), steps=10, batch_size=4,
                      lr=1e-2, warmup=1, stack_factor=2, ctc_weight=1.0, ctc_head_lr=5e-2, **tiny_bases)
    ctc = load_checkpoint(train(cfg))[2]["train"]["ctc_loss"]
    assert ctc[-1] < ctc[0]  # the same 4 clips every step
    with pytest.raises(ValueError, match="CTC alone"):
        TrainConfig(stage=1, objective="ctc", ctc_weight=0.5, data="x", out="o", init="c")
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(stage=2, ctc_weight=-1.0, data="x", out="o", init="c")
    with pytest.raises(ValueError, match="has none"):
        TrainConfig(stage=2, ctc_head_lr=1e-2, data="x", out="o", init="c")


def test_gradient_checkpointing_gives_the_same_step(stage1, speech_data, tmp_path):
    """Stage 2 with LoRA and activation checkpointing: same losses as without (it only trades compute for memory)."""
    _, s1 = stage1
    common = dict(stage=2, init=str(s1), data=str(speech_data / "conv.jsonl"), steps=2, batch_size=2, lr=1e-2,
                  warmup=1, lora_rank=4)
    plain = load_checkpoint(train(TrainConfig(out=str(tmp_path / "a"), **common)))[2]["train"]["loss"]
    ckpt = load_checkpoint(train(TrainConfig(out=str(tmp_path / "b"), gradient_checkpointing=True, **common)))
    assert ckpt[2]["train"]["loss"] == pytest.approx(plain, abs=1e-5)


@pytest.mark.parametrize("llm_trainable", [False, True])
def test_shared_system_header_is_computed_once_with_the_same_loss_and_gradients(tiny_bases, speech_data,
                                                                                llm_trainable):
    cfg = TrainConfig(stage=1, data=[str(speech_data / "asr.jsonl"), str(speech_data / "conv.jsonl")], out="unused",
                      **tiny_bases)
    model, tok, _ = build_model(cfg)
    model.requires_grad_(False)
    model.adaptor.requires_grad_(True)
    if llm_trainable:  # as LoRA or full training: the header's keys and values then carry gradient
        model.llm.get_decoder().layers[0].self_attn.q_proj.weight.requires_grad_(True)
    trained = [p for p in model.parameters() if p.requires_grad]
    examples = read_manifest(speech_data / "asr.jsonl", model.cfg.transcribe_instruction)
    examples += read_manifest(speech_data / "conv.jsonl", model.cfg.transcribe_instruction)
    collate = Collator(tok, model.cfg.prompt, model.cfg.geometry)
    batch = collate([examples[0], examples[2], examples[5], examples[-1]])  # ASR, conv and text-only rows
    header = tok.encode(model.cfg.prompt.system.format(content=model.cfg.prompt.default_system))
    n = model.shared_prefix(batch)
    assert len(header) <= n <= min(len(p[0][1]) for p in batch.items)

    def loss_and_grads(prefix: bool):
        model.zero_grad()
        if not prefix:
            model.shared_prefix = lambda b: 0
        loss = model(batch)
        loss.backward()
        vars(model).pop("shared_prefix", None)
        return loss.detach(), [p.grad.clone() for p in trained]

    loss_p, grads_p = loss_and_grads(True)
    loss_f, grads_f = loss_and_grads(False)
    torch.testing.assert_close(loss_p, loss_f, atol=1e-5, rtol=1e-5)
    assert len(grads_p) == len(grads_f) == len(trained) and grads_p[-1].abs().sum() > 0
    for a, b in zip(grads_p, grads_f):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_grouped_batches_cover_each_epoch_once_with_less_padding():
    from llasm.training.trainer import batch_indices

    rng = random.Random(1)
    lengths = [rng.uniform(1, 100) for _ in range(1000)]
    per_epoch = 1000 // 8
    grouped = [batch_indices(1000, 8, 3, s, lengths) for s in range(2 * per_epoch)]
    first = sorted(i for b in grouped[:per_epoch] for i in b)
    assert len(first) == len(set(first)) == per_epoch * 8  # no example twice in an epoch
    assert grouped[:per_epoch] != grouped[per_epoch:]  # the next epoch is another shuffle
    assert grouped == [batch_indices(1000, 8, 3, s, lengths) for s in range(2 * per_epoch)]  # a pure function

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches) / sum(lengths[i] for b in batches for i in b)

    plain = [batch_indices(1000, 8, 3, s) for s in range(per_epoch)]
    assert padded(grouped[:per_epoch]) < 1.1 < 1.4 < padded(plain)


def test_shared_prefix_is_the_longest_common_one_whatever_the_order(tiny_bases, tmp_path):
    rows = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
            ("Where is Paris?", "In France.")]
    manifest = tmp_path / "text.jsonl"
    manifest.write_text("".join(json.dumps({"turns": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                                for q, a in rows))
    cfg = TrainConfig(stage=1, data=str(manifest), out="unused", **tiny_bases)
    model, tok, _ = build_model(cfg)
    model.requires_grad_(False)
    examples = read_manifest(manifest, model.cfg.transcribe_instruction)
    collate = Collator(tok, model.cfg.prompt, model.cfg.geometry)
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2]):
        batch = collate([examples[i] for i in order])
        firsts = [p[0][1].tolist() for p in batch.items]
        want = next(i for i in range(min(map(len, firsts)) + 1)
                    if i == min(map(len, firsts)) or len({f[i] for f in firsts}) > 1)
        assert model.shared_prefix(batch) == want
        with torch.no_grad():
            torch.testing.assert_close(model(batch), _without_prefix(model, batch), atol=1e-5, rtol=1e-5)


def _without_prefix(model, batch):
    model.shared_prefix = lambda b: 0
    try:
        return model(batch)
    finally:
        vars(model).pop("shared_prefix", None)


def test_held_out_loss_is_logged_at_each_save_and_changes_nothing(tiny_bases, speech_data, tmp_path):
    common = dict(stage=1, data=str(speech_data / "asr.jsonl"), steps=4, save_every=2, batch_size=2, lr=1e-2,
                  warmup=1, **tiny_bases)
    plain = load_checkpoint(train(TrainConfig(out=str(tmp_path / "a"), **common)))
    cfg = TrainConfig(out=str(tmp_path / "b"), eval_data=str(speech_data / "asr.jsonl"), keep_best=True, **common)
    assert cfg.digest() == TrainConfig(out="x", **common).digest()  # held-out rows do not change the run
    model, tokenizer, info = load_checkpoint(train(cfg))
    assert info["train"]["loss"] == plain[2]["train"]["loss"]  # evaluating left the training steps untouched
    evals = info["train"]["eval"]
    assert [s for s, _ in evals] == [2, 4]
    assert evals[0][1] != pytest.approx(evals[1][1], rel=1e-4)
    held_out = read_manifest(speech_data / "asr.jsonl", model.cfg.transcribe_instruction)
    collate = Collator(tokenizer, model.cfg.prompt, model.cfg.geometry)

    def mean_loss(m):
        m.eval()
        with torch.no_grad():
            return sum(float(m(collate(held_out[i:i + 2]))) * len(held_out[i:i + 2])
                       for i in range(0, len(held_out), 2)) / len(held_out)

    assert evals[-1][1] == pytest.approx(mean_loss(model), rel=1e-4)  # the final checkpoint's own held-out loss
    best, _, best_info = load_checkpoint(tmp_path / "b-best")
    step, value = min(evals, key=lambda e: e[1])
    assert best_info["train"]["step"] == step
    assert value == pytest.approx(mean_loss(best), rel=1e-4)


def test_keep_best_needs_held_out_rows(tiny_bases):
    with pytest.raises(ValueError, match="eval_data"):
        TrainConfig(stage=1, data="x", out="o", keep_best=True, **tiny_bases)


class _NanGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward (what a bf16 overflow in the backward pass does)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_gradient_at(monkeypatch, bad_calls):
    from llasm.training.model import LLaSMModel

    forward, calls = LLaSMModel.forward, []

    def patched(self, batch):
        calls.append(1)
        loss = forward(self, batch)
        return _NanGradient.apply(loss) if len(calls) in bad_calls else loss

    monkeypatch.setattr(LLaSMModel, "forward", patched)


def test_a_non_finite_gradient_skips_its_step(tiny_bases, speech_data, tmp_path, monkeypatch):
    common = dict(stage=1, data=str(speech_data / "asr.jsonl"), batch_size=2, lr=1e-2, warmup=1, **tiny_bases)
    one_step = load_checkpoint(train(TrainConfig(out=str(tmp_path / "a"), steps=1, **common)))[0]
    _nan_gradient_at(monkeypatch, {2})
    model, _, info = load_checkpoint(train(TrainConfig(out=str(tmp_path / "b"), steps=2, **common)))
    assert info["train"]["skipped"] == [2]
    for (name, x), (_, y) in zip(one_step.adaptor.state_dict().items(), model.adaptor.state_dict().items()):
        assert torch.isfinite(y).all(), name
        torch.testing.assert_close(x, y, atol=0, rtol=0, msg=name)  # step 2 left the weights as step 1 made them


def test_a_run_of_non_finite_gradients_ends_the_run(tiny_bases, speech_data, tmp_path, monkeypatch):
    import llasm.training.trainer as trainer

    monkeypatch.setattr(trainer, "MAX_BAD_STEPS", 2)
    _nan_gradient_at(monkeypatch, {2, 3})
    cfg = TrainConfig(stage=1, data=str(speech_data / "asr.jsonl"), out=str(tmp_path / "c"), steps=5, batch_size=2,
                      **tiny_bases)
    with pytest.raises(RuntimeError, match="2 steps in a row had non-finite gradients"):
        train(cfg)


def test_averaged_checkpoint_holds_the_mean_of_adaptor_and_lora(stage1, speech_data, tmp_path, capsys):
    from safetensors.torch import load_file

    from llasm.cli.train import main as train_main
    from llasm.training.checkpoint import CheckpointError, average_checkpoints, read_config

    _, s1 = stage1
    runs = [train(TrainConfig(stage=2, init=str(s1), data=str(speech_data / "conv.jsonl"), out=str(tmp_path / f"r{i}"),
                              steps=2, batch_size=2, lr=1e-2, warmup=1, lora_rank=4, seed=i)) for i in (1, 2)]
    (runs[0] / "lora" / "README.md").write_text("peft's model card, as older checkpoints hold")
    train_main(["average", str(runs[0]), str(runs[1]), "-o", str(tmp_path / "soup")])
    soup = tmp_path / "soup"
    assert sorted(f.name for f in (soup / "lora").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    for rel in ("adaptor.safetensors", "lora/adapter_model.safetensors"):
        a, b, mean = (load_file(str(d / rel)) for d in (*runs, soup))
        assert mean.keys() == a.keys() and any(not torch.equal(a[k], b[k]) for k in a)
        for k in a:
            torch.testing.assert_close(mean[k], (a[k] + b[k]) / 2)
    model, _, config = load_checkpoint(soup, merge_lora=True)  # a loadable checkpoint, LoRA config copied
    assert config["llm_mode"] == "lora" and not (soup / "trainer_state.pt").exists()
    train_info = [read_config(r)["train"] for r in runs]
    assert [s["digest"] for s in config["train"]["average_of"]] == [t["digest"] for t in train_info]
    assert config["train"]["digest"] not in {t["digest"] for t in train_info}

    with pytest.raises(CheckpointError, match="'llm_mode' differ"):
        average_checkpoints([s1, runs[0]], tmp_path / "bad")
    with pytest.raises(CheckpointError, match="at least two"):
        average_checkpoints([s1], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as e:
        train_main(["average", str(s1), str(tmp_path / "nowhere"), "-o", str(tmp_path / "bad")])
    assert e.value.code != 0 and "no config.json" in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(runs[1], damaged)
    (damaged / "adaptor.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit) as e:
        train_main(["average", str(runs[0]), str(damaged), "-o", str(tmp_path / "bad")])
    assert e.value.code != 0 and "cannot read" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(CheckpointError, match="cannot read .*adaptor.safetensors"):
        load_checkpoint(damaged)
    shutil.copy(runs[1] / "adaptor.safetensors", damaged / "adaptor.safetensors")
    (damaged / "lora" / "adapter_model.safetensors").write_bytes(b"")  # a LoRA file cut short
    with pytest.raises(CheckpointError, match="cannot read .*adapter_model.safetensors"):
        load_checkpoint(damaged)


def test_saving_a_lora_checkpoint_never_asks_the_hub(stage1, speech_data, tmp_path, monkeypatch):
    import peft.utils.save_and_load as peft_save

    from llasm.training.checkpoint import save_checkpoint
    from llasm.training.trainer import set_trainable

    def no_hub(*args, **kw):
        raise AssertionError("peft asked the Hugging Face Hub")

    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", no_hub)
    _, s1 = stage1
    cfg = TrainConfig(stage=2, init=str(s1), data=str(speech_data / "conv.jsonl"), out=str(tmp_path / "s2"),
                      lora_rank=4)
    model, _, base = build_model(cfg)
    set_trainable(model, cfg)
    model.llm.peft_config["default"].base_model_name_or_path = str(tmp_path)  # no config.json there: a GGUF base
    path = save_checkpoint(model, tmp_path / "s2", base, llm_mode="lora")
    assert (path / "lora" / "adapter_model.safetensors").is_file()


def test_loading_a_lora_checkpoint_is_quiet(stage1, speech_data, tmp_path):
    import warnings

    _, s1 = stage1
    path = train(TrainConfig(stage=2, init=str(s1), data=str(speech_data / "conv.jsonl"), out=str(tmp_path / "s2"),
                             steps=1, batch_size=2, warmup=1, lora_rank=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(path)
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
