"""What crosses between the hosts, and how.

    protocol     the typed, framed messages between the source and the target's agent
    streams      bytes between CRIU and the network: zstd out, plain in
    bandwidth    --max-bandwidth: one cap over every stream of a move
    transports   how commands and bytes reach a host: ssh, or this host
"""
