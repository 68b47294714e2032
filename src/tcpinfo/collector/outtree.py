"""The archive tree under -output: reached without following links, with the operator's modes.

The collector usually runs as root, and -output may lie where other users can write (a shared
spool, a 1777 scratch directory).  Upstream makes directories with MkdirAll and opens files by
path, so a symbolic link planted at OUT/2026 or at an archive's name makes root write wherever it
points, and a FIFO there blocks the collector in open(2).  Here the output root is resolved once,
when the tree is made; below it, each directory is opened one component at a time relative to its
parent with O_NOFOLLOW|O_DIRECTORY (made with mkdir relative to the parent when missing), and each
archive relative to its day directory with O_NOFOLLOW|O_NONBLOCK, so nothing is reached through a
link and no open blocks.  A link or any other non-directory where a directory should be is refused
(OSError ELOOP or ENOTDIR: the saver keeps the records and retries, as for any failed write).  An
archive that is no longer the regular file this process created (a link, a FIFO, a directory,
another file), or whose day directory is no longer there or no longer a directory, is left alone
(and reported), and the saver goes on in the connection's next sequence file, in today's directory.
Every such case is counted in tcpinfo_unsafe_paths_total{kind}.

Day directories stay open (a handful of descriptors, never one per connection: there may be
100,000 connections and a limit of 20,000 descriptors) and are looked up again after a second, so
a directory that an uploader moved or removed is not written into for longer than that.

Archives get exactly -output-mode (default 0640) and directories the same bits plus x wherever r
is set (0750): the mode is set with fchmod on the new descriptor, whatever the umask.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile
from collections import OrderedDict

from prometheus_client import Counter

log = logging.getLogger(__name__)

FILE_MODE = 0o640
OPEN_DAYS = 4                       # day directories kept open at once
RECHECK_NS = 1_000_000_000          # an open day directory is looked up again after this long
REPORT_EVERY_NS = 60_000_000_000    # an unsafe archive of one kind is logged at most this often

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
_APPEND = (os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
           | os.O_CLOEXEC)
_DAY_GONE = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR)   # removed, or replaced (and counted)
_FILE_TYPES = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISREG, "a regular file"))


def directory_mode(file_mode: int) -> int:
    """The directories' mode for an archive mode: the same bits plus x wherever r is set."""
    return file_mode | (file_mode & 0o444) >> 2


def make_output_dir(path: str, mode: int) -> None:
    """Creates the output directory and any missing parent with exactly `mode`, whatever the
    umask; an existing directory (or a link to one) is the operator's and is left as it is."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    make_output_dir(os.path.dirname(path), mode)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        return   # made meanwhile, or not a directory: the caller's chdir says which
    fd = os.open(path, _DIRECTORY)
    try:
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def replace_file(name: str, data: bytes, mode: int) -> None:
    """Writes `name` in the working directory as a new file with exactly `mode`, renamed over
    whatever has that name: a link planted there is replaced, never written through."""
    fd, temporary = tempfile.mkstemp(prefix=f".{name}.", dir=".")   # O_EXCL|O_NOFOLLOW
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, mode)
            f.write(data)
        os.replace(temporary, name)
    except OSError:
        os.unlink(temporary)
        raise


def _describe(mode: int) -> str:
    """A file type in words, for log lines."""
    return next((name for is_type, name in _FILE_TYPES if is_type(mode)), "an unknown file")


def _foreign(st: os.stat_result, dev: int, inode: int, owner: int) -> str | None:
    """Why a file is not the archive this process created (a `unsafe_paths` label value), or None.

    The owner is compared too: a file made right after ours was removed often gets its inode
    number again, but another user cannot make a file owned as this process's files are.
    """
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_ino != inode or st.st_dev != dev or st.st_uid != owner:
        return "replaced file"
    return None


class OutputTree:
    """The day directories and archive files under one output root, each opened relative to its
    parent's descriptor."""

    def __init__(self, root: str, unsafe_paths: Counter, file_mode: int = FILE_MODE) -> None:
        """`unsafe_paths` counts what was found where the collector would not write, by `kind`
        (symlink, not a directory, not a regular file, replaced file)."""
        self.root = os.path.realpath(root)
        self._unsafe_paths = unsafe_paths   # the operator's path may be a link: resolved once
        self.file_mode = file_mode
        self.dir_mode = directory_mode(file_mode)
        # "YYYY/MM/DD" -> (descriptor, st_dev, when opened), least recently used first
        self._days: OrderedDict[str, tuple[int, int, int]] = OrderedDict()
        self._reported: dict[str, int] = {}   # unsafe archive kind -> when last logged
        self._owner = os.geteuid()   # of the files this process creates (NFS may squash it)

    def day(self, day: str, now_ns: int, make: bool = True) -> tuple[int, int]:
        """The descriptor and st_dev of a "YYYY/MM/DD" directory, made if missing (or
        FileNotFoundError, without `make`)."""
        days = self._days
        entry = days.get(day)
        if entry is not None:
            if 0 <= now_ns - entry[2] < RECHECK_NS:
                days.move_to_end(day)
                return entry[0], entry[1]
            self.forget(day)
        fd = self._walk(day, make)
        dev = os.fstat(fd).st_dev
        days[day] = (fd, dev, now_ns)
        if len(days) > OPEN_DAYS:
            os.close(days.popitem(last=False)[1][0])
        return fd, dev

    def forget(self, day: str) -> None:
        """Closes a day directory's descriptor; the next use looks the directory up again."""
        entry = self._days.pop(day, None)
        if entry is not None:
            os.close(entry[0])

    def close(self) -> None:
        while self._days:
            os.close(self._days.popitem()[1][0])

    def create(self, dir_fd: int, name: str) -> tuple[int, int]:
        """A new archive with exactly the file mode: its descriptor and inode (which reopen
        checks); FileExistsError if the name is taken by anything, a link included (O_EXCL
        never follows one)."""
        fd = os.open(name, _CREATE, self.file_mode, dir_fd=dir_fd)
        try:
            os.fchmod(fd, self.file_mode)
            made = os.fstat(fd)
        except OSError:
            os.close(fd)
            os.unlink(name, dir_fd=dir_fd)
            raise
        self._owner = made.st_uid
        return fd, made.st_ino

    def reopen(self, day: str, name: str, inode: int, now_ns: int) -> tuple[int, int] | None:
        """Opens an archive this process created, to append: (descriptor, size); None when it or
        its day directory is gone (an uploader took it; the directory is not made again just to
        find that out) or is something else now (reported)."""
        try:
            dir_fd, dev = self.day(day, now_ns, make=False)
        except OSError as err:
            if err.errno not in _DAY_GONE:
                raise
            return None
        try:
            fd = os.open(name, _APPEND, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError:   # ELOOP (a link), ENXIO (a FIFO without reader), EISDIR, EACCES...
            try:
                found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            kind = _foreign(found, dev, inode, self._owner)
            if kind is None:
                raise   # still our file: a real write failure
            self._report(kind, found, f"{day}/{name}", now_ns)
            return None
        found = os.fstat(fd)
        kind = _foreign(found, dev, inode, self._owner)
        if kind is None:
            return fd, found.st_size
        os.close(fd)
        self._report(kind, found, f"{day}/{name}", now_ns)
        return None

    def _walk(self, day: str, make: bool) -> int:
        """Opens each directory of `day` below the root in turn, making missing ones."""
        try:
            fd = os.open(self.root, _DIRECTORY)
        except FileNotFoundError:
            if not make:
                raise
            make_output_dir(self.root, self.dir_mode)
            fd = os.open(self.root, _DIRECTORY)
        try:
            path = ""
            for name in day.split("/"):
                path = f"{path}/{name}" if path else name
                child = self._enter(fd, name, path, make)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _enter(self, parent: int, name: str, path: str, make: bool) -> int:
        """Opens directory `name` of `parent`, making it with exactly the directory mode."""
        try:
            return self._open_dir(parent, name, path)
        except FileNotFoundError:
            if not make:
                raise
        try:
            os.mkdir(name, self.dir_mode, dir_fd=parent)
        except FileExistsError:   # made meanwhile: taken as it is, if it is a directory
            return self._open_dir(parent, name, path)
        fd = self._open_dir(parent, name, path)
        os.fchmod(fd, self.dir_mode)
        return fd

    def _open_dir(self, parent: int, name: str, path: str) -> int:
        try:
            return os.open(name, _DIRECTORY, dir_fd=parent)
        except NotADirectoryError:
            found = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
        kind, code = (("symlink", errno.ELOOP) if stat.S_ISLNK(found)
                      else ("not a directory", errno.ENOTDIR))
        self._unsafe_paths.labels(kind=kind).inc()
        raise OSError(code, f"{self.root}/{path} is {_describe(found)} where a directory should "
                            f"be: not followed, nothing written through it")

    def _report(self, kind: str, found: os.stat_result, path: str, now_ns: int) -> None:
        """Counts an archive that is not ours any more; logs it once a minute per kind."""
        self._unsafe_paths.labels(kind=kind).inc()
        last = self._reported.get(kind)
        if last is not None and 0 <= now_ns - last < REPORT_EVERY_NS:
            return
        self._reported[kind] = now_ns
        what = "another regular file" if kind == "replaced file" else _describe(found.st_mode)
        log.error("Archive %s/%s is now %s, not the file this collector wrote: left alone (not "
                  "followed, not written); its connection goes on in its next sequence file "
                  "(logged once a minute, counted in tcpinfo_unsafe_paths_total{kind=\"%s\"})",
                  self.root, path, what, kind)
