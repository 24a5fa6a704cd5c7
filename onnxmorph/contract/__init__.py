"""The pass contract (`passinfra`) and the registry (`registry`), the one loader of `onnxmorph.passes`."""
