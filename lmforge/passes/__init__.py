"""Graph passes. Importing this package registers every pass in `PASSES`."""

from lmforge.passes import cleanup, draft_heads, ffn_skip, fuse_projections, kv_share, prompt_lookup, verify  # noqa: F401  (registration side effect)
from lmforge.passes.base import PASSES, Pass, PassConfig, PassContext, PassResult, register_pass

__all__ = ["PASSES", "Pass", "PassConfig", "PassContext", "PassResult", "register_pass"]
