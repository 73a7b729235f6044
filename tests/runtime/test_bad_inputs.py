"""Bad input to `generate` and to a forward fails with one `LmforgeError` naming the
problem, before anything runs, and the model gives the same results afterwards."""

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from tiny_models import tiny_model

VOCAB = 256
CACHE = 64
PROMPT = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
PADDED_MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10])


@pytest.fixture(scope="module")
def model():
    return lmforge.optimize(tiny_model("llama"), f"runtime: {{max_seq_len: {CACHE}}}\n")


@pytest.fixture(scope="module")
def expected(model):
    """Greedy tokens and logits before any bad call."""
    return model.generate(PROMPT, PADDED_MASK, max_new_tokens=6, eos_token_id=[]), model(PROMPT, PADDED_MASK).logits


def _ids(values) -> torch.Tensor:
    return torch.tensor([values])


BAD_GENERATE = {
    "empty prompt": (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids must be"),
    "no rows": (dict(input_ids=torch.zeros(0, 4, dtype=torch.long)), "input_ids must be"),
    "one dimension": (dict(input_ids=PROMPT[0]), "input_ids must be"),
    "a list": (dict(input_ids=[[5, 6, 7]]), "must be a torch.Tensor"),
    "prompt longer than the cache": (dict(input_ids=torch.full((1, CACHE + 1), 5)), "exceeds the KV cache length"),
    "prompt + new tokens longer than the cache": (dict(input_ids=torch.full((1, CACHE - 6), 5), max_new_tokens=7),
                                                  "exceeds the KV cache length"),
    "id = vocab size": (dict(input_ids=_ids([5, VOCAB, 7])), f"token id {VOCAB} at row 0, position 1 is outside"),
    "negative id": (dict(input_ids=_ids([5, 6, -1])), "token id -1 at row 0, position 2 is outside"),
    "float ids": (dict(input_ids=PROMPT.float()), "integer token ids, got dtype torch.float32"),
    "bool ids": (dict(input_ids=PROMPT > 100), "integer token ids"),
    "ids on another device": (dict(input_ids=PROMPT.to("meta")), "input_ids are on meta but the model runs on cpu"),
    "max_new_tokens 0": (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1 \(got 0\)"),
    "max_new_tokens -1": (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 1"),
    "max_new_tokens 2.5": (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 1"),
    "temperature nan": (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
    "temperature inf": (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number"),
    "temperature negative": (dict(temperature=-0.5), "temperature must be a finite number"),
    "temperature 0 when sampling": (dict(do_sample=True, temperature=0.0), "use do_sample=False for greedy"),
    "top_p 0": (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
    "top_p above 1": (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    "top_p nan": (dict(do_sample=True, top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    "top_k negative": (dict(do_sample=True, top_k=-1), "top_k must be an integer >= 0"),
    "top_k float": (dict(do_sample=True, top_k=2.5), "top_k must be an integer >= 0"),
    "seed a string": (dict(do_sample=True, seed="7"), "seed must be an integer"),
    "seed a float": (dict(do_sample=True, seed=7.5), "seed must be an integer"),
    "do_sample a string": (dict(do_sample="yes"), "do_sample must be True or False"),
    "all-padding row": (dict(attention_mask=torch.tensor([[0] * 10, [1] * 10])), "row 0 of attention_mask is all padding"),
    "mask value 2": (dict(attention_mask=PADDED_MASK * 2), "only 0 .padding. and 1 .real token."),
    "mask value 0.5": (dict(attention_mask=PADDED_MASK / 2), "only 0 .padding. and 1"),
    "mask of another shape": (dict(attention_mask=PADDED_MASK[:, 1:]), "attention_mask shape"),
    "mask on another device": (dict(attention_mask=PADDED_MASK.to("meta")), "attention_mask is on meta"),
    "right padding": (dict(attention_mask=PADDED_MASK.flip(1)), "only left padding"),
    "eos a string": (dict(eos_token_id="2"), "eos_token_id must be an int or a list of ints"),
    "empty stop string": (dict(stop_strings=[""]), "stop_strings must be non-empty strings"),
}


@pytest.mark.parametrize("case", BAD_GENERATE)
def test_bad_generate_input_is_one_clear_error_and_the_model_still_works(model, expected, case):
    overrides, message = BAD_GENERATE[case]
    mask = None if "input_ids" in overrides else PADDED_MASK
    arguments = dict(input_ids=PROMPT, attention_mask=mask, max_new_tokens=6, eos_token_id=[]) | overrides
    with pytest.raises(LmforgeError, match=message):
        model.generate(**arguments)
    assert torch.equal(model.generate(PROMPT, PADDED_MASK, max_new_tokens=6, eos_token_id=[]), expected[0])


BAD_FORWARD = {
    "id = vocab size": (_ids([VOCAB]), None, "outside the vocabulary"),
    "negative id": (_ids([3, -4]), None, "token id -4 at row 0, position 1 is outside"),
    "float ids": (PROMPT.double(), None, "integer token ids"),
    "empty": (torch.zeros(1, 0, dtype=torch.long), None, "input_ids must be"),
    "all-padding row": (PROMPT, torch.tensor([[1] * 10, [0] * 10]), "row 1 of attention_mask is all padding"),
    "mask value -1": (PROMPT, -PADDED_MASK, "only 0 .padding. and 1"),
}


@pytest.mark.parametrize("case", BAD_FORWARD)
def test_bad_forward_input_is_one_clear_error_and_the_model_still_works(model, expected, case):
    ids, mask, message = BAD_FORWARD[case]
    with pytest.raises(LmforgeError, match=message):
        model(ids, mask)
    assert torch.equal(model(PROMPT, PADDED_MASK).logits, expected[1])


def test_greedy_ignores_temperature_zero_like_hugging_face(model, expected):
    out = model.generate(PROMPT, PADDED_MASK, max_new_tokens=6, eos_token_id=[], temperature=0.0)
    assert torch.equal(out, expected[0])


def test_generate_from_inside_generate_is_refused(model, expected):
    class Reenter:
        def put(self, value):
            model.generate(PROMPT, max_new_tokens=2)

        def end(self):
            pass

    with pytest.raises(LmforgeError, match="called again from inside generate"):
        model.generate(PROMPT, max_new_tokens=2, streamer=Reenter())
    assert torch.equal(model.generate(PROMPT, PADDED_MASK, max_new_tokens=6, eos_token_id=[]), expected[0])
