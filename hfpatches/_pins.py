"""Reading pin sets for ``audit``: requirements/constraints files, ``pip freeze`` output, and lock
files (``uv.lock``, ``poetry.lock``, ``pylock.toml``) -> a :class:`PinSet`. Judging is ``_audit``'s job.

Requirements files follow pip's parsing: ``\\`` continuations (never on a comment line), comments,
``${VAR}`` expansion, ``--hash`` and the other pip options, ``-r``/``-c`` includes (relative to the
including file; each file is read once, so cycles and diamonds are harmless), ``-e`` and direct
references. Only regular files are read (a FIFO, a device or a socket is refused: it could block
or never end), and at most :data:`MAX_BYTES` of each input, stdin included.

A direct source (URL, VCS, local path, editable) names no release: in a requirements file and in
a lock file alike it is a ``direct`` pin (judged ``unknown`` unless every version is in range),
whatever version the source tree claims (shown in the reason).
"""
from __future__ import annotations

import os
import re
import shlex
import stat
import sys

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
_COMMENT = re.compile(r"(^|\s+)#.*$")


def _logical_lines(text: str):
    """(first line number, line) with ``\\`` continuations joined and comments removed, as pip's
    ``join_lines`` / ``ignore_comments`` do: a comment line (``#`` first, after optional blanks) never
    continues, even when it ends in ``\\``, and it ends a continuation in progress."""
    buf: list[str] = []
    start = 0
    for no, raw in enumerate(text.splitlines(), 1):
        comment = _COMMENT.match(raw) is not None
        if raw.endswith("\\") and not comment:
            if not buf:
                start = no
            buf.append(raw.strip("\\"))
            continue
        if comment:
            raw = " " + raw      # so that the comment is stripped below, also when joined
        if buf:
            buf.append(raw)
            joined, first = "".join(buf), start
            buf = []
        else:
            joined, first = raw, no
        line = _COMMENT.sub("", joined).strip()
        if line:
            yield first, line
    if buf:
        line = _COMMENT.sub("", "".join(buf)).strip()
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


#: At most this many bytes are read from one input (a requirements or lock file, stdin).
MAX_BYTES = 16 * 1024 * 1024

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _read_text(path: str, what: str) -> str:
    """A regular file's text (at most :data:`MAX_BYTES`). Anything else is refused before it is
    opened: reading a FIFO blocks forever, a device never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AuditError(f"{what}: no such file ({path})") from None
    except OSError as e:
        raise AuditError(f"{what}: cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AuditError(f"{what}: is a directory, expected a requirements or lock file ({path})")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "a special file")
        raise AuditError(f"{what}: is {kind}, not a regular file ({path}); the audit reads only regular "
                         "files (a pipe or a device could block or never end): save it to a file, or pipe it to '-'")
    if st.st_size > MAX_BYTES:
        raise AuditError(f"{what}: larger than {MAX_BYTES} bytes ({st.st_size}); not a requirements or lock file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise AuditError(f"{what}: cannot read: {e.strerror or e}") from None
    return _decode(data, what)


def _decode(data: bytes | str, what: str) -> str:
    if len(data) > MAX_BYTES:
        raise AuditError(f"{what}: larger than {MAX_BYTES} bytes; not a requirements or lock file")
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AuditError(f"{what}: not UTF-8 text ({e.reason} at byte {e.start})") from None


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
        claims = f"; the tree says {version}" if version is not None else ""
        pin = Pin(name, "direct", text, source,
                  why=f"locked from {local}: a source, not a release{claims} (judged as the same pin in a "
                      "requirements file)")
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
        local = next((f"a local {k} ({src[k]})" if k in ("editable", "virtual", "directory", "path")
                      else f"a {k} source ({src[k]})"
                      for k in ("editable", "virtual", "directory", "path", "git", "url") if k in src), None)
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
        kind = src.get("type")
        local = (f"a local {kind} ({src.get('url')})" if kind in ("directory", "file")
                 else f"a {kind} source ({src.get('url')})" if kind in ("git", "url") else None)
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
        local = None
        for k in ("directory", "vcs", "archive"):   # PEP 751: not from an index
            d = pkg.get(k)
            if d:
                where = (d.get("path") or d.get("url")) if isinstance(d, dict) else d
                local = f"a local directory ({where})" if k == "directory" else f"a {k} source ({where})"
                break
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
            text = _decode((stdin if stdin is not None else sys.stdin).read(MAX_BYTES + 1), "<stdin>")
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


