"""Parameters, FLOPs per example and compiled memory of an ov3 config, without its files or hardware.

    python -m ov3.tools.summary --config configs/ov3_b.py[:arg] [--config.key=value ...]
        [--per_device_batch 32 [--mesh data=1,fsdp=256] [--topology v4:8x8x4]
         [--hlo_out STEP.hlo | --hlo_in STEP.hlo] [--component vae_decode]]

1. Parameters per module (encoder, decoder, text, caption, VAE, LPIPS) from an abstract init.
2. FLOPs of one example per component (`ov3.flops`, analytic), next to XLA's count
   (`jit(...).lower(...).cost_analysis()` of each forward at batch 1 on this machine). XLA
   counts a scanned block stack's body once, so its tower numbers add (depth - 1) x one block;
   it also counts elementwise work, so it reads a few percent above the matmul-only count.
3. With --per_device_batch: the train step AOT-compiled (`lower(...).compile()`) for a mesh,
   with `memory_analysis()` per device and the compile time. Where it compiles:
     --topology NAME  for that TPU slice, by libtpu's compiler on this CPU host: real TPU
                      numbers without a TPU (`jax.experimental.topologies`; needs the `libtpu`
                      wheel importable, e.g. `pip install --target DIR libtpu` + PYTHONPATH=DIR,
                      kept out of the main venv so CPU runs don't probe for a TPU; several
                      such compiles may run at once). Names as
                      "v4:8x8x4" (256 chips), "v4:4x4x8" (v4-256 = 128 chips), "v5e:16x16",
                      "v5p:8x8x4", "v6e:16x16". The whole OV3-B step for 256 chips: 4-6 min
                      on an idle 2-core host (timings per config in the README).
     otherwise        on this machine's devices; on a CPU host --mesh sets
                      --xla_force_host_platform_device_count, and the numbers are those of the
                      CPU backend's program (labelled as such), not a TPU's.
   `jax.sharding.AbstractMesh` lowers but does not compile, so it gives no memory analysis.
4. With --per_device_batch on a device with a peak/bandwidth entry (ov3/perf.py; every TPU
   topology): the step-time bound read off the compiled program (ov3.tools.roofline) per
   component, the implied img/s per device and MFU, the paper's efficiency beside it, and the
   wall time of the whole recipe on that slice. --hlo_out saves the program; --hlo_in reads
   it back instead of compiling (seconds instead of the compile's minutes).
5. With --component NAME (and --per_device_batch, --topology): that part of the step alone,
   compiled for one chip and bounded the same way, in 10 s to 2 min instead of the whole
   step's 4-10 min: vae_encode (forward), vae_decode and lpips (forward + input gradient, as
   in training), encoder / decoder / text (forward + backward) and caption (forward + backward
   with the head and the loss). How each change to a component was measured (README).

No weights, dataset or tokenizer are read: the VAE is FLUX.1's architecture (or the config.json
at vae.path when that is a diffusers folder) and the vocabulary has VOCAB_SIZE entries (or the
size of the config's tokenizer file, when it exists: the demo's).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

from ov3 import paths

VOCAB_SIZE = 32000  # OpenVision's BERT WordPiece vocabulary padded to 32000
LIBTPU_HINT = ("compiling for a TPU topology needs libtpu importable: `pip install --target DIR libtpu` "
               "and PYTHONPATH=DIR (no TPU needed)")


def vae_config(cfg: Any) -> Any:
    from ov3.models import vae as vae_lib
    folder = paths.path(cfg.vae.path)
    for candidate in (folder / "config.json", folder / "vae" / "config.json"):
        if candidate.is_file():
            return vae_lib.VAEConfig.from_dict(json.loads(candidate.read_text()), str(candidate))
    return vae_lib.VAEConfig.from_dict(vae_lib.FLUX1_DEV_CONFIG)


def vocab_size(cfg: Any) -> int:
    """The size of the config's tokenizer when its file is on disk (the demo's), else VOCAB_SIZE."""
    from ov3.train import tokenizer_path
    path = paths.path(tokenizer_path(cfg))
    if not path.is_file():
        return VOCAB_SIZE
    from ov3.data.tokenizer import Tokenizer
    return Tokenizer.from_file(str(path)).vocab_size


def abstract_task(cfg: Any) -> Any:
    """An OV3Task whose frozen params (VAE, LPIPS) are ShapeDtypeStructs: nothing is loaded."""
    import jax
    import jax.numpy as jnp
    from ov3 import tasks
    from ov3.models import lpips as lpips_lib
    from ov3.models import vae as vae_lib
    from ov3.train import DTYPES

    if cfg.model.input == "pixels":
        vae = vae_lib.Identity()
    else:
        config = vae_config(cfg)
        module = vae_lib.AutoencoderKL(config, DTYPES[cfg.vae.dtype], cfg.vae.remat_decoder)
        side = 2 * config.downsample_factor
        params = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct(
            (1, side, side, config.in_channels), jnp.float32))["params"]
        vae = vae_lib.VAE(module, params, config, cfg.vae.latent_norm)
    no_lpips = cfg.copy_and_resolve_references()
    no_lpips.loss.lpips = 0.0  # the task would load VGG weights; put abstract ones in instead
    task = tasks.OV3Task(no_lpips, vae=vae, vocab_size=vocab_size(cfg), pad_id=0)
    task.cfg = cfg
    if cfg.loss.lpips > 0:
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        task.lpips = (tasks.lpips_apply(cfg), jax.eval_shape(lpips_lib.LPIPS().init, jax.random.key(0), x, x)["params"])
    return task


def count(tree: Any) -> int:
    import jax
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def abstract_params(task: Any) -> Any:
    import flax.linen as nn
    import jax
    return jax.eval_shape(lambda: nn.meta.unbox(task.init(jax.random.key(0))))


def param_counts(task: Any) -> dict[str, int]:
    params = abstract_params(task)
    out = {k: count(params[k]) for k in ("encoder", "decoder", "text", "caption")}
    out["other (logit scale)"] = count(params) - sum(out.values())
    out["VAE (frozen)"] = count(task.vae.params)
    if task.lpips is not None:
        out["LPIPS (frozen)"] = count(task.lpips[1])
    return out


# ----------------------------------------------------------------------------- FLOPs

def xla_flops(fn: Any, *args: Any) -> float:
    import jax
    cost = jax.jit(fn).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def xla_block_flops(tokens: int, width: int, mlp_dim: int, heads: int, mask: Any = None) -> float:
    """XLA's count for one transformer block at batch 1."""
    import jax
    import jax.numpy as jnp
    from ov3.models.layers import Block
    block = Block(heads, mlp_dim)
    x = jax.ShapeDtypeStruct((1, tokens, width), jnp.float32)
    params = jax.eval_shape(block.init, jax.random.key(0), x, mask)
    return xla_flops(lambda p, x: block.apply(p, x, mask)[0], params, x)


def xla_costs(task: Any, image_size: int, num_texts: int = 1) -> dict[str, float]:
    """XLA's forward FLOPs per example (batch 1) of every component, scan-corrected."""
    import jax
    import jax.numpy as jnp
    from ov3.models import lpips as lpips_lib
    from ov3.models import registry
    from ov3.models import vae as vae_lib
    from ov3.models.caption import prefix_lm_mask
    from ov3.models.ov3 import OV3Model

    spec, vae = task.spec, task.vae
    model = OV3Model(dataclasses.replace(spec, dtype="float32", remat="none"))
    params = abstract_params(task)
    grid = image_size // vae.config.downsample_factor
    enc, patch = registry.vit_size(spec.encoder)
    dec, _ = registry.vit_size(spec.decoder)
    txt = registry.text_size(spec.text)
    n = (grid // patch) ** 2
    sds = jax.ShapeDtypeStruct
    latents = sds((1, grid, grid, spec.latent_channels), jnp.float32)
    tokens = sds((1, n, enc.width), jnp.float32)
    text = sds((1, spec.text_len), jnp.int32)
    caption = sds((1, spec.caption_len), jnp.int32)

    def tower(method: Any, *args: Any) -> float:
        return xla_flops(lambda p, *a: model.apply({"params": p}, *a, method=method), params, *args)

    out = {
        "encoder": tower(OV3Model.encode_image, latents)
        + (enc.depth - 1) * xla_block_flops(n + 1, enc.width, enc.mlp_dim, enc.num_heads),
        "text": num_texts * (tower(OV3Model.encode_text, text)
                             + (txt.depth - 1) * xla_block_flops(spec.text_len, txt.width, txt.mlp_dim,
                                                                 txt.num_heads)),
        "caption": tower(OV3Model.caption_logits, tokens, caption)
        + (txt.depth - 1) * xla_block_flops(n + spec.caption_len, txt.width, txt.mlp_dim, txt.num_heads,
                                            prefix_lm_mask(n, spec.caption_len)),
        "decoder": tower(OV3Model.decode_tokens, tokens)
        + (dec.depth - 1) * xla_block_flops(n, dec.width, dec.mlp_dim, dec.num_heads),
    }
    image = sds((1, image_size, image_size, 3), jnp.float32)
    if not task.pixels:
        module = vae_lib.AutoencoderKL(vae.config)
        out["vae_encode"] = xla_flops(lambda p, x: module.apply({"params": p}, x, method=vae_lib.AutoencoderKL.encode),
                                      vae.params, image)
        out["vae_decode"] = xla_flops(lambda p, z: module.apply({"params": p}, z, method=vae_lib.AutoencoderKL.decode),
                                      vae.params, latents)
    if task.lpips is not None:  # LPIPS runs its trunk on x and x_hat in one batch of 2
        out["lpips"] = xla_flops(lpips_lib.lpips_fn, task.lpips[1], image, image) / 2
    return out


def flop_rows(cfg: Any, task: Any, xla_check: bool) -> list[dict[str, Any]]:
    from ov3 import flops
    costs = flops.task_costs(cfg, task)
    xla = xla_costs(task, cfg.image_size, len(cfg.loss.contrastive_texts)) if xla_check else {}
    rows = [{"component": k, "forward": c.forward, "train_factor": c.train_factor, "train": c.train,
             "xla_forward": xla.get(k)} for k, c in costs.items()]
    rows.append({"component": "total", "forward": sum(c.forward for c in costs.values()), "train_factor": None,
                 "train": flops.train_flops_per_example(costs),
                 "xla_forward": sum(xla.values()) if xla else None})
    return rows


# ----------------------------------------------------------------------------- memory

def parse_mesh(text: str) -> dict[str, int]:
    from ov3.errors import Ov3Error
    from ov3.sharding import MESH_AXES
    out = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in MESH_AXES or not value.lstrip("-").isdigit():
            raise Ov3Error(f"--mesh {text!r}: use axis=size pairs over {MESH_AXES}, e.g. data=1,fsdp=256")
        out[key] = int(value)
    return out


def topology_devices(name: str) -> list:
    from ov3.errors import Ov3Error
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise Ov3Error(f"--topology {name}: {LIBTPU_HINT}.") from None
    from jax.experimental import topologies
    # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore").
    kwargs = {"chip_config_name": "megacore"} if name.split(":")[0] in ("v4", "v5p") else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name, **kwargs).devices)


def compile_step(cfg: Any, task: Any, devices: list, per_device_batch: int) -> tuple[Any, float, Any]:
    """(compiled step, seconds to compile, mesh) for the global batch per_device_batch * devices."""
    import jax
    import jax.numpy as jnp
    from ov3 import sharding, train

    mesh = sharding.make_mesh(cfg.mesh, devices)
    batch_size = per_device_batch * len(devices)
    sharding.check_batch(batch_size, mesh, "batch_size (per_device_batch x devices)")
    cfg = cfg.copy_and_resolve_references()
    cfg.batch_size = batch_size
    task.cfg = cfg
    trainer = train.Trainer(cfg, mesh, task)
    replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          task.frozen_params())
    s, spec = cfg.image_size, task.spec
    batch = {"image": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.uint8, sharding=batched),
             "text": jax.ShapeDtypeStruct((batch_size, spec.text_len), jnp.int32, sharding=batched),
             "caption": jax.ShapeDtypeStruct((batch_size, spec.caption_len), jnp.int32, sharding=batched)}
    if "caption_sentence" in cfg.loss.contrastive_texts:  # the second contrastive positive
        batch["caption_sentence"] = batch["text"]
    t0 = time.perf_counter()
    compiled = trainer.compile(trainer.abstract_state, frozen, batch)
    return compiled, time.perf_counter() - t0, mesh


COMPONENTS = ("vae_encode", "vae_decode", "lpips", "encoder", "decoder", "text", "caption")


def compile_component(cfg: Any, task: Any, name: str, device: Any, per_device_batch: int) -> tuple[Any, float]:
    """(compiled program, seconds to compile) of one component of the train step alone on one
    device, in the config's dtypes and remat, at per_device_batch examples (see COMPONENTS)."""
    import jax
    import jax.numpy as jnp
    from ov3 import losses
    from ov3.errors import Ov3Error
    from ov3.models import registry
    from ov3.models.ov3 import OV3Model

    if name not in COMPONENTS:
        raise Ov3Error(f"--component {name!r}: one of {', '.join(COMPONENTS)}")
    if name.startswith("vae") and task.pixels:
        raise Ov3Error(f"--component {name}: this config has no VAE (model.input='pixels')")
    single = jax.sharding.SingleDeviceSharding(device)
    on_device = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), tree)
    b, spec, vae = per_device_batch, task.spec, task.vae
    grid = cfg.image_size // vae.config.downsample_factor
    sds = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=single)  # noqa: E731
    model = OV3Model(spec)
    params = on_device(abstract_params(task))
    enc, patch = registry.vit_size(spec.encoder)
    tokens = sds((b, (grid // patch) ** 2, enc.width))

    def tower(method: Any, *inputs: Any) -> Any:  # forward + backward of params and float inputs
        def loss(p: Any, *a: Any) -> Any:
            out = model.apply({"params": p}, *a, method=method)
            out = out[0] if isinstance(out, tuple) else out
            return jnp.sum(jnp.square(out.astype(jnp.float32)))
        return jax.grad(loss, argnums=(0, 1) if inputs[0].dtype == jnp.float32 else 0), (params, *inputs)

    if name == "vae_encode":
        fn, args = vae.encode_fn, (on_device(vae.params), sds((b, cfg.image_size, cfg.image_size, 3)))
    elif name == "vae_decode":
        fn = jax.grad(lambda p, z: jnp.sum(jnp.square(vae.decode_fn(p, z))), argnums=1)
        args = (on_device(vae.params), sds((b, grid, grid, spec.latent_channels)))
    elif name == "lpips":  # forward + gradient w.r.t. the reconstruction, as in training
        if task.lpips is None:
            raise Ov3Error("--component lpips: this config has loss.lpips = 0 (no LPIPS in its step)")
        apply, lpips_params = task.lpips
        image = sds((b, cfg.image_size, cfg.image_size, 3))
        fn = jax.grad(lambda p, x, y: jnp.sum(apply(p, x, y)), argnums=2)
        args = (on_device(lpips_params), image, image)
    elif name == "encoder":
        fn, args = tower(OV3Model.encode_image, sds((b, grid, grid, spec.latent_channels)))
    elif name == "decoder":
        fn, args = tower(OV3Model.decode_tokens, tokens)
    elif name == "text":
        fn, args = tower(OV3Model.encode_text, sds((b, len(cfg.loss.contrastive_texts), spec.text_len), jnp.int32))
    else:
        def caption_loss(p: Any, t: Any, ids: Any) -> Any:
            return losses.caption(model.apply({"params": p}, t, ids, method=OV3Model.caption_logits), ids)
        fn, args = jax.grad(caption_loss, argnums=(0, 1)), (params, tokens, sds((b, spec.caption_len), jnp.int32))

    def scoped(*a: Any) -> Any:  # the scope names the roofline groups by (as in the train step)
        with jax.named_scope(name):
            return fn(*a)
    t0 = time.perf_counter()
    compiled = jax.jit(scoped).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def program_text(compiled: Any) -> str | None:
    """The compiled program's optimized HLO text, or None where jax cannot read it back."""
    import jax
    try:
        return compiled.as_text()
    except jax.errors.JaxRuntimeError:
        return None


def memory_row(compiled: Any) -> dict[str, float]:
    """GiB per device; `total` = arguments + outputs - aliased (donated state) + temporaries."""
    m = compiled.memory_analysis()
    gib = 2 ** 30
    row = {"arguments": m.argument_size_in_bytes / gib, "outputs": m.output_size_in_bytes / gib,
           "aliased": m.alias_size_in_bytes / gib, "temporaries": m.temp_size_in_bytes / gib}
    row["total"] = row["arguments"] + row["outputs"] - row["aliased"] + row["temporaries"]
    return row


# ----------------------------------------------------------------------------- CLI

def _g(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e9:10.2f}"


def step_bound(cfg: Any, task: Any, hlo: str, kind: str, devices: int, per_device_batch: int
               ) -> dict[str, Any] | None:
    """The roofline table of the compiled step (ov3.tools.roofline) and the recipe's wall time."""
    from ov3 import perf
    from ov3 import flops
    from ov3.tools import roofline
    hw = perf.hardware(kind)
    if hw is None:
        print(f"\nno step-time bound: no peak/bandwidth entry for {kind!r} in ov3/perf.py")
        return None
    result = roofline.bound(roofline.op_costs(hlo), hw.peak_flops, hw.hbm_bytes_per_s, hw.ici_bytes_per_s,
                            per_device_batch)
    analytic = flops.train_flops_per_example(flops.task_costs(cfg, task))
    roofline.print_table(result, device=kind, per_device_batch=per_device_batch, peak=hw.peak_flops,
                         analytic_per_example=analytic)
    result["mfu"] = analytic * result["images_per_s_per_device"] / hw.peak_flops
    result.update(roofline.print_recipe_time(result, samples=cfg.total_steps * cfg.batch_size, devices=devices,
                                             peak=hw.peak_flops, analytic_per_example=analytic))
    return result


def component_bound(cfg: Any, task: Any, name: str, topology: str | None, per_device_batch: int,
                    hlo_out: str | None = None) -> dict[str, Any] | None:
    """Compile one component alone (compile_component) and print its roofline table."""
    import jax
    from ov3 import flops, perf
    from ov3.errors import Ov3Error
    from ov3.tools import roofline
    if not per_device_batch:
        raise Ov3Error("--component needs --per_device_batch (examples on the one chip)")
    device = (topology_devices(topology) if topology else jax.devices())[0]
    compiled, seconds = compile_component(cfg, task, name, device, per_device_batch)
    print(f"\n{name} alone compiled in {seconds:.1f}s for one {device.device_kind}, {per_device_batch} examples; "
          f"GiB: temporaries {compiled.memory_analysis().temp_size_in_bytes / 2 ** 30:.2f}")
    hlo = program_text(compiled)
    if hlo is None:
        print("no bound: this jax cannot read the compiled program back as HLO text")
        return None
    if hlo_out:
        pathlib.Path(hlo_out).write_text(hlo)
    hw = perf.hardware(device.device_kind)
    if hw is None:
        print(f"no bound: no peak/bandwidth entry for {device.device_kind!r} in ov3/perf.py")
        return None
    result = roofline.bound(roofline.op_costs(hlo), hw.peak_flops, hw.hbm_bytes_per_s, hw.ici_bytes_per_s,
                            per_device_batch)
    roofline.print_table(result, device=device.device_kind, per_device_batch=per_device_batch,
                         peak=hw.peak_flops, analytic_per_example=flops.task_costs(cfg, task)[name].train)
    return {"compile_s": seconds, **result}


def report(cfg: Any, xla_check: bool, per_device_batch: int | None, topology: str | None,
           hlo_out: str | None = None, hlo_in: str | None = None, component: str | None = None
           ) -> dict[str, Any]:
    import jax
    from ov3 import recipes
    from ov3.config import validate

    validate(cfg)
    task = abstract_task(cfg)
    print(f"config: encoder {cfg.model.encoder}, decoder {cfg.model.decoder}, text {cfg.model.text}, "
          f"{recipes.describe(cfg)}; compute {cfg.model.dtype}, remat {cfg.model.remat}, "
          f"VAE {cfg.vae.dtype} (remat decoder {cfg.vae.remat_decoder}), lambda {cfg.loss.lpips}")
    out: dict[str, Any] = {"params": param_counts(task)}
    print("\nparameters")
    for k, v in out["params"].items():
        print(f"  {k:22s} {v:>14,d}")
    print(f"  {'trainable total':22s} {sum(v for k, v in out['params'].items() if 'frozen' not in k):>14,d}")

    out["flops"] = flop_rows(cfg, task, xla_check)
    print(f"\nGFLOPs per example at {cfg.image_size} px (analytic matmul/conv; XLA = cost_analysis of the forward)")
    print(f"  {'component':12s} {'forward':>10s} {'x':>3s} {'train':>10s} {'XLA fwd':>10s} {'XLA/ana':>8s}")
    for r in out["flops"]:
        ratio = f"{r['xla_forward'] / r['forward']:8.3f}" if r["xla_forward"] else "       -"
        factor = f"{r['train_factor']:3g}" if r["train_factor"] else "   "
        print(f"  {r['component']:12s} {_g(r['forward'])} {factor} {_g(r['train'])} {_g(r['xla_forward'])} {ratio}")

    if component:
        out["component"] = component_bound(cfg, task, component, topology, per_device_batch, hlo_out)
        return out
    if per_device_batch:
        devices = topology_devices(topology) if topology else jax.devices()
        kind = devices[0].device_kind
        if hlo_in:
            hlo, where = pathlib.Path(hlo_in).read_text(), f"{hlo_in} ({kind}, {len(devices)} devices)"
            print(f"\ntrain step read from {where}")
        else:
            compiled, seconds, mesh = compile_step(cfg, task, devices, per_device_batch)
            hlo, mem = program_text(compiled), memory_row(compiled)
            where = (f"TPU topology {topology} ({kind}, compiled by libtpu on this host)" if topology
                     else f"{jax.default_backend().upper()}-compiled program ({kind}); "
                          + ("CPU numbers, not a TPU's" if jax.default_backend() == "cpu" else "this device"))
            out["memory"] = {"where": where, "mesh": dict(mesh.shape), "per_device_batch": per_device_batch,
                             "compile_s": seconds, **mem}
            print(f"\ntrain step compiled in {seconds:.1f}s for mesh {dict(mesh.shape)}, "
                  f"{per_device_batch} examples per device: {where}")
            print("  GiB per device: " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items()))
        if hlo is None:
            print("  no step-time bound: this jax cannot read the compiled program back as HLO text "
                  "(jaxlib's HLO parser is older than libtpu's compiler for this chip: seen for v5p with "
                  "jax 0.10.2 and libtpu 0.0.52); the memory above is the compiler's own")
            return out
        if hlo_out:  # the optimized program, for --hlo_in later without recompiling
            pathlib.Path(hlo_out).write_text(hlo)
            print(f"  wrote the compiled HLO to {hlo_out}")
        out["bound"] = step_bound(cfg, task, hlo, kind, len(devices), per_device_batch)
    return out


def main() -> None:
    argv = sys.argv
    mesh_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--mesh=")), None)
    if mesh_arg is None and "--mesh" in argv:
        mesh_arg = argv[argv.index("--mesh") + 1]
    if mesh_arg and "--topology" not in " ".join(argv):
        # Fake CPU devices must be requested before JAX starts its backend.
        sizes = [v for v in parse_mesh(mesh_arg).values()]
        if -1 not in sizes and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                       f" --xla_force_host_platform_device_count={math.prod(sizes)}")

    if any(a.startswith("--topology") for a in argv):
        # Compiling only, no TPU to share: libtpu's one-process-per-host lockfile would make a
        # second compile on this host fail to start.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

    from absl import app, flags
    from ml_collections import config_flags
    from ov3.errors import Ov3Error
    config = config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]", lock_config=False)
    flags.DEFINE_string("mesh", None, "e.g. data=1,fsdp=256 (replaces config.mesh)")
    flags.DEFINE_integer("per_device_batch", None, "compile the train step for this many examples per device")
    flags.DEFINE_string("topology", None, "compile for a TPU slice, e.g. v4:8x8x4 (needs libtpu)")
    flags.DEFINE_bool("xla_check", True, "also count FLOPs with XLA's cost_analysis")
    flags.DEFINE_enum("component", None, list(COMPONENTS), "compile and bound only this part of the step, "
                      "on one chip of --topology (needs --per_device_batch)")
    flags.DEFINE_string("hlo_out", None, "write the compiled step's optimized HLO text to this file")
    flags.DEFINE_string("hlo_in", None, "read the step's optimized HLO from this file (--hlo_out) instead "
                        "of compiling it; give the same --topology and --per_device_batch")
    flags.mark_flag_as_required("config")
    f = flags.FLAGS

    def run(argv: list[str]) -> None:
        del argv
        cfg = config.value
        try:
            if f.mesh:
                cfg.mesh.update(parse_mesh(f.mesh))
            report(cfg, f.xla_check, f.per_device_batch, f.topology, f.hlo_out, f.hlo_in, f.component)
        except Ov3Error as e:
            print(f"ov3: error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(run)


if __name__ == "__main__":
    main()
