"""jaxformer.plan's HLO reading and batch search on hand-written inputs (no compile, milliseconds).

The module texts follow what XLA:GPU prints for a compiled step (async collectives as -start ops whose
result is (inputs, outputs), replica groups in the iota, explicit and mesh forms, while loops with a
known_trip_count); every expected number below is worked out by hand from the shapes.
"""

from __future__ import annotations

import pytest

from jaxformer.plan import largest_fit
from jaxformer.plan.hlo import analyze, nbytes, replica_groups

SCANNED = """HloModule jit_step, num_partitions=8

%body (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %p = (s32[], f32[64,128]{1,0}) parameter(0)
  %x = f32[64,128]{1,0} get-tuple-element(%p), index=1
  %w = f32[128,128]{1,0} constant({...})
  %fusion.1 = f32[64,128]{1,0} fusion(%x, %w), kind=kCustom, calls=%gemm_fusion_dot
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[64,128]{1,0}) tuple(%i, %fusion.1)
}

%gemm_fusion_dot (parameter_0: f32[64,128], parameter_1: f32[128,128]) -> f32[64,128] {
  %parameter_0 = f32[64,128]{1,0} parameter(0)
  %parameter_1 = f32[128,128]{1,0} parameter(1)
  ROOT %dot.2 = f32[64,128]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%cond (p.1: (s32[], f32[64,128])) -> pred[] {
  %p.1 = (s32[], f32[64,128]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (a: bf16[32,4096], b: f32[64,128]) -> f32[64,128] {
  %a = bf16[32,4096]{1,0} parameter(0)
  %b = f32[64,128]{1,0} parameter(1)
  %ag = ((bf16[32,4096]{1,0}), bf16[256,4096]{1,0}) all-gather-start(%a), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}
  %agd = bf16[256,4096]{1,0} all-gather-done(%ag)
  %rs = ((bf16[256,4096]{1,0}), bf16[32,4096]{1,0}) reduce-scatter-start(%agd), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}, to_apply=%add
  %ar = f32[64,128]{1,0} all-reduce-start(%b), channel_id=3, replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add
  %init = (s32[], f32[64,128]{1,0}) tuple(%c0, %b)
  %loop = (s32[], f32[64,128]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  ROOT %out = f32[64,128]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_dot_flops_count_a_while_body_as_often_as_it_runs():
    stats = analyze(SCANNED, n_devices=8, devices_per_host=8)
    assert stats.dot_flops == 12 * 2 * 64 * 128 * 128  # 12 trips of a [64,128] x [128,128] matmul


def test_collective_bytes_per_device_on_a_ring():
    stats = analyze(SCANNED, n_devices=8, devices_per_host=8)
    gathered = 256 * 4096 * 2  # the all-gather's output, groups of 4 ('axis_1')
    assert stats.collective_bytes["all-gather"] == gathered * 3 / 4
    assert stats.collective_bytes["reduce-scatter"] == 256 * 4096 * 2 * 7 / 8  # its full input, groups of 8
    assert stats.collective_bytes["all-reduce"] == 64 * 128 * 4 * 2 * 1 / 2  # 2 (n-1)/n, groups of 2
    assert stats.cross_host_bytes == 0


def test_collectives_whose_groups_span_hosts_are_counted_as_cross_host():
    # 4 devices per host: the mesh groups {0..3},{4..7} stay inside a host; the iota group of 8 and the
    # explicit pairs {0,4},... cross hosts.
    stats = analyze(SCANNED, n_devices=8, devices_per_host=4)
    assert stats.cross_host_bytes == stats.collective_bytes["reduce-scatter"] + stats.collective_bytes["all-reduce"]


def test_replica_group_forms():
    assert replica_groups("replica_groups=[2,4]<=[8]", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert replica_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert replica_groups("replica_groups={{0,2},{1,3}}, x", 4) == [[0, 2], [1, 3]]
    assert replica_groups("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", 8) == [[0, 4], [1, 5], [2, 6],
                                                                                         [3, 7]]
    assert replica_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]
    assert nbytes("(bf16[2,3]{1,0}, f32[4]{0}, s32[])") == 2 * 3 * 2 + 4 * 4 + 4


@pytest.mark.parametrize("grows", ["linear", "sublinear"])
def test_largest_fit_finds_the_boundary_in_a_few_compiles(grows):
    budget = 1000
    peak = (lambda k: 40 + 7 * k) if grows == "linear" else (lambda k: 40 + int(60 * k ** 0.8))
    best = max(k for k in range(1, 500) if peak(k) <= budget)
    calls = []

    def measure(k):
        calls.append(k)
        return peak(k)

    found = largest_fit(measure, 8, peak(8), budget, max_compiles=6)
    assert found["largest_fitting"] == best and found["smallest_not_fitting"] == best + 1
    assert len(calls) == found["compiles"] <= 6


def test_largest_fit_when_even_one_row_does_not_fit():
    found = largest_fit(lambda k: 500 + k, 4, 504, 100)
    assert found["largest_fitting"] is None and found["smallest_not_fitting"] == 1
