"""`make bench` and `make profile`, as a package: `python -m bench`, `python -m bench.flame`.

Run from the repository's root. Its modules are named so that none can
stand for one of memcr's or the standard library's (service, profile, codecs).
"""
