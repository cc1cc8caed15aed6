"""The platform: /proc reads and their parsing, the libc calls Python lacks, memcr's own process.

Nothing here knows about checkpoints; every layer above reads the system
through these modules (psutil's _pslinux shape).
"""
