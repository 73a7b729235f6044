"""The runtime on the real reference checkpoint: identical to HF, batch, sampling, stops."""

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.runtime.sampling import SamplingParams, filtered_logits


def _left_pad(prompts, pad_id=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def test_ref_logits_match_hf(ref_compiled, ref_hf, heldout_prompts):
    ids = torch.tensor([heldout_prompts[0]])
    with torch.no_grad():
        expected = ref_hf(ids).logits
    torch.testing.assert_close(ref_compiled(ids).logits, expected, atol=1e-4, rtol=0)


def test_ref_greedy_batch1_equals_hf(ref_compiled, ref_hf, heldout_prompts):
    for prompt in heldout_prompts:
        ids = torch.tensor([prompt])
        expected = ref_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
        assert torch.equal(ref_compiled.generate(ids, max_new_tokens=40), expected)


def test_ref_greedy_left_padded_batch3_equals_hf(ref_compiled, ref_hf, heldout_prompts):
    ids, mask = _left_pad(heldout_prompts)
    expected = ref_hf.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    got = ref_compiled.generate(ids, mask, max_new_tokens=32)
    assert torch.equal(got, expected)


def test_padded_full_forward_matches_unpadded_rows(ref_compiled, heldout_prompts):
    ids, mask = _left_pad(heldout_prompts)
    padded = ref_compiled(ids, mask).logits
    for row, prompt in enumerate(heldout_prompts):
        alone = ref_compiled(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(padded[row, ids.shape[1] - len(prompt) :], alone, atol=1e-4, rtol=0)


def test_sampling_is_reproducible_with_a_seed(ref_compiled, heldout_prompts):
    ids = torch.tensor([heldout_prompts[1]])
    options = dict(max_new_tokens=20, do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    first = ref_compiled.generate(ids, seed=7, **options)
    assert torch.equal(first, ref_compiled.generate(ids, seed=7, **options))
    assert not torch.equal(first, ref_compiled.generate(ids, seed=8, **options))


def test_top_k_and_top_p_filter_like_hf():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    ours = filtered_logits(logits, SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8))
    theirs = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        theirs = warper(None, theirs)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_eos_stops_and_pads_finished_rows(ref_compiled, heldout_prompts):
    ids = torch.tensor([heldout_prompts[0]])
    free = ref_compiled.generate(ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 3])
    stopped = ref_compiled.generate(ids, max_new_tokens=12, eos_token_id=eos)
    first = (free[0, ids.shape[1] :] == eos).nonzero()[0].item()
    assert stopped.shape[1] == ids.shape[1] + first + 1 and stopped[0, -1] == eos


def test_stop_strings_end_generation(ref_compiled, ref_tokenizer, heldout_prompts):
    ids = torch.tensor([heldout_prompts[0]])
    free = ref_compiled.generate(ids, max_new_tokens=30, eos_token_id=[])
    text = ref_tokenizer.decode(free[0, ids.shape[1] :])
    stop = text.strip()[5:8]
    out = ref_compiled.generate(ids, max_new_tokens=30, eos_token_id=[], stop_strings=[stop])
    new_text = ref_tokenizer.decode(out[0, ids.shape[1] :])
    assert stop in new_text and out.shape[1] < free.shape[1]
    assert stop not in ref_tokenizer.decode(out[0, ids.shape[1] : -1])


def test_streamer_receives_every_token(ref_compiled, heldout_prompts):
    received = []

    class Collect:
        def put(self, value):
            received.append(value.clone())

        def end(self):
            received.append(None)

    ids = torch.tensor([heldout_prompts[0]])
    out = ref_compiled.generate(ids, max_new_tokens=10, eos_token_id=[], streamer=Collect())
    assert torch.equal(received[0], ids) and received[-1] is None
    assert torch.equal(torch.stack(received[1:-1], 1), out[:, ids.shape[1] :])


def test_bad_generation_input_is_explained(ref_compiled, heldout_prompts):
    ids, mask = _left_pad(heldout_prompts)
    with pytest.raises(LmforgeError, match="only left padding"):
        ref_compiled.generate(ids, mask.flip(1), max_new_tokens=2)
    with pytest.raises(LmforgeError, match="exceeds the KV cache length"):
        ref_compiled.generate(ids, mask, max_new_tokens=100_000)
    with pytest.raises(LmforgeError, match="temperature must be > 0"):
        ref_compiled.generate(ids, mask, do_sample=True, temperature=0)
