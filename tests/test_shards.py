"""Sharded builds merge into what one build makes; held-out sentences and voices never reach training rows."""
import json

import pytest

from llasm.training import manifests
from llasm.training.sentences import normalize
from llasm.training.speech_data import BuildConfig, build
from llasm.training.voices import TTSError, held_out, parse

from test_speech_data import SineVoice

TRAIN_VOICES = (("en", "flite:awb"), ("en", "flite:rms"), ("en", "rhvoice:slt"), ("zh", "kokoro:jf_alpha"),
                ("zh", "kokoro:jm_kumo"))
HELD_VOICES = (("en", "festival:kal"), ("en", "rhvoice:clb"), ("zh", "kokoro:jf_tebukuro"))


def fake(lang, name):
    return SineVoice(name=name)


def config(tmp_path, name, **kw):
    kw = {"langs": ("en", "zh"), "limit": 14, "seed": 2, "noise": True, "augment": True, "heldout_fraction": 0.3,
          "dev_fraction": 0.2, "sources": ("facts", "math"), "voices": TRAIN_VOICES, "voices_per_sentence": 2,
          "heldout_voices": HELD_VOICES, **kw}
    return BuildConfig(out=tmp_path / name, **kw)


def texts_of(out):
    meta = manifests.read_dataset(out)
    return {r["text"] for split in meta["manifests"]
            for r in manifests.read_jsonl(out / manifests.manifest_name("asr", split))}


def test_shards_are_disjoint_and_merge_into_the_unsharded_build(tmp_path):
    whole = config(tmp_path, "whole")
    build(whole, progress=False, make=fake)
    parts = [config(tmp_path, f"part{i}", shard=(i, 3)) for i in range(3)]
    for part in parts:
        build(part, progress=False, make=fake)
    seen = [texts_of(p.out) for p in parts]
    assert all(seen) and not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert set().union(*seen) == texts_of(whole.out)
    summary = manifests.merge(tmp_path / "merged", [p.out for p in reversed(parts)], progress=False)
    names = sorted(p.name for p in whole.out.glob("*.jsonl") if p.name not in manifests.CACHES)
    assert names == sorted(p.name for p in (tmp_path / "merged").glob("*.jsonl")) and "asr.heldout-voice.jsonl" in names
    for name in names:
        assert (tmp_path / "merged" / name).read_bytes() == (whole.out / name).read_bytes(), name
    clips = {p.name for p in (whole.out / "clips").iterdir()}
    assert clips == {p.name for p in (tmp_path / "merged" / "clips").iterdir()} and summary.clips_linked == len(clips)
    for a, b in zip(sorted((whole.out / "clips").iterdir()), sorted((tmp_path / "merged" / "clips").iterdir())):
        assert a.read_bytes() == b.read_bytes()
    merged = manifests.read_dataset(tmp_path / "merged")
    assert merged["rows"] == manifests.read_dataset(whole.out)["rows"] and merged["shard"] is None
    again = build(parts[1], progress=False, make=fake)  # a shard resumes like any build
    assert again.clips_written == 0 and again.clips_reused > 0


def test_held_out_sentences_and_voices_never_train(tmp_path):
    c = config(tmp_path, "d")
    build(c, progress=False, make=fake)
    held = {v for _, v in HELD_VOICES}
    rows = {split: manifests.read_jsonl(c.out / manifests.manifest_name("asr", split)) for split in c.splits}
    for split in ("train", "dev"):
        assert rows[split] and not {r["voice"] for r in rows[split]} & held
        assert not any(held_out(parse(r["voice"], r["lang"])) for r in rows[split])
        convs = manifests.read_jsonl(c.out / manifests.manifest_name("conv", split))
        assert not {r.get("voice") for r in convs} & held
    assert {r["voice"] for r in rows["heldout"]} <= {v for _, v in TRAIN_VOICES}
    by_voice = rows["heldout-voice"]
    assert {r["voice"] for r in by_voice} == held  # every held-out voice spoke
    heldout_keys = {normalize(r["text"]) for r in rows["heldout"]}
    assert {normalize(r["text"]) for r in by_voice} == heldout_keys  # the held-out sentences, and only those
    train_keys = {normalize(r["text"]) for split in ("train", "dev") for r in rows[split]}
    assert heldout_keys and not heldout_keys & train_keys
    per_sentence = {}
    for r in rows["train"]:
        per_sentence.setdefault(r["text"], set()).add(r["voice"])
    assert {len(v) for v in per_sentence.values()} == {2}  # voices_per_sentence
    qa = manifests.read_jsonl(c.out / "qa.heldout-voice.jsonl")
    assert qa and {r["question"] for r in qa} <= {r["text"] for r in by_voice}


def test_an_evaluation_set_speaks_the_held_out_sentences_of_the_full_build_and_nothing_else(tmp_path):
    full, only = config(tmp_path, "full"), config(tmp_path, "eval", heldout_only=True)
    spoken = []

    def counting(lang, name):
        voice = SineVoice(name=name)
        voice.speak = lambda text, speed=1.0, speak=voice.speak: spoken.append(text) or speak(text, speed)
        return voice

    build(full, progress=False, make=fake)
    build(only, progress=False, make=counting)
    for split in ("heldout", "heldout-voice"):
        for name in manifests.NAMES:
            path = manifests.manifest_name(name, split)
            assert manifests.read_jsonl(only.out / path) == manifests.read_jsonl(full.out / path), path
    for split in ("train", "dev"):
        assert not any(manifests.read_jsonl(only.out / manifests.manifest_name(n, split)) for n in manifests.NAMES)
    held = {r["text"]: r["lang"] for r in manifests.read_jsonl(full.out / "asr.heldout.jsonl")}
    assert held and set(spoken) == set(held)  # each in two training voices and its language's held-out voices
    assert len(spoken) == sum(2 + len(only.heldout_voices_for(lang)) for lang in held.values())
    meta = manifests.read_dataset(only.out)
    assert meta["config"]["heldout_only"] is True and "heldout_only" not in manifests.read_dataset(full.out)["config"]
    assert "evaluation set" in (only.out / "README.md").read_text(encoding="utf-8")


def test_a_voice_that_cannot_load_is_skipped_and_counted(tmp_path):
    def make(lang, name):
        if name == "flite:rms":
            raise TTSError("flite is not installed: apt-get install flite")
        return SineVoice(name=name)

    c = config(tmp_path, "d", heldout_voices=())
    summary = build(c, progress=False, make=make)
    asr = [r for split in c.splits for r in manifests.read_jsonl(c.out / manifests.manifest_name("asr", split))]
    planned = len(asr) + summary.skipped["voice unavailable"]
    assert summary.skipped["voice unavailable"] > 0 and "flite:rms" not in {r["voice"] for r in asr}
    assert planned == 2 * 14 * 2  # two languages, 14 sentences, two voices each: every clip made or counted


def test_merge_refuses_what_is_not_one_whole_build(tmp_path, capsys):
    from llasm.cli.data import main

    parts = [config(tmp_path, f"p{i}", shard=(i, 3), limit=4) for i in range(3)]
    for part in parts[:2]:
        build(part, progress=False, make=fake)
    build(config(tmp_path, "other", shard=(2, 3), limit=4, seed=9), progress=False, make=fake)
    build(config(tmp_path, "whole", limit=4), progress=False, make=fake)
    for argv, expected in [([parts[0].out, parts[1].out], r"shards 0..2 once each; missing \[2\]"),
                           ([parts[0].out, parts[1].out, parts[1].out], r"missing \[2\], twice \[1\]"),
                           ([parts[0].out, parts[1].out, tmp_path / "other"], "another config"),
                           ([parts[0].out, tmp_path / "whole"], "not a shard"),
                           ([parts[0].out, tmp_path / "nothing"], "not a finished llasm-data build")]:
        with pytest.raises(SystemExit) as e:
            main(["merge", str(tmp_path / "m"), *map(str, argv)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and err.startswith("llasm-data: error:") and "\n" not in err, err
        assert __import__("re").search(expected, err), err
    for argv, expected in [(["--shard", "3/2"], "0 <= i < n"), (["--shard", "1"], "--shard takes i/N"),
                           (["--shard", "0/2", "--sources", "facts,answers", "--responses", "llm"],
                            "fixed before any LLM answer"),
                           (["--voices-per-sentence", "3"], None)]:
        with pytest.raises(SystemExit) as e:
            main(["build", str(tmp_path / "b"), *argv])
        err = capsys.readouterr().err.strip()
        if expected:
            assert e.value.code == 1 and expected in err and "\n" not in err, err
        else:
            assert e.value.code == 2  # argparse's own usage error
    for argv, held in [([str(parts[0].out), "--shard", "1/3"], "holds shard 0/3, not shard 1/3: give each part"),
                       ([str(parts[0].out)], "holds shard 0/3, not an unsharded build"),
                       ([str(tmp_path / "whole"), "--shard", "0/3"], "holds an unsharded build, not shard 0/3")]:
        with pytest.raises(SystemExit) as e:
            main(["build", *argv, "--limit", "4"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 1 and held in err and "llasm-data merge" in err and "\n" not in err, err
    (parts[0].out / "part.txt").unlink()  # a part built before the mark: its dataset.json says which part it is
    with pytest.raises(SystemExit):
        main(["build", str(parts[0].out), "--shard", "2/3", "--limit", "4"])
    assert "holds shard 0/3" in capsys.readouterr().err
    meta = json.loads((parts[0].out / "dataset.json").read_text())
    assert meta["shard"] == [0, 3] and meta["plan"] == json.loads((parts[1].out / "dataset.json").read_text())["plan"]
