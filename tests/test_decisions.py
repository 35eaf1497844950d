"""The runtime's decisions as tables: pure functions of plain facts, nothing compiled."""

import pytest

from compileclip.records import Path, choose_path, plan_norm, resolve_owner


@pytest.mark.parametrize(
    "compiled_frame, has_step_graph, closure, fuse, expected",
    [
        (True, True, False, True, Path.IN_GRAPH),      # compile_step(opt) in steady state
        (False, True, False, True, Path.EAGER),        # the same optimizer stepped uncompiled (scaler.step)
        (True, False, False, True, Path.EAGER),        # a step compiled by another backend
        (False, False, False, True, Path.EAGER),       # eager opt.step() of a clipped model
        (True, True, False, False, Path.EAGER),        # fuse=False: always the eager clip
        (True, True, True, True, Path.AFTER_CLOSURE),  # the closure runs the backward
        (False, False, True, True, Path.AFTER_CLOSURE),
    ],
)
def test_choose_path(compiled_frame, has_step_graph, closure, fuse, expected):
    assert choose_path(compiled_frame=compiled_frame, has_step_graph=has_step_graph,
                       closure=closure, fuse=fuse) is expected


A, B = "a", "b"


@pytest.mark.parametrize(
    "strong, owner, error",
    [
        ([A], A, None),
        ([A, B], None, "2 clip backends cover"),  # model clip and step clip on one optimizer
        ([], None, None),                         # an optimizer no clip knows: not clipped
    ],
)
def test_resolve_owner(strong, owner, error):
    got, msg = resolve_owner(strong)
    assert got == owner
    assert (msg is None) == (error is None) and (error is None or error in msg)


S = frozenset


@pytest.mark.parametrize(
    "runs, step, used, left",
    [
        ([(S({1, 2, 3}), True)], S({1, 2, 3}), [0], S()),                 # one graph, all final
        ([(S({1, 2, 3}), False)], S({1, 2, 3}), [], S({1, 2, 3})),        # .grad changed since
        ([(S({1, 2}), True), (S({3}), True)], S({1, 2, 3}), [0, 1], S()),  # graph break, regional
        ([(S({1, 2}), True)], S({1, 2, 3}), [0], S({3})),                 # a module outside the graph
        ([(S({1, 2}), True), (S({1, 2}), True)], S({1, 2}), [], S({1, 2})),  # model called twice
        ([(S({1, 2, 9}), True)], S({1, 2}), [], S({1, 2})),               # the norm covers another optimizer's
        ([(S({1}), True), (S({1, 2}), True), (S({3}), True)], S({1, 2, 3}), [2], S({1, 2})),
        ([(S(), True)], S({1}), [], S({1})),
        ([], S({1, 2}), [], S({1, 2})),                                   # no compiled backward (compiled autograd)
    ],
)
def test_plan_norm(runs, step, used, left):
    assert plan_norm(runs, step) == (used, left)
