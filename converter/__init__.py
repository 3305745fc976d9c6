"""WKVQuant converter: calibrate a LLaMA-family model and write a W4KV4 artifact."""

__version__ = "0.1.0"
