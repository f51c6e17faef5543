"""KV beyond one engine: rayfleet's vLLM KV connector (scheduler and worker halves, run inside vLLM's
processes), its worker RPCs and the engine-level migration API, and the fleet KV store (shard actors, tiers,
block hashing). Every byte this package moves goes through `rayfleet.kernels`."""
