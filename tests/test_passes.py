"""Golden graphs: what ``insert_grad_norm`` puts into a small backward graph, and what
``guard_input_mutations`` does to a step graph."""

import math

import torch
import torch.fx as fx
from expecttest import TestCase
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

from compileclip import clipmath
from compileclip.passes import GraphSignature, insert_grad_norm, insert_step_clip, output_values


class _TupleOut(torch.nn.Module):
    # aot_module_simplified wants tuple outputs
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, x):
        return (self.lin(x),)


def rewritten_backward(norm_type: float, unscale: bool = False) -> str:
    """The backward graph of Linear(3, 2) after the pass, with the norm of every gradient."""
    torch.manual_seed(0)
    model = _TupleOut()
    captured = []

    def bw(gm: fx.GraphModule, inputs):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        grads = [i for i, a in enumerate(out.args[0]) if isinstance(a, fx.Node)]
        groups = clipmath.group_positions(output_values(gm, grads))

        def norms(gs, inp):
            return {f"norms_{k}": t for k, t in enumerate(clipmath.norms_by_group(gs, groups, norm_type, inp.get("inv_scale")))}

        inputs_ = {"inv_scale": torch.tensor(0.25)} if unscale else {}
        sig = insert_grad_norm(gm, grads, norms, inputs=inputs_)
        captured.append((sig, gm))
        return make_boxed_func(lambda *a: sig.split(gm(*sig.bind(a, inputs_)))[0])

    fw = lambda gm, inputs: make_boxed_func(gm.forward)  # noqa: E731
    compiled = aot_module_simplified(model, (torch.randn(4, 3),), fw_compiler=fw, bw_compiler=bw)
    compiled(torch.randn(4, 3))[0].sum().backward()
    sig, gm = captured[0]
    assert sig == GraphSignature(("inv_scale",) if unscale else (), ("norms_0",))
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


def rewritten_step(**spec) -> str:
    """An SGD update of one parameter, traced (as Dynamo gives it: torch-level calls), after
    ``insert_step_clip`` with the clip of ``clipmath.step_clip``."""
    def step(w, g):
        w.sub_(0.1 * g)
        return ()

    gm = fx.symbolic_trace(step)
    g = list(gm.graph.find_nodes(op="placeholder"))[1]
    spec = clipmath.StepClipSpec(norm_type=2.0, groups=((0,),), device=torch.device("cpu"),
                                 devices=(torch.device("cpu"),), **spec)
    f32 = torch.tensor(0.0)
    inputs = {"max_norm": f32, "enabled": torch.tensor(True)}
    sig = insert_step_clip(gm, [g], lambda gr, inp, ps: clipmath.step_clip(gr, inp, spec, ps), inputs=inputs)
    assert sig.inputs == ("max_norm", "enabled") and sig.outputs == ("total_norm", "nonfinite")
    return gm.code.strip()


class TestGoldenGraphs(TestCase):
    def test_norm_2(self):
        self.assertExpectedInline(rewritten_backward(2.0), """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_3: "f32[4, 3]", tangents_1: "f32[4, 2]"):
        # No stacktrace found for following nodes
        t_1: "f32[2, 4]" = torch.ops.aten.t.default(tangents_1)
        mm: "f32[2, 3]" = torch.ops.aten.mm.default(t_1, primals_3);  t_1 = primals_3 = None
        t_2: "f32[3, 2]" = torch.ops.aten.t.default(mm);  mm = None
        sum_1: "f32[1, 2]" = torch.ops.aten.sum.dim_IntList(tangents_1, [0], True);  tangents_1 = None
        view: "f32[2]" = torch.ops.aten.view.default(sum_1, [2]);  sum_1 = None
        t_3: "f32[2, 3]" = torch.ops.aten.t.default(t_2);  t_2 = None
        grad_norms_default: "f32[2]" = torch.ops.compileclip.grad_norms.default([t_3, view], 2.0, None)
        return (t_3, view, None, grad_norms_default)
""")

    def test_norm_inf(self):
        self.assertExpectedInline(rewritten_backward(math.inf), """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_3: "f32[4, 3]", tangents_1: "f32[4, 2]"):
        # No stacktrace found for following nodes
        t_1: "f32[2, 4]" = torch.ops.aten.t.default(tangents_1)
        mm: "f32[2, 3]" = torch.ops.aten.mm.default(t_1, primals_3);  t_1 = primals_3 = None
        t_2: "f32[3, 2]" = torch.ops.aten.t.default(mm);  mm = None
        sum_1: "f32[1, 2]" = torch.ops.aten.sum.dim_IntList(tangents_1, [0], True);  tangents_1 = None
        view: "f32[2]" = torch.ops.aten.view.default(sum_1, [2]);  sum_1 = None
        t_3: "f32[2, 3]" = torch.ops.aten.t.default(t_2);  t_2 = None
        grad_norms_default: "f32[2]" = torch.ops.compileclip.grad_norms.default([t_3, view], inf, None)
        return (t_3, view, None, grad_norms_default)
""")

    def test_unscale(self):
        self.assertExpectedInline(rewritten_backward(2.0, unscale=True), """\
class GraphModule(torch.nn.Module):
    def forward(self, primals_3: "f32[4, 3]", tangents_1: "f32[4, 2]", inv_scale: "f32[]"):
        # No stacktrace found for following nodes
        t_1: "f32[2, 4]" = torch.ops.aten.t.default(tangents_1)
        mm: "f32[2, 3]" = torch.ops.aten.mm.default(t_1, primals_3);  t_1 = primals_3 = None
        t_2: "f32[3, 2]" = torch.ops.aten.t.default(mm);  mm = None
        sum_1: "f32[1, 2]" = torch.ops.aten.sum.dim_IntList(tangents_1, [0], True);  tangents_1 = None
        view: "f32[2]" = torch.ops.aten.view.default(sum_1, [2]);  sum_1 = None
        t_3: "f32[2, 3]" = torch.ops.aten.t.default(t_2);  t_2 = None
        grad_norms_default: "f32[2]" = torch.ops.compileclip.grad_norms.default([t_3, view], 2.0, inv_scale);  inv_scale = None
        return (t_3, view, None, grad_norms_default)
""")


class TestGoldenStep(TestCase):
    def test_clip_in_the_update(self):
        self.assertExpectedInline(rewritten_step(), """\
def forward(self, w, g, clip_max_norm, clip_enabled):
    norms_and_total_default = torch.ops.compileclip.norms_and_total.default([g], 2.0, None)
    getitem = norms_and_total_default[1];  norms_and_total_default = None
    abs_1 = torch.abs(getitem)
    lt = torch.lt(abs_1, inf);  abs_1 = None
    logical_not = torch.logical_not(lt);  lt = None
    to = logical_not.to(torch.float32);  logical_not = None
    add = getitem + 1e-06
    reciprocal = add.reciprocal();  add = None
    mul_1 = reciprocal * clip_max_norm;  reciprocal = clip_max_norm = None
    clamp = torch.clamp(mul_1, max = 1.0);  mul_1 = None
    where = torch.where(clip_enabled, clamp, 1.0);  clip_enabled = clamp = None
    mul_2 = g * where;  where = None
    mul = 0.1 * mul_2
    sub_ = w.sub_(mul);  w = mul = sub_ = None
    copy_ = g.copy_(mul_2);  g = mul_2 = copy_ = None
    return (getitem, to)""")


def guarded_step_graph() -> tuple[str, int]:
    """An SGD-like update of two inputs, functionalized (mutations become copy_ at the end),
    with a skip flag output, after ``guard_input_mutations`` (input 2 excluded)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from compileclip.passes import guard_input_mutations

    def step(param, buf, grad):
        total = grad.norm()
        flag = (~(total.abs() < math.inf)).float()
        buf.mul_(0.9).add_(grad)
        param.sub_(0.1 * buf)
        grad.mul_(0.5)
        return (total, flag)

    args = (torch.randn(3), torch.randn(3), torch.randn(3))
    gm = make_fx(torch.func.functionalize(step, remove="mutations_and_views"), tracing_mode="fake")(*args)
    n = guard_input_mutations(gm, -1, exclude=[2])
    return gm.code.strip(), n


class TestGuardStep(TestCase):
    def test_writes_into_inputs_are_guarded(self):
        code, n = guarded_step_graph()
        self.assertEqual(n, 2)  # param and buf; the gradient (excluded) is written as is
        self.assertExpectedInline(code, """\
def forward(self, param_1, buf_1, grad_1):
    linalg_vector_norm = torch.ops.aten.linalg_vector_norm.default(grad_1)
    abs_1 = torch.ops.aten.abs.default(linalg_vector_norm)
    lt = torch.ops.aten.lt.Scalar(abs_1, inf);  abs_1 = None
    bitwise_not = torch.ops.aten.bitwise_not.default(lt);  lt = None
    _to_copy = torch.ops.aten._to_copy.default(bitwise_not, dtype = torch.float32);  bitwise_not = None
    gt_scalar = torch.ops.aten.gt.Scalar(_to_copy, 0)
    mul = torch.ops.aten.mul.Tensor(buf_1, 0.9)
    add = torch.ops.aten.add.Tensor(mul, grad_1);  mul = None
    mul_1 = torch.ops.aten.mul.Tensor(add, 0.1)
    sub = torch.ops.aten.sub.Tensor(param_1, mul_1);  mul_1 = None
    mul_2 = torch.ops.aten.mul.Tensor(grad_1, 0.5)
    where_self = torch.ops.aten.where.self(gt_scalar, param_1, sub);  sub = None
    copy_ = torch.ops.aten.copy_.default(param_1, where_self);  param_1 = where_self = copy_ = None
    where_self_1 = torch.ops.aten.where.self(gt_scalar, buf_1, add);  gt_scalar = add = None
    copy__1 = torch.ops.aten.copy_.default(buf_1, where_self_1);  buf_1 = where_self_1 = copy__1 = None
    copy__2 = torch.ops.aten.copy_.default(grad_1, mul_2);  grad_1 = mul_2 = copy__2 = None
    return (linalg_vector_norm, _to_copy)""")
