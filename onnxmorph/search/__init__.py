"""Morph-based architecture search: `onnxmorph.search.search(parent, data, outdir, ...)`.

    import onnxmorph.search
    result = onnxmorph.search.search("parent.onnx", "digits", "out/", rounds=3, children=4, steps=200)

`loop` runs the rounds and keeps the state; `state` reads a state back, checked; `space` draws
morphs, `data` loads data sets, `workers` trains candidates (in processes of its own or on Ray),
`report` writes the summary, `cli` is the subcommand. See `onnxmorph.search.loop` for the whole story.
"""

from onnxmorph.lazy import lazy_attributes

__all__ = ["STATE_FILE", "SearchResult", "Settings", "search"]
__getattr__ = lazy_attributes(__name__, {name: "onnxmorph.search.loop" for name in __all__})
