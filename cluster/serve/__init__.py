"""The Ray Serve application: draft, target and ingress deployments on their own pools.

app (`build_app`, the builder `serve deploy` imports), ports. It wires every other room together,
and is the only room that imports ray.
"""
