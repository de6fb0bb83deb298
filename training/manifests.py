"""A speech-data directory on disk: its manifests, its dataset.json, and merging the parts of a sharded build.

    asr.jsonl, conv.jsonl, qa.jsonl      training rows (train split)
    NAME.SPLIT.jsonl                     the other splits: dev, heldout (by sentence), heldout-voice (the held-out
                                         sentences spoken by voices no training row has)
    clips/<lang>-<id>.wav                16 kHz mono; the id hashes voice, text and variation
    answers.jsonl, vocab.jsonl           the LLM's cached replies
    dataset.json, README.md              what was built, and how

Rows are written sorted (by language, then their JSON text), so a build split into shards and merged gives the same
manifests as one build of the whole.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = "llasm.speech_data"
FORMAT_VERSION = 2
NAMES = ("asr", "conv", "qa")
SPLITS = ("train", "dev", "heldout", "heldout-voice")
CACHES = ("answers.jsonl", "vocab.jsonl")


def manifest_name(name: str, split: str) -> str:
    return f"{name}.jsonl" if split == "train" else f"{name}.{split}.jsonl"


def _row_key(row: dict) -> tuple:
    return row["lang"], json.dumps(row, ensure_ascii=False, sort_keys=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_manifests(out: Path, manifests: dict[str, dict[str, list]]) -> Counter:
    """manifests[split][name] -> rows, written sorted; a split's files that this build does not make (an earlier
    build's dev or heldout-voice rows) are removed. Returns (split, lang, name) -> rows."""
    counts: Counter = Counter()
    for split in SPLITS:
        for name in NAMES:
            path = out / manifest_name(name, split)
            if split not in manifests:
                path.unlink(missing_ok=True)
                continue
            rows = sorted(manifests[split][name], key=_row_key)
            write_jsonl(path, rows)
            counts.update((split, r["lang"], name) for r in rows)
    return counts


def write_dataset(out: Path, meta: dict, readme: list[str]) -> None:
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **meta}
    (out / "dataset.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (out / "README.md").write_text("\n".join(readme) + "\n", encoding="utf-8")


def read_dataset(path: Path) -> dict:
    try:
        meta = json.loads((Path(path) / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a finished llasm-data build (dataset.json: {e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}/dataset.json is {meta.get('format')} version {meta.get('version')}, expected "
                         f"{FORMAT} version {FORMAT_VERSION}")
    return meta


# ---- merging -----------------------------------------------------------------------------------------------------

@dataclass
class MergeSummary:
    out: Path
    rows: Counter = field(default_factory=Counter)
    clips_linked: int = 0
    clips_present: int = 0
    skipped: Counter = field(default_factory=Counter)

    def lines(self) -> list[str]:
        out = [f"{split:13s} {lang}  asr {self.rows[split, lang, 'asr']:6d}  conv {self.rows[split, lang, 'conv']:6d}"
               for split, lang in sorted({k[:2] for k in self.rows})]
        out.append(f"clips: {self.clips_linked} brought in, {self.clips_present} already there")
        out.append(f"skipped in the parts: {sum(self.skipped.values())}" + (f" ({dict(self.skipped)})"
                                                                            if self.skipped else ""))
        return out


def merge(out: Path, parts: list[Path], progress: bool = True) -> MergeSummary:
    """The shards 0..N-1 of one build (same config and plan) joined into `out`: their manifests merged and sorted,
    their clips hard-linked (or copied) into out/clips, their LLM caches joined, one dataset.json."""
    from tqdm import tqdm

    out, parts = Path(out), [Path(p) for p in parts]
    if not parts:
        raise ValueError("merge needs the directories of a sharded build's parts")
    metas = [read_dataset(p) for p in parts]
    first = metas[0]
    for part, meta in zip(parts, metas):
        if meta.get("shard") is None:
            raise ValueError(f"{part} is not a shard (built without --shard)")
        for key in ("config", "plan"):
            if _without_shard(meta[key]) != _without_shard(first[key]):
                raise ValueError(f"{part} was built with another {key} than {parts[0]}: not parts of one build")
    n = first["shard"][1]
    got = sorted(meta["shard"][0] for meta in metas)
    if got != list(range(n)):
        missing, twice = sorted(set(range(n)) - set(got)), sorted({i for i in got if got.count(i) > 1})
        raise ValueError(f"merge needs shards 0..{n - 1} once each; missing {missing}, twice {twice}")
    (out / "clips").mkdir(parents=True, exist_ok=True)
    summary = MergeSummary(out)
    manifests: dict[str, dict[str, list]] = {}
    for part, meta in zip(parts, metas):
        for split in meta["manifests"]:
            for name in NAMES:
                path = part / manifest_name(name, split)
                rows = read_jsonl(path) if path.is_file() else []
                manifests.setdefault(split, {k: [] for k in NAMES})[name] += rows
        summary.skipped.update(meta.get("skipped", {}))
    clips = sorted({(part, r["audio"]) for part, meta in zip(parts, metas) for split in meta["manifests"]
                    for name in ("asr",) for r in read_jsonl(part / manifest_name(name, split))})
    for part, clip in tqdm(clips, desc="merging clips", unit="clip", disable=not progress):
        dest = out / clip
        if dest.is_file():
            summary.clips_present += 1
            continue
        try:
            os.link(part / clip, dest)
        except OSError:  # another file system
            shutil.copy2(part / clip, dest)
        summary.clips_linked += 1
    for cache in CACHES:
        lines = {line: None for part in parts if (part / cache).is_file()
                 for line in (part / cache).read_text(encoding="utf-8").splitlines() if line.strip()}
        if lines:
            (out / cache).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    summary.rows = write_manifests(out, manifests)
    meta = {**first, "config": {**first["config"], "out": str(out), "shard": None}, "shard": None,
            "merged_from": [str(p) for p in parts], "rows": {"/".join(k): v for k, v in sorted(summary.rows.items())},
            "skipped": dict(summary.skipped),
            "audio_seconds": round(sum(m.get("audio_seconds", 0.0) for m in metas), 1)}
    text = (parts[0] / "README.md").read_text(encoding="utf-8") if (parts[0] / "README.md").is_file() else ""
    readme = [line for line in text.splitlines() if not line.startswith("- Shard ")]
    write_dataset(out, {k: v for k, v in meta.items() if k not in ("format", "version")},
                  readme + [f"- Merged from {n} shards: {', '.join(map(str, parts))}."])
    return summary


def _without_shard(value):
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("out", "shard")}
    return value
