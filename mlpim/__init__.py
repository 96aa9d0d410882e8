"""mlpim: is this subspace real, or an interpretability illusion?"""

__version__ = "0.1.0"
