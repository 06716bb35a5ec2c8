"""The target side of a move: what runs on the host the workload comes to, started over
ssh by the source (`livemig agent`).

    agent   the message loop and its handlers: probes, page servers, image files,
            restores, post-copy and fills, verdicts, orphans
    guard   the process that kills a copy lacking pages if the agent dies

Nothing here imports the source side (livemig.source), nor the other way round.
"""
