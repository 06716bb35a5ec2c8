"""The source side of a move: what runs on the host the workload leaves.

    migration   the phases, in order: preflight, pre-copy, final dump, transfer, restore,
                commit or rollback (Migration), and the API's migrate(), plan(), check()
    stages      where a move stands (Stage), and the steps allowed from there
    move        what a move's phases share (Move)
    precopy     pre-copy's rounds loop; rounds: one round of either kind
    autoconverge  auto-converge's steps between rounds (the cgroup's side: throttle)
    bundles     a container's image and bundle, beside its memory
    switchover  final dump, transfer, restore, and the commit
    postcopy    post-copy and fills, the source's side: relay, verdicts, settling
    failures    which failure is told, how, and the rollback
    local       this host's preflight facts and work directory (moves and clones)
    testpoints  where the lab's tests stop a move (LIVEMIG_TEST_STOP_AT)
    preflight   what both hosts must have, compared before anything is touched
    policy      when pre-copy stops, and which mode runs: pure functions
    throttle    auto-converge: the workload's CPU quota while pre-copy runs
    session     one target host as the source sees it: its agent and data streams
    recovery    what a move past its final dump leaves for `livemig recover`, and recover
    clone       replicas of a podman container on other hosts

Nothing here is imported by the target side (livemig.target), nor the other way round:
both speak through livemig.wire, and share livemig.pages and livemig.runtimes.
"""
