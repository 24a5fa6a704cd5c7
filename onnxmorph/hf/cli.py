"""The `export-hf` subcommand's arguments and output; the export (onnxmorph.hf.export) is imported when it runs."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `export-hf` subcommand's arguments (onnxmorph.cli adds the common ones)."""
    p.add_argument("model", metavar="CHILD", help="the grown ONNX model (grown by widen and block)")
    p.add_argument("--like", required=True, metavar="HF_DIR",
                   help="the parent's Hugging Face checkpoint folder (save_pretrained of the model that was exported)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="the folder to write the checkpoint to")
    p.add_argument("--parent", metavar="PARENT.onnx",
                   help="the export the child was grown from (default: the *.onnx file in HF_DIR or beside CHILD "
                        "whose SHA-256 the child's receipt records)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR when it exists and is not empty")
    p.add_argument("--no-check", action="store_true",
                   help="do not load the written checkpoint with transformers to compare it with the child "
                        "(the check runs when transformers and torch are installed)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def run_command(args: argparse.Namespace) -> int:
    """`python -m onnxmorph export-hf ...`; returns the exit code (errors are raised for onnxmorph.cli to report)."""
    from onnxmorph.hf.export import export_hf

    result = export_hf(args.model, like=args.like, out=args.output, parent=args.parent, force=args.force,
                       check=False if args.no_check else None)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    elif not args.quiet:
        print(result.summary())
    return 0
