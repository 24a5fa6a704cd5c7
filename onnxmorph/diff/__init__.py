"""What a morph changed between a parent and a child: `diff(parent, child)`, its text, JSON and page.

    from onnxmorph.diff import diff, write_page
    d = diff("parent.onnx", "child.onnx")
    print(d); d.to_dict(); write_page(d, "diff.html")

`views` reads a model's header, `compare` matches the two, `text` prints, `layout` and `page`
draw the HTML page.
"""

from onnxmorph.lazy import lazy_attributes

_EXPORTS = {
    "Diff": "onnxmorph.diff.compare", "diff": "onnxmorph.diff.compare",
    "model_explorer_mapping": "onnxmorph.diff.compare",
    "ModelView": "onnxmorph.diff.views", "model_view": "onnxmorph.diff.views", "node_flops": "onnxmorph.diff.views",
    "format_diff": "onnxmorph.diff.text",
    "write_page": "onnxmorph.diff.page", "write_diff_page": "onnxmorph.diff.page",
    "write_outputs": "onnxmorph.diff.page",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_attributes(__name__, _EXPORTS)
