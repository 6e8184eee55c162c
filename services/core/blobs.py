"""A content-addressed blob store: images travel by sha256, never inside Kafka records."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    """Blobs under root/<first two hex>/<sha256>. Writes are atomic (temporary name, then rename) and
    idempotent, so replicas can share one volume."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise ValueError(f"not a lower-case hex sha256: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        if target.exists():
            return digest
        target.parent.mkdir(exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return digest

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()
