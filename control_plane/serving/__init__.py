"""The per-token data plane: the Ray Serve ingress (OpenAI HTTP, admin API, vLLM's gRPC protocol), rendering
and derendering with vLLM's classes, the token ledger, OpenAI error bodies, and the Serve app builder."""
