"""fashionlab: fast, reproducible image classification on Fashion-MNIST."""

__version__ = "0.1.0"
