"""Content addresses of KV-cache blocks: one chained hash per full block of a token prefix.

A block's hash covers its parent's hash and its own tokens, so it fingerprints the whole prefix that ends
at that block, exactly as vLLM's prefix cache does (`vllm/v1/core/kv_cache_utils.py`, `hash_block_tokens`).
The chain starts from a root derived from a *namespace* naming the model and KV layout, so two models (or
two layouts of one model) never address the same entry even for identical tokens.

Why not call vLLM's `hash_block_tokens`: it is usable standalone only with an explicit parent (the first
block otherwise reads the module global `NONE_HASH`, seeded from `PYTHONHASHSEED` when that is set, or at
random for xxhash), and it is stable across processes only with `sha256_cbor`. Its byte format is an
internal of vLLM that changed between releases, while these hashes are a contract between every process
sharing a store (GPU and CPU builds, two vLLM versions during a rolling upgrade) and name files that
outlive the processes. Importing it also costs ~7 s (it pulls `vllm.config`). So the format is owned
here, versioned by `_FORMAT`, and needs only `hashlib`: sha256 over fixed-width little-endian bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NewType

import numpy as np

# 32 bytes of sha256; the same name and representation (bytes) as vLLM's `BlockHash`.
BlockHash = NewType("BlockHash", bytes)

# Bump when the byte layout below changes: every old entry then simply misses instead of aliasing.
_FORMAT = b"rayfleet.kv-block-hash.v1\x00"


def namespace_root(namespace: str) -> BlockHash:
    """The parent hash of a namespace's first block."""
    if not namespace:
        raise ValueError("namespace must name the model and KV layout; it is empty")
    return BlockHash(hashlib.sha256(_FORMAT + namespace.encode()).digest())


def block_hashes(token_ids: Sequence[int], block_size: int, namespace: str,
                 parent: BlockHash | None = None) -> list[BlockHash]:
    """Chained hashes of every full block of `token_ids`; a partial trailing block gets none.

    hash[i] = sha256(hash[i-1] || tokens of block i as little-endian uint32), hash[-1] = namespace_root.
    The parent is always 32 bytes, so the encoding is unambiguous without separators. With `parent` (the hash
    of the block before `token_ids`), the chain continues from it: a growing sequence hashes only its new blocks.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    # uint32 holds every vocabulary; numpy raises OverflowError on a negative or larger id.
    tokens = np.asarray(token_ids, dtype="<u4")
    if parent is None:
        parent = namespace_root(namespace)
    hashes: list[BlockHash] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = BlockHash(hashlib.sha256(parent + tokens[start : start + block_size].tobytes()).digest())
        hashes.append(parent)
    return hashes
