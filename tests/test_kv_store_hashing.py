"""Block hashes (content addresses) and shard routing: pure functions, no Ray."""

import os
import subprocess
import sys

from rayfleet.actors.kv.block_hash import block_hashes
from rayfleet.actors.kv.store import shard_of

TOKENS = list(range(1000, 1010))  # two full blocks of 4 and a partial block of 2
NAMESPACE = "tiny-llama|float32|LBHNC|bs4|tp0of1"


def test_same_tokens_give_same_hashes_in_another_process():
    script = (
        "from rayfleet.actors.kv.block_hash import block_hashes;"
        f"print(','.join(h.hex() for h in block_hashes({TOKENS}, 4, {NAMESPACE!r})))"
    )
    # A different PYTHONHASHSEED: Python's own hash() would differ, these must not.
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ",".join(h.hex() for h in block_hashes(TOKENS, 4, NAMESPACE))


def test_hash_format_is_frozen():
    # These digests are a contract with every store on disk and every process sharing a store: changing
    # the format must bump `_FORMAT` in kv_block_hash.py, and then this expectation.
    assert [h.hex()[:16] for h in block_hashes(TOKENS, 4, NAMESPACE)] == ["890cd6440c469985", "727cf488870a83f6"]


def test_a_partial_trailing_block_gets_no_hash():
    assert len(block_hashes(TOKENS, 4, NAMESPACE)) == 2
    assert block_hashes(TOKENS, 4, NAMESPACE) == block_hashes(TOKENS[:8], 4, NAMESPACE)
    assert block_hashes(TOKENS[:3], 4, NAMESPACE) == []


def test_another_namespace_changes_every_hash():
    ours = block_hashes(TOKENS, 2, NAMESPACE)
    theirs = block_hashes(TOKENS, 2, "other-model|bfloat16|LBNHC|bs2|tp0of1")
    assert all(a != b for a, b in zip(ours, theirs, strict=True))


def test_a_different_earlier_block_changes_every_later_hash():
    changed = [TOKENS[0] + 1, *TOKENS[1:]]
    assert all(a != b for a, b in zip(block_hashes(TOKENS, 2, NAMESPACE), block_hashes(changed, 2, NAMESPACE)))


def test_a_shared_prefix_shares_its_hashes():
    longer = block_hashes([*TOKENS[:8], 7, 7, 7, 7], 4, NAMESPACE)
    assert longer[:2] == block_hashes(TOKENS, 4, NAMESPACE)


def _many_hashes(n: int):
    return [h for i in range(n // 4) for h in block_hashes(range(i * 16, i * 16 + 16), 4, NAMESPACE)]


def test_shards_get_equal_shares_of_the_keys():
    hashes = _many_hashes(8000)
    counts = [sum(shard_of(h, 4) == shard for h in hashes) for shard in range(4)]
    assert all(abs(count - 2000) < 200 for count in counts), counts


def test_adding_a_shard_moves_only_the_new_shards_share():
    hashes = _many_hashes(8000)
    moved = [h for h in hashes if shard_of(h, 4) != shard_of(h, 5)]
    assert all(shard_of(h, 5) == 4 for h in moved)  # keys only move to the new shard
    assert abs(len(moved) / len(hashes) - 1 / 5) < 0.03
