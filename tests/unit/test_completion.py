"""`livemig completion bash` completes as a user types: commands, flags, and hosts from
~/.ssh/config, run through a real bash."""

import subprocess
import sys


def complete(tmp_path, *words: str) -> list[str]:
    script = subprocess.run([sys.executable, "-c", "import sys; from livemig.cli import main; sys.exit(main())",
                             "completion", "bash"], capture_output=True, text=True, check=True).stdout
    (tmp_path / ".ssh").mkdir(exist_ok=True)
    (tmp_path / ".ssh" / "config").write_text("Host host-b host-c\n  User root\nHost *.internal\n")
    (tmp_path / "hosts").write_text("")
    words_arr = " ".join(f"'{w}'" for w in words)
    prog = (f"{script}\nCOMP_WORDS=({words_arr}); COMP_CWORD={len(words) - 1}; COMP_LINE='{' '.join(words)}'; "
            f"COMP_POINT=${{#COMP_LINE}}; _shtab_livemig; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    out = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, check=True,
                         env={"HOME": str(tmp_path), "HOSTFILE": str(tmp_path / "hosts"), "PATH": "/usr/bin:/bin"})
    return sorted(x for x in out.stdout.split("\n") if x)


def test_commands_flags_and_hosts_complete(tmp_path):
    assert complete(tmp_path, "livemig", "mo") == ["move"]
    assert "--max-downtime" in complete(tmp_path, "livemig", "move", "--max")
    # the target: the hosts ~/.ssh/config names (never its patterns)
    assert complete(tmp_path, "livemig", "move", "--pid", "42", "host-") == ["host-b", "host-c"]
    assert complete(tmp_path, "livemig", "check", "host-c") == ["host-c"]
