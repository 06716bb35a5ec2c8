"""livemig's version: what `--version` prints and the agent's Hello names. A module of its
own, so that neither side imports the package's API (livemig/__init__.py) for it."""

# Raised with what changes for its users: 0.2.0 installs in one step (pipx), brings its agent
# along and speaks its wire protocol over a range (16 on), so hosts need not carry the same one.
__version__ = "0.2.0"
