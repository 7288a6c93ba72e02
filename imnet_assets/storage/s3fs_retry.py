"""The s3fs file system of `fs` for s3:// URLs, its requests retried by s3read's policy. A module of
its own so that a build of local roots never imports s3fs and aiobotocore (0.4 s of CPU in every
process that imports storage, the encode workers' forkserver among them)."""

from __future__ import annotations

import asyncio

import s3fs
from fsspec.asyn import sync_wrapper

from imnet_assets.storage import s3read


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
        while True:
            try:
                return await call(**args)
            except Exception as e:  # noqa: BLE001 - botocore's errors are not OSErrors
                translated = s3fs.errors.translate_boto_error(e)
                if isinstance(translated, FileNotFoundError) or s3read.fault_kind(e) == "other":
                    raise translated from e  # s3fs's meaning (a missing key, a refused request)
                await asyncio.sleep(retry.wait(e))

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
