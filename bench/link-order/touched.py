"""Prints the functions of a running ztunnel (split by split.so) whose code pages were touched,
in address order: the symbol-ordering list for lld (bench/link-order.sh)."""
import re
import subprocess
import sys


def touched_offsets(pid):
    """File offsets of the executable's code pages that are resident (one-page mappings)."""
    exe = f"/proc/{pid}/exe"
    path = subprocess.run(["readlink", exe], capture_output=True, text=True, check=True).stdout.strip()
    pages, current = set(), None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+) ([0-9a-f]+) \S+ \S+\s*(.*)", line)
            if m:
                mapped = m.group(5).replace(" (deleted)", "")
                current = int(m.group(4), 16) if mapped == path and m.group(3) == "r-xp" else None
                size = int(m.group(2), 16) - int(m.group(1), 16)
                if current is not None and size != 4096:
                    sys.exit(f"{path}: a {size}-byte code mapping: was split.so preloaded?")
                continue
            if current is not None and line.startswith("Rss:") and int(line.split()[1]) > 0:
                pages.add(current // 4096)
    return path, pages


def code_segment(binary):
    """(file offset, virtual address) of the executable PT_LOAD segment."""
    out = subprocess.run(["readelf", "-l", "-W", binary], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "LOAD" and "E" in f[6:-1]:
            return int(f[1], 16), int(f[2], 16)
    sys.exit(f"{binary}: no executable segment")


def main():
    names, binary = {}, None
    for pid in sys.argv[1:]:
        binary, pages = touched_offsets(pid)
        offset, vaddr = code_segment(binary)
        out = subprocess.run(["nm", "-S", "--defined-only", binary], capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            f = line.split()
            if len(f) != 4 or f[2] not in "tTwW":
                continue
            start, size = int(f[0], 16) - vaddr + offset, max(int(f[1], 16), 1)
            if any(p in pages for p in range(start // 4096, (start + size - 1) // 4096 + 1)):
                names[f[3]] = int(f[0], 16)
    for name in sorted(names, key=names.get):
        print(name)


main()
