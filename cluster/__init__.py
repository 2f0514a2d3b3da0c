"""The control plane: everything between a client and the workers.

Rooms, and what each may import (tests/test_layout.py keeps the direction):

    api/         public front ends (gRPC, OpenAI HTTP), one request validation, responses, text
    scheduling/  the step scheduler and the pure parts under it: rows, rounds, drafting,
                 pipelining, policies, admission. Imports no ray, grpc or torch.
    transport/   how the scheduler reaches workers: gRPC clients, worker pools (imports scheduling)
    routing/     the router: api + scheduling + transport over gRPC workers, one scheduler per
                 target; the ingress's forwarding router; local server processes
    observability/  the metric catalogue and recorders (pure; the Serve room exports them)
    serve/       the Ray Serve application: deployments, the builder, ports (wires everything)
    config.py    the one validated cluster configuration (used by routing, serve and the CLI);
                 config_sections.py its operations sections (autoscaling, security, workers)
    engine.py    the in-process engine: the same scheduler with in-process workers
    cli/         `specdec`
"""
