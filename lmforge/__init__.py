"""lmforge: a compiler for LLM inference.

Public API: `optimize(model_or_path, recipe)`, `load(artifact_dir)` and `Recipe`.
"""

__version__ = "0.1.0"

from lmforge.api import load, optimize  # noqa: E402
from lmforge.compiler.recipe import Recipe  # noqa: E402

__all__ = ["Recipe", "load", "optimize", "__version__"]
