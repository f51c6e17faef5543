"""The declarative fleet spec: what pools of which models run where, and which policies steer them.

A `FleetSpec` is read from YAML and validated with pydantic. Errors are re-raised as `SpecError` whose
message names the field path (`pools[1].max_replicas`) and, for enumerations, the allowed values, so a
user can fix a spec without reading this file.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayfleet.actors.kv.store_config import KVStoreConfig
from rayfleet.actors.observability.tracing import TracingConfig
from rayfleet.control_plane import llm_config

POOL_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
RESERVED_MODEL_NAMES = {"auto"}
ROLLOUT_WEIGHT_BACKEND = "rayfleet_object_store"  # actors/rl/weight_transfer.py registers it with vLLM
ROLLOUT_LOGPROBS_MODE = "processed_logprobs"  # a rollout's logprobs: of the sampling distribution


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

    # The JSON Schema (the Helm chart's values schema) admits Ray Serve LLM's keys too.
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=llm_config.add_to_json_schema)

    name: str
    model: str = Field(description="Local model directory or Hugging Face id.")
    served_model_name: str | None = None
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed through to vLLM's AsyncEngineArgs."
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the replica actors.")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env of the replica actors (pip, working_dir, env_vars...); "
        "`env` is merged into its env_vars.")
    log_engine_metrics: bool = Field(
        True, description="Export vLLM's engine metrics through Ray's metrics endpoint (vLLM's RayPrometheusStatLogger).")
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
    kv_store_priced: bool | None = Field(
        None, description="Override of kv_store.priced for this pool's engines (false: every request with blocks "
        "beyond its local prefix hit asks the store, whatever the price). None: the fleet's kv_store.priced.",
    )
    kv_store_lookup_ahead: bool | None = Field(
        None, description="Override of kv_store.lookup_ahead for this pool's engines. None: the fleet's.",
    )
    kv_store_access: Literal["read_write", "read_only", "write_only"] | None = Field(
        None, description="Override of kv_store.access for this pool's engines: 'read_only' loads what other pools "
        "put and puts nothing, 'write_only' puts and never looks up. None: the fleet's kv_store.access.",
    )
    kv_store_namespace: str | None = Field(
        None, min_length=1, description="Hash namespace of this pool's blocks in the KV store. Pools sharing one "
        "must produce identical KV bytes for identical tokens (same model, dtype, KV layout, block size, "
        "parallelism). None: derived by the engine from exactly those.",
    )
    rollout: bool = Field(
        False, description="An RL rollout pool: its replicas take weight updates from an RL job (vLLM's weight-"
        "update API; engine_args.weight_transfer_config defaults to rayfleet's object-store backend, "
        "engine_args.logprobs_mode to processed_logprobs: after temperature, as the trainer's ratio needs) and never "
        "live-migrate (a rollout's logprobs must come from the engine that sampled it).",
    )

    @model_validator(mode="before")
    @classmethod
    def _rollout_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("rollout"):
            return data
        if data.get("live_migration"):
            raise ValueError("a rollout pool cannot use live_migration")
        # vLLM returns raw logprobs (before temperature, top-k/top-p) unless told otherwise; the trainer's
        # importance ratio needs the distribution the engine sampled from.
        engine_args = {"weight_transfer_config": {"backend": ROLLOUT_WEIGHT_BACKEND},
                       "logprobs_mode": ROLLOUT_LOGPROBS_MODE, **(data.get("engine_args") or {})}
        return {**data, "live_migration": False, "engine_args": engine_args}

    @model_validator(mode="before")
    @classmethod
    def _from_llm_config_vocabulary(cls, data: Any) -> Any:
        """Ray Serve LLM's LLMConfig keys (see `llm_config.py`) become rayfleet's fields."""
        return llm_config.translate(data) if llm_config.uses_llm_config(data) else data

    @classmethod
    def from_llm_config(cls, config: Any, **overrides: Any) -> PoolSpec:
        """A pool from a `ray.serve.llm.LLMConfig` (or its dict), plus rayfleet fields such as `tags`."""
        data = config.model_dump(exclude_unset=True) if hasattr(config, "model_dump") else dict(config)
        try:
            return cls.model_validate({**data, **overrides})
        except ValidationError as error:
            raise SpecError(format_validation_error(error)) from None

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

    def engine_kv_store(self, fleet_store: KVStoreConfig | None) -> KVStoreConfig | None:
        """The fleet's KV store as this pool's engines use it (its per-pool overrides applied); None: no store."""
        if fleet_store is None or not self.use_kv_store:
            return None
        overrides = {"priced": self.kv_store_priced, "access": self.kv_store_access,
                     "lookup_ahead": self.kv_store_lookup_ahead}
        return fleet_store.model_copy(update={key: value for key, value in overrides.items() if value is not None})


class APIKeySpec(Strict):
    """One credential. Give the key itself (`key`) or, better, only its SHA-256 (`sha256`, hex): the ingress
    keeps digests only, so a spec that carries none of the keys is safe to store and to show."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                      description="The tenant this key belongs to: request ids and status are scoped by it.")
    key: str | None = Field(None, min_length=16, description="The key in clear (at least 16 characters).")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the key, lowercase hex.")
    role: Literal["user", "admin"] = Field(
        "user", description="admin: may also call /v1/fleet/scale|migrate|drain and see fleet-wide status.")
    allow_priority: bool = Field(False, description="May set the request field `priority` (admins always may).")

    @model_validator(mode="after")
    def _one_secret(self) -> APIKeySpec:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of 'key' or 'sha256'")
        return self


class RequestLimitsSpec(Strict):
    """Bounds on one request, checked at the ingress before anything reaches an engine (400, or 413 for the
    body). None: the model's own bound (context length) is the only one."""

    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_json_depth: int = Field(32, ge=4, description="Nesting depth of the JSON body.")
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="Largest `max_tokens` (or `max_completion_tokens`).")
    max_n: int = Field(16, ge=1, description="Largest `n` (choices per prompt).")
    max_prompts: int = Field(64, ge=1, description="Most prompts in one /v1/completions request.")


class IngressSpec(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int | None = Field(None, ge=1, le=65535)
    auth: Literal["api_keys", "none"] = Field(
        "api_keys", description="api_keys: every request needs a key (the ingress refuses to start without one). "
        "none: anyone who reaches the port may use every route, the admin ones included; say so on purpose.")
    api_keys: list[str | APIKeySpec] = Field(
        default_factory=list, description="User keys; a plain string is a user key in clear.")
    api_keys_env: str | None = Field(
        None, description="Name of an environment variable holding comma-separated user API keys (e.g. from a "
        "Secret). Set but empty or missing at start-up: the ingress refuses to start.")
    admin_keys_env: str | None = Field(
        None, description="Name of an environment variable holding comma-separated admin API keys.")
    limits: RequestLimitsSpec = Field(default_factory=RequestLimitsSpec)
    num_replicas: int = Field(1, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    chunk_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for a request's next token chunk (queueing and prefill included) "
        "before the ingress treats its replica as hung and replays the request elsewhere.")
    replay_wait_s: float = Field(
        300.0, ge=0, description="How long a request whose replica died waits for another replica of its pool "
        "(e.g. the replacement) before it fails; also how long the ingress routes on its last view while the "
        "controller restarts.")
    max_replays: int = Field(3, ge=0, description="Replays of one request after replica failures.")
    view_stale_s: float = Field(
        1.0, ge=0, description="Oldest routing view (the controller's snapshot of replicas and their load) a "
        "request is routed on while a fresh one is fetched in the background; an older view is fetched first, "
        "which costs that request a round trip to the controller (4-8 ms on a 2-core machine). 0: every request "
        "arriving more than 0.25 s after the last fetch waits for a fresh view.")
    local_deltas: bool = Field(
        True, description="Take token deltas from replicas on the ingress' own node over a local ZMQ socket "
        "(ipc, in a directory only its user may enter) instead of as Ray stream items, which cost several times "
        "the CPU per message (docs/benchmarks-serving.md), and start requests there over a second such socket "
        "instead of an actor call. The Ray stream stays open for liveness; replicas on other nodes always stream "
        "and take requests over Ray.")
    direct_ingress: Literal["auto", "on", "off"] = Field(
        "auto", description="Serve's direct ingress: the ingress replica serves HTTP itself, without the hop "
        "through Serve's proxy (about a third less CPU per output token, docs/benchmarks-serving.md). Ray must "
        "start with it, so it applies where rayfleet starts Ray (`rayfleet up` without a cluster, `rayfleet "
        "demo`). auto: on with one ingress replica and no gRPC port; on: the same, a config error otherwise; "
        "off: Serve's proxy.")

    @model_validator(mode="after")
    def _direct_ingress_fits(self) -> "IngressSpec":
        if self.direct_ingress == "on" and not self.direct_ingress_fits:
            raise ValueError("direct_ingress 'on' needs num_replicas 1 and no grpc_port (each ingress replica "
                             "would listen on a port of its own, with nothing in front); use 'auto' or 'off'")
        return self

    @property
    def direct_ingress_fits(self) -> bool:
        return self.num_replicas == 1 and self.grpc_port is None

    @property
    def uses_direct_ingress(self) -> bool:
        return self.direct_ingress != "off" and self.direct_ingress_fits

    def key_entries(self) -> list[APIKeySpec]:
        """The inline keys as digests only; a plain string is the user key of tenant `key<index>`."""
        entries = []
        for index, entry in enumerate(self.api_keys):
            if isinstance(entry, str):
                entry = APIKeySpec(name=f"key{index}", sha256=key_digest(entry))
            elif entry.key is not None:
                entry = entry.model_copy(update={"key": None, "sha256": key_digest(entry.key)})
            entries.append(entry)
        return entries


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
    stall_timeout_s: float = Field(
        30.0, gt=0, description="A replica whose engine has requests but completed no step for this long is "
        "unhealthy (a hung or stopped engine core), and is replaced.")
    migration_timeout_s: float = Field(
        120.0, gt=0, description="Longest a live migration may take before the controller stops waiting for it.")


class FleetSpec(Strict):
    name: str = "rayfleet"
    pools: list[PoolSpec] = Field(min_length=1)
    ingress: IngressSpec = Field(default_factory=IngressSpec)
    policies: PoliciesSpec = Field(default_factory=PoliciesSpec)
    health: HealthSpec = Field(default_factory=HealthSpec)
    state_store: str = Field(
        "memory://", description="redis://host:port/db, or memory:// (embedded): kept in the controller's process "
        "only. With memory:// a restarted controller re-adopts its replicas from Ray's actor names but forgets "
        "runtime scaling (desired counts fall back to the spec) and the migration history, and nothing survives "
        "a restart of the Ray cluster.")
    kv_store: KVStoreConfig | None = Field(
        None, description="A fleet-wide KV block store shared by every replica of pools with use_kv_store: "
        "prefix reuse across replicas and offload. None: no store.",
    )
    tracing: TracingConfig | None = Field(
        None, description="OpenTelemetry tracing of every request (OTLP export); None: off.")
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

    def with_key_digests(self) -> FleetSpec:
        """This spec with its inline API keys replaced by their SHA-256: all the ingress needs to check them."""
        return self.model_copy(update={"ingress": self.ingress.model_copy(
            update={"api_keys": self.ingress.key_entries()})})

    def without_secrets(self) -> FleetSpec:
        """This spec with every credential replaced: API keys by their SHA-256, the state store's password by
        `***`. What is stored and shown."""
        return self.with_key_digests().model_copy(update={"state_store": redact_url(self.state_store)})


def key_digest(key: str) -> str:
    """How keys are kept: SHA-256, lowercase hex (keys are random secrets, so no salt or stretching is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def redact_url(url: str) -> str:
    """A URL with its password (and a user name standing alone as the credential) replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None and not (parts.username and parts.scheme.startswith(("redis", "rediss"))):
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***" if parts.password is not None and parts.username else "***"
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


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


def read_yaml(path: Path, what: str = "fleet spec") -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{what} not found: {path}") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None


def load_spec(path: str | Path) -> FleetSpec:
    path = Path(path)
    spec = parse_spec(read_yaml(path))
    pools = [pool.model_copy(update={"model": _resolve_path(pool.model, path.parent, f"pools[{pool.name}].model")})
             for pool in spec.pools]
    # Policy parameters that are paths (e.g. the chimera router's table) resolve the same way, here, because
    # the policies run in other processes (the ingress, the controller) that have neither the variables nor
    # the spec's folder.
    policies = {kind: ref.model_copy(update={"params": {
        key: _resolve_path(value, path.parent, f"policies.{kind}.params.{key}")
        if isinstance(value, str) and ("$" in value or value.startswith(("./", "../"))) else value
        for key, value in ref.params.items()}})
        for kind in ("router", "admission", "scaler", "migration") if (ref := getattr(spec.policies, kind))}
    return spec.model_copy(update={"pools": pools, "policies": spec.policies.model_copy(update=policies)})


def _resolve_path(value: str, base: Path, field: str) -> str:
    """`$VARS` are expanded; `./x` and `../x` are relative to the spec file."""
    resolved = os.path.expandvars(value)
    if "$" in resolved:
        raise SpecError(f"{field}: environment variable not set in '{value}'")
    if resolved.startswith(("./", "../")):
        resolved = str((base / resolved).resolve())
    return resolved
