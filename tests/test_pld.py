"""Prompt lookup decoding: lossless, and its drafts accepted exactly as predicted."""
from __future__ import annotations

import numpy as np
import pytest

from methods import get
from methods.pld import lookup_draft
from tests.conftest import PROMPTS, tiny


def test_lookup_draft_takes_the_latest_longest_match():
    tokens = np.array([5, 1, 2, 3, 9, 1, 2, 3, 7, 8, 4, 2, 3])
    # the suffix 3-gram (4, 2, 3) never occurs before; the 2-gram (2, 3) last occurred at 6..7
    assert lookup_draft(tokens, max_ngram=3, num_draft=3) == [7, 8, 4]
    assert lookup_draft(tokens, max_ngram=3, num_draft=10) == [7, 8, 4, 2, 3]
    assert lookup_draft(np.array([1, 2, 3, 4]), max_ngram=3, num_draft=5) == []
    assert lookup_draft(np.array([6, 6]), max_ngram=3, num_draft=5) == [6]


@pytest.mark.parametrize("options", [{}, {"max_ngram": 1, "num_draft": 3}])
def test_pld_is_lossless_on_tiny_models(tiny_model, options):
    vanilla = get("vanilla")(tiny_model.runtime)
    pld = get("pld")(tiny_model.runtime, **options)
    drafted = 0
    for prompt in PROMPTS:
        ids = tiny_model.tokenizer.encode(prompt)
        expected = vanilla.generate(ids, 40, tiny_model.stop_ids)
        got = pld.generate(ids, 40, tiny_model.stop_ids)
        assert got.new_ids == expected.new_ids
        assert sum(got.accept_lengths) == len(got.new_ids)
        drafted += sum(got.draft_lengths)
    assert drafted > 0  # some steps did verify drafts


def oracle_drafts(pld, prompt_len, reference, wrong_at):
    """Replace PLD's lookup with drafts of vanilla's own next tokens; at draft depth `wrong_at[step]`
    the token is made wrong. Returns the expected accept_lengths."""
    state = {"step": 0}

    def draft(tokens):
        produced = len(tokens) - prompt_len
        drafts = list(reference[produced:produced + 4])
        depth = wrong_at[state["step"] % len(wrong_at)]
        if depth is not None and depth < len(drafts):
            drafts[depth] = (drafts[depth] + 1) % 200 + 4
        state["step"] += 1
        return drafts

    pld.draft = draft
    expected, produced, step = [1], 1, 0
    while produced < len(reference):
        remaining = len(reference) - produced
        drafts = min(4, len(reference) - produced, remaining - 1)
        depth = wrong_at[step % len(wrong_at)]
        accepted = drafts if depth is None or depth >= drafts else depth
        expected.append(accepted + 1)
        produced += accepted + 1
        step += 1
    return expected


@pytest.mark.parametrize("name", ["tiny-llama-random", "tiny-gemma3-random"])
def test_oracle_drafts_are_accepted_with_exact_lengths(name):
    model = tiny(name)
    ids = model.tokenizer.encode(PROMPTS[1])
    reference = get("vanilla")(model.runtime).generate(ids, 30, []).new_ids
    pld = get("pld")(model.runtime, num_draft=4)
    expected = oracle_drafts(pld, len(ids), reference, wrong_at=[None, 0, 2, None, 1, 3])
    got = pld.generate(ids, 30, [])
    assert got.new_ids == reference
    assert got.accept_lengths == expected
    assert max(expected) == 5


@pytest.mark.slow
def test_pld_on_the_embedded_model(embedded, questions_file):
    """Lossless on a multi-turn prompt, a prompt longer than the sliding window and a repetitive
    one; on the repetitive one real lookup drafts are accepted."""
    import json
    questions = [json.loads(line) for line in questions_file.open()]
    multi = next(q for q in questions if len(q["turns"]) == 2)
    article = next(q for q in questions if q["category"] == "summarization")
    vanilla, pld = get("vanilla")(embedded.runtime), get("pld")(embedded.runtime)
    repeat = "Count: one two three four five, one two three four five, one two three four five, one two"
    first_answer = embedded.tokenizer.decode(vanilla.generate(embedded.prompt_ids(multi["turns"][:1], []), 24,
                                                              embedded.stop_ids).new_ids).strip()
    prompts = [embedded.prompt_ids(multi["turns"], [first_answer]), embedded.prompt_ids(article["turns"], []),
               embedded.prompt_ids([repeat], [])]
    assert len(prompts[1]) > 512
    for ids in prompts:
        expected = vanilla.generate(ids, 32, embedded.stop_ids)
        got = pld.generate(ids, 32, embedded.stop_ids)
        assert got.new_ids == expected.new_ids
    assert max(got.accept_lengths) > 2  # the repetitive prompt's continuation was drafted and accepted
