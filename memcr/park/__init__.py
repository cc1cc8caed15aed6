"""One process parked and woken: the memory scan, the checkpoint, the restore.

Data flows one way: scan -> plan -> stream -> dump file, and back
(`parked` and `upload`; lazily, `memcr.lazy`).
"""
