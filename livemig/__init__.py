"""livemig: live-migrate running containers and process trees between hosts with CRIU."""

__version__ = "0.1.0"
