"""Public front ends: the gRPC SpecDecode service, the OpenAI-compatible HTTP API, the one request
validation both share, the response messages and incremental text.

grpc_service (SpecDecode over anything with the router's face), validation (a GenerateRequest
checked: one rule set for every API), response_stream (a stream's final message: finish reason,
usage, stats), text_stream (incremental detokenization with stop strings), http_app (the FastAPI
app of the Serve ingress), openai_requests / openai_responses / openai_errors / openai_fields /
openai_models (OpenAI JSON <-> the public proto, pure translation).

May import: cluster.scheduling (rows, rounds, policy names), workers' plain value types, protos.
Never: cluster.transport, cluster.routing, cluster.serve, ray.
"""
