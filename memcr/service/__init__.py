"""Service mode (`memcr -l`), the daemon: memcr.service.daemon runs it.

listener: its socket; requests: a request off a connection, and its
answer; paths: what a client names, checked; peer: who asks, and what it
may have done; jobs: one target from its checkpoint to its restore, one
pid (pid_target) or a group (group_target).
"""
