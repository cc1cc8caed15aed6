"""Service mode (`memcr -l`), the daemon: memcr.service.daemon runs it.

listener: its socket; requests: a request off a connection, and its
answer; paths: what a client names, checked; peer: who asks, and what it
may have done; group_worker: a tree or a cgroup parked.
"""
