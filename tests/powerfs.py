"""powerfs (tests/powerfs.c): a FUSE mount that loses unflushed writes on a power cut.

build() compiles it; mounted() serves a backing directory at a mount point for
the length of a `with` block. See the header of powerfs.c for the semantics.
Needs root (or fuse permissions), /dev/fuse and the Debian packages fuse3 and
libfuse3-dev (scripts/setup.sh --dev installs them).
"""

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import time

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "powerfs.c")
PACKAGES = "fuse3 libfuse3-dev"
MOUNT_TIMEOUT_S = 10.0
EXIT_TIMEOUT_S = 10.0

_built = None  # the binary built by mounted() without one


def build(dest_dir):
    """Compile powerfs.c into dest_dir; the binary's path.

    Raises RuntimeError if libfuse3's development files or fusermount3 are
    missing (naming the Debian packages), or if the compiler fails (with its output).
    """
    if shutil.which("fusermount3") is None or shutil.which("pkg-config") is None:
        raise RuntimeError(f"powerfs needs fusermount3 and pkg-config: apt-get install {PACKAGES}")
    flags = subprocess.run(
        ["pkg-config", "fuse3", "--cflags", "--libs"], capture_output=True, text=True
    )
    if flags.returncode != 0:
        raise RuntimeError(f"pkg-config finds no fuse3: apt-get install {PACKAGES}")
    binary = os.path.join(dest_dir, "powerfs")
    command = ["gcc", "-O2", "-Wall", "-o", binary, SOURCE, *flags.stdout.split(), "-lpthread"]
    compiled = subprocess.run(command, capture_output=True, text=True)
    if compiled.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{compiled.stderr}")
    return binary


class PowerFS:
    """A live mount: power control and status through its /.powerfs file."""

    def __init__(self, backing, mountpoint, pid):
        self.backing = backing
        self.mountpoint = mountpoint
        self.pid = pid
        self.control = os.path.join(mountpoint, ".powerfs")

    def command(self, text):
        """Run one command (one write); OSError (EINVAL) if powerfs refuses it."""
        fd = os.open(self.control, os.O_WRONLY)
        try:
            written = os.write(fd, text.encode())
        finally:
            os.close(fd)
        if written != len(text):
            raise OSError(f"powerfs took {written} of {len(text)} bytes of {text!r}")

    def cut(self, torn_seed=None):
        """Power cut: unflushed writes are lost (with torn_seed, about half written, one torn)."""
        self.command("cut" if torn_seed is None else f"cut torn {int(torn_seed)}")

    def on(self):
        """Power back on: new opens work on the backing directory as the cut left it."""
        self.command("on")

    def status(self):
        """The status line as a dict: state ("on"/"off") and int counters."""
        with open(self.control) as f:
            line = f.read()
        fields = dict(item.split("=", 1) for item in line.split())
        return {key: value if key == "state" else int(value) for key, value in fields.items()}


def _unmount(mountpoint):
    if not os.path.ismount(mountpoint):
        return
    done = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True)
    if done.returncode != 0:  # busy: detach now, powerfs ends when the last file closes
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)


@contextlib.contextmanager
def mounted(backing, mountpoint, binary=None):
    """Serve `backing` at `mountpoint` with powerfs (built once if binary is None).

    Yields a PowerFS once the mount is live; raises RuntimeError (with
    powerfs's output) if it is not within MOUNT_TIMEOUT_S. On exit, always,
    unmounts (fusermount3 -u, else umount -l) and waits for the powerfs
    process, killing it by PID if it has not exited within EXIT_TIMEOUT_S.
    """
    global _built
    if binary is None:
        if _built is None:
            build_dir = tempfile.mkdtemp(prefix="powerfs-build-")
            atexit.register(shutil.rmtree, build_dir, True)
            _built = build(build_dir)
        binary = _built
    backing, mountpoint = os.path.abspath(backing), os.path.abspath(mountpoint)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [binary, backing, mountpoint, "-f"], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + MOUNT_TIMEOUT_S
            while not os.path.ismount(mountpoint):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode(errors="replace")
                    raise RuntimeError(f"powerfs did not mount {mountpoint}: {output}")
                time.sleep(0.02)
            yield PowerFS(backing, mountpoint, proc.pid)
        finally:
            _unmount(mountpoint)
            try:
                proc.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                subprocess.run(["umount", "-l", mountpoint], capture_output=True)
