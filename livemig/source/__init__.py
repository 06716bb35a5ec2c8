"""The source side of a move: what runs on the host the workload leaves.

    migration   the phases, in order: preflight, pre-copy, final dump, transfer, restore,
                commit or rollback (Migration), and the API's migrate(), plan(), check()
    preflight   what both hosts must have, compared before anything is touched
    policy      when pre-copy stops, and which mode runs: pure functions
    throttle    auto-converge: the workload's CPU quota while pre-copy runs
    session     one target host as the source sees it: its agent and data streams
    recovery    what a move past its final dump leaves for `livemig recover`, and recover
    clone       replicas of a podman container on other hosts

Nothing here is imported by the target side (livemig.target), nor the other way round:
both speak through livemig.wire, and share livemig.pages and livemig.runtimes.
"""
