"""ONNX export and onnxruntime serving (installed as ``ressl.export``)."""
