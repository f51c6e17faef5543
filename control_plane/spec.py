"""The declarative fleet spec: what pools of which models run where, and which policies steer them.

A `FleetSpec` is read from YAML and validated with pydantic. Errors are re-raised as `SpecError` whose
message names the field path (`pools[1].max_replicas`) and, for enumerations, the allowed values, so a
user can fix a spec without reading this file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayfleet.actors.kv.store_config import KVStoreConfig

POOL_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
RESERVED_MODEL_NAMES = {"auto"}


class SpecError(ValueError):
    """A fleet spec that cannot be used; the message names every offending field path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourcesSpec(Strict):
    """Ray resources one replica reserves (its engine runs inside the replica's actor process tree)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type, e.g. H100, L4 (ray.util.accelerators)."
    )
    memory_gb: float | None = Field(None, gt=0)
    custom: dict[str, float] = Field(default_factory=dict, description="Extra Ray custom resources.")


class PoolSpec(Strict):
    """A pool of identical replicas of one model; `name` is the `model` clients ask for."""

    name: str
    model: str = Field(description="Local model directory or Hugging Face id.")
    served_model_name: str | None = None
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed through to vLLM's AsyncEngineArgs."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the replica actors.")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    tags: dict[str, str] = Field(
        default_factory=dict, description="Free-form labels for policies: cost, latency_class, quality."
    )
    live_migration: bool = Field(
        True, description="Install rayfleet's KV connector so requests can move between replicas with their KV."
    )
    use_kv_store: bool = Field(
        True, description="When the fleet has a kv_store: load prompt prefixes other replicas computed from it, "
        "and put this pool's computed blocks into it (prefix reuse and offload)."
    )
    role: Literal["both", "prefill", "decode"] = Field(
        "both", description="Prefill/decode disaggregation: 'prefill' replicas compute a request's first token "
        "and hand it with its KV to a 'decode' pool; 'both' (default) does everything.",
    )
    prefill_pool: str | None = Field(
        None, description="For a 'decode' pool: the 'prefill' pool whose replicas prefill this pool's requests "
        "(with the prefill_decode router). Same model and KV layout as this pool.",
    )
    kv_store_namespace: str | None = Field(
        None, min_length=1, description="Hash namespace of this pool's blocks in the KV store. Pools sharing one "
        "must produce identical KV bytes for identical tokens (same model, dtype, KV layout, block size, "
        "parallelism). None: derived by the engine from exactly those.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_dns_label(cls, name: str) -> str:
        if not POOL_NAME.match(name):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-' (at most 63), e.g. 'qwen-7b'")
        if name in RESERVED_MODEL_NAMES:
            raise ValueError(f"'{name}' is reserved: clients send model='auto' to let the router choose")
        return name

    @model_validator(mode="after")
    def _replica_bounds(self) -> PoolSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        start = self.start_replicas
        if not self.min_replicas <= start <= self.max_replicas:
            raise ValueError(f"initial_replicas ({start}) must lie in [min_replicas, max_replicas]")
        return self

    @property
    def start_replicas(self) -> int:
        return self.min_replicas if self.initial_replicas is None else self.initial_replicas


class IngressSpec(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int | None = Field(None, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="Empty: no authentication.")
    api_keys_env: str | None = Field(
        None, description="Name of an environment variable holding comma-separated API keys (e.g. from a Secret)."
    )
    num_replicas: int = Field(1, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)


class PolicyRef(Strict):
    """A policy plugin by entry-point name, with keyword parameters for its constructor."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class PoliciesSpec(Strict):
    router: PolicyRef = PolicyRef(name="least_load")
    admission: PolicyRef = PolicyRef(name="queue_limit")
    scaler: PolicyRef = PolicyRef(name="static")
    migration: PolicyRef = PolicyRef(name="none")
    tick_s: float = Field(1.0, gt=0, description="Period of the controller's policy loop.")


class HealthSpec(Strict):
    check_period_s: float = Field(2.0, gt=0)
    check_timeout_s: float = Field(10.0, gt=0)
    start_timeout_s: float = Field(600.0, gt=0)
    drain_timeout_s: float = Field(300.0, gt=0)


class FleetSpec(Strict):
    name: str = "rayfleet"
    pools: list[PoolSpec] = Field(min_length=1)
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    policies: PoliciesSpec = Field(default_factory=PoliciesSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    state_store: str = Field("memory://", description="memory:// (embedded) or redis://host:port/db")
    kv_store: KVStoreConfig | None = Field(
        None, description="A fleet-wide KV block store shared by every replica of pools with use_kv_store: "
        "prefix reuse across replicas and offload. None: no store.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("state_store")
    @classmethod
    def _known_store(cls, url: str) -> str:
        if not (url == "memory://" or url.startswith(("redis://", "rediss://", "unix://"))):
            raise ValueError("allowed: 'memory://', 'redis://host:port/db', 'rediss://...', 'unix://path'")
        return url

    @model_validator(mode="after")
    def _unique_pool_names(self) -> FleetSpec:
        names = [pool.name for pool in self.pools]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"pool names must be unique; repeated: {', '.join(duplicates)}")
        return self

    @model_validator(mode="after")
    def _prefill_pools_match(self) -> FleetSpec:
        pools = {pool.name: pool for pool in self.pools}
        for i, pool in enumerate(self.pools):
            if pool.prefill_pool is None:
                continue
            prefill = pools.get(pool.prefill_pool)
            where = f"pools[{i}].prefill_pool"
            if pool.role != "decode":
                raise ValueError(f"{where}: only a pool with role 'decode' names a prefill pool (role is '{pool.role}')")
            if prefill is None:
                raise ValueError(f"{where}: no pool named '{pool.prefill_pool}'; pools: {', '.join(pools)}")
            if prefill.role == "decode":
                raise ValueError(f"{where}: '{prefill.name}' has role 'decode'; a prefill pool has role 'prefill' or 'both'")
            if not (prefill.live_migration and pool.live_migration):
                raise ValueError(f"{where}: the handoff is a live migration; both pools need live_migration: true")
            kv_args = ("dtype", "kv_cache_dtype", "block_size")
            if prefill.model != pool.model or any(prefill.engine_args.get(a) != pool.engine_args.get(a) for a in kv_args):
                raise ValueError(f"{where}: '{prefill.name}' must serve the same model with the same "
                                 f"{', '.join(kv_args)} (KV blocks are copied as they are)")
        return self

    def pool(self, name: str) -> PoolSpec:
        for pool in self.pools:
            if pool.name == name:
                return pool
        raise KeyError(name)


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"]).lstrip(".")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{path or '<spec>'}: {message}")
    return "invalid fleet spec:\n  " + "\n  ".join(lines)


def parse_spec(data: Any) -> FleetSpec:
    try:
        return FleetSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(format_validation_error(error)) from None


def load_spec(path: str | Path) -> FleetSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"fleet spec not found: {path}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    spec = parse_spec(data)
    return spec.model_copy(update={"pools": [_resolve_model_path(pool, path.parent) for pool in spec.pools]})


def _resolve_model_path(pool: PoolSpec, base: Path) -> PoolSpec:
    """`$VARS` in a model path are expanded; `./x` and `../x` are relative to the spec file."""
    model = os.path.expandvars(pool.model)
    if "$" in model:
        raise SpecError(f"pools[{pool.name}].model: environment variable not set in '{pool.model}'")
    if model.startswith(("./", "../")):
        model = str((base / model).resolve())
    return pool.model_copy(update={"model": model})
