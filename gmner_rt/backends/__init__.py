"""Inference backends behind one small interface (onnxruntime now; TensorRT later)."""
