#!/usr/bin/env python3
"""Run a command, by default the test suite, as root in emulated arm64 Debian machines, one per kernel.

    python3 scripts/arm64/vm.py [--kernel NAME]... [--timeout S] [-- COMMAND...]

As root on a Debian x86_64 host. Installs the host packages it needs, builds (once, cached under
/var/cache/memcr-py/arm64, or $MEMCR_ARM64_CACHE: every checkout on the machine uses it) a bookworm arm64 root
filesystem, the project's Python dependencies for aarch64, and for
each kernel of KERNELS (Debian's arm64 kernel of that release: bookworm's 6.1, bullseye's 5.10) an initrd
and a disk of its modules, then boots each in qemu-system-aarch64 with the project on a disk made anew
each run. Without a command, each kernel runs its own test files; with one, every kernel runs it. The exit
code is the first failing machine's, or 0. MEMCR_* variables of the host are passed to the command. The
guest's console goes to the terminal and to console-NAME.log in the cache. --timeout bounds each machine's
run (boot and command), not the builds before it.

Exit codes other than the command's: 124 timeout, 125 the machine failed, 130 interrupted.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import inspect
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# What `make test-arm64` runs inside, in /opt/memcr-py, when no command is given: each kernel its own files
# (docs/kernels.md says which run where, and why). The whole suite takes some 2 hours under emulation, too
# long for CI: the other files (the daemon's dialects, groups, security, endings, faults, the real apps) run
# natively only. Bookworm's 6.1 is the arm64 reference: the arch checks, the round trips with every option
# set, the dump pipeline, the service, the refusals and the failure paths (about 10 minutes). Bullseye's
# 5.10 is memcr's floor: the round trips, the odd states, lazy restore without /dev/userfaultfd, the
# mapping shapes and io_uring's older worker threads (about 14 minutes).
KERNELS = {
    "bookworm": [
        "tests/unit/test_arch.py",
        "tests/unit/test_features.py",
        "tests/test_roundtrip.py",
        "tests/test_dump_pipeline.py",
        "tests/test_service.py",
        "tests/test_preflight.py",
        "tests/test_failures.py",
        # io_uring's idle workers wait in io_wqe_worker before 6.4, and 6.1 polls a pipe read it hands them
        "tests/test_fidelity.py::test_io_urings_own_threads_waiting_for_work_are_parked",
        "tests/test_fidelity.py::test_io_uring_completion_while_parked_lands_after_restore",
        "tests/test_fidelity.py::test_an_io_uring_worker_asleep_in_a_request_is_left_alone",
        # no write tracking before 6.10 on arm64: every park whole, and memcr says why
        "tests/test_incremental.py::test_where_the_kernel_cannot_track_writes_every_park_is_whole",
    ],
    "bullseye": [
        "tests/unit/test_features.py",
        "tests/test_roundtrip.py",
        "tests/test_states.py",
        "tests/test_lazy.py",
        "tests/test_fidelity.py",
        "tests/test_incremental.py::test_where_the_kernel_cannot_track_writes_every_park_is_whole",
    ],
}
PYTEST = ["python3", "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", "--timeout=600", "--durations=25"]
# for those files, unless the host sets them: fewer random layouts (tests/test_fidelity.py) than the 40 natively,
# each taking some 3 s under emulation
SUITE_ENV = {"MEMCR_LAYOUT_EXAMPLES": "15"}
DEFAULT_TIMEOUT = 50 * 60

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "scripts" / "arm64"
# outside the checkout: a clean clone (as CI makes) finds what an earlier run built; what each run makes is
# named by what it was made from (key), so a change to a recipe builds anew
CACHE = Path(os.environ.get("MEMCR_ARM64_CACHE") or "/var/cache/memcr-py/arm64")

HOST_PACKAGES = [
    "qemu-system-arm",
    "qemu-user-static",
    "binfmt-support",
    "mmdebstrap",
    "arch-test",
    "kmod",
    "cpio",
    "e2fsprogs",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "python3-venv",
    "git",
    "make",
]
SUITE = "bookworm"
ROOTFS_PACKAGES = [
    "python3",
    "python3-venv",
    "gcc",
    "make",
    "libc6-dev",
    "binutils",
    "linux-libc-dev",
    "util-linux",
    "mount",
    "libcap2-bin",
    "strace",
    "passwd",
    "procps",
    "iproute2",
    "kmod",
    "e2fsprogs",
    "tini",
    # tests/unit/test_arch.py checks the other CPU's layouts with its cross compiler, as on the host
    "gcc-x86-64-linux-gnu",
    "libc6-dev-amd64-cross",
]
GUEST_PYTHON = "3.11"
# bookworm has glibc 2.36: every manylinux up to it, since pip takes only the tags it is given
PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)]
EXTRA_PYTHON_DEPS = ["pytest-timeout"]
# =m in the Debian arm64 config, needed to mount an ext4 root on virtio-blk (crc32c: ext4's checksums)
INITRD_MODULES = ["virtio_pci", "virtio_blk", "crc32c_generic", "ext4", "virtio_rng"]
GUEST_VENV = "/opt/memcr-venv"
GUEST_PROJECT = "/opt/memcr-py"
HOSTNAME = "memcr-arm64"
FREE_SPACE = 8 << 30  # on the root disk, for /tmp: the tests write dumps of up to 1 GiB
# copied from the host into the guest, so that the tests meet the same rules
SYSCTLS = [
    "kernel/yama/ptrace_scope",
    "vm/unprivileged_userfaultfd",
    "vm/overcommit_memory",
    "vm/max_map_count",
    "kernel/randomize_va_space",
    "kernel/kptr_restrict",
    "kernel/dmesg_restrict",
    "fs/suid_dumpable",
    "fs/protected_regular",
    "fs/protected_symlinks",
    "fs/protected_hardlinks",
    "fs/protected_fifos",
]

TIMES: list[tuple[str, float, str]] = []
WARNINGS: list[str] = []


class Failure(Exception):
    def __init__(self, message: str, code: int = 125) -> None:
        super().__init__(message)
        self.code = code


def say(message: str) -> None:
    print(f"vm.py: {message}", flush=True)


def timed(name: str, start: float, note: str) -> None:
    seconds = time.monotonic() - start
    TIMES.append((name, seconds, note))
    say(f"{name}: {note} ({seconds:.1f} s)")


def stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def run(
    argv: Sequence[str | Path],
    *,
    capture: bool = False,
    check: bool = True,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """Run a command to its end; it is ended too when we are (Ctrl-C, SIGTERM)."""
    args = [str(a) for a in argv]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE if capture else None, text=True, cwd=cwd, env=env)
    try:
        out, _ = proc.communicate()
    except BaseException:
        stop(proc)
        raise
    if check and proc.returncode != 0:
        raise Failure(f"{shlex.join(args)} failed with exit code {proc.returncode}")
    return out or ""


def key(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def cached(path: Path, build: Callable[[Path], None], kind: str = "") -> bool:
    """Build `path` through `build(tmp)` unless it is there; drop older builds of the same kind.

    The kind is the name's first word unless given: each kernel keeps its own builds.
    """
    if path.exists():
        return False
    for old in CACHE.glob(f"{kind or path.name.split('-')[0]}-*"):
        remove(old)
    tmp = path.with_name(path.name + ".tmp")
    build(tmp)
    tmp.rename(path)
    return True


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def host_packages() -> None:
    start = time.monotonic()
    listed = run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Status}\n", *HOST_PACKAGES], capture=True, check=False)
    installed = {line.split()[0] for line in listed.splitlines() if line.endswith(" installed")}
    missing = [p for p in HOST_PACKAGES if p not in installed]
    has_arm64 = "arm64" in run(["dpkg", "--print-foreign-architectures"], capture=True).split()
    if not has_arm64:
        run(["dpkg", "--add-architecture", "arm64"])
    if missing or not has_arm64:
        run(["apt-get", "update", "-q"])
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)
    timed("packages", start, f"installed {' '.join(missing)}" if missing else "all there")


def ensure_binfmt() -> None:
    """mmdebstrap runs the arm64 maintainer scripts through qemu-user, found by binfmt_misc."""
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", binfmt])
    if not (binfmt / "qemu-aarch64").exists():
        if not Path("/var/lib/binfmts/qemu-aarch64").exists():
            run(["update-binfmts", "--import", "qemu-aarch64"])
        run(["update-binfmts", "--enable", "qemu-aarch64"])


def build_rootfs(out: Path) -> None:
    ensure_binfmt()
    remove(out)
    run(
        [
            "mmdebstrap",
            "--arch=arm64",
            "--variant=apt",
            "--mode=root",
            "--format=directory",
            "--include=" + ",".join(ROOTFS_PACKAGES),
            '--aptopt=Acquire::Languages "none"',
            *(f"--dpkgopt=path-exclude=/usr/share/{d}/*" for d in ("doc", "man", "info", "locale")),
            SUITE,
            out,
            *host_sources(),
        ]
    )


def host_sources() -> list[str]:
    """The host's own Debian sources of SUITE, as one-line entries: the guest's packages come from where the host's do.

    Read from /etc/apt (deb822 .sources files and one-line .list files), so no address is written here.
    The kernels of other releases come from the same places (`suite_sources`).
    """
    apt = Path("/etc/apt")
    entries = []
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                (name.strip().lower(), value.strip())
                for name, sep, value in (line.partition(":") for line in stanza.splitlines())
                if sep and not name.startswith((" ", "#"))
            )
            if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no":
                components = fields.get("components", "main")
                entries += [
                    f"deb {uri} {suite} {components}"
                    for uri in fields.get("uris", "").split()
                    for suite in fields.get("suites", "").split()
                ]
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        for line in path.read_text().splitlines() if path.exists() else []:
            words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()  # options such as [signed-by=...] dropped
            if len(words) >= 3 and words[0] == "deb":
                entries.append(" ".join(words))
    mine = [e for e in dict.fromkeys(entries) if e.split()[2].split("-")[0] == SUITE]
    if not mine:
        raise Failure(f"/etc/apt lists no source of Debian {SUITE}: the arm64 machine is built from the host's sources")
    return mine


def rootfs() -> Path:
    start = time.monotonic()
    path = CACHE / f"rootfs-{key(inspect.getsource(build_rootfs), ROOTFS_PACKAGES, SUITE, host_sources())}"
    built = cached(path, build_rootfs)
    timed("rootfs", start, "built" if built else "cached")
    return path


def normalized(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    return re.sub(r"[-_.]+", "-", name.group(0) if name else requirement).lower()


def pyprojects() -> list[dict[str, Any]]:
    return [tomllib.loads((REPO / p / "pyproject.toml").read_text()) for p in (".", "memcr_client")]


def python_requirements() -> list[str]:
    """The runtime and test dependencies from pyproject.toml, less memcr-py-client (this tree's memcr_client)."""
    main, client = pyprojects()
    project = main["project"]
    wanted = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("test", [])]
    wanted += EXTRA_PYTHON_DEPS
    return list(dict.fromkeys(r for r in wanted if normalized(r) != normalized(client["project"]["name"])))


def build_requirements() -> list[str]:
    """What pip needs to build the project and memcr_client, as some tests and `make install-system` do."""
    return list(dict.fromkeys(r for p in pyprojects() for r in p.get("build-system", {}).get("requires", [])))


def console_scripts() -> dict[str, str]:
    return {name: target for p in pyprojects() for name, target in p["project"].get("scripts", {}).items()}


def host_pip() -> Path:
    """A pip of our own: Debian's python3 has none, and --target needs no environment of the host's."""
    venv = CACHE / "host-pip"
    if not (venv / "bin" / "pip").exists():
        remove(venv)
        run([sys.executable, "-m", "venv", venv])
    return venv / "bin" / "pip"


def build_deps(out: Path, requirements: list[str], build: list[str], scripts: dict[str, str]) -> None:
    """A venv for the guest's /usr/bin/python3, made without running it, from aarch64 wheels.

    The wheels stay in it too, with pip and the build requirements: the guest has no network, and its
    /etc/pip.conf sends pip there, so that the tests' own installs work as on the host.
    """
    remove(out)
    wheels = out / "wheels"
    site = out / "lib" / f"python{GUEST_PYTHON}" / "site-packages"
    pip: list[str | Path] = [host_pip(), "-q", "--disable-pip-version-check"]
    target = ["--python-version", GUEST_PYTHON, "--implementation", "cp", "--only-binary=:all:"]
    target += [f"--platform={p}" for p in PLATFORMS]
    run([*pip, "download", *target, "--dest", wheels, *requirements, *build, "pip"])
    run([*pip, "install", *target, "--no-index", "--find-links", wheels, "--target", site, *requirements])
    bin_dir = out / "bin"
    if (site / "bin").exists():
        (site / "bin").rename(bin_dir)
    bin_dir.mkdir(exist_ok=True)
    python = f"{GUEST_VENV}/bin/python"
    for script in bin_dir.iterdir():
        if not script.is_file():
            continue  # __pycache__ of the scripts a wheel ships (python-ptrace's strace.py, gdb.py)
        text = script.read_bytes()
        if text.startswith(b"#!") and b"python" in text.split(b"\n", 1)[0]:
            script.write_bytes(b"#!" + python.encode() + b"\n" + text.split(b"\n", 1)[1])
    for name, entry in scripts.items():
        module, _, function = entry.partition(":")
        script = bin_dir / name
        script.write_text(f"#!{python}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
        script.chmod(0o755)
    (bin_dir / "python").symlink_to(f"/usr/bin/python{GUEST_PYTHON}")
    (bin_dir / "python3").symlink_to("python")
    (bin_dir / f"python{GUEST_PYTHON}").symlink_to("python")
    (out / "lib64").symlink_to("lib")
    (out / "pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {GUEST_PYTHON}\n"
    )
    # memcr and memcr_client from the project's tree, as an editable install has them
    (site / "memcr-py.pth").write_text(GUEST_PROJECT + "\n")


def deps() -> Path:
    start = time.monotonic()
    requirements, build, scripts = python_requirements(), build_requirements(), console_scripts()
    recipe = key(inspect.getsource(build_deps), requirements, build, scripts, PLATFORMS, GUEST_VENV)
    path = CACHE / f"deps-{recipe}"
    built = cached(path, lambda out: build_deps(out, requirements, build, scripts))
    timed("deps", start, ("built: " if built else "cached: ") + " ".join(requirements))
    return path


def suite_sources(release: str) -> list[str]:
    """Where RELEASE's arm64 packages come from: the host's sources of SUITE, arm64 only.

    Another release has the same addresses, but only its own suite: the kernel of its last point release,
    which stays the same from run to run (an old release's security updates also leave the mirrors).
    """
    lines = []
    for entry in host_sources():
        words = entry.split()
        if release != SUITE:
            if words[2] != SUITE:
                continue
            words[2] = release
        lines.append(" ".join([words[0], "[arch=arm64]", *words[1:]]))
    return lines


def apt(release: str, *args: str, capture: bool = False, check: bool = True, cwd: Path | None = None) -> str:
    """apt-get or apt-cache (the first of args) on a state of our own that knows only RELEASE's arm64 packages.

    The host's apt is left as it is: no list of another release is added to it. Lists of other sources
    than today's are dropped.
    """
    state = CACHE / f"apt-{release}"
    sources = state / "sources.list"
    text = "".join(line + "\n" for line in suite_sources(release))
    if not sources.exists() or sources.read_text() != text:
        remove(state)
        state.mkdir(parents=True)
        sources.write_text(text)
    (state / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (state / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    options = [
        f"Dir::Etc::SourceList={sources}",
        "Dir::Etc::SourceParts=/nonexistent",
        f"Dir::State::Lists={state / 'lists'}",
        f"Dir::Cache={state}",
        f"Dir::Cache::Archives={state / 'archives'}",
        # the _apt sandbox user cannot write into these root-owned folders
        "APT::Sandbox::User=root",
    ]
    command, *rest = args
    return run([command, *(f"-o{o}" for o in options), *rest], capture=capture, check=check, cwd=cwd)


def resolve_kernel(release: str, update: bool) -> tuple[str, str] | None:
    """The versioned image package that RELEASE's linux-image-arm64 depends on, and its version, by the lists
    as they are (None without any) or, with `update`, as they are now."""
    if update:
        apt(release, "apt-get", "update", "-q")
    shown = apt(release, "apt-cache", "show", "--no-all-versions", "linux-image-arm64:arm64", capture=True, check=False)
    found = re.search(r"^Depends:.*?\b(linux-image-[^\s,(]+-arm64(?:-unsigned)?) \(= ([^)]+)\)", shown, re.M)
    return (found.group(1), found.group(2)) if found else None


def build_kernel(out: Path, release: str, package: str, version: str) -> None:
    remove(out)
    debs = out / "debs"
    debs.mkdir(parents=True)
    apt(release, "apt-get", "download", "-q", f"{package}:arm64={version}", "busybox-static:arm64", cwd=debs)
    for deb in debs.glob("*.deb"):
        run(["dpkg-deb", "-x", deb, out / ("busybox" if deb.name.startswith("busybox") else "tree")])
    remove(debs)
    run(["depmod", "-b", out / "tree", kernel_release(out)])


def kernel_release(kernel: Path) -> str:
    return next((kernel / "tree" / "lib" / "modules").iterdir()).name


def kernel(release: str) -> Path:
    """RELEASE's kernel: the one fetched before while the lists still name it, else the newest there is."""
    start = time.monotonic()
    known = resolve_kernel(release, update=False)
    if known is None or not (CACHE / f"kernel-{release}-{known[0]}_{known[1]}").exists():
        known = resolve_kernel(release, update=True)  # what is fetched comes from fresh lists
    if known is None:
        raise Failure(f"Debian {release}'s sources ({', '.join(suite_sources(release))}) have no linux-image-arm64")
    package, version = known
    path = CACHE / f"kernel-{release}-{package}_{version}"
    built = cached(path, lambda out: build_kernel(out, release, package, version), f"kernel-{release}")
    timed(f"{release} kernel", start, f"{'fetched' if built else 'cached'} {package} {version}")
    return path


def initrd_modules(kernel: Path) -> list[str]:
    """INITRD_MODULES and what they depend on, dependencies first, as paths under lib/modules/RELEASE."""
    modules = kernel / "tree" / "lib" / "modules" / kernel_release(kernel)
    depends: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        module, _, needs = line.partition(":")
        depends[module] = needs.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in depends}
    builtin = {
        Path(m).name.split(".ko")[0].replace("-", "_") for m in (modules / "modules.builtin").read_text().split()
    }
    order: list[str] = []

    def add(module: str) -> None:
        for need in depends[module]:
            add(need)
        if module not in order:
            order.append(module)

    for name in INITRD_MODULES:
        if name in by_name:
            add(by_name[name])
        elif name not in builtin:
            raise Failure(f"the kernel has no module {name}, neither built in nor as a file")
    return order


def build_initrd(out: Path, kernel: Path) -> None:
    staging = CACHE / "initrd-staging"
    remove(staging)
    (staging / "bin").mkdir(parents=True)
    shutil.copy2(kernel / "busybox" / "bin" / "busybox", staging / "bin" / "busybox")
    shutil.copy2(HERE / "initrd-init.sh", staging / "init")
    (staging / "init").chmod(0o755)
    modules = kernel / "tree" / "lib" / "modules" / kernel_release(kernel)
    (staging / "lib" / "modules").mkdir(parents=True)
    order = initrd_modules(kernel)
    for module in order:
        shutil.copy2(modules / module, staging / "lib" / "modules")
    (staging / "modules").write_text("".join(Path(m).name + "\n" for m in order))
    run(["sh", "-c", 'find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -9 >"$0"', out], cwd=staging)
    remove(staging)
    say("initrd modules: " + " ".join(Path(m).name for m in order))


def initrd(release: str, kernel: Path) -> Path:
    start = time.monotonic()
    recipe = key(inspect.getsource(build_initrd), INITRD_MODULES, (HERE / "initrd-init.sh").read_text(), kernel.name)
    path = CACHE / f"initrd-{release}-{recipe}.img"
    built = cached(path, lambda out: build_initrd(out, kernel), f"initrd-{release}")
    timed(f"{release} initrd", start, "built" if built else "cached")
    return path


def build_modules(out: Path, kernel: Path) -> None:
    """The kernel's modules on a disk of their own, mounted on /usr/lib/modules: the root disk serves every kernel."""
    make_ext4(kernel / "tree" / "lib" / "modules", out, used_bytes(kernel / "tree") * 5 // 4 + (16 << 20), "memcr-mod")


def modules(release: str, kernel: Path) -> Path:
    start = time.monotonic()
    recipe = key(inspect.getsource(build_modules), inspect.getsource(make_ext4), kernel.name)
    path = CACHE / f"modules-{release}-{recipe}.img"
    built = cached(path, lambda out: build_modules(out, kernel), f"modules-{release}")
    timed(f"{release} modules", start, "built" if built else "cached")
    return path


def used_bytes(tree: Path) -> int:
    return int(run(["du", "-sx", "--block-size=1", tree], capture=True).split()[0])


def make_ext4(tree: Path, image: Path, size: int, label: str) -> None:
    remove(image)
    with image.open("wb") as f:
        f.truncate(size)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", label, "-d", tree, image])


def replace(path: Path, text: str) -> None:
    """Write a file of a tree hard-linked to the cache without writing through to the cache."""
    path.unlink(missing_ok=True)
    path.write_text(text)


def build_base(out: Path, rootfs: Path, deps: Path) -> None:
    """The root disk: the rootfs and the venv (each kernel's modules are on a disk of their own)."""
    staging = CACHE / "base-staging"
    remove(staging)
    # hard links: copying the gigabyte would take longer than mke2fs
    run(["cp", "-al", rootfs, staging])
    (staging / "usr" / "lib" / "modules").mkdir(exist_ok=True)
    run(["cp", "-al", deps, staging / GUEST_VENV.lstrip("/")])
    replace(staging / "etc" / "hostname", HOSTNAME + "\n")
    replace(staging / "etc" / "hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost\n")
    # no network in the guest: pip takes what build_deps downloaded
    replace(staging / "etc" / "pip.conf", f"[global]\nno-index = true\nfind-links = {GUEST_VENV}/wheels\n")
    (staging / "mnt" / "job").mkdir(parents=True, exist_ok=True)
    make_ext4(staging, out, used_bytes(staging) * 5 // 4 + FREE_SPACE, "memcr-root")
    remove(staging)


def base_image(rootfs: Path, deps: Path) -> Path:
    start = time.monotonic()
    recipe = key(inspect.getsource(build_base), rootfs.name, deps.name, HOSTNAME, FREE_SPACE)
    path = CACHE / f"base-{recipe}.img"
    built = cached(path, lambda out: build_base(out, rootfs, deps))
    timed("image", start, "built" if built else "cached")
    return path


def build_parasite() -> None:
    """The arm64 blob the guest's memcr uses: a failed build fails the run, as a stale blob would test old code."""
    start = time.monotonic()
    run(["make", "-C", REPO / "parasite", "ARCH=aarch64", "CROSS_COMPILE=aarch64-linux-gnu-"])
    timed("parasite", start, "memcr/_blobs/aarch64 made")


def project_files() -> list[Path]:
    """The working tree as git sees it (new files not yet added too), and the parasite blobs it ignores."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], capture=True, cwd=REPO)
    files = [Path(f) for f in listed.split("\0") if f]
    blobs = REPO / "memcr" / "_blobs"
    if blobs.is_dir():
        files += [p.relative_to(REPO) for p in blobs.rglob("*") if p.is_file()]
    return sorted({f for f in files if (REPO / f).is_file() or (REPO / f).is_symlink()})


def host_sysctls() -> list[str]:
    settings = []
    for name in SYSCTLS:
        try:
            value = Path("/proc/sys", name).read_text().strip()
        except FileNotFoundError:
            if name != "kernel/yama/ptrace_scope":
                continue
            value = "0"  # no Yama on the host: nothing but capabilities restricts ptrace
        if re.fullmatch(r"-?\d+", value):
            settings.append(f"{name}={value}")
    return settings


def job_disk(command: list[str], nonce: str, env: dict[str, str]) -> Path:
    """The second disk, made anew each run: the project tree, the guest's init and the job, run with `env`
    and the host's MEMCR_* variables."""
    start = time.monotonic()
    staging = CACHE / "job"
    remove(staging)
    project = staging / "project"
    for f in project_files():
        (project / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, project / f, follow_symlinks=False)
    if sys.version_info[:2] == tuple(int(n) for n in GUEST_PYTHON.split(".")):
        # the guest's Python is ~7x slower: compile the project here (same bytecode)
        run([sys.executable, "-m", "compileall", "-q", "-j0", project], capture=True, check=False)
    shutil.copy2(HERE / "guest-init.sh", staging / "init.sh")
    (staging / "vm.env").write_text(
        f"NONCE={nonce}\nVM_HOSTNAME={HOSTNAME}\nSYSCTLS={shlex.quote(' '.join(host_sysctls()))}\n"
    )
    passed = env | {k: v for k, v in os.environ.items() if k.startswith("MEMCR_") and re.fullmatch(r"\w+", k)}
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(passed.items()))
    (staging / "run").write_text(f"{exports}exec {shlex.join(command)}\n")
    image = CACHE / "job.img"
    make_ext4(staging, image, used_bytes(staging) * 2 + (1 << 30), "memcr-job")
    remove(staging)
    timed("job disk", start, f"{len(passed)} MEMCR_* variable(s): {' '.join(sorted(passed)) or '-'}")
    return image


def boot(release: str, kernel: Path, initrd: Path, disks: tuple[Path, Path, Path], nonce: str, timeout: float) -> int:
    """Boot RELEASE's kernel on the disks (root, modules, job) and return the job's exit code."""
    base, mods, job = disks
    vmlinuz = next((kernel / "tree" / "boot").glob("vmlinuz-*"))
    # PCI slots in this order make the root vda, the job disk vdb and the modules vdc; snapshot=on: writes
    # go to a temporary file that qemu deletes, so each run starts from the pristine base image
    argv = [
        "qemu-system-aarch64",
        "-M",
        "virt",
        "-cpu",
        "max,pauth-impdef=on",
        "-smp",
        "2",
        "-m",
        "4096",
        "-accel",
        "tcg,thread=multi",
        "-nographic",
        "-no-reboot",
        "-nic",
        "none",
        "-kernel",
        str(vmlinuz),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyAMA0 root=/dev/vda memcr.job=/dev/vdb memcr.modules=/dev/vdc quiet panic=-1",
        "-drive",
        f"file={base},format=raw,if=none,id=root,snapshot=on,cache=unsafe",
        "-device",
        "virtio-blk-pci,drive=root,addr=0x8",
        "-drive",
        f"file={job},format=raw,if=none,id=job,cache=unsafe",
        "-device",
        "virtio-blk-pci,drive=job,addr=0x9",
        "-drive",
        f"file={mods},format=raw,if=none,id=modules,readonly=on",
        "-device",
        "virtio-blk-pci,drive=modules,addr=0xa",
        "-device",
        "virtio-rng-pci",
    ]
    start = time.monotonic()
    deadline = start + timeout
    started = None
    code = None
    panicked = False
    qemu_said = ""
    # searched, not matched: output without a final newline leaves the marker behind it on its line
    marker = re.compile(rf"memcr-vm: (start|exit) {nonce}(?: (\d+))?$".encode())
    log_path = CACHE / f"console-{release}.log"
    say(f"booting; the console goes to {log_path} too")
    # its own session: Ctrl-C reaches us, and we end it
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    pending = b""
    try:
        with log_path.open("wb") as log:
            while True:
                now = time.monotonic()
                if code is None and now > deadline:
                    raise Failure(f"timed out after {timeout:.0f} s: killed qemu", 124)
                if code is not None and now > deadline:
                    WARNINGS.append("the guest did not power off after its command: killed qemu")
                    break
                ready, _, _ = select.select([fd], [], [], 1.0)
                if not ready:
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                chunk = chunk.replace(b"\r", b"")
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
                log.flush()
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    panicked = panicked or b"Kernel panic" in line
                    if line.startswith(b"qemu-system-aarch64:"):
                        qemu_said = line.decode(errors="replace")
                    found = marker.search(line)
                    if found and found.group(1) == b"start":
                        started = time.monotonic()
                        timed(f"{release} boot", start, "up")
                    elif found:
                        code = int(found.group(2))
                        timed(f"{release} command", started or start, f"exit code {code}")
                        deadline = time.monotonic() + 60  # to power off
    finally:
        stop(proc)
    if code is None:
        why = "the kernel panicked" if panicked else qemu_said or f"qemu exited with {proc.returncode}"
        raise Failure(f"the guest ended without reporting its command's exit code ({why}); see {log_path}")
    return code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for boot and command (default 50 min)"
    )
    parser.add_argument(
        "--kernel",
        action="append",
        choices=list(KERNELS),
        help="the Debian release whose arm64 kernel to boot; again for more (default: each in turn)",
    )
    parser.add_argument("command", nargs="*", help=f"run in each guest (default: {shlex.join(PYTEST)} and its files)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise Failure("run me as root: apt-get, mmdebstrap and mke2fs of a root filesystem need it")
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = (CACHE / "lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise Failure(f"another vm.py is running with {CACHE}") from None
    host_packages()
    base = base_image(rootfs(), deps())
    build_parasite()
    status = 0
    for release in args.kernel or list(KERNELS):
        try:
            if args.command:
                code = machine(release, base, args.command, {}, args.timeout)
            else:
                code = machine(release, base, [*PYTEST, *KERNELS[release]], SUITE_ENV, args.timeout)
        except Failure as failure:  # the other kernels still run
            say(f"{release}: FAILED: {failure}")
            code = failure.code
        say(f"{release}: exit code {code}")
        status = status or code
    return status


def machine(release: str, base: Path, command: list[str], env: dict[str, str], timeout: float) -> int:
    """Fetch and boot RELEASE's kernel on `base`, run the command there (with `env`); its exit code."""
    kern = kernel(release)
    ramdisk, mods = initrd(release, kern), modules(release, kern)
    nonce = secrets.token_hex(8)
    job = job_disk(command, nonce, env)
    say(f"{release}: Linux {kernel_release(kern)}")
    return boot(release, kern, ramdisk, (base, mods, job), nonce, timeout)


def summary() -> None:
    say("phases: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds, _ in TIMES))
    for warning in WARNINGS:
        say("WARNING: " + warning)


if __name__ == "__main__":

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)
    try:
        status = main()
    except Failure as failure:
        say(f"FAILED: {failure}")
        status = failure.code
    except KeyboardInterrupt:
        say("interrupted")
        status = 130
    summary()
    sys.exit(status)
