"""llasm-export CKPT -o BUNDLE: checkpoint -> verified bundle."""
from __future__ import annotations

import argparse

from .common import one_line_errors, setup_logging


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="llasm-export", description="Build a bundle (ONNX + GGUF + manifest) from a checkpoint.")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--out", required=True, help="bundle directory to write")
    p.add_argument("--onnx", default="fp32", choices=["fp32", "fp16", "int8"], help="audio encoder precision")
    p.add_argument("--gguf", default="auto",
                   choices=["auto", "base", "f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"],
                   help="LLM weights: 'base' ships a GGUF base untouched (+ LoRA adapter); a type re-writes "
                        "the (merged) LLM and quantizes it with llama.cpp; auto: base for GGUF bases, else f16")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.quiet)
    with one_line_errors("llasm-export"):
        from ..export.bundle import export_bundle

        report = export_bundle(args.checkpoint, args.out, args.onnx, args.gguf, overwrite=args.force)
    if not args.quiet:
        print(f"bundle: {report.bundle}")
        for name, size in report.files.items():
            print(f"  {name:24s} {size / 1e6:10.2f} MB")
        for name, value in report.checks.items():
            print(f"  {name:24s} {value:10.3g}")


if __name__ == "__main__":
    main()
