"""The trial restore's logic (livemig/trial.py): its images without pages, CRIU's argv, its
error as one line. The trial itself runs in the lab (tests/test_trial.py)."""

from __future__ import annotations

from livemig import criu, trial
from livemig.options import Options
from livemig.pages import pagemap
from livemig.source.stages import Stage, Stages


def test_without_pages_drops_the_lazy_entries_and_every_shared_page(tmp_path):
    written = [pagemap.Entry(0x1000, 2, pagemap.PE_PRESENT), pagemap.Entry(0x10000, 100, pagemap.PE_LAZY),
               pagemap.Entry(0x80000, 1, pagemap.PE_PRESENT | pagemap.PE_LAZY)]
    (tmp_path / "pagemap-7.img").write_bytes(pagemap.image(3, written))
    (tmp_path / "pages-3.img").write_bytes(b"\1" * 8192)
    (tmp_path / "pagemap-shmem-99.img").write_bytes(pagemap.image(4, [pagemap.Entry(0, 5, pagemap.PE_PRESENT)]))
    (tmp_path / "pages-4.img").write_bytes(b"\2" * 5 * 4096)
    trial.without_pages(tmp_path)
    assert pagemap.read((tmp_path / "pagemap-7.img").read_bytes()) == (3, written[:1])
    assert (tmp_path / "pages-3.img").stat().st_size == 8192     # (what is not lazy: the restore reads it)
    # shared memory's pages, which CRIU wrote, need not cross: the trial's copy never runs
    assert pagemap.read((tmp_path / "pagemap-shmem-99.img").read_bytes()) == (4, [])
    assert (tmp_path / "pages-4.img").stat().st_size == 0


def test_the_dump_leaves_the_tree_running_and_its_pages_out_with_the_final_dump_s_flags():
    opts = criu.Options(file_locks=True)
    argv = criu.trial_dump(42, "/w/trial", ps_fd=9, opts=opts, nothing_to_lock=True, extra=("--external=unix[5]",))
    for flag in ("--leave-running", "--lazy-pages", "--skip-in-flight", "--file-locks", "--tcp-close",
                 "--external=unix[5]"):
        assert flag in argv
    assert argv[argv.index("--ps-socket") + 1] == "9" and argv[argv.index("--network-lock") + 1] == "iptables"
    assert "--page-server" not in argv and "--leave-stopped" not in argv
    established = criu.trial_dump(42, "/w/trial", ps_fd=9, opts=criu.Options(tcp_established=True),
                                  nothing_to_lock=True)
    assert "--tcp-close" not in established and "--network-lock" not in established


def test_the_restore_is_stopped_detached_and_under_a_cgroup_root_of_its_own():
    argv = criu.trial_restore("/w/trial", cgroup_root="/livemig-trial-X", opts=criu.NO_OPTIONS)
    assert argv[:2] == ["criu", "restore"]
    for flag in ("--restore-detached", "--leave-stopped", "--tcp-close"):
        assert flag in argv
    assert argv[argv.index("--cgroup-root") + 1] == "/livemig-trial-X"


def test_criu_s_first_error_is_said_without_its_pid_level_and_source_line(tmp_path):
    (tmp_path / "restore.log").write_text(
        "Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n"
        "   150: Error (criu/files-reg.c:2353): Can't open file tmp/x/sub on restore: No such file or directory\n"
        "   150: Error (criu/files.c:1221): Unable to open fd=3 id=0xd\n"
        "Error (criu/cr-restore.c:2331): Restoring FAILED.\n")
    errors = trial._errors(tmp_path / "restore.log")
    assert trial._said(errors) == "Can't open file tmp/x/sub on restore: No such file or directory"
    assert len(errors) == 2
    assert trial._errors(tmp_path / "none.log") == [] and trial._said([]) == ""


def test_the_images_go_once_tried_and_the_logs_stay(tmp_path):
    for name in ("core-1.img", "pages-1.img", "dump.log"):
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    trial.images_gone(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dump.log"]


def test_a_move_may_go_from_its_preflight_to_the_trial_and_on_to_pre_copy_or_back():
    stages = Stages()
    stages.to(Stage.TRIAL)
    assert stages.phase == "trial restore"
    stages.to(Stage.PRECOPY)
    failed = Stages()
    failed.to(Stage.TRIAL)
    failed.to(Stage.ROLLING_BACK)
    assert failed.phase == "trial restore"


def test_the_trial_is_asked_for_not_taken_by_default():
    assert Options().trial is False
