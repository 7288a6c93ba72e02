"""The s3fs file system of `fs` for s3:// URLs, its requests retried by s3read's policy. A module of
its own so that a build of local roots never imports s3fs and aiobotocore (0.4 s of CPU in every
process that imports storage, the encode workers' forkserver among them)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import sys
import time
from datetime import datetime, timedelta, timezone

import s3fs
from fsspec.asyn import sync_wrapper

from imnet_assets.storage import s3read

UPLOADS_DIR = "_uploads"  # beside a file being uploaded: leases naming the writer of each upload (atomic.py)


def upload_lease_key(key: str, upload_id: str) -> str:
    """The key of the lease naming the writer of upload `upload_id` of `key` (storage/atomic.py)."""
    folder, _, name = key.rpartition("/")
    lease = f"{UPLOADS_DIR}/{name}.{hashlib.sha256(upload_id.encode()).hexdigest()[:32]}.json"
    return f"{folder}/{lease}" if folder else lease


class S3FileSystem(s3fs.S3FileSystem):
    """s3fs whose requests follow s3read.Retry (throttling and broken connections retried for
    minutes, a silent endpoint given up on within a minute, naming it) instead of s3fs's and
    botocore's own retries, which tried every failure 5 x 5 times: a silent endpoint held a build
    for 7 minutes, and a burst of 503 SlowDown failed it after seconds."""

    async def _call_s3(self, method, *akwarglist, **kwargs):
        await self.set_session()
        client = await self.get_s3(kwargs.get("Bucket"))
        call = getattr(client, method)
        args = self._get_s3_method_kwargs(call, *akwarglist, **kwargs)
        target = "/".join(str(kwargs[k]) for k in ("Bucket", "Key", "Prefix") if kwargs.get(k))
        retry = s3read.Retry(f"{method} s3://{target}")
        faulted = False  # an attempt failed in transport: it may have been carried out all the same
        began = time.monotonic()
        while True:
            try:
                answer = await call(**args)
            except Exception as e:  # noqa: BLE001 - botocore's errors are not OSErrors
                if faulted and method == "complete_multipart_upload" and _error_code(e) == "NoSuchUpload":
                    done = await self._completed(kwargs)
                    if done is not None:
                        return done
                translated = s3fs.errors.translate_boto_error(e)
                if isinstance(translated, FileNotFoundError) or s3read.fault_kind(e) == "other":
                    raise translated from e  # s3fs's meaning (a missing key, a refused request)
                faulted = True
                await asyncio.sleep(retry.wait(e))
            else:
                if faulted and method == "create_multipart_upload":
                    await self._abort_lost_creates(kwargs, answer, time.monotonic() - began)
                return answer

    async def _completed(self, kwargs) -> dict | None:
        """The answer a CompleteMultipartUpload whose reply was lost would have had, when the object
        at its key is the one those parts make (its ETag, md5 of the parts' ETags as the store gave
        them and "-<parts>", says so); None otherwise. A store that makes an object's ETag another
        way (encrypted objects' ETags are no md5s of their bytes) gives one that differs: the
        completion's error stands, a failed write, never one wrongly taken for done. A store that
        forgets a completed upload at once (MinIO, Ceph) answers the retry NoSuchUpload; AWS S3
        answers it with the object."""
        parts = kwargs["MultipartUpload"]["Parts"]
        try:
            digests = b"".join(bytes.fromhex(p["ETag"].strip('"')) for p in parts)
        except ValueError:  # parts' ETags that are not hex (some stores): nothing to compare
            return None
        expected = f'"{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"'
        try:
            head = await self._call_s3("head_object", Bucket=kwargs["Bucket"], Key=kwargs["Key"])
        except Exception:  # noqa: BLE001 - not there, or not to be told: the upload's own error stands
            return None
        if head.get("ETag") != expected:
            return None
        done = {"Bucket": kwargs["Bucket"], "Key": kwargs["Key"], "ETag": head["ETag"]}
        return {**done, "VersionId": head["VersionId"]} if head.get("VersionId") else done

    async def _abort_lost_creates(self, kwargs, created: dict, elapsed: float) -> None:
        """A multipart upload's create answered after an attempt failed in transport: the store may
        have carried out that attempt (its reply lost), beginning an upload whose id this process
        never learned. Never completed, it is never visible, but nothing would ever complete or
        abort it: it cost storage until a lifecycle rule or a sweep a day later (atomic.remove_partials,
        STALE_UPLOAD_SECONDS) aborted it. Aborts the uploads for the key that the store began
        between the first attempt and the answer (by the store's clock: the answer's Date, less the
        time since the first attempt was sent, a second's margin each side for the Date's
        resolution), other than the one answered, and other than any whose upload lease exists
        (storage/atomic.py: every writer names itself beside its upload once it began it; a lost
        create's upload has none, its id unknown to its writer). The key is this process's to write
        meanwhile (the build lease: one build per out root; a shard's runs: one at a time), but a
        lease taken over from a holder whose storage was out of reach past its expiry has two
        writers for a while: the other's upload, begun within the window, is theirs, not a lost
        create's. A list or abort the storage does not let happen is a warning line: the write
        goes on (an unfinished upload is never visible, it only costs storage)."""
        bucket, key = kwargs["Bucket"], kwargs["Key"]
        try:
            answered = email.utils.parsedate_to_datetime(created["ResponseMetadata"]["HTTPHeaders"]["date"])
        except (KeyError, TypeError, ValueError):
            answered = datetime.now(timezone.utc)
        since, until = answered - timedelta(seconds=elapsed + 1), answered + timedelta(seconds=1)
        try:
            listed = await self._call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
            for up in listed.get("Uploads", []):
                initiated = up.get("Initiated")
                if up.get("Key") != key or up.get("UploadId") == created.get("UploadId") or not isinstance(
                        initiated, datetime) or not since <= initiated <= until:
                    continue
                try:  # a writer's lease names it: another process's upload
                    await self._call_s3("head_object", Bucket=bucket, Key=upload_lease_key(key, up["UploadId"]))
                    continue
                except FileNotFoundError:
                    pass
                with contextlib.suppress(FileNotFoundError):  # gone already: an abort whose reply was lost
                    await self._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=up["UploadId"])
        except Exception as e:  # noqa: BLE001 - botocore's errors are not OSErrors
            print(f"warning: cannot abort the upload that a lost reply to beginning s3://{bucket}/{key}'s upload "
                  f"left ({type(e).__name__}: {s3read.brief(e)}): never visible, it costs storage until a later "
                  "run's sweep, or a bucket lifecycle rule that aborts incomplete multipart uploads, clears it",
                  file=sys.stderr, flush=True)

    call_s3 = sync_wrapper(_call_s3)  # s3fs's files call this, bound to the class's own _call_s3

    async def _cat_file(self, path, *args, **kwargs):
        # the body is read after _call_s3 returned: a connection cut mid-body is retried here
        retry = s3read.Retry(f"read s3://{path}")
        while True:
            try:
                return await super()._cat_file(path, *args, **kwargs)
            except (FileNotFoundError, s3read.StorageError):
                raise
            except Exception as e:  # noqa: BLE001
                if s3read.fault_kind(e) == "other":
                    raise
                await asyncio.sleep(retry.wait(e))


def _error_code(e: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError ("NoSuchUpload"), else None."""
    response = getattr(e, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None
