"""Merging queued token chunks of one request (what a replica sends when its reader lags)."""

from __future__ import annotations

from vllm.entrypoints.scale_out.token_in_token_out.protocol import (
    GenerateLogProbs,
    GenerateLogProbsContent,
    GenerateTokensStreamChoice,
)

from rayfleet.actors.replica.delta_stream import merge_chunks
from rayfleet.actors.replica.protocol import ReplicaChunk


def chunk(index, tokens, finish=None, logprobs=False, cached=None):
    lp = GenerateLogProbs(content=[GenerateLogProbsContent(token_id=t, logprob=-1.0) for t in tokens]) if logprobs else None
    return ReplicaChunk(choices=[GenerateTokensStreamChoice(index=index, token_ids=tokens, finish_reason=finish,
                                                            logprobs=lp)], num_cached_tokens=cached)


def test_tokens_and_logprobs_concatenate_and_the_last_finish_wins():
    merged = merge_chunks(chunk(0, [1, 2], logprobs=True, cached=7), chunk(0, [3], "length", logprobs=True))
    [choice] = merged.choices
    assert choice.token_ids == [1, 2, 3] and choice.finish_reason == "length"
    assert [e.token_id for e in choice.logprobs.content] == [1, 2, 3]
    assert merged.num_cached_tokens == 7


def test_choices_of_n_stay_separate_and_ordered():
    merged = merge_chunks(chunk(1, [5]), merge_chunks(chunk(0, [4]), chunk(1, [6])))
    assert [(c.index, c.token_ids) for c in merged.choices] == [(0, [4]), (1, [5, 6])]


def test_merging_leaves_the_inputs_unchanged():
    first = chunk(0, [1])
    merge_chunks(first, chunk(0, [2]))
    assert first.choices[0].token_ids == [1]
