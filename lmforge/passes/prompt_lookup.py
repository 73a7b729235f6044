"""`prompt_lookup`: draft tokens by n-gram lookup in the prompt and the generated text.

It changes no graph: it records the draft source in `meta["speculation"]`, and the
runtime verifies the drafts (`runtime/speculative.py`) in the same forward that decodes the
next token. Greedy output stays token-for-token that of plain greedy decoding, and sampling
keeps its distribution (speculative-sampling rejection rule), so the pass is lossless.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from lmforge.compiler.program import Program
from lmforge.compiler.speculation_rules import check_draft_source
from lmforge.passes.base import Pass, PassConfig, PassContext, PassResult, register_pass


class PromptLookupConfig(PassConfig):
    max_ngram: int = Field(3, ge=1, description="longest suffix n-gram looked up (tried first)")
    min_ngram: int = Field(1, ge=1, description="shortest suffix n-gram looked up")
    num_draft: int = Field(8, ge=1, description="tokens proposed after a match (of max_ngram tokens, with scale_by_match)")
    scale_by_match: bool = Field(
        True, description="a match of n tokens proposes ceil(num_draft * n / max_ngram) tokens: shorter matches "
        "are right less often, and every drafted token costs verify work"
    )

    @model_validator(mode="after")
    def _ordered(self) -> PromptLookupConfig:
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"min_ngram ({self.min_ngram}) must not exceed max_ngram ({self.max_ngram})")
        return self


@register_pass("prompt_lookup")
class PromptLookupPass(Pass):
    description = "speculative decoding with drafts from n-gram lookup in prompt + output (runtime; lossless)"
    Config = PromptLookupConfig
    provides = ("speculation",)

    def apply(self, program: Program, ctx: PassContext) -> PassResult:
        check_draft_source(program.meta, self.config.num_draft, self.name)
        program.meta.setdefault("speculation", {})["prompt_lookup"] = self.config.model_dump()
        return PassResult(notes=(f"runtime drafts up to {self.config.num_draft} tokens after a "
                                 f"{self.config.min_ngram}..{self.config.max_ngram}-gram match",))
