"""`/jobs/{id}/files/...`: list, read, upload and delete the files of one job.

Reading works in every state (following the LOG of a running job is a main use);
changing files is refused with 409 while the job is queued or processing.

Everything in a job folder is user input, so every route works through the job
folder's descriptor (`Store.open_job`) and batchingest.fs: a path is checked while it is
opened, component by component, and what was opened is used from then on, never the
path string. A symbolic link anywhere on a path is refused (400 InvalidPath), for
reads as for writes; a job folder that holds links can still be listed, and a folder
holding links removed with `?recursive=true` (the links themselves are removed).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from batchingest import events, fs
from batchingest.api import transfer
from batchingest.api.common import by_method, find_job, json_response, run_blocking
from batchingest.api.errors import ApiError
from batchingest.api.paths import job_name, segments
from batchingest.api.upload import Upload, hold_unqueued
from batchingest.config import Config
from batchingest.store import BUSY, Job, JobBusy, Store


def _not_found(parts: list[str]) -> ApiError:
    return ApiError(404, "FileNotFound", f"no file or folder {'/'.join(parts)!r} in this job")


def _busy(job: Job) -> ApiError:
    return ApiError(
        409,
        "JobBusy",
        f"job {job.name!r} is in {job.state}/: its files cannot be changed until it leaves",
    )


def open_job(store: Store, name: str) -> tuple[Job, int]:
    """The job and a descriptor of its folder; 404 if there is none."""
    for _ in range(3):
        job = find_job(store, name)
        try:
            return job, store.open_job(job)
        except FileNotFoundError:
            continue  # it moved on between finding and opening: look again
    raise JobBusy(f"job {name!r} keeps changing state")


def list_names(dir_fd: int) -> list[str]:
    """Names in an open folder, sorted, without hidden (temporary, lock) entries or
    names that are not valid UTF-8 (no URL could name them)."""
    return sorted(e.name for e in fs.entries(dir_fd))


# O_PATH, and /proc to reopen what it names; without them files are opened directly
_O_PATH = getattr(os, "O_PATH", 0) if os.path.isdir("/proc/self/fd") else 0


def open_for_read(job_fd: int, parts: list[str]) -> tuple[int, os.stat_result]:
    """Open a regular file or folder beneath the job folder for reading, and its stat.

    A FIFO or device is never opened, not even with O_NONBLOCK (opening a FIFO wakes
    its writer; opening a tape device can rewind it): the name is first opened O_PATH,
    which only names the inode, and reopened for reading (through /proc/self/fd, the
    same inode, so nothing can be swapped in between) only if it is a file or folder.
    """
    parent = fs.open_dir(job_fd, "/".join(parts[:-1])) if len(parts) > 1 else os.dup(job_fd)
    try:
        if not parts:
            return parent, os.fstat(parent)
        if not _O_PATH:  # pragma: no cover - Linux with /proc has both
            fd = fs.open_beneath(parent, parts[-1])
            return fd, os.fstat(fd)
        path_fd = os.open(parts[-1], _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    finally:
        if parts:
            os.close(parent)
    try:
        st = os.fstat(path_fd)
        if stat.S_ISLNK(st.st_mode):
            raise fs.UnsafePath(errno.ELOOP, "a symbolic link is in the way", "/".join(parts))
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            what = fs.kind(st.st_mode)
            raise ApiError(404, "FileNotFound", f"{'/'.join(parts)!r} is a {what}, not a file")
        fd = os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    finally:
        os.close(path_fd)
    return fd, st


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def boolean(request: Request, key: str) -> bool:
    """A boolean query parameter: absent is false; a word not in _BOOLEANS is a 400, so
    that a typo (`?recursive=ture`) is not silently false."""
    raw = request.query_params.get(key)
    if raw is None:
        return False
    value = _BOOLEANS.get(raw.lower())
    if value is None:
        raise ApiError(400, "InvalidParameter", f"{key} must be true or false, not {raw[:50]!r}")
    return value


def only_listing(request: Request) -> None:
    """`/jobs/{id}/files/` names the job folder's listing, which is only read: 405."""
    if request.path_params.get("path", "") == "":
        raise ApiError(
            405,
            "MethodNotAllowed",
            f"{request.method} is not allowed on a job's file listing",
            headers={"Allow": "GET, HEAD"},
        )


class FileRoutes:
    """`/jobs/{id}/files/...`: read (a file or a folder's names), upload, delete."""

    def __init__(self, cfg: Config, store: Store) -> None:
        self.store = store
        self.max_upload = cfg.max_upload

    async def read(self, request: Request) -> Response | ASGIApp:
        name = job_name(request.path_params["id"])
        parts = segments(request.path_params.get("path", ""), allow_empty=True)
        _, job_fd = open_job(self.store, name)
        try:
            try:
                fd, st = open_for_read(job_fd, parts)
            except (FileNotFoundError, NotADirectoryError):
                raise _not_found(parts) from None
        finally:
            os.close(job_fd)
        if stat.S_ISREG(st.st_mode):
            return transfer.FileBody.open(fd, st, request.headers)  # it closes fd
        try:
            names = await run_blocking(list_names, fd)
        finally:
            os.close(fd)
        return json_response(names)

    async def upload(self, request: Request) -> Response:
        name = job_name(request.path_params["id"])
        only_listing(request)
        parts = segments(request.path_params["path"], allow_empty=False)
        job, job_fd = open_job(self.store, name)
        try:
            if job.state in BUSY:
                raise _busy(job)
            transfer.check_length(request.headers.get("content-length"), self.max_upload)
            expected = transfer.expected_sha256(request.headers.get("content-digest"))
            up = Upload(self.store, job, job_fd, parts)
            try:
                created, got = await self._receive(request, up, expected)
            finally:
                up.close()
        finally:
            os.close(job_fd)
        events.file_uploaded(self.store, name, up.rel, got.size, got.sha256.hex())
        body = {"path": up.rel, "size": got.size, "sha256": got.sha256.hex()}
        headers = {"Location": f"/jobs/{name}/files/{quote(up.rel)}"} if created else None
        return json_response(body, 201 if created else 200, headers)

    async def _receive(
        self, request: Request, up: Upload, expected: bytes | None
    ) -> tuple[bool, transfer.Upload]:
        """The body into the upload's temporary file, checked, then committed."""
        up.open()
        got = await transfer.receive_body(request, up.fd, self.max_upload)
        if expected is not None and got.sha256 != expected:
            raise ApiError(
                400, "DigestMismatch", "the body does not match its Content-Digest sha-256"
            )
        up.check_job_file()
        return await run_blocking(up.commit), got

    async def delete(self, request: Request) -> Response:
        name = job_name(request.path_params["id"])
        only_listing(request)
        parts = segments(request.path_params["path"], allow_empty=False)
        recursive = boolean(request, "recursive")
        job, job_fd = open_job(self.store, name)
        try:
            if job.state in BUSY:
                raise _busy(job)
            await run_blocking(_delete, self.store, job, job_fd, parts, recursive)
        finally:
            os.close(job_fd)
        events.file_deleted(self.store, name, "/".join(parts))
        return Response(status_code=204)


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    files = FileRoutes(cfg, store)
    return [
        Route("/jobs/{id}/files", files.read, methods=["GET"]),
        by_method(
            "/jobs/{id}/files/{path:path}",
            {"GET": files.read, "PUT": files.upload, "DELETE": files.delete},
        ),
    ]


def _delete(store: Store, job: Job, job_fd: int, parts: list[str], recursive: bool) -> None:
    hold = hold_unqueued(store, job, job_fd)
    try:
        remove_path(job_fd, parts, recursive)
    finally:
        hold.release()


def remove_path(job_fd: int, parts: list[str], recursive: bool) -> None:
    """Remove parts beneath the job folder; nothing there is fine. A link is refused."""
    parent = job_fd
    if len(parts) > 1:
        try:
            parent = fs.open_dir(job_fd, "/".join(parts[:-1]))
        except (FileNotFoundError, NotADirectoryError):
            return
    try:
        name = parts[-1]
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode):
            raise fs.UnsafePath(
                errno.ELOOP, "a symbolic link is in the way (links are never followed)",
                "/".join(parts),
            )  # fmt: skip
        if not stat.S_ISDIR(st.st_mode):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)
        elif recursive:
            remove_tree(parent, name)
        else:
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError as e:
                if e.errno != errno.ENOTEMPTY:
                    raise
                raise ApiError(
                    409, "NotEmpty", "the folder is not empty: add ?recursive=true"
                ) from None
    finally:
        if parent != job_fd:
            os.close(parent)


def remove_tree(parent: int, name: str) -> None:
    """Remove the folder name in parent and everything in it, by descriptors only.

    Each folder is opened with no link followed before anything in it is removed, and
    entries are unlinked relative to it; a link is removed itself. A folder swapped for
    a link meanwhile is not entered: the link is removed instead.
    """
    fd = fs.open_dir(parent, name)
    try:
        with os.scandir(fd) as it:
            found = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for entry, is_dir in found:
            try:
                if is_dir:
                    try:
                        remove_tree(fd, entry)
                        continue
                    except (fs.UnsafePath, NotADirectoryError):
                        pass  # no longer a folder: remove whatever it is now
                os.unlink(entry, dir_fd=fd)
            except IsADirectoryError:
                remove_tree(fd, entry)  # became a folder meanwhile
            except FileNotFoundError:
                pass
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)
