"""planner.execute on the fake kernel with an agent in a thread: what the
manifest it writes says about the IOASes and their mappings."""
from __future__ import annotations

import errno
import os

import pytest

from pyiommufd import manifest as M
from pyiommufd import pci
from pyiommufd import planner as P
from pyiommufd.agent import AgentClient, AgentServer

BDF = "0000:00:03.0"


@pytest.fixture
def agent(series_kernel, sockdir):
    pci.PciDevice(BDF, series_kernel).bind_vfio()
    path = os.path.join(sockdir, "agent.sock")
    server = AgentServer(path, backend=series_kernel).serve_in_thread()
    yield AgentClient(path)
    server.shutdown()


def plan_with_a_scratch_ioas() -> P.Plan:
    """ioas0 is what the marked HWPT uses; scratch maps a memfd that is not
    preserved, in an IOAS no HWPT uses (the kernel ignores it, seed-spec 4.4)."""
    return P.plan_from_dict({
        "session": "scratch", "lu_abi": "lu-v2",
        "memfd": [{"name": "ram", "size": "64K", "token": 1, "contents": "random:5"},
                  {"name": "bounce", "size": "8K", "preserve": False}],
        "iommufd": [{"name": "ictx", "token": 2,
                     "ioas": [{"name": "ioas0", "mappings": [{"memfd": "ram", "iova": 0x100000}]},
                              {"name": "scratch", "mappings": [{"memfd": "bounce", "iova": 0x200000}]}],
                     "hwpt": [{"name": "hwpt0", "ioas": "ioas0", "device": "nic", "lu_token": 7}]}],
        "device": [{"name": "nic", "bdf": BDF, "hwpt": "hwpt0", "token": 3}],
    })


def test_a_mapping_of_an_unpreserved_memfd_stays_out_of_the_manifest(series_kernel, agent):
    plan = plan_with_a_scratch_ioas()
    assert P.errors_in(P.validate(plan)) == []
    done = P.execute(plan, agent, backend=series_kernel)
    assert sorted(row["token"] for row in done.preserved) == [0, 1, 2, 3]   # not bounce
    manifest = M.Manifest.from_json(done.manifest.to_json()).validate()
    iommufd = manifest.by_name("ictx")
    assert iommufd is not None and iommufd.ioas is not None
    assert [(a.name, [(m.memfd, m.memfd_token) for m in a.mappings]) for a in iommufd.ioas] == \
        [("ioas0", [("ram", 1)])]
    assert [h.ioas for h in iommufd.hwpts or []] == ["ioas0"]


def test_every_action_runs_and_in_the_order_it_was_given(series_kernel, agent):
    plan = plan_with_a_scratch_ioas()
    ops = P.order(plan)
    seen: list[P.Operation] = []
    P.execute(plan, agent, backend=series_kernel, ops=ops, progress=seen.append)
    assert seen == ops
    assert {op.action for op in seen} == set(P.ACTIONS)
    status = agent.status()
    assert [s["name"] for s in status["sessions"]] == ["scratch"]


def test_a_failed_step_releases_the_half_built_session(series_kernel, agent):
    plan = plan_with_a_scratch_ioas()
    ops = P.order(plan)
    cdev = next(op for op in ops if op.action == "preserve_cdev")
    cdev.args["token"] = 1      # the memfd's: PRESERVE_FD says EEXIST
    told: list[str] = []
    with pytest.raises(OSError):
        P.execute(plan, agent, backend=series_kernel, ops=ops, notify=told.append)
    assert told and "released the half-built session 'scratch'" in told[0]
    assert agent.status()["sessions"] == []


def test_an_unattached_device_goes_into_the_manifest_without_iommu_state(series_kernel, agent):
    plan = P.plan_from_dict({"session": "bare", "memfd": [{"name": "ram", "size": 4096}],
                             "device": [{"name": "nic", "bdf": BDF}]})
    done = P.execute(plan, agent, backend=series_kernel)
    cdev = M.Manifest.from_json(done.manifest.to_json()).validate().by_name("nic")
    assert cdev is not None and cdev.bdf == BDF
    assert cdev.hwpt is None and cdev.iommufd_token is None


def test_unknown_seal_bits_are_refused_by_f_add_seals_as_the_plan_says(series_kernel):
    from pyiommufd.memfd import MemFD

    plan = P.plan_from_dict({"session": "s", "memfd": [{"name": "ram", "size": 4096, "seals": 0x47}]})
    assert "EINVAL" in next(p.message for p in P.validate(plan) if p.code == "seals-unsupported")
    with MemFD.create("ram", 4096, sealing=True, backend=series_kernel) as memfd:
        with pytest.raises(OSError) as info:
            memfd.add_seals(0x47)
    assert info.value.errno == errno.EINVAL
