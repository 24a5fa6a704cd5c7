"""Train an ONNX model in PyTorch: load it as a trainable module, fit it on arrays, write it back to ONNX.

Needs the `train` extra (`pip install -e '.[train]'`)::

    import onnxmorph, onnxmorph.train as ot
    child = onnxmorph.deepen(parent, layer="fc1", activation="tanh")
    net = ot.to_torch(child)                    # every float initializer is a torch Parameter
    ot.activation_parameters(net)               # the P-activation parameters `a` (start at 1)
    ot.fit(net, x, y, loss="cross_entropy", optimizer=lambda p: torch.optim.Adam(p, 1e-3), steps=200)
    trained = ot.to_onnx(net)                   # the child's own graph with the trained weights

The module interprets the ONNX graph node by node with torch operators instead of
converting it to a different graph (onnx2torch does that, and turns weights read by
PRelu/Mul into frozen constants, and needs torchvision, which pulls a CUDA build of torch).
Because training never changes the graph, `to_onnx` is exact: the same nodes, names,
opset, metadata and receipt, with the initializers replaced by the trained values.
"""

from onnxmorph.lazy import lazy_attributes

__all__ = ["IGNORE_INDEX", "OnnxModule", "SUPPORTED_OPS", "activation_parameters", "causal_lm_labels", "fit", "predict",
           "to_onnx", "to_torch"]
__getattr__ = lazy_attributes(__name__, {name: "onnxmorph.train.adapter" for name in __all__})
