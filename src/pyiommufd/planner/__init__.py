"""Live-update preservation plans: validate and order them without touching
the kernel (``pyiommufd plan --dry-run``), then execute them.

A plan is declarative (TOML, JSON, or built from CLI options)::

    session = "vm0"
    lu_abi = "lu-v1"                 # lu-v1 (v1, set) | lu-v2 (v2, mark) | probe (default: probe)

    [[memfd]]
    name = "guest-ram"
    size = "1M"                      # bytes, or with K/M/G suffix
    seals = ["seal", "grow", "shrink"]   # or "live-update"
    contents = "random:42"           # zero | random[:SEED] | @PATH | hex:PATTERN
    token = 0x890123                 # LUO token (default: assigned)

    [[iommufd]]
    name = "iommufd0"
    token = 0x123456
      [[iommufd.ioas]]
      name = "ioas0"
      mappings = [{ memfd = "guest-ram", offset = 0, length = "1M", iova = 0x100000000 }]
      [[iommufd.hwpt]]
      name = "hwpt0"
      ioas = "ioas0"
      device = "dev0"                # the device IOMMU_HWPT_ALLOC is done for
      lu_token = 0x789012            # IOMMU_HWPT_LU_* token (per iommufd)

    [[device]]
    name = "dev0"
    bdf = "0000:00:03.0"             # or cdev = "/dev/vfio/devices/vfio0"
    hwpt = "hwpt0"
    token = 0x654321

The package follows the plan's life:

* :mod:`.spec`: the schema and the parsers (``plan_from_dict``, ``load_plan``,
  ``plan_from_options``);
* :mod:`.rules`: :func:`validate` returns a :class:`Problem` for every rule the
  series imposes, one function per rule (docs/plan-format.md lists them with
  their sources);
* :mod:`.order`: :func:`order` returns the numbered :class:`Operation` s,
  :func:`check_order` re-checks any operation sequence against the ordering
  rules, :func:`report` is the dry run;
* :mod:`.execute`: :func:`execute` carries a valid plan out through the object
  model and preserves through the holder agent.

Only :func:`execute` touches the kernel.

Token 0 of the session is reserved for the manifest
(:data:`pyiommufd.manifest.MANIFEST_TOKEN`).
"""
from __future__ import annotations

from .execute import Executed, content_chunks, execute
from .order import ACTIONS, Operation, assign_tokens, check_order, order, report, stage2_retrieves
from .rules import Problem, errors_in, validate
from .spec import (LU_SEALS, LUO_SEALS, MEMFD_SIZE_MAX, PAGE_SIZE, U32_MAX, U64_MAX, WRITE_SEALS, Contents,
                   DeviceSpec, HwptSpec, IoasSpec, IommufdSpec, MappingSpec, MemfdSpec, Plan, abi_name,
                   device_iommufd, load_plan, marked_hwpts, memfds_needed_by, parse_contents, parse_int,
                   parse_memfd_option, parse_seals, parse_size, parse_token, plan_from_dict, plan_from_options,
                   preserved_ioas)

__all__ = ["Plan", "MemfdSpec", "IommufdSpec", "IoasSpec", "MappingSpec", "HwptSpec", "DeviceSpec", "Contents",
           "Problem", "Operation", "plan_from_dict", "plan_from_options", "load_plan", "parse_memfd_option",
           "validate", "order", "check_order", "assign_tokens", "stage2_retrieves", "report", "errors_in",
           "content_chunks", "LU_SEALS", "LUO_SEALS", "execute", "Executed",
           # the helpers and limits the package's modules share, importable as before the split
           "ACTIONS", "MEMFD_SIZE_MAX", "PAGE_SIZE", "U32_MAX", "U64_MAX", "WRITE_SEALS", "abi_name",
           "device_iommufd", "marked_hwpts", "memfds_needed_by", "parse_contents", "parse_int", "parse_seals",
           "parse_size", "parse_token", "preserved_ioas"]
