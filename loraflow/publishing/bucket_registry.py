"""The version registry of an `s3://` store, in the bucket, so every host that shares the store sees one registry.

Same layout as the folder registry (loraflow.publishing.registry), under `<store>/published/`:

    <name>/versions/0001.json   taken with `If-None-Match: *`: of two hosts that try one number, one gets it and the
                                other tries the next (412), so two publishes at once get two numbers
    <name>/history.jsonl        appended by rewriting it with `If-Match: <its ETag>` (created with `If-None-Match: *`),
                                again on 412, so no entry is lost to a concurrent append
    <name>.json                 the champion's record, rewritten with `If-Match` on the ETag it was read with: a move
                                that raced another starts over from the champion the other set, so neither is lost

Moving the champion rewrites `<name>.json` first (the conditional put decides which move comes after which), then
appends its entry to the history. The bucket must honour conditional writes (AWS S3, recent MinIO, R2), as for
`locks.backend: object-store`.
"""

from __future__ import annotations

import json

from loraflow.publishing.registry import RegistryError, move_entry, previous_champion
from loraflow.runtime.object_store_locks import MISSING, error_code, put_object_if, s3_client, s3_location


class RegistryStoreError(RuntimeError):
    """The bucket refused or could not serve a registry request; the message names the key and what to check."""


class BucketRegistry:
    """The registry at `<store>/published/` in an `s3://` store, with the folder registry's functions."""

    def __init__(self, store_root: str, client=None) -> None:
        self.bucket, self.prefix = s3_location(store_root)
        self.client = client or s3_client()
        self.where = f"s3://{self.bucket}/{self.key('')}".rstrip("/")

    def key(self, path: str) -> str:
        """The bucket key of `published/<path>`."""
        return "/".join(part for part in (self.prefix, "published", path) if part)

    # ---- objects

    def _get(self, path: str) -> tuple[bytes, str] | None:
        """(body, ETag) of `published/<path>`, or None when there is no such object."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key(path))
        except Exception as error:
            if error_code(error) in MISSING:
                return None
            raise self._store_error(path, error) from error
        return response["Body"].read(), response["ETag"]

    def _put(self, path: str, body: bytes, **condition) -> bool:
        """Write `published/<path>` under `condition` (IfNoneMatch='*' or IfMatch=<ETag>); False when the condition
        failed (another host wrote it first)."""
        try:
            return put_object_if(self.client, self.bucket, self.key(path), body, **condition) is not None
        except Exception as error:
            raise self._store_error(path, error) from error

    def _store_error(self, path: str, error: Exception) -> RegistryStoreError:
        return RegistryStoreError(
            f"registry s3://{self.bucket}/{self.key(path)}: the bucket refused the request "
            f"({error_code(error) or type(error).__name__}: {error}) -> check the AWS credentials and endpoint "
            f"(AWS_ENDPOINT_URL) of this host")

    def _numbers(self, name: str) -> list[int]:
        """The version numbers of `name` in the bucket, ascending."""
        prefix = self.key(f"{name}/versions/")
        numbers = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            numbers += [int(item["Key"][len(prefix):].removesuffix(".json")) for item in page.get("Contents", [])
                        if item["Key"].endswith(".json")]
        return sorted(numbers)

    # ---- the registry

    def add_version(self, name: str, record: dict) -> int:
        """Write `record` as the next version of `name` and return its number (taken with `If-None-Match: *`)."""
        number = max(self._numbers(name), default=0) + 1
        while not self._put(f"{name}/versions/{number:04d}.json", _json(
                {**record, "model_name": name, "version": number}), IfNoneMatch="*"):
            number += 1  # another host took this number first
        return number

    def versions(self, name: str) -> list[dict]:
        """Every version of `name`, oldest first."""
        return [self.version(name, number) for number in self._numbers(name)]

    def version(self, name: str, number: int) -> dict:
        """Version `number` of `name`, or RegistryError naming the versions there are."""
        found = self._get(f"{name}/versions/{number:04d}.json")
        if found is None:
            raise RegistryError(f"{name}: no version {number} in {self.where} (versions: {self._numbers(name) or 'none'})"
                                f" -> `loraflow models {name}` lists them")
        return json.loads(found[0])

    def history(self, name: str) -> list[dict]:
        """Every move of `name`'s champion, oldest first."""
        found = self._get(f"{name}/history.jsonl")
        return [json.loads(line) for line in found[0].decode().splitlines() if line.strip()] if found else []

    def champion(self, name: str) -> dict | None:
        """The champion's version record (None before the first publish)."""
        found = self._get(f"{name}.json")
        return json.loads(found[0]) if found else None

    def move_champion(self, name: str, number: int, *, action: str, why: str, by: str | None = None,
                      hub_tag: dict | None = None) -> dict:
        """Make version `number` the champion of `name` (as the folder registry's `move_champion`); the record is
        rewritten with `If-Match` on the one read, so a concurrent move makes this one start over from it."""
        record = self.version(name, number)
        while True:
            found = self._get(f"{name}.json")
            current, condition = (json.loads(found[0]), {"IfMatch": found[1]}) if found else (None, {"IfNoneMatch": "*"})
            entry = move_entry(current, number, action=action, why=why, by=by, hub_tag=hub_tag)
            if self._put(f"{name}.json", _json({**record, "champion_since": entry}), **condition):
                break
        self._append_history(name, entry)
        return entry

    def _append_history(self, name: str, entry: dict) -> None:
        """Add `entry` to `<name>/history.jsonl`, rewritten with `If-Match` (again when another append came first)."""
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        while True:
            found = self._get(f"{name}/history.jsonl")
            body, condition = (found[0] + line, {"IfMatch": found[1]}) if found else (line, {"IfNoneMatch": "*"})
            if self._put(f"{name}/history.jsonl", body, **condition):
                return

    def rollback_target(self, name: str) -> int:
        """The version that was champion before the current one (the target of `loraflow rollback NAME`)."""
        return previous_champion(name, self.champion(name), self.history(name), self.where)


def _json(value: dict) -> bytes:
    return json.dumps(value, indent=1, sort_keys=True).encode()
