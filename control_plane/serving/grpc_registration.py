"""What Ray Serve's gRPC proxy imports to register vLLM's `VllmEngine` service: only the generated code.

The proxy must answer Serve's readiness check within seconds of starting; importing the servicer itself
(`grpc_servicer.py`: vLLM, the gateway, the router's dependencies) takes longer than that on a busy host, and
Serve then kills the proxy as unhealthy. So the proxy imports this module, and the ingress imports both.
"""

from __future__ import annotations

import sys

from smg_grpc_proto.generated import common_pb2, vllm_engine_pb2_grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as pb

# The generated messages name their module `vllm_engine_pb2` (protoc's flat layout), and Ray Serve pickles
# requests from its gRPC proxy to the ingress: both processes import this module, which makes that name
# importable before any message crosses.
sys.modules.setdefault("vllm_engine_pb2", pb)
sys.modules.setdefault("common_pb2", common_pb2)

GRPC_SERVICER_FUNCTIONS = ["rayfleet.control_plane.serving.grpc_registration:add_servicer_to_server"]


def add_servicer_to_server(servicer, server) -> None:
    """What Serve's gRPC proxy registers (`grpc_servicer_functions`): vLLM's VllmEngine service."""
    vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(servicer, server)
