"""A writer process for the kill tests: stage MB bytes to URI, say "ready", then wait.

Usage: python _storage_writer.py URI MB

It opens ``storage.atomic_write(URI)``, writes MB mebibytes, flushes, prints ``ready`` (and
flushes stdout), then sleeps inside the ``with`` block until it is killed. The environment
(STORAGE_EMULATOR_HOST, AWS_*, STABLEREP_STAGING_DIR) comes from the parent test.
"""

from __future__ import annotations

import sys
import time

from stablerep import storage


def main() -> None:
    uri, mb = sys.argv[1], int(sys.argv[2])
    chunk = bytes(range(256)) * 4096  # 1 MiB
    with storage.atomic_write(uri) as w:
        for _ in range(mb):
            w.file.write(chunk)
        w.file.flush()
        print("ready", flush=True)
        time.sleep(120)  # the test kills us long before this ends
    print("published", flush=True)  # reached only if nobody killed us


if __name__ == "__main__":
    main()
