"""torch.onnx's decomposition step without its re-trace, where the re-trace would only swap a few ops.

Every `torch.onnx.export(..., dynamo=True)` call runs three steps:

    torch.export capture  ->  run_decompositions(table)  ->  FX -> ONNX translation
    (symbolic trace #1)       (symbolic trace #2 of the        (torchlib)
                               whole graph, make_fx)

The second step re-traces the whole captured graph to replace the ops torchlib has no translation
for (the table: torch's aten -> aten decompositions minus every op torchlib translates) and the
composite ops that alias (reshape, to). On this project's graphs it changes a handful of nodes and
costs as much as the capture: 40% of an export's tracing CPU (the official LLaMA fixture: 2.2-2.6 s
for each layer-shaped piece). The ops it changes here are few and their decompositions one-to-one:

    aten.reshape(x, s)      -> aten.view(x, s)                 when x can be viewed so (fake tensor check)
                            -> aten._unsafe_view(aten.clone(x, contiguous), s)   otherwise
    aten.to.dtype(x, t)     -> x  (t is x's dtype: `to` returns x itself)  |  aten._to_copy(x, dtype=t)
    aten.__or__/__and__     -> aten.bitwise_or / aten.bitwise_and          (Tensor overloads)
    aten.rsub.Scalar(x, c)  -> aten.sub.Tensor(c, x)                       (alpha 1)

so while `direct_decompositions()` is active, a captured program whose every node is one of those, an
op torchlib translates that the re-trace would keep (not in the table, not a composite op torch
must decompose), a torch.ops.onnx op, a symbolic-int operator or an assertion (torch.onnx drops
those after this step) has them rewritten in place, and the re-trace is skipped. Anything else (a
mutation, a higher-order op or subgraph, an op of the table, an unknown target, a form of these ops
not listed, a data-dependent (unbacked) size, which the re-trace may write otherwise: torch 2.11
captures one in the stitched roles' epilogue) makes the step run torch's own re-trace, unchanged.
The translated graphs are the same nodes, attributes, initializers and wiring as with torch's
re-trace (only FX node names, and so ONNX node names and their metadata, differ):
tests/test_decompositions.py compares them for five roles (LLaMA, GPT-2 and RMT; fp32, fp16, bf16)
and each rewritten op, and checks the fall-backs; docs/exporter.md lists the exports compared.

This patches a private function of torch.onnx (`_fx_passes.decompose_with_registry`) for the block
only; a torch without it, or `ARMT_FULL_DECOMPOSITIONS=1`, runs torch's step as it is.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

log = logging.getLogger("armt.export")

ENV_FULL = "ARMT_FULL_DECOMPOSITIONS"  # "1": always run torch.onnx's own re-trace

aten = torch.ops.aten


@functools.lru_cache(maxsize=1)
def _known_ops():
    """(assertions, the rewritten ops, __or__/__and__ -> bitwise): looked up on first use, so a torch
    without one of them fails here (AttributeError: torch's own step runs) and not at import."""
    # torch.onnx removes the assertions after the decomposition step (_fx_passes.remove_assertion_nodes)
    assertions = frozenset({aten._assert_scalar.default, aten._assert_tensor_metadata.default,
                            aten.sym_constrain_range_for_size.default, aten._assert_async.default,
                            aten._assert_async.msg})
    bitwise = {aten.__or__.Tensor: aten.bitwise_or.Tensor, aten.__and__.Tensor: aten.bitwise_and.Tensor}
    rewritten = frozenset({aten.reshape.default, aten.to.dtype, aten.rsub.Scalar, *bitwise})
    return assertions, rewritten, bitwise


def full_decompositions_forced() -> bool:
    return os.environ.get(ENV_FULL, "").strip() not in ("", "0")


class _Fallback(Exception):
    """The program needs torch's re-trace (the message says why)."""


# (registry, ops torchlib translates, torch.onnx's decomposition table) of the last registry seen:
# the registries are per process and opset (trace.shared_op_registry), so this is rebuilt only when
# an export changes opset.
_last_tables: tuple[object, set, dict] | None = None


def _tables(registry) -> tuple[set, dict]:
    global _last_tables
    if _last_tables is None or _last_tables[0] is not registry:
        from torch.onnx._internal.exporter import _decomp
        registered = set(_decomp.get_onnx_implemented_overloads(registry))
        _last_tables = (registry, registered, _decomp.create_onnx_friendly_decomposition_table(registered))
    return _last_tables[1], _last_tables[2]


def _check(program, registered: set, table: dict) -> None:
    """Raise _Fallback unless every node of the program is one this module may leave or rewrite."""
    from torch._export import utils as export_utils
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
    assertions, rewritten, _ = _known_ops()
    signature = program.graph_signature
    if signature.buffers_to_mutate or signature.user_inputs_to_mutate:
        raise _Fallback("the program mutates its inputs or buffers")
    if any(isinstance(m, torch.fx.GraphModule) for _, m in program.graph_module.named_children()):
        raise _Fallback("the program has subgraphs")
    for node in program.graph.nodes:
        if free_unbacked_symbols(node.meta.get("val")):  # a size torch's re-trace may express otherwise
            raise _Fallback(f"node {node.name} has a data-dependent (unbacked) size")
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op != "call_function":
            raise _Fallback(f"node {node.name} is a {node.op}")
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            raise _Fallback(f"{target} is a higher-order op")
        if not isinstance(target, torch._ops.OpOverload):
            if target in registered:  # operator.add, torch.sym_not, ... on symbolic ints
                continue
            raise _Fallback(f"{target} is not an op overload torch.onnx translates")
        if target._schema.is_mutable:
            raise _Fallback(f"{target} mutates")
        if target in assertions or target in rewritten or target.namespace == "onnx":
            continue
        if target in table:
            raise _Fallback(f"torch decomposes {target}")
        if target not in registered:
            raise _Fallback(f"torchlib has no translation of {target}")
        if export_utils._is_cia_op(target) and not export_utils._is_preservable_cia_op(target):
            raise _Fallback(f"torch always decomposes the composite {target}")


def _val(arg):
    return torch.fx.node.map_arg(arg, lambda n: n.meta["val"])


def _replacement(graph, node):
    """Insert the node(s) torch's decomposition gives for `node` before it and return the last one
    (its meta is the caller's to fill), or the input node itself where the op is the identity
    (to.dtype to the same dtype); _Fallback for a form not listed in the module docstring."""
    target, args, kwargs = node.target, node.args, dict(node.kwargs)
    if target is aten.reshape.default:
        from torch._guards import detect_fake_mode
        values = _val(args)
        fake_mode = detect_fake_mode([values[0]])
        if fake_mode is None or kwargs:
            raise _Fallback(f"reshape node {node.name} has no fake tensor")
        with fake_mode:
            viewed = aten.reshape.default(*values)._is_view()
            contiguous = None if viewed else values[0].clone(memory_format=torch.contiguous_format)
        if viewed:
            return graph.call_function(aten.view.default, args)
        clone = graph.call_function(aten.clone.default, (args[0],), {"memory_format": torch.contiguous_format})
        clone.meta.update({k: v for k, v in node.meta.items() if k != "val"}, val=contiguous)
        return graph.call_function(aten._unsafe_view.default, (clone, args[1]))
    if target is aten.to.dtype:
        x, dtype = args[0], args[1] if len(args) > 1 else kwargs.pop("dtype", None)
        non_blocking, copy = kwargs.pop("non_blocking", False), kwargs.pop("copy", False)
        memory_format = kwargs.pop("memory_format", None)
        if len(args) > 2 or kwargs or copy or memory_format not in (None, torch.preserve_format) or non_blocking:
            raise _Fallback(f"to node {node.name} has a form this module does not rewrite")
        if x.meta["val"].dtype == dtype:
            return x
        return graph.call_function(aten._to_copy.default, (x,), {"dtype": dtype})
    if target is aten.rsub.Scalar:
        alpha = args[2] if len(args) > 2 else kwargs.pop("alpha", 1)
        if alpha != 1 or kwargs:
            raise _Fallback(f"rsub node {node.name} has alpha {alpha}")
        return graph.call_function(aten.sub.Tensor, (args[1], args[0]))
    return graph.call_function(_known_ops()[2][target], args, node.kwargs)


def _rewrite(program) -> None:
    """Replace the rewritten ops' nodes in place (the program's output names follow)."""
    rewritten = _known_ops()[1]
    graph = program.graph
    renamed: dict[str, str] = {}
    replaced: dict = {}  # old node -> its replacement (an identity `to` may return an earlier old node)
    plan = []
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in rewritten:
            with graph.inserting_before(node):
                plan.append((node, _replacement(graph, node)))  # _Fallback: only unused new nodes remain
    for node, new in plan:
        while new in replaced:
            new = replaced[new]
        replaced[node] = new
        if not new.meta:  # inserted by _replacement: the replaced node's value, stack trace, module path
            new.meta.update(node.meta)
        renamed[node.name] = new.name
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    from torch.export.graph_signature import TensorArgument
    for spec in program.graph_signature.output_specs:
        if isinstance(spec.arg, TensorArgument) and spec.arg.name in renamed:
            spec.arg.name = renamed[spec.arg.name]
    graph.lint()
    program.graph_module.recompile()


def _discard(graph, nodes) -> None:
    """Remove nodes inserted for a plan that was given up (they have no users yet)."""
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


@contextlib.contextmanager
def direct_decompositions():
    """While the block runs, torch.onnx's decomposition step rewrites a program in place instead of
    re-tracing it when that is all the re-trace would do (module docstring); torch's step otherwise."""
    try:
        from torch.onnx._internal.exporter import _fx_passes
        from torch._export import utils as export_utils
        original = _fx_passes.decompose_with_registry
        export_utils._is_cia_op, export_utils._is_preservable_cia_op  # noqa: B018 (present in this torch)
        _known_ops()
    except (ImportError, AttributeError):
        yield
        return
    if full_decompositions_forced():
        yield
        return

    def decompose_with_registry(program, registry):
        try:
            registered, table = _tables(registry)
            _check(program, registered, table)
            before = set(program.graph.nodes)
            try:
                _rewrite(program)
            except _Fallback:
                _discard(program.graph, [n for n in program.graph.nodes if n not in before])
                raise
        except _Fallback as why:
            log.debug("decomposition: torch's re-trace (%s)", why)
            return original(program, registry)
        return program

    _fx_passes.decompose_with_registry = decompose_with_registry
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original
