"""Ray Serve LLM's `LLMConfig` vocabulary for a pool, so a Ray Serve LLM config moves over without renaming.

A pool in the fleet spec may be written with `LLMConfig`'s keys (`model_loading_config`, `engine_kwargs`,
`deployment_config.autoscaling_config`, `deployment_config.ray_actor_options`, `accelerator_type`,
`accelerator_config`, `runtime_env`, `log_engine_metrics`, `llm_engine`), in YAML or as a dict, or built from a
`ray.serve.llm.LLMConfig` object with `PoolSpec.from_llm_config`. They are translated to rayfleet's own
fields before validation. A key whose meaning rayfleet provides differently (Serve's per-deployment
autoscaler knobs, LoRA, custom placement groups) is refused with what to use instead, rather than accepted
and silently ignored.
"""

from __future__ import annotations

from typing import Any

# LLMConfig's top-level keys that this module translates.
LLM_CONFIG_KEYS = ("model_loading_config", "engine_kwargs", "deployment_config", "accelerator_type",
                   "accelerator_config", "llm_engine", "placement_group_config", "lora_config", "server_cls",
                   "experimental_configs", "callback_config")
# LLMConfig keys rayfleet has no counterpart for; their LLMConfig defaults (None or empty) are accepted.
UNSUPPORTED = {
    "placement_group_config": "a replica is one Ray actor with the pool's `resources`",
    "lora_config": "LoRA adapters are not served by rayfleet pools yet",
    "server_cls": "the replica is rayfleet's LLMReplica",
    "experimental_configs": "no experimental switches exist",
    "callback_config": "no engine callbacks exist",
}
# deployment_config keys with a fleet-level home in rayfleet.
DEPLOYMENT_ELSEWHERE = {
    "max_ongoing_requests": "policies.admission (e.g. queue_limit's max_in_flight_per_replica)",
    "health_check_period_s": "health.check_period_s", "health_check_timeout_s": "health.check_timeout_s",
    "graceful_shutdown_timeout_s": "health.drain_timeout_s",
}
ACTOR_OPTIONS = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type"}


class LLMConfigError(ValueError):
    """An LLMConfig key rayfleet cannot honour; the message names its path and what to use instead."""


def add_to_json_schema(schema: dict[str, Any]) -> None:
    """Declare LLMConfig's keys in a pool's JSON Schema (translated, not validated, by the schema)."""
    for key in LLM_CONFIG_KEYS:
        schema["properties"].setdefault(key, {"description": f"Ray Serve LLM's LLMConfig.{key} (llm_config.py)"})
    # A pool names its model either way: rayfleet's name + model, or LLMConfig's model_loading_config.
    schema["anyOf"] = [{"required": schema.pop("required")}, {"required": ["model_loading_config"]}]


def uses_llm_config(data: Any) -> bool:
    return isinstance(data, dict) and any(key in data for key in LLM_CONFIG_KEYS)


def translate(pool: dict[str, Any]) -> dict[str, Any]:
    """A pool written with LLMConfig keys -> the same pool in rayfleet's fields (rayfleet's keys pass through)."""
    out = {k: v for k, v in pool.items() if k not in LLM_CONFIG_KEYS}
    for key, instead in UNSUPPORTED.items():
        if pool.get(key) and not _is_default_callback(key, pool[key]):
            raise LLMConfigError(f"{key}: not supported ({instead}); remove it")
    if pool.get("llm_engine", "vLLM") != "vLLM":
        raise LLMConfigError(f"llm_engine: rayfleet runs vLLM engines only, got {pool['llm_engine']!r}")
    if "engine_kwargs" in pool:
        if "engine_args" in pool:
            raise LLMConfigError("engine_kwargs and engine_args name the same thing; keep one")
        out["engine_args"] = dict(pool["engine_kwargs"] or {})
    _model_loading(pool.get("model_loading_config"), out)
    resources = dict(out.pop("resources", {}) or {})
    _deployment(pool.get("deployment_config") or {}, out, resources)
    accelerator = pool.get("accelerator_type")
    if accelerator:
        resources.setdefault("accelerator_type", accelerator)
    kind = (pool.get("accelerator_config") or {}).get("kind", "gpu" if accelerator else None)
    if kind == "gpu" and "num_gpus" not in resources:
        # Ray Serve LLM reserves one GPU per tensor- and pipeline-parallel rank of the engine.
        engine = out.get("engine_args", {})
        resources["num_gpus"] = engine.get("tensor_parallel_size", 1) * engine.get("pipeline_parallel_size", 1)
    elif kind not in (None, "gpu", "cpu"):
        raise LLMConfigError(f"accelerator_config.kind: rayfleet runs on 'gpu' or 'cpu', got {kind!r}")
    if resources:
        out["resources"] = resources
    return out


def _model_loading(config: Any, out: dict[str, Any]) -> None:
    if config is None:
        return
    if not isinstance(config, dict) or "model_id" not in config:
        raise LLMConfigError("model_loading_config: needs at least model_id")
    unknown = set(config) - {"model_id", "model_source", "tokenizer_source"}
    if unknown:
        raise LLMConfigError(f"model_loading_config.{sorted(unknown)[0]}: unknown field")
    # model_id is what clients send (the pool's name); model_source is where the weights come from.
    _set_once(out, "name", config["model_id"], "model_loading_config.model_id")
    _set_once(out, "model", config.get("model_source") or config["model_id"], "model_loading_config.model_source")
    if config.get("tokenizer_source"):
        out.setdefault("engine_args", {})["tokenizer"] = config["tokenizer_source"]


def _deployment(config: dict[str, Any], out: dict[str, Any], resources: dict[str, Any]) -> None:
    for key, value in config.items():
        if key == "autoscaling_config":
            _autoscaling(value or {}, out)
        elif key == "num_replicas":
            if not isinstance(value, int):
                raise LLMConfigError("deployment_config.num_replicas: rayfleet needs a number (a fixed-size pool); "
                                     "use autoscaling_config.min_replicas/max_replicas for a range")
            for name in ("min_replicas", "max_replicas", "initial_replicas"):
                _set_once(out, name, value, "deployment_config.num_replicas")
        elif key == "ray_actor_options":
            for option, setting in (value or {}).items():
                if option == "runtime_env":
                    _set_once(out, "runtime_env", setting, "deployment_config.ray_actor_options.runtime_env")
                elif option in ACTOR_OPTIONS:
                    name = "memory_gb" if option == "memory" else "custom" if option == "resources" else option
                    resources[name] = setting / 2**30 if option == "memory" else setting
                else:
                    raise LLMConfigError(f"deployment_config.ray_actor_options.{option}: not supported; "
                                         f"a replica takes {', '.join(sorted(ACTOR_OPTIONS | {'runtime_env'}))}")
        elif key in DEPLOYMENT_ELSEWHERE:
            raise LLMConfigError(f"deployment_config.{key}: set fleet-wide in rayfleet, as {DEPLOYMENT_ELSEWHERE[key]}")
        elif key != "name":
            raise LLMConfigError(f"deployment_config.{key}: not supported by rayfleet pools")


def _autoscaling(config: dict[str, Any], out: dict[str, Any]) -> None:
    for key, value in config.items():
        if key in ("min_replicas", "max_replicas", "initial_replicas"):
            _set_once(out, key, value, f"deployment_config.autoscaling_config.{key}")
        else:
            # Serve's per-deployment autoscaler knobs (target_ongoing_requests, delays, smoothing...).
            raise LLMConfigError(f"deployment_config.autoscaling_config.{key}: rayfleet scales pools with the "
                                 "fleet's scaler policy (policies.scaler, e.g. tokens_in_flight); keep min_replicas "
                                 "and max_replicas here and remove this key")


def _set_once(out: dict[str, Any], key: str, value: Any, source: str) -> None:
    if key in out and out[key] != value:
        raise LLMConfigError(f"{source} ({value!r}) conflicts with {key} ({out[key]!r}); keep one")
    out[key] = value


def _is_default_callback(key: str, value: Any) -> bool:
    """LLMConfig dumps its default callback config (the no-op base class) even when unset."""
    return key == "callback_config" and not (value or {}).get("callback_kwargs") and \
        getattr((value or {}).get("callback_class"), "__name__", "CallbackBase") == "CallbackBase"
