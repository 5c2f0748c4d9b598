"""Site-level differential privacy for the aggregated model (DP-FedAvg style, docs/privacy.md).

settings.py says what a round asks for (clip norm, noise multiplier, delta, budget);
ledger.py carries what a model has already released through its chain and turns it into
epsilon with a maintained accountant (dp-accounting); mechanism.py is the clipping and the
Gaussian noise, pure numpy.
"""
