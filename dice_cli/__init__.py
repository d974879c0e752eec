"""dice-cli: Data Influence CascadE (DICE) for decentralized learning.

``dice train`` simulates decentralized SGD and records a replayable run directory; later commands measure
how one node's data influences every other node over several hops of gossip.
"""
__version__ = "0.1.0"
