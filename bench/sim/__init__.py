"""A discrete-event swarm simulator that drives the real policy code (docs/simulation.md).

``python -m bench.sim validate`` reproduces the loopback benchmark; ``python -m bench.sim fleet``
runs heterogeneous fleets of 1,000+ nodes.
"""
