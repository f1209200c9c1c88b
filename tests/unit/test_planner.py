"""The planner: every rule with a plan that breaks it, ordering, parsing.
Nothing here touches a kernel (validate/order/check_order never do)."""
from __future__ import annotations

import copy
import json

import pytest

from pyiommufd import planner as P
from pyiommufd.errors import UsageError

MiB = 1 << 20


def base() -> dict:
    """A valid plan shaped like the series' selftest (seed-spec 3.3)."""
    return {
        "session": "iommufd-test",
        "lu_abi": "lu-v1",
        "memfd": [{"name": "buffer", "size": "1M", "seals": ["seal", "grow", "shrink"], "token": 0x890123,
                   "contents": "random:7"}],
        "iommufd": [{
            "name": "iommufd0", "token": 0x123456,
            "ioas": [{"name": "ioas0", "mappings": [{"memfd": "buffer", "offset": 0, "length": "1M",
                                                     "iova": 0x100000000}]}],
            "hwpt": [{"name": "hwpt0", "ioas": "ioas0", "device": "dev0", "lu_token": 0x789012}],
        }],
        "device": [{"name": "dev0", "bdf": "0000:00:03.0", "hwpt": "hwpt0", "token": 0x654321}],
    }


def plan_of(mutate=None) -> P.Plan:
    data = copy.deepcopy(base())
    if mutate is not None:
        mutate(data)
    return P.plan_from_dict(data)


def codes(plan: P.Plan, severity: str = "error") -> set[str]:
    return {p.code for p in P.validate(plan) if p.severity == severity}


def test_base_plan_is_valid():
    plan = plan_of()
    assert codes(plan) == set()
    assert codes(plan, "warning") == set()
    ops = P.order(plan)
    assert P.check_order(plan, ops) == []


def test_order_matches_the_series():
    plan = plan_of()
    actions = [o.action for o in P.order(plan)]
    idx = {a: actions.index(a) for a in set(actions)}
    # seal before map (seed-spec 4.4)
    assert idx["create_memfd"] < idx["fill"] < idx["seal"] < idx["map_file"]
    # mark before anything is preserved (4.9 H1)
    assert idx["mark"] < idx["create_session"] < idx["preserve_manifest"]
    # manifest first, then memfd -> iommufd -> cdev (4.2)
    assert idx["preserve_manifest"] < idx["preserve_memfd"] < idx["preserve_iommufd"] < idx["preserve_cdev"]
    assert idx["bind"] < idx["alloc_hwpt"] < idx["attach"] < idx["mark"]
    steps = [o.step for o in P.order(plan_of())]
    assert steps == list(range(1, len(steps) + 1))


def test_stage2_lists_manifest_memfd_cdev_then_iommufd():
    plan = plan_of()
    P.order(plan)
    kinds = [(r["kind"], r["token"]) for r in P.stage2_retrieves(plan)]
    assert kinds == [("manifest", 0), ("memfd", 0x890123), ("vfio-cdev", 0x654321), ("iommufd", 0x123456)]
    assert "EOPNOTSUPP" in P.stage2_retrieves(plan)[-1]["expect"]


def test_tokens_are_assigned_uniquely_and_never_zero():
    data = base()
    for item in (data["memfd"][0], data["iommufd"][0], data["device"][0], data["iommufd"][0]["hwpt"][0]):
        item.pop("token", None)
        item.pop("lu_token", None)
    data["memfd"].append({"name": "second", "size": 4096, "token": 1})
    plan = P.plan_from_dict(data)
    P.order(plan)
    tokens = [plan.memfds[0].token, plan.memfds[1].token, plan.iommufds[0].token, plan.devices[0].token]
    assert 0 not in tokens and len(set(tokens)) == 4
    assert plan.iommufds[0].hwpts[0].lu_token == 1


# -- one failing plan per rule ---------------------------------------------------------------
def _set(path, value):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _del(path):
    def mutate(d):
        target = d
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


def _both(*fns):
    def mutate(d):
        for fn in fns:
            fn(d)
    return mutate


HWPT = ["iommufd", 0, "hwpt", 0]
MAP = ["iommufd", 0, "ioas", 0, "mappings", 0]

RULES = {
    "session-name": _set(["session"], "x" * 64),
    "lu-abi": _set(["lu_abi"], "lu-v9"),
    "one-session": _set(["memfd", 0, "session"], "other"),
    "name-duplicate": _set(["device", 0, "name"], "buffer"),
    "token-reserved": _set(["memfd", 0, "token"], 0),
    "token-duplicate": _set(["device", 0, "token"], 0x123456),
    "memfd-size": _set(["memfd", 0, "size"], 0),
    "hugetlb": _set(["memfd", 0, "hugetlb"], True),
    "seals-unsupported": _set(["memfd", 0, "seals"], 0x7 | 0x40),
    "seals-missing": _set(["memfd", 0, "seals"], ["seal", "shrink"]),
    "memfd-unpreserved": _set(["memfd", 0, "preserve"], False),
    "mapping-not-file": _set(MAP + ["kind"], "va"),
    "mapping-memfd-unknown": _set(MAP + ["memfd"], "elsewhere"),
    "mapping-align": _set(MAP + ["iova"], 0x100000001),
    "mapping-range": _set(MAP + ["offset"], "1M"),
    "mapping-overlap": lambda d: d["iommufd"][0]["ioas"][0]["mappings"].append(
        {"memfd": "buffer", "offset": 0, "length": 4096, "iova": 0x100001000}),
    "mapping-iova-range": _set(MAP + ["iova"], (1 << 64) - 0x1000),
    "mapping-prot": _both(_set(MAP + ["readable"], False), _set(MAP + ["writeable"], False)),
    "hwpt-nested": _set(HWPT + ["data_type"], "vtd_s1"),
    "hwpt-ioas-unknown": _set(HWPT + ["ioas"], "ioas9"),
    "hwpt-device": _del(HWPT + ["device"]),
    "hwpt-device-unknown": _set(HWPT + ["device"], "dev9"),
    "hwpt-token-width": _set(HWPT + ["lu_token"], 1 << 32),
    "hwpt-token-duplicate": lambda d: (
        d["device"].append({"name": "dev1", "bdf": "0000:00:04.0", "hwpt": "hwpt1", "token": 5}),
        d["iommufd"][0]["hwpt"].append({"name": "hwpt1", "ioas": "ioas0", "device": "dev1",
                                        "lu_token": 0x789012})),
    "iommufd-unpreserved": _set(["iommufd", 0, "preserve"], False),
    "device-ident": _set(["device", 0, "bdf"], "00:3.0"),
    "device-duplicate": lambda d: (
        d["device"].append({"name": "dev1", "bdf": "00:03.0", "hwpt": "hwpt0", "token": 5})),
    "device-pasid": _set(["device", 0, "pasid"], [1]),
    "device-hwpt-unknown": _set(["device", 0, "hwpt"], "hwpt9"),
    "device-hwpt-unmarked": _set(HWPT + ["mark"], False),
    "device-hwpt-nested": _set(HWPT + ["data_type"], "vtd_s1"),
    "device-iommufd-unpreserved": _set(["iommufd", 0, "preserve"], False),
    "hwpt-device-iommufd": lambda d: (
        d["iommufd"].append({"name": "iommufd1", "token": 9, "ioas": [{"name": "ioas1", "mappings": [
            {"memfd": "buffer"}]}], "hwpt": [{"name": "hwptB", "ioas": "ioas1", "device": "dev0"}]})),
    "memfd-contents": _set(["memfd", 0, "contents"], "@/nonexistent/image"),
    "empty": lambda d: (d["memfd"][0].update(preserve=False), d["iommufd"].clear(), d["device"].clear()),
}


@pytest.mark.parametrize("code", RULES, ids=RULES.keys())
def test_rule(code):
    plan = plan_of(RULES[code])
    found = codes(plan)
    assert code in found, [str(p) for p in P.validate(plan)]
    rep = P.report(plan)
    assert not rep["valid"] and rep["operations"] == []


def test_every_error_has_a_location_and_message():
    for code, mutate in RULES.items():
        for problem in P.validate(plan_of(mutate)):
            assert problem.message and problem.code
            assert problem.describe() in str(problem)


WARNINGS = {
    "seals-write": _set(["memfd", 0, "seals"], ["seal", "grow", "shrink", "write"]),
    "hwpt-token-width": _both(_set(["lu_abi"], "probe"), _set(HWPT + ["lu_token"], 1 << 40)),
    "iommufd-unmarked": _both(_set(HWPT + ["mark"], False), _set(["device", 0, "preserve"], False)),
    "no-manifest": _set(["manifest"], False),
    "device-cdev": _both(_del(["device", 0, "bdf"]), _set(["device", 0, "cdev"], "/dev/vfio/7")),
    "device-unattached": _both(_del(HWPT + ["device"]), _del(["device", 0, "hwpt"])),
}


@pytest.mark.parametrize("code", WARNINGS, ids=WARNINGS.keys())
def test_warning(code):
    plan = plan_of(WARNINGS[code])
    assert code in codes(plan, "warning"), [str(p) for p in P.validate(plan)]


def test_write_seals_on_an_unmapped_memfd_warn_that_nothing_can_write_it():
    plan = plan_of(lambda d: d["memfd"].append({"name": "rom", "size": 4096, "seals": "seal,write", "token": 9}))
    warnings = [p for p in P.validate(plan) if p.code == "seals-write"]
    assert [p.where for p in warnings] == ["memfd 'rom'"]
    assert "nothing can write" in warnings[0].message


@pytest.mark.parametrize("where,mutate", [
    ("IOAS", lambda d: d["iommufd"][0]["ioas"].append({"name": "ioas0"})),
    ("HWPT", lambda d: d["iommufd"].append({"name": "iommufd1", "ioas": [{"name": "ioas1"}], "hwpt": [
        {"name": "hwpt0", "ioas": "ioas1", "device": "dev0", "mark": False}]})),
])
def test_ioas_and_hwpt_names_are_unique(where, mutate):
    problems = [p for p in P.validate(plan_of(mutate)) if p.code == "name-duplicate"]
    assert len(problems) == 1 and problems[0].message.startswith(f"{where} name"), problems


def test_a_new_rule_is_one_function_in_the_list(monkeypatch):
    from pyiommufd.planner import rules

    def no_plan_called_forbidden(plan):
        if plan.session == "forbidden":
            yield rules.error("session-forbidden", "not this one", "session")

    monkeypatch.setattr(rules, "RULES", (*rules.RULES, no_plan_called_forbidden))
    assert codes(plan_of(_set(["session"], "forbidden"))) == {"session-forbidden"}
    assert codes(plan_of()) == set()


def test_lu_v2_accepts_u64_hwpt_tokens():
    plan = plan_of(_both(_set(["lu_abi"], "v2"), _set(HWPT + ["lu_token"], (1 << 64) - 1)))
    assert codes(plan) == set()


def test_hwpt_tokens_are_per_iommufd():
    def two_iommufds(d):
        d["device"].append({"name": "dev1", "bdf": "0000:00:04.0", "hwpt": "hwptB", "token": 5})
        d["memfd"].append({"name": "ram2", "size": 4096, "token": 6})
        d["iommufd"].append({"name": "iommufd1", "token": 9, "ioas": [{"name": "ioas1", "mappings": [
            {"memfd": "ram2"}]}], "hwpt": [{"name": "hwptB", "ioas": "ioas1", "device": "dev1",
                                              "lu_token": 0x789012}]})
    assert codes(plan_of(two_iommufds)) == set()


def test_unmarked_hwpt_ioas_needs_no_seals():
    # only marked HWPTs' IOASes are checked (seed-spec 4.4)
    plan = plan_of(_both(_set(["memfd", 0, "seals"], []), _set(HWPT + ["mark"], False),
                         _set(["device", 0, "preserve"], False)))
    assert "seals-missing" not in codes(plan)


# -- ordering checks -------------------------------------------------------------------------
def _ops(plan):
    return P.order(plan)


def _move(ops, action, before_action):
    """Move the first ``action`` right before the first ``before_action``."""
    ops = list(ops)
    op = next(o for o in ops if o.action == action)
    ops.remove(op)
    ops.insert(next(i for i, o in enumerate(ops) if o.action == before_action), op)
    for i, o in enumerate(ops, 1):
        o.step = i
    return ops


ORDER_RULES = {
    "seal-before-map": ("map_file", "seal"),
    "mark-after-preserve": ("preserve_iommufd", "mark"),
    "mark-before-preserve": ("preserve_iommufd", "mark"),
    "memfd-before-iommufd": ("preserve_iommufd", "preserve_memfd"),
    "iommufd-before-cdev": ("preserve_cdev", "preserve_iommufd"),
    "manifest-first": ("preserve_memfd", "preserve_manifest"),
    "preserve-before-session": ("preserve_manifest", "create_session"),
    "attach-before-preserve": ("preserve_cdev", "attach"),
    "alloc-before-attach": ("attach", "alloc_hwpt"),
}


@pytest.mark.parametrize("code", ORDER_RULES, ids=ORDER_RULES.keys())
def test_check_order(code):
    plan = plan_of()
    action, before = ORDER_RULES[code]
    ops = _move(_ops(plan), action, before)
    found = {p.code for p in P.check_order(plan, ops)}
    assert code in found, found


def test_check_order_one_session():
    plan = plan_of()
    ops = _ops(plan)
    extra = P.Operation(len(ops) + 1, "create_session", "other", args={"session": "other"})
    assert "one-session" in {p.code for p in P.check_order(plan, ops + [extra])}


# -- parsing ----------------------------------------------------------------------------------
def test_toml_and_json_files(tmp_path):
    toml = tmp_path / "plan.toml"
    toml.write_text('''
session = "vm0"
lu_abi = "v2"

[[memfd]]
name = "guest-ram"
size = "2M"
seals = "live-update"
contents = { random = 42 }
token = 0x10

[[iommufd]]
name = "iommufd0"
  [[iommufd.ioas]]
  name = "ioas0"
  mappings = [{ memfd = "guest-ram" }]
  [[iommufd.hwpt]]
  name = "hwpt0"
  device = "dev0"

[[device]]
name = "dev0"
cdev = "/dev/vfio/devices/vfio0"
hwpt = "hwpt0"
''')
    plan = P.load_plan(toml)
    assert plan.memfds[0].size == 2 * MiB and plan.memfds[0].seals == P.LU_SEALS
    assert plan.memfds[0].contents.kind == "random" and plan.memfds[0].contents.seed == 42
    assert plan.iommufds[0].hwpts[0].ioas == "ioas0"  # the only IOAS
    assert codes(plan) == set()
    js = tmp_path / "plan.json"
    js.write_text(json.dumps(base()))
    assert codes(P.load_plan(js)) == set()


@pytest.mark.parametrize("text,ext,match", [
    ("session = ", ".toml", "not valid TOML"),
    ("{", ".json", "not valid JSON"),
    ("[1]", ".json", "top level"),
    ('memfd = []', ".toml", "session"),
    ('session = "s"\nbogus = 1', ".toml", "unknown key"),
    ('session = "s"\n[[memfd]]\nname = "a"', ".toml", "size"),
    ('session = "s"\n[[memfd]]\nname = "a"\nsize = "1Q"', ".toml", "not a size"),
    ('session = "s"\n[[memfd]]\nname = "a b"\nsize = 1', ".toml", "a name is"),
    ('session = "s"\n[[memfd]]\nname = "a"\nsize = 1\nseals = ["glue"]', ".toml", "unknown seal"),
    ('session = "s"\n[[memfd]]\nname = "a"\nsize = 1\ncontents = "hex:zz"', ".toml", "hex"),
    ('session = "s"\n[[memfd]]\nname = "a"\nsize = 1\ntoken = "x"', ".toml", "not an integer"),
    ('session = "s"\n[[memfd]]\nname = "a"\nsize = 1\nhugetlb = "yes"', ".toml", "true or false"),
])
def test_malformed_plan_files(tmp_path, text, ext, match):
    path = tmp_path / f"plan{ext}"
    path.write_text(text)
    with pytest.raises(UsageError, match=match):
        P.load_plan(path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        P.load_plan(tmp_path / "nope.toml")


@pytest.mark.parametrize("value,expected", [
    (4096, 4096), ("4K", 4096), ("1M", MiB), ("2GiB", 2 << 30), ("0x1000", 4096), ("3 MB", 3 * MiB)])
def test_sizes(value, expected):
    assert P.parse_size(value, "x") == expected


@pytest.mark.parametrize("value,kind", [
    ("zero", "zero"), ("random", "random"), ("random:5", "random"), ("@/etc/hostname", "file"),
    ("hex:deadbeef", "pattern"), ("0xab", "pattern"), ({"pattern": "00ff"}, "pattern"), ({"file": "x"}, "file")])
def test_contents(value, kind):
    assert P.parse_contents(value, "x").kind == kind


def test_content_chunks_are_deterministic(tmp_path):
    a = b"".join(c for _, c in P.content_chunks(P.Contents("random", seed=3), 3 * MiB + 5))
    b = b"".join(c for _, c in P.content_chunks(P.Contents("random", seed=3), 3 * MiB + 5))
    assert a == b and len(a) == 3 * MiB + 5
    pat = b"".join(c for _, c in P.content_chunks(P.Contents("pattern", pattern=b"\x01\x02\x03"), 10))
    assert pat == b"\x01\x02\x03" * 3 + b"\x01"
    src = tmp_path / "img"
    src.write_bytes(b"hello")
    got = list(P.content_chunks(P.Contents("file", path=str(src)), 4096))
    assert got == [(0, b"hello")]
    assert list(P.content_chunks(P.Contents(), 4096)) == []


def test_memfd_option():
    assert P.parse_memfd_option("ram:1M") == {"name": "ram", "size": "1M"}
    got = P.parse_memfd_option("ram:1M:token=0x10:fill=random:seed=4:seals=seal,grow,shrink")
    assert got == {"name": "ram", "size": "1M", "token": "0x10", "contents": "random:4",
                   "seals": "seal,grow,shrink"}
    assert P.parse_memfd_option("ram:4K:fill=hex:abcd")["contents"] == "hex:abcd"
    assert P.parse_memfd_option("ram:4K:fill=@/tmp/x")["contents"] == "@/tmp/x"


@pytest.mark.parametrize("text", ["ram", ":1M", "ram:", "ram:1M:token", "ram:1M:colour=red",
                                  "ram:1M:fill=zero:seed=3"])
def test_bad_memfd_option(text):
    with pytest.raises(UsageError):
        P.parse_memfd_option(text)


def test_plan_from_options():
    plan = P.plan_from_options("vm0", memfds=["ram:1M", "rom:4K"], devices=["00:03.0", "/dev/vfio/devices/vfio1"],
                               hwpt_tokens=["1", "2"], iommufd_token="0x99", lu_abi="v1", base_iova="0x100000000")
    assert codes(plan) == set()
    iommufd = plan.iommufds[0]
    assert iommufd.token == 0x99
    assert [m.iova for m in iommufd.ioas[0].mappings] == [0x100000000, 0x100100000]
    assert [h.lu_token for h in iommufd.hwpts] == [1, 2]
    assert plan.devices[1].cdev == "/dev/vfio/devices/vfio1"
    memfd_only = P.plan_from_options("vm0", memfds=["ram:1M"])
    assert memfd_only.iommufds == [] and codes(memfd_only) == set()


@pytest.mark.parametrize("kwargs,match", [
    ({"memfds": ["ram:1M"], "session": None}, "--session"),
    ({"session": "s"}, "nothing to preserve"),
    ({"session": "s", "devices": ["00:03.0"], "hwpt_tokens": ["1", "2"]}, "one per device"),
    ({"session": "s", "devices": ["00:03.0"], "device_tokens": ["1", "2"]}, "one per device"),
])
def test_plan_from_options_errors(kwargs, match):
    session = kwargs.pop("session")
    with pytest.raises(UsageError, match=match):
        P.plan_from_options(session, **kwargs)


def test_report_is_json_serializable():
    rep = P.report(plan_of())
    assert json.loads(json.dumps(rep))["valid"] is True
    assert rep["lu_abi"] == "lu-v1"


# -- a device names itself one way -------------------------------------------------------------
def test_device_with_both_bdf_and_cdev_is_one_clear_problem():
    plan = plan_of(_set(["device", 0, "cdev"], "/dev/vfio/devices/vfio0"))
    problems = [p for p in P.validate(plan) if p.code == "device-ident"]
    assert [p.where for p in problems] == ["device 'dev0'"]
    assert "not both" in problems[0].message
    assert not P.report(plan)["valid"]


def test_device_with_neither_bdf_nor_cdev_is_a_problem():
    plan = plan_of(_del(["device", 0, "bdf"]))
    assert "device-ident" in codes(plan)


def test_an_unattached_device_is_preserved_without_iommu_state():
    # the series keeps such a cdev with no IOMMU state (seed-spec 4.5): a warning, not an error
    plan = P.plan_from_dict({"session": "s", "device": [{"name": "nic", "bdf": "0000:00:03.0"}]})
    assert codes(plan) == set() and "device-unattached" in codes(plan, "warning")
    actions = [o.action for o in P.order(plan)]
    assert "open_device" in actions and "preserve_cdev" in actions
    assert "bind" not in actions and "attach" not in actions
    row = next(r for r in P.stage2_retrieves(plan) if r["kind"] == "vfio-cdev")
    assert "without IOMMU state" in row["expect"] and "EPERM" not in row["expect"]


def test_an_unpreserved_hugetlb_memfd_is_the_kernels_business():
    # nothing asks LUO to preserve it and no marked HWPT maps it: the kernel has nothing to refuse
    scratch = {"name": "scratch", "size": "2M", "hugetlb": True, "preserve": False}
    assert "hugetlb" not in codes(plan_of(lambda d: d["memfd"].append(scratch)))
    assert "hugetlb" in codes(plan_of(lambda d: d["memfd"].append({**scratch, "preserve": True, "token": 9})))


def test_unknown_seal_bits_name_the_kernels_answer():
    problem = next(p for p in P.validate(plan_of(RULES["seals-unsupported"])) if p.code == "seals-unsupported")
    assert "F_ADD_SEALS says EINVAL" in problem.message and "0x40" in problem.message
