"""Pages: how a workload's memory crosses, both halves of each mechanism together.

    postcopy   the page stream's format and the source's push (post-copy, fills)
    placer     the target's half: pages into the restored copy through its userfaultfds
    pagehash   pre-copy by page hashes, where the kernel cannot track dirty pages
    shadow     the target's store of pre-copied pages, until they are placed
    pagemap    CRIU's pagemap images: which pages a dump holds, and where
    uffd       userfaultfd, as the placer uses it
"""
