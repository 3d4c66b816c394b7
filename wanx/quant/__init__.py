"""Quantized DiT and text-encoder weights: GGML block formats (GGUF) in torch so far."""
