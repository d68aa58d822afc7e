"""Generate the README's version matrix from the patch registry; ``--check`` fails on drift.

The table lives between the markers ``<!-- matrix:begin -->`` and ``<!-- matrix:end -->``.
Usage: python scripts/matrix.py --write | --check
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"


def _link(ref: str) -> str:
    if ref.startswith("http"):
        return f"[link]({ref})"
    repo, _, num = ref.partition("#")
    if num:
        return f"[{ref}](https://github.com/{repo}/issues/{num})"
    return ref


def table() -> str:
    from hfpatches._registry import registry

    rows = ["| patch id | bug | affected versions (`requires`) | upstream | fixed in | default | verified stacks |",
            "|---|---|---|---|---|---|---|"]
    for p in registry().values():
        req = ", ".join(f"`{r}`" for r in p.requires)
        if p.affected:
            req = f"{p.affected} ({req})"
        default = "on" if p.default_enabled else f"opt-in (`{p.enable_env}`)" if p.enable_env else "opt-in"
        rows.append(f"| [`{p.id}`](docs/patches/{p.id}.md) | {p.summary} | {req} | {', '.join(_link(u) for u in p.upstream)} "
                    f"| {f'`{p.fixed_in}`' if p.fixed_in else 'not fixed upstream'} | {default} "
                    f"| {', '.join(p.verified_stacks) or '-'} |")
    return "\n".join(rows)


def render(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    args = ap.parse_args()
    with open(README, encoding="utf-8") as fh:
        text = fh.read()
    new = render(text)
    if args.check:
        if new != text:
            print("README.md version matrix is out of date: run `make matrix` (scripts/matrix.py --write)", file=sys.stderr)
            return 1
        print("README.md version matrix matches the registry")
        return 0
    tmp = README + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(new)
    os.replace(tmp, README)
    print("README.md version matrix written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
