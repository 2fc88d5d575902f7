"""Block-scaled FP8 checkpoints (DeepSeek-V3, MiniMax-M2; transformers' `quant_method: fp8` with `weight_block_size`),
dequantized on import.

Each quantized matrix is stored as float8_e4m3fn `W` [out, in] beside a float32 `weight_scale_inv` [ceil(out/b0),
ceil(in/b1)]: W[i, j] * weight_scale_inv[i // b0, j // b1] is the float weight (transformers' finegrained_fp8,
DeepSeek-V3's `weight_dequant`). safetensors' numpy reader has no float8 type, so files holding one are read here
from their header with ml_dtypes' float8 types.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jaxformer.interop.state_dict import UnsupportedCheckpointError

SAFETENSORS_DTYPES = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "BF16": ml_dtypes.bfloat16,
                      "F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "U8": np.uint8,
                      "I16": np.int16, "I32": np.int32, "I64": np.int64, "BOOL": np.bool_}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as numpy, float8 included (the format: an 8-byte little-endian header
    length, a JSON header of {name: {dtype, shape, data_offsets}}, then the data)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise UnsupportedCheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which jaxformer does not "
                                             f"read; supported: {sorted(SAFETENSORS_DTYPES)}")
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def dequantize_fp8(sd: dict[str, np.ndarray], quantization: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every `X.weight` with an `X.weight_scale_inv` beside it, as float32 W * scale per block; the scales dropped."""
    block = quantization.get("weight_block_size")
    if quantization.get("activation_scheme", "dynamic") != "dynamic" or not block or len(block) != 2:
        raise UnsupportedCheckpointError(f"quantization_config {quantization} is not supported; jaxformer dequantizes "
                                         "block-scaled fp8 (weight_block_size [b0, b1], activation_scheme dynamic)")
    b0, b1 = block
    out = {k: v for k, v in sd.items() if not k.endswith(".weight_scale_inv")}
    for key, scale in sd.items():
        if not key.endswith(".weight_scale_inv"):
            continue
        name = key.removesuffix("_scale_inv")
        w = sd[name].astype(np.float32)  # [out, in]
        O, I = w.shape
        if scale.shape != (-(-O // b0), -(-I // b1)):
            raise UnsupportedCheckpointError(f"{key} has shape {scale.shape}; a {list(w.shape)} weight in "
                                             f"{b0} x {b1} blocks needs {(-(-O // b0), -(-I // b1))}")
        full = np.repeat(np.repeat(scale.astype(np.float32), b0, axis=0), b1, axis=1)[:O, :I]
        out[name] = w * full
    return out
