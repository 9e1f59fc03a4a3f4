"""``python -m vmem``: profile a network, plan it for a budget, or run the demo.

    python -m vmem profile --model resnet50 --batch 256 --image-size 224 [--json]
    python -m vmem plan --model vgg16 --batch 256 --budget 4GiB [--policy auto] [--json]
        [--trace plan.json] [--hardware h100-pcie | h2d=25e9,d2h=25e9,flops=4e14]
    python -m vmem demo
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

import torch

from . import models
from .config import LOG_LEVELS, POLICIES, parse_size


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _model(text: str) -> str:
    if text not in models.names():
        raise argparse.ArgumentTypeError(
            f"unknown model {text!r}; choose one of {', '.join(models.names())}")
    return text


def _dtype(text: str) -> torch.dtype:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if text not in dtypes:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(dtypes)}")
    return dtypes[text]


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vmem", description="vmem: virtualised GPU memory for CNN training")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    profile = commands.add_parser("profile", help="per-layer profile of a reference model")
    profile.add_argument("--model", type=_model, required=True, help="e.g. resnet50, vgg16")
    profile.add_argument("--batch", type=_positive, default=32)
    profile.add_argument("--image-size", type=_positive, default=224)
    profile.add_argument("--classes", type=_positive, default=1000)
    profile.add_argument("--dtype", type=_dtype, default=torch.float32, help="fp32, bf16, fp16")
    profile.add_argument("--device", default="meta",
                         help="meta (shape only, the default), cpu or cuda (also timed)")
    profile.add_argument("--json", action="store_true", help="machine-readable output")
    plan = commands.add_parser("plan", help="plan a reference model for a device budget "
                               "(shape-only: allocates nothing)")
    plan.add_argument("--model", type=_model, required=True, help="e.g. resnet50, vgg16")
    plan.add_argument("--batch", type=_positive, default=32)
    plan.add_argument("--image-size", type=_positive, default=224)
    plan.add_argument("--classes", type=_positive, default=1000)
    plan.add_argument("--dtype", type=_dtype, default=torch.float32, help="fp32, bf16, fp16")
    plan.add_argument("--budget", required=True, help="device budget, e.g. 4GiB or 8000MB")
    plan.add_argument("--policy", choices=POLICIES, default="auto")
    plan.add_argument("--optimizer", choices=["sgd", "adam", "none"], default="sgd",
                      help="whose state the budget holds too: sgd (momentum), adam, none")
    plan.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                      help="the device planned for, whose headroom is kept: cuda (5%% + 256 "
                      "MiB) or cpu, the emulated device (2%%)")
    plan.add_argument("--split", type=_positive, default=None,
                      help="most parts per split run (1: never split); default 32")
    plan.add_argument("--hardware", default=os.environ.get("VMEM_EMULATED_DEVICE", ""),
                      help="the device to simulate: a preset (a100, h100-pcie, h100-sxm, "
                      "h200, gh200), optionally with key=value overrides "
                      "(h100-pcie,h2d=30e9), or key=value pairs as VMEM_EMULATED_DEVICE "
                      "(memory, h2d, d2h, flops) over the emulated device's defaults")
    plan.add_argument("--trace", help="write the simulated step as a Chrome/Perfetto trace")
    plan.add_argument("--json", action="store_true", help="the plan as JSON")
    native = commands.add_parser("build-native", help="build the native transfer library now "
                                 "(otherwise built on first use) and say what it sees")
    native.add_argument("--force", action="store_true", help="rebuild even if cached")
    demo = commands.add_parser("demo", help="the main job: profile and train under the meter")
    demo.add_argument("--steps", type=_positive, default=4)
    return parser


def _profile(args: argparse.Namespace) -> int:
    from .preprocessing import profile_network

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device; use meta, cpu or cuda"
                         ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use meta or cpu")
    with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
        model = models.get(args.model, num_classes=args.classes)  # no weights on meta
    shape = (args.batch, 3, args.image_size, args.image_size)
    try:
        prof = profile_network(model, shape, device=device, dtype=args.dtype, name=args.model)
    except RuntimeError as err:  # e.g. an image too small for the network's pooling
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{args.model} cannot run on input {shape}: {first}") from None
    print(prof.to_json() if args.json else prof.table())
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .control.planner import headroom_for
    from .control.simulator import simulate
    from .control.splitting import MAX_PARTS
    from .errors import format_bytes
    from .planning import plan_model
    from .preprocessing.optimizer import profile_optimizer
    from .preprocessing.presets import hardware_spec

    budget = parse_size(args.budget, "--budget")
    if isinstance(budget, float):
        raise ValueError(f"--budget {args.budget!r}: give bytes or a size such as 4GiB (a "
                         "fraction needs a device)")
    with torch.device("meta"):
        model = models.get(args.model, num_classes=args.classes).to(args.dtype)
    optimizers = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                  "adam": lambda p: torch.optim.Adam(p), "none": None}
    make = optimizers[args.optimizer]
    optimizer = profile_optimizer(make(model.parameters())) if make else None
    x = torch.empty(args.batch, 3, args.image_size, args.image_size, device="meta",
                    dtype=args.dtype)
    spec = hardware_spec(args.hardware)
    common = dict(headroom=headroom_for(args.device), optimizer=optimizer, spec=spec)
    try:
        plan, profile = plan_model(model, (x,), budget=budget, policy=args.policy,
                                   max_parts=args.split or MAX_PARTS, **common)
        plain = plan_model(model, (x,), budget=None, policy="none", **common).plan
    except RuntimeError as err:  # e.g. an image too small for the network's pooling
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{args.model} cannot run on input {list(x.shape)}: {first}") from None
    if args.json:
        print(plan.to_json(indent=1))
    else:
        step = plan.predicted_seconds
        moved = plan.link_bytes + plan.streamed_bytes
        print(plan.table())
        print(f"simulated on {spec.name}: step {step * 1e3:.1f} ms against plain "
              f"{plain.predicted_seconds * 1e3:.1f} ms ({step / plain.predicted_seconds:.2f}x)"
              f", peak {format_bytes(plan.predicted_peak)} against plain "
              f"{format_bytes(plain.predicted_peak)}")
        print(f"host link: {format_bytes(moved)} each way, against "
              f"{format_bytes(int(spec.d2h_bandwidth * step))} out and "
              f"{format_bytes(int(spec.h2d_bandwidth * step))} in over the step")
    if args.trace:
        simulate(profile, plan, spec).write_trace(args.trace)
        print(f"trace written to {args.trace} (open in ui.perfetto.dev)", file=sys.stderr)
    return 0


def _build_native(args: argparse.Namespace) -> int:
    from . import transfer
    from .transfer import native

    try:
        print(f"built {native.build(force=args.force)}")
    except native.NativeError as err:
        raise ValueError(str(err)) from None
    print(f"native library: {native.status()}")
    print(f"transfer backends here, best first: {', '.join(transfer.backends())}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m vmem`` and the ``vmem`` script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    level = os.environ.get("VMEM_LOG", "warning").lower()
    logging.basicConfig(level=level.upper() if level in LOG_LEVELS else "WARNING",
                        format="%(message)s")
    try:
        if args.command == "profile":
            return _profile(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "build-native":
            return _build_native(args)
        from .demo import run_demo

        return run_demo(steps=args.steps)
    except ValueError as err:
        parser.exit(2, f"vmem {args.command}: error: {err}\n")
    except torch.OutOfMemoryError as err:
        first = str(err).strip().splitlines()[0]
        parser.exit(2, f"vmem {args.command}: error: out of device memory: {first}\n")
