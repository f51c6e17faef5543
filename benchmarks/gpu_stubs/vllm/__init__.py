"""Stand-in for vLLM on the GPU machine (see benchmarks/gpu_stubs/README.md)."""
