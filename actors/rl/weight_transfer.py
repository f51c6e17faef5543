"""rayfleet's vLLM weight-transfer backend: a trainer's weights reach the engines through Ray's object store.

vLLM's own backends (`nccl`, `ipc`, `sparse_nccl`, ...) need CUDA; vLLM lets a deployment register its own
(`WeightTransferEngineFactory.register_engine`), and this module does, under the name `BACKEND`, from a vLLM
general plugin (entry point group `vllm.general_plugins`, which vLLM loads in every engine process). The engine
of a pool built with `weight_transfer_config={"backend": "rayfleet_object_store"}` is then driven through vLLM's
weight-update API unchanged (`LLMReplica.update_weights` does this):

    await engine.init_weight_transfer_engine(WeightTransferInitRequest({"ray_address": ..., "namespace": ...}))
    await engine.start_weight_update()
    await engine.update_weights(WeightTransferUpdateRequest({"store": NAME, "version": 3, "timeout_s": 30}))
    await engine.finish_weight_update(weight_version="3")

`update_weights` runs in the engine's worker process, which joins the Ray cluster at the init call: it asks the
named `WeightStore` actor (`weight_sync.py`) for the version's object ref and reads the arrays from the object
store (zero-copy on the same node), then loads them with the model's own `load_weights` inside vLLM's layerwise
reload (what vLLM's checkpoint-format backends do). The trainer puts each version into the object store once,
however many engines read it. Every wait is bounded by the update's `timeout_s`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from rayfleet.actors.engine_driver import join_cluster

logger = logging.getLogger("rayfleet.weight_transfer")

BACKEND = "rayfleet_object_store"


@dataclass
class ObjectStoreInitInfo(WeightTransferInitInfo):
    ray_address: str  # the cluster's GCS address: the worker process is not a Ray worker until it joins
    namespace: str  # where the weight store actor is named


@dataclass
class ObjectStoreUpdateInfo(WeightTransferUpdateInfo):
    store: str  # the WeightStore actor's name
    version: int
    timeout_s: float


class WeightsNotLoaded(RuntimeError):
    """An update that would leave some of the model's parameters on their old values."""


class ObjectStoreWeightTransferEngine(WeightTransferEngine[ObjectStoreInitInfo, ObjectStoreUpdateInfo]):
    init_info_cls = ObjectStoreInitInfo
    update_info_cls = ObjectStoreUpdateInfo
    supports_draft_weight_update = False

    def init_transfer_engine(self, init_info: ObjectStoreInitInfo) -> None:
        join_cluster(init_info.ray_address, init_info.namespace)
        self.namespace = init_info.namespace

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class ends with torch.accelerator.synchronize(), which has no device to wait for on the CPU;
        # loading here is synchronous on every device, so there is nothing to wait for anyway.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: ObjectStoreUpdateInfo) -> None:
        import ray

        store = ray.get_actor(update_info.store, namespace=self.namespace)
        [ref] = ray.get(store.get.remote(update_info.version), timeout=update_info.timeout_s)
        arrays: dict[str, Any] = ray.get(ref, timeout=update_info.timeout_s)
        # The arrays are read-only views of the object store; load_weights copies them into the parameters.
        loaded = self.model.load_weights((name, torch.from_numpy(array)) for name, array in arrays.items())
        if loaded is not None:
            missing = sorted({name for name, _ in self.model.named_parameters()} - set(loaded))
            if missing:
                raise WeightsNotLoaded(f"version {update_info.version} left {len(missing)} parameters on their old "
                                       f"values: {', '.join(missing[:5])}")
        logger.info("loaded weights of version %d (%d tensors)", update_info.version, len(arrays))

    def shutdown(self) -> None:
        """Nothing to release: the worker stays in the Ray cluster for the next update."""


def register() -> None:
    """vLLM general plugin: make `BACKEND` known to this process's weight-transfer factory (idempotent:
    vLLM may load plugins more than once per process)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "ObjectStoreWeightTransferEngine")
    except ValueError:  # "already registered"
        pass
