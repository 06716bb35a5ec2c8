"""The target side of a move: what runs on the host the workload comes to, started over
ssh by the source (`livemig agent`).

    agent      the message loop and its table of handlers (message type -> handler)
    stage      the agent's stages and the moves between them allowed
    workspace  the private work directory, its image directories, the data streams
    preflight  Probe and CpuinfoCheck: this host's facts
    receive    CRIU's page servers, image files, pre-copy by hashes' pages, bundles, images
    restore    the restore, through CRIU or a container's runtime
    copy       the restored copy: resumed, or undone
    postcopy   post-copy and fills: lazy pages placed in the copy, which dies if they never come
    guard      the process that kills a copy lacking pages if the agent dies
    verdicts   how each post-copy ended, kept on disk for `livemig recover`
    orphans    copies left behind (stopped when the coordinator vanished before Resume; or by
               an agent that died unheard), and the verdicts told as the copies now are
    failures   AgentFailure: every error here, with its phase

Nothing here imports the source side (livemig.source), nor the other way round.
"""
