"""Fleet spec validation: every error names the field path and, where it applies, the allowed values."""

from __future__ import annotations

import pytest

from rayfleet.control_plane.spec import SpecError, load_spec, parse_spec

POOL = {"name": "small", "model": "/models/small"}


def error_of(data) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    return str(info.value)


def test_minimal_spec_gets_defaults():
    spec = parse_spec({"pools": [POOL]})
    assert spec.state_store == "memory://"
    assert spec.policies.router.name == "least_load"
    assert spec.pool("small").start_replicas == 1


def test_error_names_nested_field_path():
    message = error_of({"pools": [POOL, {**POOL, "name": "big", "max_replicas": 0}]})
    assert "pools[1].max_replicas" in message


def test_unknown_field_is_rejected_by_path():
    assert "pools[0].replicas: unknown field" in error_of({"pools": [{**POOL, "replicas": 3}]})


def test_min_above_max_is_explained():
    assert "min_replicas (3) exceeds max_replicas (2)" in error_of(
        {"pools": [{**POOL, "min_replicas": 3, "max_replicas": 2}]})


def test_state_store_lists_allowed_values():
    message = error_of({"pools": [POOL], "state_store": "postgres://x"})
    assert "state_store" in message and "redis://" in message and "memory://" in message


def test_log_level_lists_allowed_values():
    message = error_of({"pools": [POOL], "log_level": "LOUD"})
    assert "log_level" in message and "'DEBUG', 'INFO', 'WARNING' or 'ERROR'" in message


def test_pool_names_must_be_unique_and_not_auto():
    assert "repeated: small" in error_of({"pools": [POOL, POOL]})
    assert "reserved" in error_of({"pools": [{**POOL, "name": "auto"}]})


def test_no_pools_is_an_error():
    assert "pools" in error_of({"pools": []})


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("pools: [\n")
    with pytest.raises(SpecError, match="fleet.yaml: not valid YAML"):
        load_spec(path)


def test_model_paths_expand_variables_and_resolve_relative_to_the_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELS", "/opt/models")
    path = tmp_path / "fleet.yaml"
    path.write_text("pools:\n  - name: a\n    model: ${MODELS}/a\n  - name: b\n    model: ./b\n")
    spec = load_spec(path)
    assert spec.pool("a").model == "/opt/models/a"
    assert spec.pool("b").model == str(tmp_path / "b")


def test_unset_variable_in_model_path_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    path = tmp_path / "fleet.yaml"
    path.write_text("pools:\n  - name: a\n    model: ${NOT_SET_ANYWHERE}/a\n")
    with pytest.raises(SpecError, match="environment variable not set"):
        load_spec(path)


def test_shipped_examples_are_valid(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("RAYFLEET_DEMO_MODELS", "/models")
    examples = Path(__file__).resolve().parents[1] / "examples"
    specs = [p for p in examples.glob("*.yaml") if not p.name.startswith("values-")]
    assert len(specs) >= 2
    for path in specs:
        assert load_spec(path).pools


def test_kv_store_is_off_by_default_and_reuses_the_store_config():
    assert parse_spec({"pools": [POOL]}).kv_store is None
    spec = parse_spec({"pools": [{**POOL, "kv_store_namespace": "small|fp16"}],
                       "kv_store": {"name": "fleet-kv", "num_shards": 2, "memory_bytes": 1 << 28}})
    assert (spec.kv_store.num_shards, spec.pool("small").use_kv_store) == (2, True)
    assert spec.pool("small").kv_store_namespace == "small|fp16"


def test_kv_store_errors_name_the_field_path():
    assert "kv_store.disk_bytes" in error_of({"pools": [POOL], "kv_store": {"disk_bytes": 1 << 30}})


def test_a_pool_overrides_how_its_engines_use_the_fleets_kv_store():
    spec = parse_spec({"pools": [{**POOL, "kv_store_access": "read_only", "kv_store_priced": False},
                                 {**POOL, "name": "fills", "kv_store_access": "write_only"},
                                 {**POOL, "name": "default"}, {**POOL, "name": "none", "use_kv_store": False}],
                       "kv_store": {"name": "fleet-kv", "priced": True}})
    assert (spec.pool("small").engine_kv_store(spec.kv_store).access,
            spec.pool("small").engine_kv_store(spec.kv_store).priced) == ("read_only", False)
    assert spec.pool("fills").engine_kv_store(spec.kv_store).access == "write_only"
    assert spec.pool("default").engine_kv_store(spec.kv_store) == spec.kv_store
    assert spec.pool("none").engine_kv_store(spec.kv_store) is None
    assert "pools[0].kv_store_access" in error_of({"pools": [{**POOL, "kv_store_access": "read"}]})
    assert "read_only" in error_of({"pools": [{**POOL, "kv_store_access": "read"}]})


def test_a_ray_serve_llm_config_moves_over_as_a_pool():
    from ray.serve.llm import LLMConfig

    from rayfleet.control_plane.spec import PoolSpec

    config = LLMConfig(
        model_loading_config={"model_id": "qwen-0.5b", "model_source": "Qwen/Qwen2.5-0.5B-Instruct"},
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}},
        accelerator_type="L4", engine_kwargs={"tensor_parallel_size": 2, "max_model_len": 8192},
        runtime_env={"env_vars": {"HF_HOME": "/cache"}}, log_engine_metrics=False)
    pool = PoolSpec.from_llm_config(config, tags={"quality": "high"})
    assert (pool.name, pool.model) == ("qwen-0.5b", "Qwen/Qwen2.5-0.5B-Instruct")
    assert pool.engine_args == {"tensor_parallel_size": 2, "max_model_len": 8192}
    assert (pool.min_replicas, pool.max_replicas) == (1, 4)
    assert (pool.resources.accelerator_type, pool.resources.num_gpus) == ("L4", 2)  # one GPU per TP rank
    assert pool.runtime_env == {"env_vars": {"HF_HOME": "/cache"}}
    assert pool.log_engine_metrics is False and pool.tags == {"quality": "high"}


def test_llm_config_vocabulary_in_a_yaml_pool(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("pools:\n"
                    "  - model_loading_config: {model_id: tiny, model_source: ./models/tiny}\n"
                    "    accelerator_config: {kind: cpu}\n"
                    "    engine_kwargs: {dtype: float32}\n"
                    "    deployment_config:\n"
                    "      num_replicas: 2\n"
                    "      ray_actor_options: {num_cpus: 2, memory: 2147483648}\n")
    pool = load_spec(path).pool("tiny")
    assert pool.model == str(tmp_path / "models" / "tiny")
    assert (pool.min_replicas, pool.max_replicas, pool.start_replicas) == (2, 2, 2)
    assert (pool.resources.num_cpus, pool.resources.num_gpus, pool.resources.memory_gb) == (2, 0, 2)
    assert pool.engine_args == {"dtype": "float32"}


def test_an_llm_config_key_rayfleet_does_not_honour_is_refused_by_name():
    message = error_of({"pools": [{"model_loading_config": {"model_id": "m"}, "accelerator_config": {"kind": "cpu"},
                                   "deployment_config": {"autoscaling_config": {"target_ongoing_requests": 8}}}]})
    assert "pools[0]: deployment_config.autoscaling_config.target_ongoing_requests" in message
    assert "policies.scaler" in message
    assert "lora_config" in error_of({"pools": [{**POOL, "lora_config": {"max_num_adapters_per_replica": 2}}]})
    assert "keep one" in error_of({"pools": [{**POOL, "engine_args": {}, "engine_kwargs": {}}]})


def test_tracing_section_names_its_fields():
    spec = parse_spec({"pools": [POOL], "tracing": {"otlp_endpoint": "http://otel:4318/v1/traces"}})
    assert spec.tracing.protocol == "http/protobuf" and spec.tracing.sample_ratio == 1.0
    assert "tracing.protocol" in error_of({"pools": [POOL], "tracing": {"otlp_endpoint": "x", "protocol": "udp"}})


def test_prefill_decode_pools_must_match():
    prefill = {**POOL, "name": "pre", "role": "prefill"}
    decode = {**POOL, "name": "dec", "role": "decode", "prefill_pool": "pre"}
    spec = parse_spec({"pools": [prefill, decode]})
    assert spec.pool("dec").prefill_pool == "pre"
    assert "pools[1].prefill_pool: no pool named 'nope'" in error_of(
        {"pools": [prefill, {**decode, "prefill_pool": "nope"}]})
    assert "only a pool with role 'decode'" in error_of({"pools": [prefill, {**decode, "role": "both"}]})
    assert "same model" in error_of({"pools": [prefill, {**decode, "model": "/models/other"}]})
    assert "role: Input should be 'both', 'prefill' or 'decode'" in error_of({"pools": [{**POOL, "role": "x"}]})


def test_direct_ingress_is_on_by_default_only_where_one_port_serves_every_request():
    assert parse_spec({"pools": [POOL]}).ingress.uses_direct_ingress
    assert not parse_spec({"pools": [POOL], "ingress": {"num_replicas": 2}}).ingress.uses_direct_ingress
    assert not parse_spec({"pools": [POOL], "ingress": {"grpc_port": 9000}}).ingress.uses_direct_ingress
    assert not parse_spec({"pools": [POOL], "ingress": {"direct_ingress": "off"}}).ingress.uses_direct_ingress
    message = error_of({"pools": [POOL], "ingress": {"direct_ingress": "on", "num_replicas": 2}})
    assert "ingress" in message and "direct_ingress 'on' needs num_replicas 1" in message


def test_a_cluster_started_for_direct_ingress_refuses_a_spec_it_cannot_serve_naming_the_fields():
    from rayfleet.control_plane.cli.launch import check_serve_env, direct_ingress_env

    spec = parse_spec({"pools": [POOL], "ingress": {"port": 8100}})
    cluster = direct_ingress_env(spec.ingress)
    assert cluster["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8100" and check_serve_env(spec, cluster)
    assert not check_serve_env(spec, {})  # a cluster rayfleet did not start: Serve's proxy
    for ingress in ({"port": 8200}, {"port": 8100, "num_replicas": 2}, {"port": 8100, "direct_ingress": "off"}):
        with pytest.raises(SystemExit, match="direct ingress on port 8100.*rayfleet down --stop-ray"):
            check_serve_env(parse_spec({"pools": [POOL], "ingress": ingress}), cluster)
    with pytest.raises(SystemExit, match="ingress.direct_ingress is 'on'"):
        check_serve_env(parse_spec({"pools": [POOL], "ingress": {"direct_ingress": "on"}}), {})
