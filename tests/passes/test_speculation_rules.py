"""Draft sources and passes that decide per decoded token refuse each other, in either order,
with the reason; passes that decide once for all tokens still compose with speculation."""

import pytest
import torch
from lossy_helpers import context, random_calibration
from tiny_models import tiny_model

from lmforge.codegen.cpu import lower
from lmforge.compiler.capture import capture
from lmforge.compiler.recipe import CodegenConfig
from lmforge.compiler.speculation_rules import check_draft_source
from lmforge.draft_heads import initial_heads, save_heads
from lmforge.errors import LmforgeError
from lmforge.passes.draft_heads import DraftHeads, DraftHeadsConfig
from lmforge.passes.ffn_skip import FFNSkip, FFNSkipConfig, make_dynamic, remove_ffns
from lmforge.passes.kv_merge import merge_pairs
from lmforge.passes.kv_share import KVShare, KVShareConfig
from lmforge.passes.prompt_lookup import PromptLookupPass
from lmforge.runtime.engine import Engine

# Per pass: the pass (refusing before it calibrates), its rewrite as the pass leaves it
# (without the calibration search, to keep the test fast), and the reason it gives.
PER_TOKEN = {
    "ffn_skip dynamic": (lambda: FFNSkip(FFNSkipConfig(mode="dynamic", layers=[2, 3], threshold=0.99)),
                         lambda program: make_dynamic(program, [2, 3], threshold=0.99, warmup=1),
                         "dynamic ffn_skip skips FFNs only in one-token forwards"),
    "kv_share merge": (lambda: KVShare(KVShareConfig(mode="merge", groups=[[1, 2]])),
                       lambda program: merge_pairs(program, [[1, 2]], 0.6, 0.05, [0.5]),
                       "merged KV caches let the tokens of a verification forward attend"),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=5)


@pytest.fixture(scope="module")
def captured(model):
    return capture(model)


@pytest.fixture(scope="module")
def draft_sources(model, tmp_path_factory):
    """Each draft source as a pass factory: prompt lookup, Medusa heads and Hydra heads."""
    sources = {"prompt_lookup": PromptLookupPass}
    for kind in ("medusa", "hydra"):
        directory = save_heads(tmp_path_factory.mktemp(kind), initial_heads(model, 2, kind), model, {})
        sources[f"draft_heads {kind}"] = lambda directory=directory: DraftHeads(DraftHeadsConfig(path=str(directory)))
    return sources


@pytest.mark.parametrize("lossy", sorted(PER_TOKEN))
@pytest.mark.parametrize("source", ["prompt_lookup", "draft_heads medusa", "draft_heads hydra"])
def test_per_token_decisions_and_drafts_refuse_each_other_in_either_order(model, captured, draft_sources, lossy, source):
    make_pass, rewrite, reason = PER_TOKEN[lossy]
    ctx = context(model, random_calibration(model))
    decided = captured.clone()
    rewrite(decided)
    with pytest.raises(LmforgeError, match=f"{reason}.*drop {lossy} or the draft source") as refused:
        draft_sources[source]()(decided, ctx)
    assert "\n" not in str(refused.value)
    drafting = captured.clone()
    draft_sources[source]()(drafting, ctx)
    with pytest.raises(LmforgeError, match=f"^{lossy}: the program drafts tokens.*{reason}") as refused:
        make_pass()(drafting, ctx)
    assert "\n" not in str(refused.value)


def test_static_ffn_skip_still_drafts_and_stays_greedy_exact(model, captured):
    """A static skip decides once for every token, so verification computes what decoding does."""
    plain, drafting = captured.clone(), captured.clone()
    for program in (plain, drafting):
        remove_ffns(program, [2])
    PromptLookupPass()(drafting, context(model, random_calibration(model)))
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])

    def engine(program):
        return Engine(lower(program, CodegenConfig()), program.meta["kv_cache"], max_seq_len=96,
                      speculation=program.meta.get("speculation"))

    speculative = engine(drafting)
    tokens = speculative.generate(prompt, max_new_tokens=32)
    assert torch.equal(tokens, engine(plain).generate(prompt, max_new_tokens=32))
    assert speculative.speculation_stats["drafted"] > 0


def test_drafts_longer_than_a_streaming_ring_slack_are_refused():
    ring = {"cache": 1, "kv_heads": 1, "head_dim": 8, "sink": 2, "window": 16, "capacity": 2 + 16 + 3}
    meta = {"kv_cache": [{"layer": 0, "cache": 0, "kv_heads": 1, "head_dim": 8, "streaming": ring}]}
    check_draft_source(meta, 3, "prompt_lookup")
    with pytest.raises(LmforgeError, match="drafts of 4 tokens need a streaming ring slack of 4, the streaming heads have 3"):
        check_draft_source(meta, 4, "prompt_lookup")
