#!/usr/bin/env python3
"""Fails when the modules of a crate import each other in a circle.

Usage: scripts/module-cycles.py CRATE_SRC_DIR...   (e.g. src actors/src)

Each file under the directory is a module (`lib.rs` the root, `a.rs` or
`a/mod.rs` module `a`, `a/b.rs` module `a::b`; `bin/` and `main.rs` are left
out: binaries sit on top of the library). Every `crate::…`, `super::…` and
`self::…` path in a file's code (comments stripped, `use` groups expanded)
is a dependency of that module on the path it names. A dependency is drawn
between the two siblings under the modules' closest common ancestor, so a
child may use its parent (`super::Thing`) and a parent its children, but
`a::x → b` and `b::y → a` is a circle between `a` and `b`. Circles are found
at every level of the tree and printed with the file and line that closes
each edge.
"""
import os
import re
import sys


def module_path(root, path):
    rel = os.path.relpath(path, root)
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("lib", "mod"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text):
    """Code without comments (doc comments included) and with empty string
    literals: paths in either are not imports. One pass, so `//` inside a
    string and quotes inside a comment are both seen for what they are."""
    token = re.compile(
        r'\bb?r(#*)".*?"\1'  # raw strings
        r'|"(?:\\.|[^"\\])*"'  # strings
        r"|'(?:\\.|[^'\\])'"  # char literals (not lifetimes)
        r"|/\*.*?\*/"  # block comments
        r"|//[^\n]*",  # line comments
        re.S,
    )

    def blank(m):
        t = m.group(0)
        if t.startswith("/"):
            return "\n" * t.count("\n")
        return '""' + "\n" * t.count("\n")

    return token.sub(blank, text)


def expand_use(tree):
    """`a::{b, c::{d, e}}` → ["a::b", "a::c::d", "a::c::e"]."""
    tree = re.sub(r"\s+", "", tree)
    if "{" not in tree:
        return [tree]
    i = tree.index("{")
    head = tree[:i]
    body = tree[i + 1 : tree.rindex("}")]
    items, depth, cur = [], 0, ""
    for ch in body:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += ch == "{"
        depth -= ch == "}"
        cur += ch
    if cur:
        items.append(cur)
    out = []
    for item in items:
        out.extend(head + sub for sub in expand_use(item))
    return out


def resolve(module, path):
    """An absolute module path for a `crate::`/`super::`/`self::` path."""
    segs = [s for s in path.split("::") if s]
    if not segs:
        return None
    if segs[0] == "crate":
        base, rest = [], segs[1:]
    elif segs[0] in ("super", "self"):
        base = list(module)
        rest = segs
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                if not base:
                    return None
                base.pop()
            rest = rest[1:]
    else:
        return None
    rest = [s for s in rest if re.fullmatch(r"[A-Za-z_]\w*", s) and s not in ("self", "*")]
    return tuple(base + rest)


def deps(module, text):
    code = strip_comments(text)
    found = []  # (target path, line)
    for m in re.finditer(r"\buse\s+((?:crate|super|self)::[^;]*);", code):
        line = code.count("\n", 0, m.start()) + 1
        for p in expand_use(m.group(1)):
            found.append((p, line))
    for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", code):
        line = code.count("\n", 0, m.start()) + 1
        found.append((m.group(1), line))
    out = []
    for p, line in found:
        target = resolve(module, p)
        if target is not None:
            out.append((target, line))
    return out


def check(root):
    modules = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "bin"]
        for f in filenames:
            if not f.endswith(".rs") or (dirpath == root and f == "main.rs"):
                continue
            p = os.path.join(dirpath, f)
            modules[module_path(root, p)] = p
    known = set(modules)
    edges = {}  # (a, b) sibling modules → (file, line)
    for mod, path in modules.items():
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for target, line in deps(mod, text):
            # Trim the target to the longest known module (items inside it).
            while target and target not in known:
                target = target[:-1]
            k = 0
            while k < len(mod) and k < len(target) and mod[k] == target[k]:
                k += 1
            if k >= len(mod) or k >= len(target):
                continue  # an ancestor or a descendant
            a, b = mod[: k + 1], target[: k + 1]
            edges.setdefault((a, b), (path, line))
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    cycles, seen = [], set()
    color = {}

    def visit(n, stack):
        color[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m) == 1:
                cyc = stack[stack.index(m):] + [m]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    cycles.append(cyc)
            elif color.get(m) is None:
                visit(m, stack)
        stack.pop()
        color[n] = 2

    for n in sorted(graph):
        if color.get(n) is None:
            visit(n, [])
    name = lambda m: "crate::" + "::".join(m)
    for cyc in cycles:
        print(f"{root}: import cycle: " + " -> ".join(name(m) for m in cyc))
        for a, b in zip(cyc, cyc[1:]):
            f, line = edges[(a, b)]
            print(f"    {name(a)} -> {name(b)}  ({f}:{line})")
    return not cycles


def main():
    roots = sys.argv[1:] or ["src"]
    ok = True
    for r in roots:
        if not os.path.isdir(r):
            sys.exit(f"{r}: not a directory")
        ok = check(r) and ok
    if ok:
        print("no import cycle in " + ", ".join(roots))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
