"""fashionlab: fast, reproducible image classification on Fashion-MNIST.

    import fashionlab as fl
    ds = fl.load_data()                              # verified arrays and class names
    run = fl.train(recipe="fast")                    # train, evaluate, write a run folder -> Run
    run.predict("shirt.png")                         # ranked labels and probabilities
    run.figures()                                    # curves, confusion, per-class, Grad-CAM, ...

The public names are listed in __all__ and documented in docs/api.md. They load on first use,
so `import fashionlab` (and the command line's start-up) stays light.
"""

from .lazy import exports

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "load_data": "api", "explore": "api", "list_models": "api", "list_recipes": "api", "build_model": "api", "train": "api",
    "Run": "api", "study": "api", "compare": "api", "sweep": "api", "Figures": "api",
    "StudyResult": "api", "Comparison": "api", "SweepResult": "api", "audit": "api", "AuditResult": "api",
    "Callback": "training", "TrainConfig": "config", "make_config": "config",
}

__all__ = sorted(_PUBLIC)

__getattr__, __dir__ = exports(__name__, _PUBLIC, globals())
