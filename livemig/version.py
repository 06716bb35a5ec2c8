"""livemig's version: what `--version` prints and the agent's Hello names. A module of its
own, so that neither side imports the package's API (livemig/__init__.py) for it."""

__version__ = "0.1.0"
