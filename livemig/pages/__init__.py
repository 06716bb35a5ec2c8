"""Pages: how a workload's memory crosses, both halves of each mechanism together.

    frames     the page stream's format, written and read there alone
    postcopy   the source's push (post-copy, fills), and what each side counted
    placer     the target's half: pages into the restored copy through its userfaultfds
    pagehash   pre-copy by page hashes, where the kernel cannot track dirty pages
    compare    pre-copy's final comparison, in two processes
    wptrack    which pages were written, where there is no soft-dirty: userfaultfd write-protection
    shadow     the target's store of pre-copied pages, until they are placed
    pagemap    CRIU's pagemap images: which pages a dump holds, and where
    cow        what the tree shares copy-on-write, kept shared through a lazy restore
    uffd       userfaultfd, as the placer uses it

What goes wrong in here raises a LivemigError of its own (postcopy.PageStreamError,
uffd.Gone and Busy, shadow.MissingPages, pagemap.PagemapError, cow.CowError) without a phase
(but wptrack.Unwatched, never a failure: the process is compared by hash instead): post-copy
and a fill share the machinery, and whoever catches it knows which one ran.
"""
