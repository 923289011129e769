"""`/jobs/{id}/files/...`: list, read, upload and delete the files of one job.

Reading works in every state (following the LOG of a running job is a main use);
changing files is refused with 409 while the job is queued or processing. Uploads land
in a hidden temporary file beside the target and are renamed into place, under the
job's lock, only once the whole body arrived and matched its digest.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path
from urllib.parse import quote

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from batchingest import events, jobfile
from batchingest.api import transfer
from batchingest.api.errors import ApiError
from batchingest.api.jobs import BUSY_STATES, by_method, find_job, json_response
from batchingest.api.paths import job_name, resolve, segments
from batchingest.config import Config
from batchingest.store import Hold, JobBusy, JobNotFound, Store


def _not_found(parts: list[str]) -> ApiError:
    return ApiError(404, "FileNotFound", f"no file or folder {'/'.join(parts)!r} in this job")


def _busy(name: str, state: str) -> ApiError:
    return ApiError(
        409, "JobBusy", f"job {name!r} is in {state}/: its files cannot be changed until it leaves"
    )


def list_folder(path: Path) -> list[str]:
    """Names in a folder, sorted, without hidden (temporary, lock) entries."""
    with os.scandir(path) as it:
        return sorted(e.name for e in it if not e.name.startswith("."))


def routes(cfg: Config, store: Store) -> list[BaseRoute]:
    max_upload = cfg.max_upload

    async def read(request: Request) -> Response | ASGIApp:
        name = job_name(request.path_params["id"])
        parts = segments(request.path_params.get("path", ""), allow_empty=True)
        job = find_job(store, name)
        target = resolve(job.path, parts)
        try:
            # O_NONBLOCK: a FIFO in a job folder must not hang the server
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            raise _not_found(parts) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                names = await to_thread.run_sync(list_folder, target)
                return json_response(names)
            if not stat.S_ISREG(st.st_mode):
                raise ApiError(404, "FileNotFound", f"{'/'.join(parts)!r} is not a regular file")
            return _file_response(request, fd, st)
        except BaseException:
            os.close(fd)
            raise

    def _file_response(request: Request, fd: int, st: os.stat_result) -> ASGIApp:
        etag = transfer.etag_of(st)
        headers = [
            (b"content-type", b"application/octet-stream"),
            (b"etag", etag.encode()),
            (b"last-modified", transfer.http_date(st.st_mtime).encode()),
            (b"accept-ranges", b"bytes"),
        ]
        if etag in (request.headers.get("if-none-match") or ""):
            os.close(fd)
            return Response(status_code=304, headers={k.decode(): v.decode() for k, v in headers})
        size = st.st_size
        byte_range = None
        if_range = request.headers.get("if-range")
        if if_range is None or if_range.strip() == etag:
            byte_range = transfer.parse_range(request.headers.get("range"), size)
        if byte_range is None:
            start, end, status = 0, size, 200
        else:
            start, end = byte_range
            status = 206
            headers.append((b"content-range", f"bytes {start}-{end - 1}/{size}".encode()))
        headers.append((b"content-length", str(end - start).encode()))
        return transfer.FileBody(fd, status, headers, start, end)

    async def upload(request: Request) -> Response:
        name = job_name(request.path_params["id"])
        parts = segments(request.path_params["path"], allow_empty=False)
        job = find_job(store, name)
        if job.state in BUSY_STATES:
            raise _busy(name, job.state)
        length = request.headers.get("content-length")
        if max_upload and length is not None and length.isdigit() and int(length) > max_upload:
            raise transfer.too_large(max_upload)
        expected = transfer.expected_sha256(request.headers.get("content-digest"))
        target = _place(job.path, parts)
        base = resolve(job.path, [])
        rel = target.relative_to(base)
        made: list[Path] = []  # folders this request created, removed again if it fails
        try:
            dir_fd, fd, tmp = _start_temp(base, rel, name, made)
            try:
                try:
                    got = await transfer.receive_into(fd, request.stream(), max_upload)
                finally:
                    os.close(fd)
                if expected is not None and got.sha256 != expected:
                    raise ApiError(
                        400, "DigestMismatch", "the body does not match its Content-Digest sha-256"
                    )
                if rel == Path(jobfile.JOB_FILE):
                    _check_job_file(tmp, dir_fd)
                created = await to_thread.run_sync(
                    _commit, store, name, rel, dir_fd, tmp, target.name
                )
            except BaseException:
                _unlink(tmp, dir_fd)
                raise
            finally:
                os.close(dir_fd)
        except BaseException as e:
            _remove_made(made)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ApiError(507, "InsufficientStorage", "no space left for this file") from e
            raise
        path = "/".join(rel.parts)
        body = {"path": path, "size": got.size, "sha256": got.sha256.hex()}
        events.file_uploaded(store, name, path, got.size, got.sha256.hex())
        headers = {"Location": f"/jobs/{name}/files/{quote(path)}"} if created else None
        return json_response(body, 201 if created else 200, headers)

    async def delete(request: Request) -> Response:
        name = job_name(request.path_params["id"])
        parts = segments(request.path_params["path"], allow_empty=False)
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true", "yes")
        job = find_job(store, name)
        if job.state in BUSY_STATES:
            raise _busy(name, job.state)
        target = _place(job.path, parts)
        await to_thread.run_sync(_remove, store, name, target, recursive)
        events.file_deleted(store, name, "/".join(parts))
        return Response(status_code=204)

    return [
        Route("/jobs/{id}/files", read, methods=["GET"]),
        by_method("/jobs/{id}/files/{path:path}", {"GET": read, "PUT": upload, "DELETE": delete}),
    ]


def _start_temp(base: Path, rel: Path, name: str, made: list[Path]) -> tuple[int, int, str]:
    """Make the folders above rel and an empty hidden temporary file in the last one.

    Returns the folder's descriptor, the file's descriptor and the file's name. A failed
    upload beside this one may remove an empty folder this one just found (it removes
    the folders it made): then the folder is made again.
    """
    target = base / rel
    for _ in range(3):
        _make_parents(base, rel, name, made)
        if target.is_dir():
            raise ApiError(409, "IsADirectory", f"{'/'.join(rel.parts)!r} is a folder")
        try:
            dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        tmp = f".upload-{secrets.token_hex(8)}"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
            )
        except FileNotFoundError:
            os.close(dir_fd)
            continue
        except BaseException:
            os.close(dir_fd)
            raise
        return dir_fd, fd, tmp
    if not base.is_dir():
        raise ApiError(404, "JobNotFound", f"job {name!r} was deleted meanwhile")
    raise ApiError(409, "Conflict", "the folders of this path keep disappearing")


def _make_parents(base: Path, rel: Path, name: str, made: list[Path]) -> None:
    """Create the folders above rel inside base, but never base itself; add them to made.

    mkdir(parents=True) would bring back a job folder deleted meanwhile, making a job out
    of nothing; here a vanished job folder is a 404.
    """
    folder = base
    for part in rel.parts[:-1]:
        folder = folder / part
        try:
            folder.mkdir()
            made.append(folder)
        except FileExistsError:
            if not folder.is_dir():
                raise ApiError(409, "NotADirectory", "a parent of this path is a file") from None
        except NotADirectoryError:
            raise ApiError(409, "NotADirectory", "a parent of this path is a file") from None
        except FileNotFoundError:
            raise ApiError(404, "JobNotFound", f"job {name!r} was deleted meanwhile") from None


def _remove_made(made: list[Path]) -> None:
    """Remove the folders a failed upload created, deepest first, so nothing changed.

    rmdir removes only empty folders: one that another upload put a file in meanwhile
    stays, and so do its parents. Folders that existed before are never in made.
    """
    for folder in sorted(set(made), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _place(job_dir: Path, parts: list[str]) -> Path:
    """Where a write to parts goes: the real parent folder plus the last name as given.

    A symlink named by the last segment is replaced or removed itself, never followed;
    one that leads outside the job folder is still refused, like any such path.
    """
    resolve(job_dir, parts)
    return resolve(job_dir, parts[:-1]) / parts[-1]


def _check_job_file(tmp: str, dir_fd: int) -> None:
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    try:
        jobfile.parse(raw)
    except jobfile.JobFileError as e:
        raise ApiError(400, "InvalidJobFile", str(e)) from None


def _unlink(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _hold(store: Store, name: str) -> Hold:
    try:
        hold = store.hold_unqueued(name)
    except JobNotFound:
        raise ApiError(404, "JobNotFound", f"job {name!r} was deleted meanwhile") from None
    except JobBusy as e:
        raise ApiError(409, "JobBusy", str(e)) from None
    if hold is None:
        job = store.find(name)
        state = job.state if job is not None else "processing"
        raise _busy(name, state)
    return hold


def _commit(store: Store, name: str, rel: Path, dir_fd: int, tmp: str, final: str) -> bool:
    """Rename tmp into place under the job's lock; True if the file is new.

    The job may have been queued, moved or deleted while the body arrived: the lock
    keeps processors away, and the folder we wrote into must still be the one at the
    job's current place.
    """
    hold = _hold(store, name)
    try:
        here = os.path.realpath(hold.path / rel.parent)
        try:
            now = os.stat(here)
        except FileNotFoundError:
            now = None
        was = os.fstat(dir_fd)
        if now is None or (now.st_dev, now.st_ino) != (was.st_dev, was.st_ino):
            raise ApiError(409, "Conflict", "the job's folder changed during the upload")
        try:
            os.stat(final, dir_fd=dir_fd, follow_symlinks=False)
            existed = True
        except FileNotFoundError:
            existed = False
        try:
            os.replace(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except IsADirectoryError:
            raise ApiError(409, "IsADirectory", f"{'/'.join(rel.parts)!r} is a folder") from None
        return not existed
    finally:
        hold.release()


def _remove(store: Store, name: str, target: Path, recursive: bool) -> None:
    hold = _hold(store, name)
    try:
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(target)
            return
        if recursive:
            shutil.rmtree(target)
            return
        try:
            os.rmdir(target)
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                raise ApiError(
                    409, "NotEmpty", "the folder is not empty: add ?recursive=true"
                ) from None
            raise
    finally:
        hold.release()
