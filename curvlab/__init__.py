"""curvlab: how good is each Kronecker approximation of the Fisher?"""

__version__ = "0.1.0"
