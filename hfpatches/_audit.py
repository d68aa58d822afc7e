"""``python -m hfpatches audit FILE...``: judge a pin set offline, before anything is installed.

For every registered patch the answer is one of:

* ``affected``: every package the patch needs is pinned inside its ``requires`` range; hfpatches
  fixes the bug at run time (the probe still has the last word there).
* ``not-affected``: a package it needs is pinned outside the range (``fixed_in`` says where
  upstream fixed it, when it did).
* ``not-pinned``: a package it needs is not in the set.
* ``unknown``: pinned loosely (``>=``, ``~=``, a wildcard, a bare name), by a direct URL or local
  tree, by conflicting pins, or to a version that does not parse; the reason says which.

A patch with several ``requires`` lines (meta_buffers: torch and transformers) is affected only
when every one is in range; one pinned outside its range makes it not-affected, else a missing one
makes it not-pinned, else a loose one unknown. The row's ``package``/``pinned`` list each package.

The ranges are the ones the engine checks (``Patch.requires`` / ``Patch.fixed_in`` from the
registry): one source of truth. Nothing of the stack is imported; only ``packaging`` and, for lock
files, ``tomllib`` (Python >= 3.11; ``tomli`` is used where it is installed on older Pythons).

Inputs (detected by file name, then by content):

* requirements / constraints files and ``pip freeze`` output (``-`` reads stdin): ``name==version``
  with extras and environment markers, comments, ``\\`` continuations, ``${VAR}`` expansion,
  ``--hash`` and the other pip options, ``-r``/``-c`` includes (relative to the including file;
  each file is read once, so cycles and diamonds are harmless), ``-e`` and direct references
  (reported ``unknown``). A constraint counts as a pin: it fixes the version a package gets if
  anything installs it. Local version labels (``2.13.0+cpu``) compare as their release.
* lock files ``uv.lock``, ``poetry.lock``, ``pylock.toml`` / ``pylock.NAME.toml`` (PEP 751).

Environment markers are evaluated against the running interpreter (its Python version, platform,
machine, ...), as pip would when installing from the same file here; ``--marker-env NAME=VALUE``
evaluates them for another target (e.g. ``--marker-env sys_platform=linux``). An entry whose
marker is false does not count, and the reason of a patch that ends ``not-pinned`` because of it
names the skipped entry and its marker. In lock files the per-package markers are evaluated
(uv ``resolution-markers``, poetry ``markers``, pylock ``marker``); dependency edges are not
followed: a package listed in a lock file counts as pinned.
"""
from __future__ import annotations

import os
import re
import shlex
import sys

STATUSES = ("affected", "not-affected", "not-pinned", "unknown")

#: pip options that take a value and change nothing about which versions get installed
_OPTS_WITH_VALUE = {"-i", "--index-url", "--extra-index-url", "-f", "--find-links", "--trusted-host",
                    "--no-binary", "--only-binary", "--use-feature", "--hash", "--config-settings",
                    "--global-option", "--install-option"}
#: pip flags (no value) of the same kind
_FLAGS = {"--pre", "--no-index", "--prefer-binary", "--require-hashes"}
_INCLUDES = {"-r": "requirement", "--requirement": "requirement",
             "-c": "constraint", "--constraint": "constraint"}
_EDITABLE = {"-e", "--editable"}
#: ``name==<something packaging does not accept>``: the pin is there, its version does not parse
_BAD_VERSION = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[[^\]]*\])?\s*==\s*"
                          r"([^\s;,=]+)\s*(?:;(.*))?$")
_TOML_START = re.compile(r"^(\[|[A-Za-z0-9_.-]+\s*=(?!=))")
_PYLOCK_NAME = re.compile(r"^pylock\.([^.]+\.)?toml$")


class AuditError(Exception):
    """Bad input: the message names the file (and line) and what is wrong. Exit status 2."""


# ----------------------------------------------------------------------------- pins
class Pin:
    """One entry of the inputs for one package.

    kind: ``exact`` (one version: ``==V``, ``===V``, a locked version), ``loose`` (a range),
    ``any`` (a bare name), ``direct`` (URL, path, editable, local tree: no version stated),
    ``bad`` (a version that does not parse), ``marker`` (a marker that could not be evaluated).
    """

    __slots__ = ("name", "kind", "version", "spec", "text", "source", "why")

    def __init__(self, name, kind, text, source, version=None, spec=None, why=""):
        self.name, self.kind, self.text, self.source = name, kind, text, source
        self.version, self.spec, self.why = version, spec, why


class PinSet:
    """Everything read from the inputs, by normalised package name."""

    def __init__(self, env: dict) -> None:
        self.env = env
        self.pins: dict[str, list[Pin]] = {}
        self.skipped: dict[str, list[tuple[Pin, str]]] = {}   # marker false here: (pin, marker)
        self.inputs: list[str] = []
        self.notes: list[str] = []
        self._seen: set[str] = set()

    def add(self, pin: Pin) -> None:
        self.pins.setdefault(pin.name, []).append(pin)

    def skip(self, pin: Pin, marker: str) -> None:
        self.skipped.setdefault(pin.name, []).append((pin, marker))


def _canon(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def _public(version):
    """``2.13.0+cpu`` -> ``2.13.0``: a local label compares as its release."""
    from packaging.version import Version

    return Version(version.public)


# ----------------------------------------------------------------------------- markers
def marker_environment(overrides: dict[str, str] | None = None) -> dict:
    """The environment markers are evaluated against: this interpreter, then ``overrides``.

    ``python_version=3.11`` alone also sets ``python_full_version=3.11.0`` (and
    ``python_full_version`` alone sets ``python_version``), so the two never contradict.
    """
    from packaging.markers import default_environment

    env = dict(default_environment())
    overrides = dict(overrides or {})
    for key in overrides:
        if key not in env:
            raise AuditError(f"--marker-env: unknown marker variable {key!r}; valid: {', '.join(sorted(env))}")
    if "python_version" in overrides and "python_full_version" not in overrides:
        overrides["python_full_version"] = overrides["python_version"] + ".0"
    if "python_full_version" in overrides and "python_version" not in overrides:
        overrides["python_version"] = ".".join(overrides["python_full_version"].split(".")[:2])
    env.update(overrides)
    return env


def _evaluate(marker, env: dict, lock: dict | None = None) -> bool | None:
    """True/False, or None when it cannot be evaluated (e.g. a lock-file-only variable)."""
    from packaging.markers import InvalidMarker, Marker

    try:
        m = marker if isinstance(marker, Marker) else Marker(marker)
    except InvalidMarker:
        return None
    if lock is not None:   # PEP 751: ``extras`` / ``dependency_groups`` are sets
        try:
            return bool(m.evaluate({**env, **lock}, context="lock_file"))
        except TypeError:   # packaging < 25: no lock-file context
            pass
        except Exception:
            return None
    try:
        return bool(m.evaluate(env))
    except Exception:   # packaging raises several types (UndefinedEnvironmentName, KeyError, ...)
        return None


def _add_with_marker(ps: PinSet, pin: Pin, marker, lock: dict | None = None) -> None:
    if marker is None:
        ps.add(pin)
        return
    ok = _evaluate(marker, ps.env, lock)
    if ok is None:
        ps.add(Pin(pin.name, "marker", pin.text, pin.source,
                   why=f"its marker {str(marker)!r} cannot be evaluated here"))
    elif ok:
        ps.add(pin)
    else:
        ps.skip(pin, str(marker))


# ----------------------------------------------------------------------------- requirements files
def _logical_lines(text: str):
    """(first line number, line) with ``\\`` continuations joined and comments removed, like pip."""
    buf, start = "", None
    for no, raw in enumerate(text.splitlines(), 1):
        if start is None:
            start = no
        if raw.endswith("\\"):
            buf += raw[:-1]
            continue
        buf += raw
        line = re.sub(r"(^|\s+)#.*$", "", buf).strip()
        if line:
            yield start, line
        buf, start = "", None
    if buf.strip():
        line = re.sub(r"(^|\s+)#.*$", "", buf).strip()
        if line:
            yield start, line


def _expand_env(line: str) -> str:
    """pip's ``${NAME}`` expansion (upper-case names only; an unset variable stays as written)."""
    return re.sub(r"\$\{([A-Z0-9_]+)\}", lambda m: os.environ.get(m.group(1), m.group(0)), line)


def _split_options(line: str) -> tuple[str, list[str]]:
    """pip's rule: the requirement is the text before the first token that starts with ``-``."""
    words = line.split()
    for i, w in enumerate(words):
        if w.startswith("-"):
            return " ".join(words[:i]).strip(), shlex.split(" ".join(words[i:]))
    return line, []


def _option(tokens: list[str], i: int) -> tuple[str, str | None, int]:
    """(option name, value or None, next index) for ``-r x``, ``-rx``, ``--requirement=x``."""
    tok = tokens[i]
    if tok.startswith("--"):
        name, eq, val = tok.partition("=")
        if eq:
            return name, val, i + 1
        if name in _OPTS_WITH_VALUE or name in _INCLUDES or name in _EDITABLE:
            return name, (tokens[i + 1] if i + 1 < len(tokens) else None), i + 2
        return name, None, i + 1
    name, rest = tok[:2], tok[2:]
    if rest:
        return name, rest.lstrip("="), i + 1
    if name in _OPTS_WITH_VALUE or name in _INCLUDES or name in _EDITABLE:
        return name, (tokens[i + 1] if i + 1 < len(tokens) else None), i + 2
    return name, None, i + 1


def _name_of_direct(ref: str) -> str | None:
    """The package name of a bare URL / path: ``#egg=NAME``, else a wheel or sdist file name."""
    from packaging.utils import InvalidSdistFilename, InvalidWheelFilename, parse_sdist_filename, parse_wheel_filename

    m = re.search(r"[#&]egg=([A-Za-z0-9][A-Za-z0-9._-]*)", ref)
    if m:
        return _canon(m.group(1))
    base = ref.split("#")[0].split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    try:
        if base.endswith(".whl"):
            return parse_wheel_filename(base)[0]
        if base.endswith((".tar.gz", ".zip")):
            return parse_sdist_filename(base)[0]
    except (InvalidWheelFilename, InvalidSdistFilename):
        return None
    return None


def _looks_direct(req: str) -> bool:
    return ("://" in req or req.startswith((".", "/", "~")) or req.startswith("file:")
            or req.endswith((".whl", ".tar.gz", ".zip")))


def _requirement(ps: PinSet, text: str, source: str) -> None:
    """One requirement (``name[extras] <spec> ; marker`` or ``name @ url``) -> a pin."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    if _looks_direct(text) and " @ " not in text and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*\s*@", text):
        name = _name_of_direct(text)
        if name is None:
            ps.notes.append(f"{source}: direct reference without a package name, not judged: {text}")
        else:
            ps.add(Pin(name, "direct", text, source, why="a direct reference (URL or path) states no version"))
        return
    try:
        req = Requirement(text)
    except InvalidRequirement as e:
        m = _BAD_VERSION.match(text)
        if m is not None:   # ``name==<not PEP 440>``: a pin all the same, judged unknown
            name, ver, marker = m.groups()
            try:
                Version(ver)
            except InvalidVersion:
                pin = Pin(_canon(name), "bad", text, source, version=ver,
                          why=f"version {ver!r} does not parse (PEP 440)")
                _add_with_marker(ps, pin, marker.strip() if marker else None)
                return
        raise AuditError(f"{source}: cannot parse {text!r}: {str(e).splitlines()[0]}") from None
    if any(not s.version for s in req.specifier):   # packaging < 24 accepts ``name===``
        raise AuditError(f"{source}: cannot parse {text!r}: a version specifier without a version")
    name = _canon(req.name)
    if req.url:
        pin = Pin(name, "direct", text, source, why="a direct URL reference states no version")
    else:
        exact = [s for s in req.specifier if (s.operator == "==" and not s.version.endswith(".*"))
                 or s.operator == "==="]
        if exact:
            try:
                version = Version(exact[0].version)
            except InvalidVersion:
                pin = Pin(name, "bad", text, source, version=exact[0].version,
                          why=f"version {exact[0].version!r} does not parse (PEP 440)")
            else:
                pin = Pin(name, "exact", text, source, version=version, spec=req.specifier)
        elif len(req.specifier):
            pin = Pin(name, "loose", text, source, spec=req.specifier)
        else:
            pin = Pin(name, "any", text, source)
    _add_with_marker(ps, pin, req.marker)


def _read_requirements(ps: PinSet, display: str, text: str, base: str, stack: tuple[str, ...]) -> None:
    for no, line in _logical_lines(text):
        source = f"{display}:{no}"
        try:
            req, tokens = _split_options(_expand_env(line))
        except ValueError as e:   # shlex: unbalanced quotes
            raise AuditError(f"{source}: cannot parse {line!r}: {e}") from None
        if req:
            if tokens and tokens[0].split("=")[0] not in ("--hash", "--config-settings", "--global-option",
                                                          "--install-option"):
                raise AuditError(f"{source}: option {tokens[0]!r} is not allowed after a requirement")
            _requirement(ps, req, source)
            continue
        i = 0
        while i < len(tokens):
            name, value, i = _option(tokens, i)
            if name in _INCLUDES:
                if not value:
                    raise AuditError(f"{source}: {name} needs a file name")
                _include(ps, value, base, source, stack)
            elif name in _EDITABLE:
                if not value:
                    raise AuditError(f"{source}: {name} needs a path or URL")
                pkg = _name_of_direct(value)
                if pkg is None:
                    ps.notes.append(f"{source}: editable install without a package name, not judged: {value}")
                else:
                    ps.add(Pin(pkg, "direct", f"-e {value}", source,
                               why="an editable install: a source tree, not a release"))
            elif name in _OPTS_WITH_VALUE:
                if value is None:
                    raise AuditError(f"{source}: {name} needs a value")
            elif name not in _FLAGS:
                raise AuditError(f"{source}: unknown option {name!r} (expected a requirement, -r/-c FILE, "
                                 "-e, or a pip index option)")


def _include(ps: PinSet, ref: str, base: str, source: str, stack: tuple[str, ...]) -> None:
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", ref) and not ref.startswith("file://"):
        raise AuditError(f"{source}: remote include {ref!r}: the audit is offline; download it and pass the file")
    path = ref[len("file://"):] if ref.startswith("file://") else ref
    path = os.path.join(base, os.path.expanduser(path))
    real = os.path.realpath(path)
    if real in stack:
        ps.notes.append(f"{source}: include cycle back to {ref} (read once)")
        return
    if real in ps._seen:
        return   # included twice (a diamond): read once
    text = _read_text(path, f"{source}: included file {ref!r}")
    ps._seen.add(real)
    display = path if os.path.isabs(ref) else os.path.relpath(path)
    ps.inputs.append(display)
    _read_requirements(ps, display, text, os.path.dirname(path), stack + (real,))


def _read_text(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except FileNotFoundError:
        raise AuditError(f"{what}: no such file ({path})") from None
    except IsADirectoryError:
        raise AuditError(f"{what}: is a directory, expected a requirements or lock file ({path})") from None
    except UnicodeDecodeError as e:
        raise AuditError(f"{what}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise AuditError(f"{what}: cannot read: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- lock files
def _toml(display: str, text: str) -> dict:
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib  # type: ignore[no-redef]  # the backport, where installed
        except ImportError:
            raise AuditError(
                f"{display}: reading lock files needs Python >= 3.11 (tomllib) or the 'tomli' package; "
                f"this is Python {sys.version.split()[0]}. Export the lock to a requirements file "
                "(e.g. 'uv export', 'poetry export') or run the audit on 3.11+") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise AuditError(f"{display}: not valid TOML: {e}") from None


def _lock_kind(base: str, text: str) -> str | None:
    if base == "uv.lock":
        return "uv"
    if base == "poetry.lock":
        return "poetry"
    if _PYLOCK_NAME.match(base):
        return "pylock"
    if base.endswith((".lock", ".toml")):
        return "sniff"
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            return "guess" if _TOML_START.match(s) else None
    return None


def _sniff(display: str, data: dict) -> str:
    if "lock-version" in data and "packages" in data:
        return "pylock"
    meta = data.get("metadata")
    if isinstance(meta, dict) and "content-hash" in meta and "package" in data:
        return "poetry"
    if "package" in data and isinstance(data.get("version"), int):
        return "uv"
    raise AuditError(f"{display}: TOML, but not a lock file this audit knows (uv.lock, poetry.lock, "
                     "pylock.toml: PEP 751)")


def _table_list(display: str, data: dict, key: str) -> list:
    items = data.get(key, [])
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise AuditError(f"{display}: '{key}' must be an array of tables")
    return items


def _locked(ps: PinSet, display: str, pkg: dict, key: str, i: int, local: str | None,
            marker_check=None) -> None:
    """One package of a lock file -> a pin (``marker_check``: (pin) -> None, adds or skips it)."""
    from packaging.version import InvalidVersion, Version

    raw_name = pkg.get("name")
    if not isinstance(raw_name, str) or not raw_name:
        raise AuditError(f"{display}: {key}[{i}] has no 'name'")
    name = _canon(raw_name)
    version = pkg.get("version")
    source = f"{display} ({raw_name})"
    text = f"{raw_name} {version}" if version is not None else raw_name
    if local:
        pin = Pin(name, "direct", text, source, why=f"locked from {local}, not a release")
    elif version is None:
        pin = Pin(name, "direct", text, source, why="the lock records no version for it (a direct source)")
    else:
        try:
            pin = Pin(name, "exact", text, source, version=Version(str(version)))
        except InvalidVersion:
            pin = Pin(name, "bad", text, source, version=str(version),
                      why=f"version {str(version)!r} does not parse (PEP 440)")
    if marker_check is None:
        ps.add(pin)
    else:
        marker_check(pin)


def _read_uv(ps: PinSet, display: str, data: dict) -> None:
    for i, pkg in enumerate(_table_list(display, data, "package")):
        src = pkg.get("source") if isinstance(pkg.get("source"), dict) else {}
        local = next((f"a local {k} ({src[k]})" for k in ("editable", "virtual", "directory") if k in src), None)
        markers = pkg.get("resolution-markers")

        def check(pin, markers=markers):
            if not markers:
                ps.add(pin)
                return
            results = [_evaluate(m, ps.env) for m in markers]
            if any(results):
                ps.add(pin)
            elif None in results:
                ps.add(Pin(pin.name, "marker", pin.text, pin.source,
                           why=f"its resolution markers cannot be evaluated here: {markers}"))
            else:
                ps.skip(pin, " or ".join(f"({m})" for m in markers))

        _locked(ps, display, pkg, "package", i, local, check)


def _read_poetry(ps: PinSet, display: str, data: dict) -> None:
    for i, pkg in enumerate(_table_list(display, data, "package")):
        src = pkg.get("source") if isinstance(pkg.get("source"), dict) else {}
        local = f"a local directory ({src.get('url')})" if src.get("type") == "directory" else None
        markers = pkg.get("markers")
        if isinstance(markers, dict):   # poetry 2: {group: marker}
            markers = " or ".join(f"({m})" for m in markers.values()) or None
        _locked(ps, display, pkg, "package", i, local,
                lambda pin, m=markers: _add_with_marker(ps, pin, m))


def _read_pylock(ps: PinSet, display: str, data: dict) -> None:
    ver = str(data.get("lock-version", ""))
    if ver.split(".")[0] != "1":
        raise AuditError(f"{display}: lock-version {ver!r} is not supported (PEP 751 lock-version 1.x)")
    lock_env = {"extras": frozenset(), "dependency_groups": frozenset(data.get("default-groups", []) or [])}
    for i, pkg in enumerate(_table_list(display, data, "packages")):
        d = pkg.get("directory")
        local = f"a local directory ({d.get('path') if isinstance(d, dict) else d})" if d else None
        _locked(ps, display, pkg, "packages", i, local,
                lambda pin, m=pkg.get("marker"): _add_with_marker(ps, pin, m, lock_env))


# ----------------------------------------------------------------------------- reading inputs
def read_inputs(files: list[str], env: dict | None = None, stdin=None) -> PinSet:
    """Read every input into one :class:`PinSet`; :class:`AuditError` on bad input."""
    ps = PinSet(env if env is not None else marker_environment())
    if not files:
        raise AuditError("no input files")
    if files.count("-") > 1:
        raise AuditError("'-' (stdin) given more than once")
    for f in files:
        if f == "-":
            text = (stdin if stdin is not None else sys.stdin).read()
            display, base, path = "<stdin>", os.getcwd(), None
        else:
            path = f
            real = os.path.realpath(path)
            if real in ps._seen:
                continue
            text = _read_text(path, path)
            ps._seen.add(real)
            display, base = f, os.path.dirname(os.path.abspath(path))
        ps.inputs.append(display)
        kind = _lock_kind(os.path.basename(path) if path else "", text)
        data = None
        if kind == "guess":   # no telling name, but it starts like TOML
            try:
                data = _toml(display, text)
            except AuditError:   # not TOML after all: the requirements parser names the bad line
                kind = None
            else:
                kind = "sniff"
        if kind is None:
            _read_requirements(ps, display, text, base, (os.path.realpath(path),) if path else ())
            continue
        if data is None:
            data = _toml(display, text)
        if kind == "sniff":
            kind = _sniff(display, data)
        {"uv": _read_uv, "poetry": _read_poetry, "pylock": _read_pylock}[kind](ps, display, data)
    return ps


# ----------------------------------------------------------------------------- judging
class _Resolved:
    """What the inputs say about one package: kind in exact/loose/any/direct/bad/marker/conflict/none."""

    __slots__ = ("kind", "version", "shown", "why", "sources")

    def __init__(self, kind, shown=None, version=None, why="", sources=()):
        self.kind, self.shown, self.version, self.why, self.sources = kind, shown, version, why, tuple(sources)


def _resolve(ps: PinSet, name: str) -> _Resolved:
    pins = ps.pins.get(name, [])
    if not pins:
        skipped = ps.skipped.get(name, [])
        why = "; ".join(f"{p.text!r} at {p.source} skipped: its marker {m!r} is false for this environment"
                        for p, m in skipped)
        return _Resolved("none", why=why)
    srcs = [p.source for p in pins]
    for kind in ("bad", "marker"):
        for p in pins:
            if p.kind == kind:
                return _Resolved(kind, p.version and str(p.version) or p.text, why=f"{p.source}: {p.why}",
                                 sources=srcs)
    exact = [p for p in pins if p.kind == "exact"]
    releases = {str(_public(p.version)) for p in exact}
    if len(releases) > 1:
        return _Resolved("conflict", " / ".join(str(p.version) for p in exact),
                         why="conflicting pins: " + ", ".join(f"{p.text!r} ({p.source})" for p in exact),
                         sources=srcs)
    if exact:
        v = exact[0].version
        for p in pins:
            if p.spec is not None and not p.spec.contains(v, prereleases=True):
                return _Resolved("conflict", str(v), sources=srcs,
                                 why=f"{exact[0].text!r} ({exact[0].source}) contradicts {p.text!r} ({p.source})")
        return _Resolved("exact", str(v), version=v, sources=srcs)
    direct = [p for p in pins if p.kind == "direct"]
    if direct:
        return _Resolved("direct", "direct", why=f"{direct[0].source}: {direct[0].why}", sources=srcs)
    loose = [p for p in pins if p.kind == "loose"]
    if loose:
        from packaging.specifiers import SpecifierSet

        spec = SpecifierSet(",".join(str(p.spec) for p in loose))
        return _Resolved("loose", str(spec), sources=srcs,
                         why=f"pinned loosely ({'; '.join(f'{p.text!r} at {p.source}' for p in loose)}): "
                             "any version in the range may be installed; pin it with == to judge")
    return _Resolved("any", "any", sources=srcs,
                     why=f"no version pinned ({pins[0].text!r} at {pins[0].source}); pin it with == to judge")


def _declared_spec(line: str) -> str:
    """The version part of a ``requires`` line as declared (packaging would reorder it)."""
    m = re.match(r"^\s*[A-Za-z0-9._-]+\s*(?:\[[^\]]*\])?\s*([^;]*)", line)
    return m.group(1).strip() if m else ""


def _judge_line(ps: PinSet, line: str) -> dict:
    """One ``requires`` line of a patch against the pin set."""
    from packaging.requirements import Requirement

    req = Requirement(line)
    name = _canon(req.name)
    spec = req.specifier
    r = _resolve(ps, name)
    shown_spec = _declared_spec(line)
    out = {"package": req.name, "pinned": r.shown, "range": shown_spec or "any version",
           "sources": list(r.sources)}
    if req.marker is not None and _evaluate(req.marker, ps.env) is False:
        return {**out, "status": "ignored", "reason": f"the requirement's marker {str(req.marker)!r} is false here"}
    if r.kind == "none":
        why = f"{req.name} is not in the pin set" + (f" ({r.why})" if r.why else "")
        return {**out, "status": "not-pinned", "reason": why}
    if r.kind == "exact":
        v = _public(r.version)
        local = f" (compared as {v})" if r.version.local else ""
        if spec.contains(v, prereleases=True):
            return {**out, "status": "affected", "reason": f"{req.name} {r.shown}{local} is in the affected range"
                                                           + (f" {shown_spec}" if shown_spec else " (every version)")}
        return {**out, "status": "not-affected",
                "reason": f"{req.name} {r.shown}{local} is outside the affected range {shown_spec}"}
    if not str(spec) and r.kind in ("loose", "any", "direct"):
        return {**out, "status": "affected",
                "reason": f"every {req.name} version is in the affected range ({req.name} {r.shown})"}
    return {**out, "status": "unknown", "reason": r.why}


def _fixed_note(ps: PinSet, fixed_in: str) -> str:
    """``fixed in X`` when the pin is a fixed release; otherwise the pin predates the bug."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        req = Requirement(fixed_in)
    except InvalidRequirement:
        return f"fixed in {fixed_in}"
    r = _resolve(ps, _canon(req.name))
    if r.kind == "exact" and not req.specifier.contains(_public(r.version), prereleases=True):
        return f"older than the affected range (upstream fixed it in {fixed_in})"
    return f"fixed in {fixed_in}"


def _patches() -> dict:
    """The registered patches: the same declarations the engine checks (one source of truth)."""
    from ._registry import registry

    return registry()


def audit(ps: PinSet) -> list[dict]:
    """One row per registered patch: id, status, package, pinned, affected_range, fixed_in, reason."""
    rows = []
    for pid, patch in _patches().items():
        lines = [_judge_line(ps, line) for line in patch.requires]
        live = [x for x in lines if x["status"] != "ignored"]
        statuses = {x["status"] for x in live}
        status = next((s for s in ("not-affected", "not-pinned", "unknown") if s in statuses), "affected")
        if not live:   # every requirement's marker is false here: the patch cannot apply
            status = "not-affected"
        why = "; ".join(x["reason"] for x in live if x["status"] == status) if live else \
            "; ".join(x["reason"] for x in lines)
        if status == "affected":
            why += "; hfpatches fixes it at run time"
            if patch.fixed_in:
                why += f" (or upgrade: fixed in {patch.fixed_in})"
            if not patch.default_enabled:
                how = f"{patch.enable_env}=1" if patch.enable_env else f"apply(only=[{pid!r}])"
                why += f"; opt-in: switch it on with {how}"
        elif status == "not-affected" and patch.fixed_in:
            why += f"; {_fixed_note(ps, patch.fixed_in)}"
        pinned = [x["pinned"] for x in lines]
        rows.append({
            "id": pid,
            "status": status,
            "package": ", ".join(x["package"] for x in lines),
            "pinned": ", ".join(p or "-" for p in pinned) if any(pinned) else None,
            "affected_range": " and ".join(patch.requires),
            "fixed_in": patch.fixed_in,
            "reason": why,
            "default_enabled": patch.default_enabled,
            "requirements": lines,
        })
    return rows


# ----------------------------------------------------------------------------- command line
def _parse_marker_env(items) -> dict[str, str]:
    out = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise AuditError(f"--marker-env {item!r}: expected NAME=VALUE, e.g. sys_platform=linux")
        out[key.strip()] = value.strip()
    return out


def _parse_fail_on(value: str | None) -> set[str]:
    if not value:
        return set()
    chosen = {s.strip() for s in value.split(",") if s.strip()}
    bad = chosen - set(STATUSES)
    if bad:
        raise AuditError(f"--fail-on: unknown status {', '.join(sorted(bad))}; valid: {', '.join(STATUSES)}")
    return chosen


def main(args, stdout=None, stderr=None, stdin=None) -> int:
    """``audit`` subcommand: 0 when the audit ran, 1 with ``--fail-on`` hits, 2 on bad input."""
    import json

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        fail_on = _parse_fail_on(args.fail_on)
        env = marker_environment(_parse_marker_env(args.marker_env))
        ps = read_inputs(args.files, env, stdin)
    except AuditError as e:
        print(f"hfpatches audit: error: {e}", file=stderr)
        return 2
    rows = audit(ps)
    if args.json:
        payload = {"patches": rows, "inputs": ps.inputs, "notes": ps.notes,
                   "marker_environment": {k: ps.env[k] for k in sorted(ps.env)}}
        print(json.dumps(payload, indent=2), file=stdout)
    else:
        _print_table(ps, rows, stdout)
    hits = sorted({r["status"] for r in rows} & fail_on)
    if hits and not args.json:
        print(f"\nfail-on: {', '.join(hits)} found", file=stdout)
    return 1 if hits else 0


def _print_table(ps: PinSet, rows: list[dict], out) -> None:
    env = ps.env
    n = len(ps.pins)
    print(f"hfpatches audit: {n} package{'s' if n != 1 else ''} from {', '.join(ps.inputs)}", file=out)
    print(f"  markers evaluated for Python {env['python_full_version']}, {env['sys_platform']} "
          f"{env['platform_machine']}", file=out)
    print(file=out)
    cols = ("patch", "status", "package", "pinned", "affected_range", "fixed_in")
    cells = [{"patch": r["id"], "status": r["status"], "package": r["package"], "pinned": r["pinned"] or "-",
              "affected_range": r["affected_range"], "fixed_in": r["fixed_in"] or "-"} for r in rows]
    w = {c: max([len(c)] + [len(x[c]) for x in cells]) for c in cols}
    print("  ".join(c.ljust(w[c]) for c in cols) + "  reason", file=out)
    print("  ".join("-" * w[c] for c in cols) + "  ------", file=out)
    for x, r in zip(cells, rows):
        print("  ".join(x[c].ljust(w[c]) for c in cols) + "  " + r["reason"], file=out)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items() if v), file=out)
    for note in ps.notes:
        print(f"note: {note}", file=out)
