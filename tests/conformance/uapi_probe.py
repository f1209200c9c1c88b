"""Checks our cffi declarations (include-bindings/) against the real 7.3 UAPI.

Two sources of truth about C are combined:

* ``RealUapi`` preprocesses the real headers (plus ``lu_revisions.h`` for the
  two LU ABI revisions no header has) and reads, without compiling anything,
  which structs exist with which fields (pycparser), which enum members exist
  and which macros each header defines (``gcc -E -dD``).
* ``compare(ffi, ...)`` writes a C probe for everything *we* declare that C
  also has, compiles it once with gcc against the real headers, runs it, and
  compares sizeof/alignof, every field's offset/size/signedness and every
  constant's value with what cffi computed from our text.

A field we lack is caught by the field-name comparison, not by the probe: a
dropped ``cap_offset`` in ``struct vfio_region_info`` leaves every remaining
offset and the struct size unchanged (anchors 2.10).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
LU_REVISIONS_H = HERE / "lu_revisions.h"

# The headers whose every struct, enum member and integer macro we must declare.
MAIN_HEADERS = ("linux/iommufd.h", "linux/vfio.h", "linux/liveupdate.h")
# Headers that only supply the values of the few constants in system.h.
SYSTEM_HEADERS = ("linux/memfd.h", "linux/fcntl.h", "linux/kexec.h", "linux/reboot.h")

# Macros of the main headers that are not integer ABI constants, so we do not
# declare them. The completeness check fails if one disappears from the headers.
NOT_ABI = {
    # include guards
    "_IOMMUFD_H": "include guard",
    "VFIO_H": "include guard",
    "_LIVEUPDATE_H": "include guard",
    # strings: a cffi cdef declares integer constants only
    "VFIO_DEVICE_API_PCI_STRING": "string",
    "VFIO_DEVICE_API_PLATFORM_STRING": "string",
    "VFIO_DEVICE_API_AMBA_STRING": "string",
    "VFIO_DEVICE_API_CCW_STRING": "string",
    "VFIO_DEVICE_API_AP_STRING": "string",
    # helper functions over the v1 migration state, not values
    "VFIO_DEVICE_STATE_VALID": "function-like macro",
    "VFIO_DEVICE_STATE_IS_ERROR": "function-like macro",
    "VFIO_DEVICE_STATE_SET_ERROR": "function-like macro",
}

_PP_FOR_PYCPARSER = [
    # pycparser knows ISO C only; these GNU spellings appear in linux/types.h
    # and friends and carry nothing we compare through the parser (layout is
    # compared by the compiled probe).
    "-D__attribute__(x)=", "-D__extension__=", "-D__signed__=signed",
    "-D__asm__(x)=", "-D__inline__=",
]


class ProbeError(RuntimeError):
    pass


def gcc() -> str:
    cc = os.environ.get("CC", "gcc")
    path = shutil.which(cc)
    if not path:
        raise ProbeError(f"{cc} not found: the conformance probe needs a C compiler (apt-get install gcc)")
    return path


def include_flags(inc: Path) -> list[str]:
    flags = ["-I", str(inc)]
    try:
        multiarch = subprocess.run([gcc(), "-print-multiarch"], capture_output=True,
                                   text=True, check=True).stdout.strip()
    except subprocess.CalledProcessError:
        multiarch = ""
    if multiarch and (inc / multiarch).is_dir():
        flags += ["-I", str(inc / multiarch)]   # the 7.3 asm/ headers, not the host's
    return flags + ["-I", str(HERE)]


def prelude(headers=MAIN_HEADERS + SYSTEM_HEADERS) -> str:
    lines = [f"#include <{h}>" for h in headers]
    lines.append('#include "lu_revisions.h"')
    return "\n".join(lines) + "\n"


def _run(cmd, what, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise ProbeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


# ---------------------------------------------------------------- real side

@dataclass
class CField:
    name: str
    kind: str          # scalar | array | flex | pointer | record
    record: str = ""   # "struct foo" for a record, or for an array of records


@dataclass
class RealUapi:
    inc: Path
    structs: dict[str, list[CField]] = field(default_factory=dict)   # tag -> flattened fields
    struct_file: dict[str, str] = field(default_factory=dict)
    enum_members: dict[str, str] = field(default_factory=dict)       # name -> header
    enum_tags: dict[str, str] = field(default_factory=dict)
    macros: dict[str, tuple[str, bool, str]] = field(default_factory=dict)  # name -> (header, fnlike, body)

    def header_of(self, path: str) -> str:
        """'…/usr/include/linux/vfio.h' -> 'linux/vfio.h'; our own file keeps its name."""
        path = os.path.normpath(path)
        for base in (str(self.inc) + "/", str(HERE) + "/"):
            if path.startswith(base):
                rel = path[len(base):]
                parts = rel.split("/")
                if len(parts) > 2 and parts[0].endswith("-linux-gnu"):
                    rel = "/".join(parts[1:])
                return rel
        return path

    def constant_names(self) -> set[str]:
        return {n for n, (_, fnlike, _) in self.macros.items() if not fnlike} | set(self.enum_members)

    def in_main(self, header: str) -> bool:
        return header in MAIN_HEADERS


def load_real(inc: Path) -> RealUapi:
    from pycparser import c_ast, c_parser

    real = RealUapi(inc=Path(inc))
    flags = include_flags(real.inc)
    with tempfile.TemporaryDirectory(prefix="pyiommufd-real-") as tmp:
        src = Path(tmp) / "real.c"
        src.write_text(prelude())
        # macros, attributed to the header that defines them
        text = _run([gcc(), "-E", "-dD", *flags, str(src)], "gcc -E -dD on the 7.3 headers")
        current = ""
        for line in text.splitlines():
            m = re.match(r'#\s+\d+\s+"([^"]+)"', line)
            if m:
                current = real.header_of(m.group(1))
                continue
            m = re.match(r"#define\s+(\w+)(\([^)]*\))?\s*(.*)$", line)
            if m and current not in ("<built-in>", "<command-line>"):
                real.macros[m.group(1)] = (current, bool(m.group(2)), m.group(3).strip())
            m = re.match(r"#undef\s+(\w+)", line)
            if m:
                real.macros.pop(m.group(1), None)
        # structs and enums, through pycparser on preprocessed text
        text = _run([gcc(), "-E", *_PP_FOR_PYCPARSER, *flags, str(src)],
                    "gcc -E on the 7.3 headers")
    ast = c_parser.CParser().parse(text, "real.c")

    def record_name(t) -> str:
        if isinstance(t, c_ast.TypeDecl) and isinstance(t.type, (c_ast.Struct, c_ast.Union)):
            kw = "struct" if isinstance(t.type, c_ast.Struct) else "union"
            return f"{kw} {t.type.name}"
        return ""

    def flatten(decls) -> list[CField]:
        out = []
        for d in decls or ():
            t = d.type
            if d.name is None and isinstance(t, (c_ast.Struct, c_ast.Union)):
                out += flatten(t.decls)          # anonymous union/struct member
            elif isinstance(t, c_ast.ArrayDecl):
                out.append(CField(d.name, "flex" if t.dim is None else "array", record_name(t.type)))
            elif isinstance(t, c_ast.PtrDecl):
                out.append(CField(d.name, "pointer"))
            elif record_name(t):
                out.append(CField(d.name, "record", record_name(t)))
            else:
                out.append(CField(d.name, "scalar"))
        return out

    class Visitor(c_ast.NodeVisitor):
        def visit_Struct(self, node):
            if node.name and node.decls is not None:
                real.structs[node.name] = flatten(node.decls)
                real.struct_file[node.name] = real.header_of(node.coord.file)
            self.generic_visit(node)

        def visit_Enum(self, node):
            header = real.header_of(node.coord.file)
            if node.name and node.values is not None:
                real.enum_tags[node.name] = header
            for e in (node.values.enumerators if node.values else ()):
                real.enum_members[e.name] = header

    Visitor().visit(ast)
    return real


# ---------------------------------------------------------------- our side

def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", " ", text)


def declared_names(cdef: str) -> tuple[list[str], list[str]]:
    """(integer constant names, enum tags) declared in our cdef text, in order."""
    text = _strip_comments(cdef)
    consts = re.findall(r"^\s*#\s*define\s+(\w+)\s+\S", text, re.M)
    tags = []
    for tag, body in re.findall(r"\benum\s*(\w*)\s*\{(.*?)\}", text, re.S):
        if tag:
            tags.append(tag)
        for item in body.split(","):
            m = re.match(r"\s*(\w+)", item)
            if m:
                consts.append(m.group(1))
    return list(dict.fromkeys(consts)), tags


def our_fields(ffi, ctype, base=0):
    """Flattened (name, offset, ctype) of a struct, through anonymous members."""
    out = []
    for name, f in ctype.fields or ():
        if not name:
            out += our_fields(ffi, f.type, base + f.offset)
        else:
            out.append((name, base + f.offset, f.type))
    return out


def load_ffi(root: Path, workdir: Path):
    """The runtime ffi cffi emits for the declarations under ``root``.

    Built exactly like pyiommufd._uapi (out-of-line ABI mode), so the test sees
    the layouts and constants the package itself would get.
    """
    import pyiommufd._uapi_build as build

    target = Path(workdir) / f"_uapi_{abs(hash(str(root)))}.py"
    build.make_ffi(Path(root)).emit_python_code(str(target))
    spec = importlib.util.spec_from_file_location(target.stem, target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi


# ---------------------------------------------------------------- compare

def _is_signed(ffi, ctype) -> int:
    if ctype.kind == "array":
        ctype = ctype.item
    if ctype.kind != "primitive":
        return -1
    return int(int(ffi.cast(ctype, -1)) < 0)


def _fits(value: int, width: int) -> bool:
    return -(1 << (width - 1)) <= value < (1 << width)


def compare(ffi, cdef: str, real: RealUapi, workdir: Path) -> list[str]:
    """Every difference between ``ffi`` (our declarations) and real C, as text."""
    problems: list[str] = []
    lines = ['#include <stdio.h>', '#include <stddef.h>', prelude(), 'int main(void) {']
    c_fields: dict[tuple[str, str], CField] = {}
    ours: dict[str, dict[str, tuple[int, object]]] = {}   # tag -> name -> (offset, ctype)

    for tag in sorted(ffi.list_types()[2]):
        problems.append(f"union {tag}: top-level unions are not probed yet (extend uapi_probe)")
    for tag in sorted(ffi.list_types()[1]):
        ctype = ffi.typeof(f"struct {tag}")
        if tag not in real.structs:
            problems.append(f"struct {tag}: not in the 7.3 headers nor the LU revisions")
            continue
        fields = our_fields(ffi, ctype)
        names = [n for n, _, _ in fields]
        ours[tag] = {n: (o, t) for n, o, t in fields}
        cnames = [f.name for f in real.structs[tag]]
        if names != cnames:
            missing = [n for n in cnames if n not in names]
            extra = [n for n in names if n not in cnames]
            detail = []
            if missing:
                detail.append("missing " + ", ".join(missing))
            if extra:
                detail.append("not in C: " + ", ".join(extra))
            if not detail:
                detail.append("order differs")
            problems.append(f"struct {tag}: fields {'; '.join(detail)} "
                            f"(C: {', '.join(cnames)}; ours: {', '.join(names)})")
        T = f"struct {tag}"
        lines.append(f'printf("S {tag} %zu %zu\\n", sizeof({T}), _Alignof({T}));')
        for cf in real.structs[tag]:
            if cf.name not in names:
                continue
            c_fields[(tag, cf.name)] = cf
            m = f"(({T} *)0)->{cf.name}"
            off = f"offsetof({T}, {cf.name})"
            if cf.kind == "flex":
                size, elem = "-1", f"sizeof({m}[0])"
                sign = f"(int)((__typeof__({m}[0]))-1 < 0)" if not cf.record else "-1"
            elif cf.kind == "array":
                size, elem = f"sizeof({m})", f"sizeof({m}[0])"
                sign = f"(int)((__typeof__({m}[0]))-1 < 0)" if not cf.record else "-1"
            elif cf.kind == "scalar":
                size, elem, sign = f"sizeof({m})", "-1", f"(int)((__typeof__({m}))-1 < 0)"
            else:
                size, elem, sign = f"sizeof({m})", "-1", "-1"
            lines.append(f'printf("F {tag} {cf.name} %zu %lld %lld %d\\n", {off}, '
                         f'(long long){size}, (long long){elem}, {sign});')

    consts, tags = declared_names(cdef)
    known = real.constant_names()
    for name in consts:
        if name not in known:
            problems.append(f"{name}: not defined by the 7.3 headers nor the LU revisions")
            continue
        lines.append(f'printf("C {name} %zu %d %lld %llu\\n", sizeof({name}), '
                     f'(int)((__typeof__({name}))-1 < 0), (long long)({name}), '
                     f'(unsigned long long)({name}));')
    for tag in tags:
        if tag not in real.enum_tags:
            problems.append(f"enum {tag}: not in the 7.3 headers")
    lines += ["return 0;", "}"]

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    src = workdir / "probe.c"
    exe = workdir / "probe"
    src.write_text("\n".join(lines) + "\n")
    _run([gcc(), "-std=gnu11", "-O0", "-w", *include_flags(real.inc), "-o", str(exe), str(src)],
         f"compiling the C probe {src}")
    out = _run([str(exe)], f"running the C probe {exe}")

    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "S":
            tag, size, align = rest[0], int(rest[1]), int(rest[2])
            T = f"struct {tag}"
            if ffi.sizeof(T) != size:
                problems.append(f"{T}: sizeof is {ffi.sizeof(T)} in ours, {size} in C")
            if ffi.alignof(T) != align:
                problems.append(f"{T}: alignof is {ffi.alignof(T)} in ours, {align} in C")
        elif kind == "F":
            tag, name = rest[0], rest[1]
            off, size, elem, sign = (int(x) for x in rest[2:6])
            o, t = ours[tag][name]
            problems += _compare_field(ffi, f"struct {tag}.{name}", o, t, c_fields[(tag, name)],
                                       off, size, elem, sign)
        elif kind == "C":
            name = rest[0]
            width, signed, sval, uval = int(rest[1]) * 8, int(rest[2]), int(rest[3]), int(rest[4])
            cval = sval if signed else uval
            ours = ffi.integer_const(name)
            # A C int like (1 << 31) is negative, our literal 0x80000000 is
            # not: the same bits at C's width are the same ABI value.
            mask = (1 << width) - 1
            if ours != cval and not (_fits(ours, width) and ours & mask == cval & mask):
                problems.append(f"{name}: {ours:#x} in ours, {cval:#x} in C")
    return problems


def _compare_field(ffi, where: str, o: int, t, cf: CField, off, size, elem, sign) -> list[str]:
    """Our field (offset o, ctype t) against what the probe printed for C's."""
    out = []
    if o != off:
        out.append(f"{where}: offset {o} in ours, {off} in C")
    if cf.kind in ("array", "flex") and cf.record and t.kind == "array" \
            and t.item.cname != cf.record:
        out.append(f"{where}: elements are {cf.record} in C, {t.item.cname} in ours")
    if cf.kind == "flex":
        if t.kind != "array" or t.length is not None:
            out.append(f"{where}: a flexible array in C, {t.cname} in ours")
        elif ffi.sizeof(t.item) != elem:
            out.append(f"{where}: element size {ffi.sizeof(t.item)} in ours, {elem} in C")
    else:
        if t.kind == "array" and t.length is None:
            out.append(f"{where}: a flexible array in ours, {size} bytes in C")
        elif ffi.sizeof(t) != size:
            out.append(f"{where}: size {ffi.sizeof(t)} in ours ({t.cname}), {size} in C")
        if cf.kind == "array" and t.kind != "array":
            out.append(f"{where}: an array in C, {t.cname} in ours")
        if cf.kind == "pointer" and t.kind != "pointer":
            out.append(f"{where}: a pointer in C, {t.cname} in ours")
        if cf.kind == "record" and t.cname != cf.record:
            out.append(f"{where}: {cf.record} in C, {t.cname} in ours")
        if cf.kind == "array" and elem > 0 and t.kind == "array" and ffi.sizeof(t.item) != elem:
            out.append(f"{where}: element size {ffi.sizeof(t.item)} in ours, {elem} in C")
    if sign >= 0:
        ours_sign = _is_signed(ffi, t)
        if ours_sign >= 0 and ours_sign != sign:
            out.append(f"{where}: {'signed' if ours_sign else 'unsigned'} in ours, "
                       f"{'signed' if sign else 'unsigned'} in C")
    return out


# ---------------------------------------------------------------- completeness

def missing_declarations(ffi, cdef: str, real: RealUapi) -> list[str]:
    """Items of the main 7.3 headers we do not declare (NOT_ABI aside)."""
    consts, tags = declared_names(cdef)
    consts, tags = set(consts), set(tags)
    structs = set(ffi.list_types()[1])
    missing = []
    for tag, header in sorted(real.struct_file.items()):
        if real.in_main(header) and tag not in structs:
            missing.append(f"struct {tag} ({header})")
    for tag, header in sorted(real.enum_tags.items()):
        if real.in_main(header) and tag not in tags:
            missing.append(f"enum {tag} ({header})")
    for name, header in sorted(real.enum_members.items()):
        if real.in_main(header) and name not in consts:
            missing.append(f"{name} (enum member, {header})")
    for name, (header, fnlike, body) in sorted(real.macros.items()):
        if real.in_main(header) and name not in consts and name not in NOT_ABI:
            missing.append(f"{name} (#define{'()' if fnlike else ''} {body[:40]!r}, {header})")
    for name in sorted(NOT_ABI):
        if name not in real.macros or not real.in_main(real.macros[name][0]):
            missing.append(f"{name}: listed in NOT_ABI but no longer in the headers (stale allowlist)")
    return missing
