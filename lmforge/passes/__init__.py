"""Graph passes. Importing this package registers every pass in `PASSES`."""

from lmforge.passes import (  # noqa: F401  (registration side effect)
    cleanup,
    draft_heads,
    ffn_skip,
    fuse_projections,
    kv_evict,
    kv_share,
    prompt_lookup,
    quantize,
    sparse_prefill,
    streaming_heads,
    verify,
)
from lmforge.passes.base import PASSES, Pass, PassConfig, PassContext, PassResult, register_pass

__all__ = ["PASSES", "Pass", "PassConfig", "PassContext", "PassResult", "register_pass"]
