"""Groups parked all or nothing: a process tree or a cgroup, one checkpoint per member."""
