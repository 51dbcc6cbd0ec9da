#!/usr/bin/env python3
"""Top heap allocation sites at the peak (t-gmax) of a valgrind DHAT profile, per connection.

    scripts/dhat-top.py dhat.out.PID --connections 2000 [--top 30] [--depth 4]

Each allocation site (a program point: the call stack of one malloc) is grouped under its
first frames outside the allocator and the standard library, so `BytesMut::with_capacity`
called from actix-http's dispatcher is listed under the dispatcher's file:line. Bytes are
what the program asked for (malloc's own overhead and rounding not counted). Used by
docs/PERFORMANCE.md's memory profile; scripts/profile-idle.sh makes the input.
"""

import argparse
import collections
import json
import re

# Frames that say nothing about who wanted the memory: the allocator, valgrind's preload,
# the standard library (paths under library/), and generic containers.
GENERIC = re.compile(
    r"(\[root\]|vgpreload|vg_replace_malloc|\(library/|/rustc/|__rust|__rdl|"
    r"\((unix|alloc|raw_vec|boxed|vec|rc|sync|arc)\.rs:|"
    r"\(src/(bytes_mut|bytes|raw_vec|boxed)\.rs:|"
    r"^0x[0-9A-Fa-f]+: (alloc|alloc_impl|allocate|aligned_malloc|with_capacity|"
    r"with_capacity_in|try_allocate_in|reserve|reserve_inner|grow_one|grow_amortized|"
    r"finish_grow|do_reserve_and_handle|new|from|clone|to_vec|to_owned|push|extend|"
    r"UnknownInlinedFun) |"
    r"\?\?\?|_dl_|__libc|pthread_create|clone3?)"
)


def strip_generics(name: str) -> str:
    """`new<tokio::…, F<…>>` → `new`; keeps `<A as B>::f` readable enough."""
    out, depth = [], 0
    for ch in name:
        if ch == "<":
            depth += 1
        elif ch == ">" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def short(frame: str) -> str:
    """`0xADDR: func<…> (path/file.rs:12)` → `func (path/file.rs:12)`."""
    frame = re.sub(r"^0x[0-9A-Fa-f]+: ", "", frame)
    m = re.match(r"^(.*) \(([^()]*)\)$", frame)
    func, where = (m.group(1), m.group(2)) if m else (frame, "")
    func = strip_generics(func)
    func = re.sub(r"::h[0-9a-f]{16}$", "", func)
    where = re.sub(r"/root/\.cargo/registry/src/[^/]+/", "", where)
    return f"{func} ({where})" if where else func


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--connections", type=int, required=True)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--depth", type=int, default=3, help="frames shown per site")
    args = ap.parse_args()
    with open(args.file) as f:
        d = json.load(f)
    ftbl = d["ftbl"]
    sites = collections.defaultdict(lambda: [0, 0, None])
    total = blocks = 0
    for pp in d["pps"]:
        gb, gbk = pp.get("gb", 0), pp.get("gbk", 0)
        if gb == 0:
            continue
        total += gb
        blocks += gbk
        frames = [ftbl[i] for i in pp["fs"]]
        useful = [short(fr) for fr in frames if not GENERIC.search(fr)]
        key = " <- ".join(useful[: args.depth]) or short(frames[-1])
        s = sites[key]
        s[0] += gb
        s[1] += gbk
    n = args.connections
    print(f"heap at t-gmax: {total} bytes in {blocks} blocks; "
          f"{total / n:.0f} bytes and {blocks / n:.1f} blocks per connection ({n})")
    print()
    print("| bytes/conn | blocks/conn | share | site (first frames outside alloc/std) |")
    print("| ---: | ---: | ---: | --- |")
    for key, (b, k, _) in sorted(sites.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| {b / n:.0f} | {k / n:.2f} | {100 * b / total:.1f}% | {key} |")


if __name__ == "__main__":
    main()
