"""DataError: every bad input is reported with where it came from.

A user with a 2 GB text file or a thousand shards needs the location, not a traceback: the message
starts with `file:line` for text sources and `shard ... key ...` for shards.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data; ``str(err)`` names the file and line or the shard and key."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        shard: str | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.shard = shard
        self.key = key
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file is not None:
            where.append(f"{self.file}:{self.line}" if self.line is not None else self.file)
        if self.shard is not None:
            where.append(f"shard {self.shard}")
        if self.key is not None:
            where.append(f"key {self.key}")
        return f"{', '.join(where)}: {self.message}" if where else self.message

    def __reduce__(self):  # keep the fields when raised inside a DataLoader worker process
        kwargs = dict(file=self.file, line=self.line, shard=self.shard, key=self.key)
        return (_rebuild, (self.message, kwargs))


def _rebuild(message: str, kwargs: dict) -> DataError:
    return DataError(message, **kwargs)
