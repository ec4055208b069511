"""What the run ran on and how (device, versions, command, settings): the header of the report."""

from __future__ import annotations

import torch

from .cases import seqlen_label
from .results import error_text
from .runner import HOST_SHAPE


def versions() -> str:
    try:
        torch_cudnn = torch.backends.cudnn.version()
    except Exception as e:  # noqa: BLE001
        torch_cudnn = f"? ({e})"
    parts = [f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch_cudnn})"]
    try:
        import cudnn_flex
        parts.append(f"cudnn_flex {cudnn_flex.__version__} {cudnn_flex.versions()}")
    except Exception as e:  # noqa: BLE001
        parts.append(f"cudnn_flex: {error_text(e)}")
    try:
        import cudnn
        parts.append(f"cudnn frontend (Python) {getattr(cudnn, '__version__', '?')}, "
                     f"backend {cudnn.backend_version_string()}")
    except Exception as e:  # noqa: BLE001
        parts.append(f"cudnn frontend (Python): {error_text(e)}")
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except Exception:  # noqa: BLE001
        pass
    return "; ".join(parts)


def device() -> str:
    try:
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} (sm{props.major}{props.minor}, {props.multi_processor_count} SMs)"
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def environment(args, argv: list) -> dict:
    meta = {"device": device(), "versions": versions(),
            "command": " ".join(["python3 -m benchmarks"] + list(argv))}
    meta.update(tokens=args.tokens // args.scale, heads=args.heads, iters=args.iters, warmup=args.warmup, scale=args.scale,
                seqlens=", ".join(seqlen_label(s // args.scale) for s in args.seqlen_list),
                head_dims=", ".join(str(d) for d in args.head_dim_list),
                host_shape="B={} H={} S={} D={}".format(HOST_SHAPE.b, HOST_SHAPE.h, HOST_SHAPE.s, HOST_SHAPE.d),
                torch_flex="torch.compile(flex_attention" + (", dynamic=False)" if args.flex_compile == "static"
                                                            else ") with automatic dynamic shapes")
                + ", one compiled function for the run; the first call of each mod/shape compiles, "
                  "outside the timed region; masks as create_block_mask BlockMasks; "
                  "measured after all other paths (same seeded inputs), so a tight budget cuts its rows first")
    return meta
