"""llasm-train PRESET.toml [--set key=value ...]: one training stage from a preset file.
llasm-train average CKPT CKPT [...] -o OUT: the uniform average of checkpoints from one starting point."""
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


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["average"]:
        return average(argv[1:])
    p = argparse.ArgumentParser(prog="llasm-train", description="Train one LLaSM stage from a preset (TOML), or "
                                "'llasm-train average CKPT CKPT ... -o OUT' to average checkpoints.")
    p.add_argument("preset", help="TOML file with TrainConfig fields (stage, data, out, whisper, llm, ...), or the "
                                  "name of a shipped preset (" + ", ".join(_shipped()) + ")")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset field")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    with one_line_errors("llasm-train"):
        from ..training.trainer import TrainConfig, train

        with open(_preset_path(args.preset), "rb") as f:
            values = tomllib.load(f)
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
            values[key.strip()] = _parse_value(value.strip())
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown preset fields {unknown}; known: {sorted(known)}")
        path = train(TrainConfig(**values))
    print(f"checkpoint: {path}")


if __name__ == "__main__":
    main()
