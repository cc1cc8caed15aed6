"""Write the symbol offsets of the parasite blobs as JSON (from `nm -P`)."""

import json
import sys

EXPORTED = {"clone_trampoline", "clone_trap", "parasite_args", "parasite_end", "syscall_blob", "syscall_trap"}


def offsets(nm_output: str) -> dict[str, int]:
    found = {}
    for line in nm_output.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] in EXPORTED:
            found[fields[0]] = int(fields[2], 16)
    return found


if __name__ == "__main__":
    out, *nm_files = sys.argv[1:]
    table = {}
    for path in nm_files:
        with open(path) as f:
            table.update(offsets(f.read()))
    with open(out, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
