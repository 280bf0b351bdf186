"""The early kernel mount (mlfs.launch, docs/adr/0021): ``mlfs mount`` makes the kernel mount itself
and reports it before its daemon has imported pyfuse3 and trio.  Real mounts, as root."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import (fuse_available, generate_into, log_defects, require, run_mlfs, sha,
                      wait_for)
from mlfs import launch


def daemon_mount(man: Path, mnt: Path, cache: Path, env=None, *args):
    mnt.mkdir(exist_ok=True)
    p = run_mlfs("mount", "--manifest", man, "--cache-dir", cache, *args, mnt, env=env)
    pid = int(re.search(r"\(pid (\d+)", p.stderr).group(1))
    log = Path(re.search(r"log (.+)\)", p.stderr).group(1))
    return pid, log


def mount_line(mnt: Path) -> list[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mnt):
            return fields
    return []


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie of ours counts as gone
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return False


@pytest.fixture
def root_fuse(tmp_path):
    """Root and FUSE; afterwards, whatever a failed test left mounted under its directory is
    detached (and the test's daemons are gone with their mounts)."""
    require(fuse_available(), "FUSE (/dev/fuse, fusermount3) is not available")
    require(os.geteuid() == 0, "the early mount is made by root only")
    yield
    for line in Path("/proc/self/mounts").read_text().splitlines():
        where = line.split()[1]
        if where.startswith(f"{tmp_path}/"):
            subprocess.run(["fusermount3", "-u", "-z", where], capture_output=True)


@pytest.mark.parametrize("early", ["1", "0"])
def test_daemon_mount_early_and_through_libfuse_alike(root_fuse, early, tmp_path, minilm_dir,
                                                      store):
    """Both ways to mount give the same kernel mount, the same bytes, switch and stats at once,
    and a clean unmount."""
    man = generate_into(store, minilm_dir, "minilm", "v1", tmp_path)
    env = {**os.environ, "MLFS_EARLY_MOUNT": early}
    mnt = tmp_path / "mnt"
    pid, log = daemon_mount(man, mnt, tmp_path / "c", env)
    try:
        fields = mount_line(mnt)
        assert fields[0] == "mlfs:minilm@v1" and fields[2] == "fuse.mlfs", fields
        assert {"ro", "nosuid", "nodev", "default_permissions"} <= set(fields[3].split(",")), fields
        # The first request may come before the daemon serves: it waits in the kernel.
        st = run_mlfs("stats", "--json", mnt)
        assert '"pid": %d' % pid in st.stdout
        assert sha(mnt / "model.safetensors") == sha(minilm_dir / "model.safetensors")
        p = run_mlfs("switch", mnt, man)  # the control socket answers
        assert p.returncode == 0
    finally:
        run_mlfs("umount", mnt)
    wait_for(lambda: gone(pid), timeout=15, what="the daemon to exit")
    assert mount_line(mnt) == []
    assert log_defects(log) == []


def test_requests_wait_for_a_daemon_still_starting(root_fuse, tmp_path, minilm_dir, store):
    """A reader that comes right after ``mlfs mount`` returns is answered, not refused: the mount
    is reported before the daemon has imported pyfuse3 and trio."""
    man = generate_into(store, minilm_dir, "minilm", "v1", tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_mlfs("mount", "--manifest", man, "--cache-dir", tmp_path / "c", mnt)
    pid = int(re.search(r"\(pid (\d+)", p.stderr).group(1))
    try:
        # As soon as the command returns: the daemon is (almost always) still importing.
        assert (mnt / "config.json").read_bytes() == (minilm_dir / "config.json").read_bytes()
        assert sorted(os.listdir(mnt)) == sorted(os.listdir(minilm_dir))
    finally:
        run_mlfs("umount", mnt)
    wait_for(lambda: gone(pid), timeout=15, what="the daemon to exit")


def test_daemon_failing_before_it_serves_takes_the_mount_away(root_fuse, tmp_path, minilm_dir,
                                                              store):
    """The kernel mount is made before the daemon runs; a daemon that cannot start (here: a broken
    pyfuse3) removes it and says why in its log, instead of leaving a mount nobody answers."""
    man = generate_into(store, minilm_dir, "minilm", "v1", tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pyfuse3.py").write_text("raise ImportError('pyfuse3 is broken on purpose')\n")
    env = {**os.environ, "PYTHONPATH": f"{broken}:{os.environ.get('PYTHONPATH', '')}"}
    mnt = tmp_path / "mnt"
    pid, log = daemon_mount(man, mnt, tmp_path / "c", env)
    wait_for(lambda: mount_line(mnt) == [], timeout=15, what="the mount to go away")
    wait_for(lambda: gone(pid), timeout=15, what="the daemon to exit")
    assert "pyfuse3 is broken on purpose" in log.read_text()
    assert os.listdir(mnt) == []  # the directory underneath, not a dead mount


def test_sigterm_to_an_early_daemon_unmounts(root_fuse, tmp_path, minilm_dir, store):
    man = generate_into(store, minilm_dir, "minilm", "v1", tmp_path)
    mnt = tmp_path / "mnt"
    for delay in (0.0, 1.0):  # while it starts (likely), and once it serves
        pid, log = daemon_mount(man, mnt, tmp_path / "c")
        time.sleep(delay)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: gone(pid), timeout=15, what="the daemon to exit")
        assert mount_line(mnt) == [], delay
        assert log_defects(log) == [], delay


def test_killed_daemon_leaves_a_dead_mount_that_umount_clears(root_fuse, tmp_path, minilm_dir,
                                                              store):
    man = generate_into(store, minilm_dir, "minilm", "v1", tmp_path)
    mnt = tmp_path / "mnt"
    pid, _ = daemon_mount(man, mnt, tmp_path / "c")
    assert (mnt / "config.json").exists()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), timeout=15, what="the daemon to die")
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    assert e.value.errno == errno.ENOTCONN
    run_mlfs("umount", mnt)
    assert mount_line(mnt) == []


def test_failures_before_the_kernel_mount_leave_nothing(root_fuse, tmp_path, minilm_dir, store):
    """What fails in ``mlfs mount`` itself (a missing prefetch chunk, a pinned digest that does not
    match) is a one-line error, with no kernel mount and no daemon left behind."""
    man = generate_into(store, minilm_dir, "minilm", "v1", tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    p = run_mlfs("mount", "--manifest", man, "--cache-dir", tmp_path / "c", "--digest",
                 "blake3:" + "0" * 64, mnt, check=False)
    assert p.returncode == 1 and "not the pinned" in p.stderr and mount_line(mnt) == []
    assert "Traceback" not in p.stderr
    from mlfs import manifest as mf

    m = mf.loads(man.read_bytes())
    store.delete_chunk(next(f for f in m.files if f.tensors).chunk_ids[0])  # a header chunk
    p = run_mlfs("mount", "--manifest", man, "--cache-dir", tmp_path / "c2", mnt, check=False)
    assert p.returncode == 1 and "cannot fetch model.safetensors" in p.stderr, p.stderr
    assert mount_line(mnt) == [] and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_kernel_unmount_of_a_mount_already_gone_is_a_no_op(root_fuse, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fd = launch.kernel_mount(str(mnt), launch.fuse_options("mlfs:test@v0", False))
    try:
        # (Nothing may stat the mount point here: with no daemon to answer, that would wait.)
        assert mount_line(mnt)[:3] == ["mlfs:test@v0", str(mnt), "fuse.mlfs"]
        launch.kernel_unmount(str(mnt), fd)
        assert mount_line(mnt) == []
        launch.kernel_unmount(str(mnt), fd)  # gone already: POLLERR on the device, nothing done
        assert mount_line(mnt) == []
    finally:
        os.close(fd)


@pytest.mark.parametrize("where", ["cache", "log"])
@pytest.mark.parametrize("foreground", [False, True])
def test_a_cache_or_log_inside_the_mount_point_is_refused(root_fuse, where, foreground, tmp_path,
                                                          minilm_dir, store):
    """The mount would hide them, and a daemon writing there would wait on its own mount before
    it serves (a test once mounted over its own cache directory and hung)."""
    man = generate_into(store, minilm_dir, "minilm", "v1", tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    paths = {"cache": ["--cache-dir", mnt], "log": ["--cache-dir", tmp_path / "c",
                                                    "--log-file", mnt / "sub" / "mount.log"]}
    p = run_mlfs("mount", "--manifest", man, *paths[where], *(["-f"] if foreground else []), mnt,
                 check=False, timeout=60)
    assert p.returncode == 1 and "is inside the mount point" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and mount_line(mnt) == []
