"""cifarlab: train, evaluate, explain and serve CNN image classifiers for CIFAR-10 and datasets like it."""

__version__ = "0.1.0"
