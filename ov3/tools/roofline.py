"""A step-time lower bound read off a compiled XLA program (its optimized HLO text).

    python -m ov3.tools.summary --config configs/ov3_b.py:pretrain --topology v4:8x8x4 \
        --per_device_batch 32 [--hlo_out STEP.hlo | --hlo_in STEP.hlo]
    (compiles the step for that slice, or reads a program saved before, and prints this table)

`compiled.cost_analysis()` counts a while loop's body once (every tower here is an `nn.scan`),
so the costs are summed here op by op over the program as it runs:

- loops: each while body counts `trip count` times (the `known_trip_count` XLA annotates, else
  the loop's induction pattern: a counter from a constant start compared `LT` to a constant);
- FLOPs: 2 per multiply-add of every `dot` and `convolution`, also inside fusions (what MXUs
  and tensor cores run; elementwise work is left to the bytes, as in the analytic count);
- bytes: each top-level op (a fusion is one op) reads its operands and writes its result
  once from HBM. Buffers the compiler placed in on-chip memory (layout `S(n)`, n > 0) are not
  HBM traffic, so this stays a lower bound;
- time per op: max(FLOPs / peak, bytes / HBM bandwidth); an op is memory-bound when the second
  is larger. Collectives: bytes over the chip's ICI bandwidth (all-reduce 2x its operand, a
  ring's reduce-scatter + all-gather; all-gather its result; others their operand);
- components: the outermost named scope in an op's `op_name` metadata (`vae_encode`,
  `vae_decode`, `optimizer`, ... set in ov3/tasks.py and ov3/train.py; Flax module names
  `encoder`, `decoder`, `text`, `caption`); backward ops carry `transpose(` in it.

The bound assumes every op at its roofline and collectives fully overlapped with compute
(`bound_s` = max(op time, collective time)); `serial_s` adds them. The compiler's own async
copies between HBM and on-chip memory (copy-start, slice-start) are listed, not added: they
run beside the ops.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Any

COMPONENTS = ("vae_encode", "vae_decode", "lpips", "encoder", "decoder", "text", "caption", "optimizer")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Ops that move no HBM bytes themselves (bookkeeping, or costed through what they call).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
        "replica-id", "opt-barrier", "while", "call", "conditional", "add-dependency", "domain"}
BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
         "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\](\{[^}]*\})?")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")


# ----------------------------------------------------------------------------- parsing

@dataclasses.dataclass
class Instr:
    name: str
    type: str           # the result type text, e.g. "bf16[8,128]{1,0}" or a tuple "(s32[], ...)"
    opcode: str
    operands: list[str]
    args: str           # the text inside the operand parentheses (a constant's literal)
    attrs: str          # everything after the operand list

    def attr(self, key: str) -> str | None:
        m = re.search(rf"\b{key}=(%?[\w.\-]+|\{{[^}}]*\}})", self.attrs)
        return m.group(1).lstrip("%") if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "({[":
            depth += 1
        elif text[i] in ")}]":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in: {text[start:start + 200]}")


def parse_instruction(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_, rest = rest[:end], rest[end:].lstrip()
    else:
        type_, _, rest = rest.partition(" ")
    paren = rest.find("(")
    opcode = rest[:paren]
    end = _balanced(rest, paren)
    args = rest[paren + 1:end - 1]
    return Instr(m.group(1), type_, opcode, re.findall(r"%([\w.\-]+)", args), args, rest[end:])


def parse_module(text: str) -> tuple[dict[str, list[Instr]], str]:
    """({computation name: instructions}, entry computation name)."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                comps[current] = []
                entry = current if m.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        instr = parse_instruction(line)
        if instr is not None:
            comps[current].append(instr)
    if not entry:
        raise ValueError("no ENTRY computation: is this the text of a compiled HLO module?")
    return comps, entry


def arrays(type_: str) -> list[tuple[str, tuple[int, ...], bool]]:
    """(dtype, dims, in HBM) of every array in a (tuple) type."""
    out = []
    for dtype, dims, layout in _ARRAY.findall(type_):
        if dtype not in BYTES:
            continue
        space = re.search(r"S\((\d+)\)", layout or "")
        out.append((dtype, tuple(int(d) for d in dims.split(",") if d), not space or space.group(1) == "0"))
    return out


def nbytes(type_: str, hbm_only: bool = False) -> int:
    return sum(BYTES[d] * math.prod(s) for d, s, hbm in arrays(type_) if hbm or not hbm_only)


def elements(type_: str) -> int:
    return sum(math.prod(s) for _, s, _ in arrays(type_))


# ----------------------------------------------------------------------------- costs

@dataclasses.dataclass
class OpCost:
    name: str
    opcode: str
    component: str
    backward: bool
    count: int          # executions per step (loop trip counts multiplied in)
    flops: float        # per execution
    bytes: float        # HBM bytes per execution
    collective_bytes: float = 0.0

    def seconds(self, peak: float, hbm: float, ici: float) -> float:
        if self.collective_bytes:
            return self.count * self.collective_bytes / ici
        return self.count * max(self.flops / peak, self.bytes / hbm)

    def memory_bound(self, peak: float, hbm: float) -> bool:
        return not self.collective_bytes and self.bytes / hbm > self.flops / peak


def dot_flops(instr: Instr, types: dict[str, str]) -> float:
    lhs = arrays(types[instr.operands[0]])[0][1]
    contracting = [int(d) for d in re.findall(r"\d+", instr.attr("lhs_contracting_dims") or "")]
    return 2.0 * elements(instr.type) * math.prod(lhs[d] for d in contracting)


def conv_flops(instr: Instr, types: dict[str, str]) -> float:
    """2 x batch x output features x input features (per group) x kernel taps, summed over the
    output positions. A spatial dim counts its whole window (border padding included, as the
    analytic count and the hardware do), except where the input has one element or is dilated:
    TPU lowers batched matmuls to convolutions whose batch dims are such padded or dilated
    spatial dims, where one tap in a window of many lands on data; there only those count."""
    lhs = arrays(types[instr.operands[0]])[0][1]
    kernel = arrays(types[instr.operands[1]])[0][1]
    out = arrays(instr.type)[0][1]
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instr.attrs)
    lhs_l, ker_l, out_l = labels.groups() if labels else ("bf", "io", "bf")
    window = re.search(r"window=\{([^}]*)\}", instr.attrs)
    fields = dict(f.split("=") for f in window.group(1).split()) if window else {}

    def per_dim(key: str, default: str, n: int) -> list[str]:
        return fields[key].split("x") if key in fields else [default] * n

    spatial = sum(c.isdigit() for c in lhs_l)
    size = [int(v) for v in per_dim("size", "1", spatial)]
    stride = [int(v) for v in per_dim("stride", "1", spatial)]
    pad = [tuple(int(x) for x in v.split("_")) for v in per_dim("pad", "0_0", spatial)]
    lhs_dilate = [int(v) for v in per_dim("lhs_dilate", "1", spatial)]
    rhs_dilate = [int(v) for v in per_dim("rhs_dilate", "1", spatial)]
    taps = 1
    for d in range(spatial):
        n, m = lhs[lhs_l.index(str(d))], out[out_l.index(str(d))]
        if n > 1 and lhs_dilate[d] == 1:  # a real spatial dim: the whole window, border padding too
            taps *= m * size[d]
            continue
        last = (n - 1) * lhs_dilate[d]  # a batch dim in disguise, or input dilation: taps on data only
        taps *= sum(1 for o in range(m) for j in range(size[d])
                    if 0 <= (p := o * stride[d] + j * rhs_dilate[d] - pad[d][0]) <= last and p % lhs_dilate[d] == 0)
    return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * kernel[ker_l.index("i")] * taps


def trip_count(instr: Instr, comps: dict[str, list[Instr]], types: dict[str, str],
               local: dict[str, Instr]) -> int:
    """A while loop's trip count: XLA's annotation, else the induction pattern."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    if m:
        return int(m.group(1))
    cond = comps[instr.attr("condition")]
    by_name = {i.name: i for i in cond}
    root, operands = cond[-1], cond[-1].operands
    if root.opcode == "fusion":  # the compare wrapped in a fusion (CPU): map its parameters back
        inner = comps[root.attr("calls")]
        params = {i.name: int(i.args) for i in inner if i.opcode == "parameter"}
        root = inner[-1]
        operands = [operands[params[o]] if o in params else o for o in root.operands]
    if root.opcode == "compare" and "direction=LT" in root.attrs:
        a, b = (by_name.get(o) for o in operands)
        if a is not None and b is not None and a.opcode == "get-tuple-element" and b.opcode == "constant":
            start = _initial_value(instr, int(a.attr("index")), local)
            return max(int(b.args) - start, 0)
    raise ValueError(f"while loop {instr.name}: no known_trip_count and no counter < constant pattern; "
                     "cannot cost it")


def _initial_value(instr: Instr, index: int, local: dict[str, Instr]) -> int:
    """The loop counter's start: element `index` of the while's init tuple, when a constant."""
    init = local.get(instr.operands[0])
    if init is not None and init.opcode == "tuple" and index < len(init.operands):
        start = local.get(init.operands[index])
        if start is not None and start.opcode == "constant" and start.args.lstrip("-").isdigit():
            return int(start.args)
    return 0


def _fused_flops(comp: str, comps: dict[str, list[Instr]]) -> float:
    types = {i.name: i.type for i in comps[comp]}
    total = 0.0
    for i in comps[comp]:
        if i.opcode == "dot":
            total += dot_flops(i, types)
        elif i.opcode == "convolution":
            total += conv_flops(i, types)
        elif i.opcode == "fusion":
            total += _fused_flops(i.attr("calls"), comps)
    return total


def collective_bytes(instr: Instr, types: dict[str, str]) -> float:
    """Bytes a collective moves per device: all-reduce 2x its operand (a ring's reduce-scatter +
    all-gather), all-gather its result, the others their operand; 0 for any other op."""
    base = instr.opcode.removesuffix("-start")
    if base not in COLLECTIVES:
        return 0.0
    operand = sum(nbytes(types[o]) for o in instr.operands if o in types)
    if base == "all-reduce":
        return 2.0 * operand
    if base == "all-gather":  # an async start's result is (operand, result)
        return float(nbytes(instr.type) - (operand if instr.opcode.endswith("-start") else 0))
    return float(operand)


def fusion_bytes(instr: Instr, comps: dict[str, list[Instr]], types: dict[str, str]) -> float:
    """HBM bytes of a fusion: an operand only read through dynamic-slice (a scanned layer's
    weights, a saved residual) counts the slices; a buffer updated in place by
    dynamic-update-slice counts the update, not the whole buffer (read or written)."""
    body = comps[instr.attr("calls")]
    by_name = {i.name: i for i in body}

    def written(name: str) -> float:
        i = by_name[name]
        if not nbytes(i.type, hbm_only=True):
            return 0
        if i.opcode == "tuple":
            return sum(written(o) for o in i.operands)
        if i.opcode == "dynamic-update-slice":
            return nbytes(by_name[i.operands[1]].type)
        if i.opcode == "bitcast":
            return written(i.operands[0])
        return nbytes(i.type, hbm_only=True)

    total = written(body[-1].name)
    for k, operand in enumerate(instr.operands):
        full = nbytes(types.get(operand, ""), hbm_only=True)
        total += min(full, _read_bytes(instr.attr("calls"), k, comps)) if full else 0
    return float(total)


def _read_bytes(comp: str, index: int, comps: dict[str, list[Instr]]) -> float:
    """Bytes of parameter `index` of fused computation `comp` that its ops read (inf: all)."""
    body = comps[comp]
    param = next((i.name for i in body if i.opcode == "parameter" and i.args == str(index)), None)
    users: dict[str, list[Instr]] = {}
    for i in body:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    total, frontier = 0.0, [param]
    while frontier:
        name = frontier.pop()
        for u in users.get(name, []):
            if u.opcode == "bitcast":
                frontier.append(u.name)
            elif u.opcode == "dynamic-slice" and u.operands[0] == name:
                total += nbytes(u.type)
            elif u.opcode == "dynamic-update-slice" and u.operands[0] == name:
                pass  # updated in place: the rest of the buffer is neither read nor written
            elif u.opcode == "fusion":
                total += sum(_read_bytes(u.attr("calls"), k, comps) for k, o in enumerate(u.operands) if o == name)
            else:
                return math.inf
    return total


def _allocates_only(instr: Instr) -> bool:
    """libtpu's `AllocateBuffer` custom call: an uninitialised buffer (a scan's stacked residuals,
    filled in place by dynamic-update-slice, whose bytes are costed there). It moves nothing."""
    return instr.opcode == "custom-call" and 'custom_call_target="AllocateBuffer"' in instr.attrs


def component_of(op_name: str) -> tuple[str, bool]:
    """(outermost known scope in op_name, whether it is backward)."""
    backward = "transpose(" in op_name
    for part in op_name.split("/"):
        while "(" in part:  # "transpose(jvp(vae_decode))" -> "vae_decode"
            part = part[part.index("(") + 1:part.rindex(")")] if part.endswith(")") else part.split("(")[0]
        if part in COMPONENTS:
            return part, backward
    return "other", backward


def op_costs(text: str) -> list[OpCost]:
    """Every executed top-level op of the module with its per-step execution count."""
    comps, entry = parse_module(text)
    out: list[OpCost] = []

    def walk(comp: str, count: int, outer_name: str) -> None:
        local = {i.name: i for i in comps[comp]}
        types = {i.name: i.type for i in comps[comp]}
        for i in comps[comp]:
            name = i.op_name or (i.opcode == "fusion" and comps[i.attr("calls")][-1].op_name) or outer_name
            if i.opcode == "while":
                n = trip_count(i, comps, types, local)
                walk(i.attr("body"), count * n, name)
                walk(i.attr("condition"), count * (n + 1), name)
                continue
            if i.opcode == "call" or (i.opcode == "async-start" and i.attr("calls")):
                walk(i.attr("to_apply") or i.attr("calls"), count, name)
                continue
            if i.opcode == "conditional":  # the costliest branch (at most one runs)
                branches = re.findall(r"%([\w.\-]+)", i.attr("branch_computations") or "")
                if branches:
                    walk(max(branches, key=lambda b: len(comps[b])), count, name)
                continue
            if i.opcode in FREE or i.opcode.endswith("-done") or _allocates_only(i):
                continue
            component, backward = component_of(name)
            moved = collective_bytes(i, types)
            if i.opcode == "fusion" and not moved:  # async collective fusion (TPU): the collective inside
                inner = comps[i.attr("calls")]
                inner_types = {x.name: x.type for x in inner}
                moved = sum(collective_bytes(x, inner_types) for x in inner)
            if moved:
                out.append(OpCost(i.name, i.opcode.removesuffix("-start"), "collectives", backward, count, 0.0, 0.0,
                                  float(moved)))
                continue
            if i.opcode.endswith("-start"):  # copy-start, slice-start: the memory-space prefetches and
                component = "async copies"     # evictions the compiler overlaps with compute
            flops = 0.0
            hbm = sum(nbytes(types[o], hbm_only=True) for o in i.operands if o in types) + nbytes(i.type, True)
            if i.opcode == "dot":
                flops = dot_flops(i, types)
            elif i.opcode == "convolution":
                flops = conv_flops(i, types)
            elif i.opcode == "fusion":
                flops, hbm = _fused_flops(i.attr("calls"), comps), fusion_bytes(i, comps, types)
            out.append(OpCost(i.name, i.opcode, component, backward, count, flops, float(hbm)))

    walk(entry, 1, "")
    return out


# ----------------------------------------------------------------------------- the table

ROWS = (("vae_encode", "VAE encode"), ("vae_decode", "VAE decode fwd + input grad"),
        ("lpips", "LPIPS fwd + input grad"), ("encoder", "encoder fwd + bwd"), ("decoder", "decoder fwd + bwd"),
        ("text", "text fwd + bwd"), ("caption", "caption fwd + bwd"), ("optimizer", "optimizer update"),
        ("other", "other (losses, glue)"), ("async copies", "async copies (overlapped)"),
        ("collectives", "collectives (ICI)"))
OVERLAPPED = ("collectives", "async copies")  # run beside the ops, not between them


def bound(ops: list[OpCost], peak: float, hbm: float, ici: float, per_device_batch: int) -> dict[str, Any]:
    """Per-component totals and the step bound; peak in FLOP/s, bandwidths in bytes/s."""
    rows = []
    for key, label in ROWS:
        mine = [o for o in ops if o.component == key]
        if not mine:
            continue
        seconds = sum(o.seconds(peak, hbm, ici) for o in mine)
        mem = sum(o.seconds(peak, hbm, ici) for o in mine if o.memory_bound(peak, hbm))
        rows.append({"component": key, "label": label, "ops": sum(o.count for o in mine),
                     "gflops": sum(o.count * o.flops for o in mine) / 1e9,
                     "gbytes": sum(o.count * (o.bytes or o.collective_bytes) for o in mine) / 1e9,
                     "seconds": seconds, "memory_bound_s": mem})
    compute = sum(r["seconds"] for r in rows if r["component"] not in OVERLAPPED)
    comm = sum(r["seconds"] for r in rows if r["component"] == "collectives")
    mem = sum(r["memory_bound_s"] for r in rows if r["component"] not in OVERLAPPED)
    step = max(compute, comm)
    return {"rows": rows, "op_s": compute, "collective_s": comm, "bound_s": step, "serial_s": compute + comm,
            "memory_bound_share": mem / compute if compute else 0.0,
            "flops_per_example": sum(o.count * o.flops for o in ops) / per_device_batch,
            "images_per_s_per_device": per_device_batch / step if step else float("inf")}


def print_table(result: dict[str, Any], *, device: str, per_device_batch: int, peak: float,
                analytic_per_example: float | None = None, file: Any = None) -> None:
    file = file or sys.stdout
    p = lambda *a: print(*a, file=file)  # noqa: E731
    p(f"\nstep-time bound from the compiled program ({device}, {per_device_batch} examples per device; "
      f"per device and step)")
    p(f"  {'component':28s} {'GFLOP':>10s} {'GB moved':>9s} {'bound ms':>9s} {'mem-bound':>9s}")
    for r in result["rows"]:
        share = f"{100 * r['memory_bound_s'] / r['seconds']:8.0f}%" if r["seconds"] else "        -"
        p(f"  {r['label']:28s} {r['gflops']:10.1f} {r['gbytes']:9.2f} {1e3 * r['seconds']:9.2f} "
          f"{share if r['component'] not in OVERLAPPED else '        -'}")
    img_s = result["images_per_s_per_device"]
    p(f"  ops at roofline {1e3 * result['op_s']:.1f} ms, collectives {1e3 * result['collective_s']:.1f} ms; "
      f"bound (collectives overlapped) {1e3 * result['bound_s']:.1f} ms, serial {1e3 * result['serial_s']:.1f} ms")
    p(f"  memory-bound ops: {100 * result['memory_bound_share']:.0f}% of op time")
    p(f"  implied {img_s:.1f} img/s per device at the bound")
    per_ex = result["flops_per_example"]
    if analytic_per_example:
        p(f"  matmul/conv FLOPs per example: compiled {per_ex / 1e9:.1f} G, analytic {analytic_per_example / 1e9:.1f} G "
          f"(ratio {per_ex / analytic_per_example:.3f}: remat recomputation counts above 1, work XLA drops as unused below)")
        p(f"  MFU at the bound (analytic FLOPs): {100 * analytic_per_example * img_s / peak:.1f}%")


# The paper's OV3-B run: ~260M samples at 128 px in 6.0 h on 128 TPU v4 chips, i.e. 12,037 img/s,
# 94 img/s per chip, at ov3's analytic 522.64 GFLOPs per OV3-B training example (ov3.flops).
PAPER = {"img_s_per_chip": 94.0, "flops_per_example": 522.64e9, "peak_flops": 275e12}


def paper_mfu() -> float:
    return PAPER["img_s_per_chip"] * PAPER["flops_per_example"] / PAPER["peak_flops"]


def print_recipe_time(result: dict[str, Any], *, samples: float, devices: int, peak: float,
                      analytic_per_example: float, file: Any = None) -> dict[str, float]:
    """The paper's efficiency beside the bound, and the whole recipe's wall time at both."""
    img_s = result["images_per_s_per_device"]
    paper_img_s = paper_mfu() * peak / analytic_per_example  # this config at the paper's MFU
    hours = {"at_bound_h": samples / (img_s * devices) / 3600, "at_paper_mfu_h": samples / (paper_img_s * devices) / 3600}
    p = lambda *a: print(*a, file=file or sys.stdout)  # noqa: E731
    p(f"  the paper measured {PAPER['img_s_per_chip']:.0f} img/s per v4 chip (OV3-B, 128 px): {100 * paper_mfu():.1f}% MFU; "
      f"at that MFU this config runs {paper_img_s:.1f} img/s per device; the bound is {img_s / paper_img_s:.2f}x that")
    p(f"  the whole recipe ({samples:,.0f} samples) on {devices} devices: {hours['at_bound_h']:,.2f} h at the "
      f"bound, {hours['at_paper_mfu_h']:,.2f} h at the paper's efficiency")
    return hours
