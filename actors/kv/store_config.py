"""Configuration of the fleet's KV store (`FleetSpec.kv_store`): names, shards, tier capacities.

Its own module, with nothing but pydantic, so that the fleet spec can validate it without importing Ray,
numpy or the store's actors.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

# Names that become actor names and path components.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class KVStoreConfig(BaseModel):
    """One store: its name (how replicas on any node find it), its shards and each shard's capacities."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("rayfleet-kv", pattern=_NAME, description="Shard actors are named <name>-shard-<i>.")
    # Fixed rather than the job's namespace, so drivers of other jobs find the named shards.
    ray_namespace: str = Field("rayfleet", pattern=_NAME, description="Ray namespace of the shard actors.")
    num_shards: int = Field(1, ge=1)
    memory_bytes: int = Field(1 << 30, gt=0, description="Host-memory tier capacity of each shard.")
    disk_dir: Path | None = Field(
        None, description="Absolute node-local directory (an SSD) on every node a shard may run on; None: no disk tier."
    )
    disk_bytes: int = Field(0, ge=0, validate_default=True, description="Disk tier capacity of each shard.")
    # Pinning creates a CUDA context on the node's first GPU in every shard process (518 MiB measured on
    # an H100), which vLLM may need: False keeps shards off GPUs.
    pin_memory: bool = Field(True, description="Page-lock the memory tier where CUDA is visible to the shard.")
    detached: bool = Field(False, description="Shards outlive the driver that created them (a fleet-wide store).")
    # Shards are memory- and I/O-bound: by default they take no CPU slot an engine could use.
    shard_num_cpus: float = Field(0.0, ge=0, description="Logical CPUs each shard reserves.")

    # How engines use the store (client side: engines with different values may share one store).
    async_loads: bool = Field(
        True, description="Look up and load off the engine's step (vLLM's async-load connector hooks): a request "
        "waits for its blocks in WAITING_FOR_REMOTE_KVS while the engine steps on. False: both block the step.")
    lookup_budget_s: float = Field(
        0.05, gt=0, description="Longest a request waits for its store lookup; then it is computed instead.")
    lookup_budget_per_block_s: float | None = Field(
        0.002, gt=0, description="Tighter wait for short hits: at most this per block the store could supply "
        "(about a block's prefill time), so a lookup never costs more than the compute it may save. None: "
        "lookup_budget_s alone.")
    lookup_grace_s: float = Field(
        0.01, ge=0, description="With async_loads: how long a schedule may wait for the lookups it starts (all of "
        "them together, and with a measured step time at most a tenth of a step), so that a lookup the store answers "
        "at once lets its request into this step instead of the next one. 0: never wait.")
    load_budget_s: float = Field(
        1.0, gt=0, description="Longest an async load may take; a slower (or dead) shard's blocks are recomputed.")
    lookup_ahead: bool = Field(
        True, description="With async_loads: ask the store as a request arrives, so that the answer is in by its "
        "first schedule (a request usually waits a step for it). False: the first schedule that considers the request "
        "asks, and waits up to lookup_grace_s for the answer. Not asked ahead: requests whose blocks the local cache "
        "already holds.")
    priced: bool = Field(
        True, description="With async_loads: each engine times its own steps and the loads it waits for, and asks "
        "the store only when the blocks it could bring take longer to prefill than the wait (a lookup costs at "
        "least a step). False: every request with blocks beyond its local prefix hit asks.")

    access: Literal["read_write", "read_only", "write_only"] = Field(
        "read_write", description="What engines do with the store (vLLM's kv_consumer / kv_producer roles): "
        "'read_only' engines load what others put and put nothing (every put costs host CPU on the engine's node: "
        "a gather, serializing, the shard's copy); 'write_only' engines put the blocks they compute and never look "
        "up (a pool that fills the store for others). 'read_write': both.")

    CLIENT_FIELDS: ClassVar[tuple[str, ...]] = ("async_loads", "lookup_budget_s", "lookup_budget_per_block_s",
                                                "lookup_grace_s", "lookup_ahead", "load_budget_s", "priced",
                                                "access")

    @field_validator("disk_dir")
    @classmethod
    def _disk_dir_is_absolute(cls, disk_dir: Path | None) -> Path | None:
        # A relative path would resolve against each Ray worker's own working directory.
        if disk_dir is not None and not disk_dir.is_absolute():
            raise ValueError(f"must be an absolute path, got {disk_dir}")
        return disk_dir

    @field_validator("disk_bytes")
    @classmethod
    def _disk_bytes_match_disk_dir(cls, disk_bytes: int, info: ValidationInfo) -> int:
        if "disk_dir" not in info.data:  # disk_dir failed its own validation, which names it
            return disk_bytes
        has_dir = info.data["disk_dir"] is not None
        if has_dir and disk_bytes == 0:
            raise ValueError("must be positive when disk_dir is set")
        if not has_dir and disk_bytes > 0:
            raise ValueError("needs disk_dir: a disk tier has no directory")
        return disk_bytes

    def shard_name(self, shard: int) -> str:
        return f"{self.name}-shard-{shard}"

    def shard_disk_dir(self, shard: int) -> Path | None:
        if self.disk_dir is None:
            return None
        return self.disk_dir / self.ray_namespace / self.name / f"shard-{shard}"
