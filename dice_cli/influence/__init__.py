"""Influence of training units on node models (spec §2–§5).

units: which data is removed; replay: any round's state from checkpoints; gt: counterfactual re-simulation.
"""
