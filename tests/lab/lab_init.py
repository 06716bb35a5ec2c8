#!/usr/bin/python3
"""PID 1 of a lab host, inside its root: start sshd, then reap every orphan.

Copied into each namespaced host as /usr/local/sbin/lab-init; a VM's vm_init.py
ends here too. Reaping at once matters: CRIU cannot restore a process onto a
PID that a zombie still holds.
"""

import os
import signal
import subprocess


def main() -> None:
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    os.makedirs("/var/log", exist_ok=True)
    # sshd daemonizes, so it is re-parented to us: we always have a child to wait for.
    subprocess.run(["/usr/sbin/sshd", "-E", "/var/log/sshd.log"], check=True)
    with open("/run/lab-init.ready", "w") as f:
        f.write("ready\n")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGCHLD, lambda *_: None)  # so that pause() below wakes up
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            signal.pause()  # woken by SIGCHLD once something is ours again


if __name__ == "__main__":
    main()
