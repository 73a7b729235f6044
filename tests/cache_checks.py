"""A check shared by the speculative-decoding tests: after generation, the cache holds
exactly what a fresh prefill of the accepted tokens would write (rejected drafts left no trace)."""

import torch

from lmforge.compiler.ops import AttentionContext, attention_context


def assert_cache_holds_only_accepted_tokens(engine, tokens: torch.Tensor, tolerance: float = 1e-5) -> None:
    valid = tokens.shape[1] - 1  # the last token was never fed back
    first = engine.prompt_padding  # the runtime left-pads a prompt to its length bucket
    fresh = [None if buffer is None else (torch.zeros_like(buffer[0]), torch.zeros_like(buffer[1]))
             for buffer in engine.cache.buffers]
    with attention_context(AttentionContext(kv=fresh, start=0, q_len=valid)):
        engine.runner(tokens[:, :valid], torch.arange(valid).expand(tokens.shape[0], -1))
    for buffer, expected in zip(engine.cache.buffers, fresh):
        if buffer is None:
            continue
        for written, recomputed in zip(buffer, expected):
            torch.testing.assert_close(written[:, :, first : first + valid], recomputed[:, :, :valid], atol=tolerance,
                                       rtol=tolerance)
