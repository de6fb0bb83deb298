"""llasm-train PRESET.toml [--set key=value ...]: one training stage from a preset file.
llasm-train average CKPT CKPT [...] -o OUT: the uniform average of checkpoints from one starting point.
llasm-train whisper-lora --train M.jsonl [...] --dev M.jsonl -o whisper_lora.npz: a LoRA of Whisper's decoder."""
from __future__ import annotations

import argparse
import sys
import tomllib
from dataclasses import fields

from .common import one_line_errors, setup_logging


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _settings(items: list[str], cls, values: dict | None = None, what: str = "settings") -> dict:
    """--set KEY=VALUE items over `values`, checked against the fields of the dataclass cls."""
    values = dict(values or {})
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        values[key.strip()] = _parse_value(value.strip())
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")
    return values


def _presets_dir():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "training" / "presets"


def _shipped() -> list[str]:
    return sorted(p.stem for p in _presets_dir().glob("*.toml"))


def _preset_path(name: str):
    from pathlib import Path

    path = Path(name)
    if path.is_file():
        return path
    shipped = _presets_dir() / f"{name}.toml"
    if shipped.is_file():
        return shipped
    raise ValueError(f"no preset file {name!r}; shipped presets: {', '.join(_shipped())}")


def average(argv) -> None:
    p = argparse.ArgumentParser(prog="llasm-train average", description="Average the weights of checkpoints fine-tuned "
                                "from one starting point on the same bases (a model soup).")
    p.add_argument("checkpoints", nargs="+", help="checkpoint directories (two or more)")
    p.add_argument("-o", "--out", required=True, help="output checkpoint directory")
    args = p.parse_args(argv)
    with one_line_errors("llasm-train"):
        from ..training.checkpoint import average_checkpoints

        path = average_checkpoints(args.checkpoints, args.out)
    print(f"checkpoint: {path}")


def whisper_lora(argv) -> None:
    p = argparse.ArgumentParser(prog="llasm-train whisper-lora", description="Teach Whisper's decoder the training "
                                "voices: a LoRA on its projections, trained on llasm-data ASR manifests with the "
                                "encoder frozen; a whisper-decoder release carries it as whisper_lora.npz.")
    p.add_argument("--whisper", default="package:whisper-base", help="CTranslate2 Whisper directory or package spec")
    p.add_argument("--train", nargs="+", required=True, help="ASR manifests (asr.jsonl of llasm-data builds)")
    p.add_argument("--dev", nargs="+", required=True, help="ASR manifests to keep the lowest loss by (asr.dev.jsonl)")
    p.add_argument("-o", "--out", required=True, help="the LoRA file (.npz)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a TuneConfig field: rank, alpha, lr, steps, batch, seed, pad_seconds, weight_decay")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    with one_line_errors("llasm-train"):
        from ..training import packaged
        from ..training.whisper_tune import TuneConfig, examples, tune

        values = _settings(args.set, TuneConfig)
        whisper = packaged.resolve(args.whisper) if packaged.is_package_spec(args.whisper) else args.whisper
        report = tune(whisper, examples(args.train, whisper), examples(args.dev, whisper), args.out,
                      TuneConfig(**values))
        if report["step"] == 0:
            raise ValueError(f"the dev loss never fell below Whisper's own ({report['start_dev_loss']:.4f}): "
                             "no LoRA written")
    print(f"whisper lora: {args.out} (step {report['step']}, dev loss {report['dev_loss']:.4f} from "
          f"{report['start_dev_loss']:.4f}; {report['train']} training clips, {report['seconds']} s)")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["average"]:
        return average(argv[1:])
    if argv[:1] == ["whisper-lora"]:
        return whisper_lora(argv[1:])
    p = argparse.ArgumentParser(prog="llasm-train", description="Train one LLaSM stage from a preset (TOML), or "
                                "'llasm-train average CKPT CKPT ... -o OUT' to average checkpoints, or 'llasm-train "
                                "whisper-lora ...' to teach Whisper's decoder the training voices.")
    p.add_argument("preset", help="TOML file with TrainConfig fields (stage, data, out, whisper, llm, ...), or the "
                                  "name of a shipped preset (" + ", ".join(_shipped()) + ")")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset field")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    with one_line_errors("llasm-train"):
        from ..training.trainer import TrainConfig, train

        with open(_preset_path(args.preset), "rb") as f:
            values = _settings(args.set, TrainConfig, tomllib.load(f), "preset fields")
        path = train(TrainConfig(**values))
    print(f"checkpoint: {path}")


if __name__ == "__main__":
    main()
