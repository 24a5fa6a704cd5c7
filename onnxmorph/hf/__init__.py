"""A grown child back to Hugging Face: `export_hf(child, like=parent_checkpoint, out=folder)` writes a checkpoint.

    from onnxmorph.hf import export_hf
    result = export_hf("child.onnx", like="parent_hf/", out="child_hf/")
    print(result.summary())

`families` says what each Hugging Face architecture keeps in its config and parameters, `matching`
finds each parameter among the export's initializers, `checkpoint` reads and writes the folders,
`export` puts them together, `check` compares the written checkpoint with the ONNX child in
transformers, and `cli` is the `export-hf` subcommand.
"""

from onnxmorph.lazy import lazy_attributes

_EXPORTS = {
    "export_hf": "onnxmorph.hf.export", "ExportResult": "onnxmorph.hf.export",
    "read_checkpoint": "onnxmorph.hf.checkpoint", "FAMILIES": "onnxmorph.hf.families",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes(__name__, _EXPORTS)
