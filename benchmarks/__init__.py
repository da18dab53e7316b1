"""Benchmarks: real models, real inputs, onnxopt side by side with the tools users would otherwise pick."""
