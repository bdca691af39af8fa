"""vlmprune: export VLMs with training-free visual-token pruning to ONNX/TensorRT and run them on the edge.

The folders ``models/``, ``prune/``, ``export/``, ``calibrate/`` and ``runtime/`` at the repository top level
install as the subpackages ``vlmprune.models`` and so on (see ``pyproject.toml``).
"""

__version__ = "0.1.0"
