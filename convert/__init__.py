"""coreml-split: one Core ML backbone, many linked classifier pipelines."""

__version__ = "0.1.0"
