"""Verify-each: after every pass, the current Program against the original model.

On a fixed batch it records, against the original model, max logit error, top-1 agreement,
KL and perplexity change. A lossless pass must not change what its input program computes
(which, after a lossy pass, is no longer the original model), so it is also checked
against a copy of the program from before it: greedy tokens of both and, when they differ,
the input's margin between its top two logits at the first differing step — a flip where
that margin and the pass's logit change are both inside `near_tie_margin` is float
reassociation meeting a near-tie, not a broken rewrite. Status per lossless pass: `ok`,
`near-tie`, `error` (greedy tokens changed otherwise) or `logit drift` (same tokens, logits
changed by more than `logit_tolerance`).
Comparing each layer's output with the reference's hidden states names the first layer
that diverges.
"""

from __future__ import annotations

import torch

from lmforge.compiler.layermap import role_of
from lmforge.compiler.pipeline import Instrument
from lmforge.compiler.program import Program
from lmforge.passes import Pass, PassResult
from lmforge.passes.calibrate import compare, full_logits, greedy_extend, node_values


def layer_outputs(program: Program) -> list:
    """Per layer, the node carrying the residual stream out of it: the last node of the
    layer that a node of another layer (or of no layer) reads."""
    outputs = []
    for entry in program.layers:
        index = entry.index
        candidates = [
            node for node in program.graph_module.graph.nodes
            if role_of(node)[0] == index and any(role_of(user)[0] != index for user in node.users)
        ]
        outputs.append(candidates[-1] if candidates else None)
    return outputs


def first_divergent_layer(program: Program, reference, ids: torch.Tensor, tolerance: float) -> dict | None:
    """The first layer whose output differs from the reference's hidden state by more than
    `tolerance` (relative to the hidden state's magnitude), or None. The last layer is not
    compared: Hugging Face reports its output only after the final norm."""
    outputs = layer_outputs(program)[:-1]
    values = node_values(program, ids, [node for node in outputs if node is not None])
    with torch.no_grad():
        hidden = reference(ids, output_hidden_states=True).hidden_states
    for layer, node in enumerate(outputs):
        if node is None or node.name not in values or values[node.name].shape != hidden[layer + 1].shape:
            continue
        expected = hidden[layer + 1].float()
        error = ((values[node.name].float() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        if error > tolerance:
            return {"layer": layer, "relative_error": error}
    return None


def greedy_check(after: Program, before: Program, prompt: torch.Tensor, steps: int, near_tie_margin: float) -> dict:
    """Did the pass (the program `before` it → `after` it) change the greedy tokens? On a
    difference: where, and whether it is a near-tie: the input program's top-2 margin at
    that step and the pass's largest logit change are both below `near_tie_margin`, so
    rounding alone can explain the flip."""
    with torch.no_grad():
        change = (full_logits(after, prompt) - full_logits(before, prompt)).abs().max().item()
        ours = greedy_extend(lambda ids: full_logits(after, ids), prompt, steps)
        theirs = greedy_extend(lambda ids: full_logits(before, ids), prompt, steps)
    differing = (ours != theirs).any(0).nonzero()
    if len(differing) == 0:
        return {"greedy_match": True, "max_logit_change": change, "status": "ok"}
    position = int(differing[0])
    with torch.no_grad():
        logits = full_logits(before, theirs[:, :position])[:, -1]
    top2 = logits.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    return {
        "greedy_match": False,
        "max_logit_change": change,
        "first_difference_at_step": position - prompt.shape[1],
        "input_top2_margin": margin,
        "status": "near-tie" if margin < near_tie_margin and change < near_tie_margin else "error",
    }


class VerifyEach(Instrument):
    """Adds a `verify_each` record to each pass's history entry (see the module doc)."""

    def __init__(
        self,
        reference,
        ids: torch.Tensor,
        greedy_tokens: int = 8,
        near_tie_margin: float = 0.05,
        layer_tolerance: float = 1e-4,
        logit_tolerance: float = 1e-3,
    ) -> None:
        self.reference, self.ids, self.logit_tolerance = reference, ids, logit_tolerance
        self.greedy_tokens, self.near_tie_margin, self.layer_tolerance = greedy_tokens, near_tie_margin, layer_tolerance
        with torch.no_grad():
            self.reference_logits = reference(ids).logits.float()
        self.records: list[dict] = []

    def before_pass(self, index: int, pass_: Pass, program: Program) -> None:
        self.before = program.clone() if pass_.lossless else None

    def after_pass(self, index: int, pass_: Pass, program: Program, result: PassResult) -> None:
        record = measure(program, self.reference, self.ids, self.reference_logits)
        record["pass"], record["index"], record["lossless"] = pass_.name, index, pass_.lossless
        if self.before is not None:
            prompt = self.ids[:, : max(1, self.ids.shape[1] // 2)]
            record.update(greedy_check(program, self.before, prompt, self.greedy_tokens, self.near_tie_margin))
            if record["status"] == "ok" and record["max_logit_change"] > self.logit_tolerance:
                record["status"] = "logit drift"
        record["first_divergent_layer"] = first_divergent_layer(program, self.reference, self.ids, self.layer_tolerance)
        program.history[-1]["verify_each"] = record
        self.records.append(record)


def measure(program: Program, reference, ids: torch.Tensor, reference_logits: torch.Tensor | None = None) -> dict:
    """Max logit error, top-1 agreement, KL and perplexity change of `program` on `ids`."""
    if reference_logits is None:
        with torch.no_grad():
            reference_logits = reference(ids).logits.float()
    with torch.no_grad():
        logits = full_logits(program, ids).float()
    quality = compare(reference_logits.log_softmax(-1), logits.log_softmax(-1), ids)
    return {"max_logit_error": (logits - reference_logits).abs().max().item(), **quality.as_dict()}
