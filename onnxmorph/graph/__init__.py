"""The editable graph: onnx-graphsurgeon import/export and helpers (`core`), the layer adapter
(`layers`), new layers and P-activations (`build`)."""
