"""How commands and bytes reach a host: over SSH (asyncssh), or on this host."""
