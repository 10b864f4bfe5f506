"""ONNX export and onnxruntime inference for hypermoe."""
