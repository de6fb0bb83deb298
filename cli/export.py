"""llasm-export CKPT_OR_RELEASE -o BUNDLE: a training checkpoint (torch) or an llasm-release (no torch) -> a verified
bundle."""
from __future__ import annotations

import argparse

from .common import one_line_errors, setup_logging


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="llasm-export", description="Build a bundle (ONNX + GGUF + manifest) from a training "
                                "checkpoint, or from an llasm-release directory such as export/release/default.")
    p.add_argument("checkpoint", help="checkpoint directory, or a release directory (config.json of format "
                                      "llasm-release)")
    p.add_argument("-o", "--out", required=True, help="bundle directory to write")
    p.add_argument("--onnx", default=None, choices=["fp32", "fp16", "int8"],
                   help="audio graphs' precision (checkpoints: default fp32; releases: int8 where it passes the "
                        "quality check, or fp16)")
    p.add_argument("--gguf", default="auto",
                   choices=["auto", "base", "f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"],
                   help="LLM weights: 'base' ships a GGUF base untouched (+ LoRA adapter); a type re-writes "
                        "the (merged) LLM and quantizes it with llama.cpp; auto: base for GGUF bases, else f16")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    with one_line_errors("llasm-export"):
        from pathlib import Path

        from ..export.default import build_release, release_format

        if not (Path(args.checkpoint) / "config.json").is_file():
            raise ValueError(f"{args.checkpoint} is not a checkpoint or a release: it has no config.json")
        if release_format(args.checkpoint) == "llasm-release":
            if args.onnx == "fp32":
                p.error("a release's Whisper graphs are int8 or fp16 (float16 weights, float32 compute)")
            report = build_release(args.checkpoint, args.out, overwrite=args.force, precision=args.onnx)
        else:
            from ..export.bundle import export_bundle

            report = export_bundle(args.checkpoint, args.out, args.onnx or "fp32", args.gguf, overwrite=args.force)
    if not args.quiet:
        print(f"bundle: {report.bundle}")
        for name, size in report.files.items():
            print(f"  {name:24s} {size / 1e6:10.2f} MB")
        for name, value in report.checks.items():
            print(f"  {name:24s} {value:10.3g}" if isinstance(value, float) else f"  {name:24s} {value}")


if __name__ == "__main__":
    main()
