"""LLMReplica: one vLLM engine in one Ray actor, its load statistics, the messages it speaks, and live
migration of its requests (source and destination sides)."""
