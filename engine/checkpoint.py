"""Load a Hugging Face checkpoint directory (config.json + safetensors) into our model code."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import ModelArgs
from engine.errors import CheckpointError, QuantizationError
from engine.model import Transformer
from engine.quantize import (
    QuantConfig,
    empty_quantized,
    parse_scheme,
    prepare_model,
    quantize_model,
    quantized_state_dict,
    tie_quantized,
)

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors of a quantized layer keep the dtype they were stored in (see engine/quantize.py).
QUANTIZED_LEAVES = ("qweight", "scales", "zeros")
_STORED_BYTES = {"I8": 1, "U8": 1, "F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}


def read_quant_config(path: Path) -> QuantConfig | None:
    """The checkpoint's `quantization_config` from config.json (None for a float checkpoint)."""
    file = path / "config.json"
    try:
        cfg = json.loads(file.read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # ModelArgs.from_dir reports a missing or broken config.json
    return None if cfg is None else QuantConfig.from_json(cfg, file=str(file))


def resolve_quantization(path: Path, requested: str | None) -> tuple[QuantConfig | None, bool]:
    """(scheme to run, whether the checkpoint stores it already). A quantized checkpoint runs
    its own scheme; asking for another one is an error rather than a silent re-quantization."""
    stored = read_quant_config(path)
    if stored is not None:
        if requested is not None and requested != stored.scheme:
            raise QuantizationError(
                f"the checkpoint is quantized as {stored.scheme!r}; cannot run it as {requested!r}",
                file=str(path / "config.json"),
                field="quantization_config.scheme",
            )
        return stored, True
    if requested is None:
        return None, False
    return parse_scheme(requested), False


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def resolve_dtype(dtype: str, args: ModelArgs, device: torch.device) -> torch.dtype:
    """`auto` follows config.json, except float16 on CPU (slow there) runs as float32."""
    if dtype == "auto":
        name = args.torch_dtype if args.torch_dtype in DTYPES else "float32"
        if name == "float16" and device.type == "cpu":
            name = "float32"
        return DTYPES[name]
    if dtype not in DTYPES:
        raise CheckpointError(
            f"dtype {dtype!r} is not supported (expected auto, {', '.join(DTYPES)})",
            file="<load_model>",
            field="dtype",
        )
    return DTYPES[dtype]


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single or sharded."""
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():
        return [single]
    if not index.is_file():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE}", file=str(path))
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"invalid index ({e})", file=str(index), field="weight_map") from e
    files = sorted({path / name for name in weight_map.values()})
    for f in files:
        if not f.is_file():
            raise CheckpointError("shard listed in the index is missing", file=str(f))
    return files


def checkpoint_bytes(path: Path, dtype: torch.dtype) -> int:
    """Bytes the weights take once loaded in `dtype`, read from safetensors headers only."""
    total = 0
    for f in weight_files(path):
        with safe_open(f, framework="pt") as st:
            names = st.keys()
            for n in names:
                sl = st.get_slice(n)
                stored = _leaf(n) in QUANTIZED_LEAVES
                size = _STORED_BYTES.get(sl.get_dtype(), 4) if stored else dtype.itemsize
                total += math.prod(sl.get_shape()) * size
    return total


def load_state_dict(
    path: Path, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint on device, cast to dtype except quantized layers'."""
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        try:
            with safe_open(f, framework="pt", device="cpu") as st:
                names = st.keys()
                for name in names:
                    t = st.get_tensor(name)
                    keep = _leaf(name) in QUANTIZED_LEAVES
                    # copy=True: tensors kept in their stored dtype would otherwise alias the
                    # file's buffer at any byte offset, and the int8 CPU kernel's vector loads
                    # fault on unaligned weights.
                    state[name] = t.to(device=device, dtype=t.dtype if keep else dtype, copy=keep)
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read safetensors ({e})", file=str(f)) from e
    return state


def load_model(
    path: str | Path, dtype: str, device: torch.device, *, quantization: str | None = None
) -> tuple[ModelArgs, Transformer]:
    """Build the model for a checkpoint directory and load its weights.

    A checkpoint whose config.json carries a `quantization_config` loads as that scheme; a
    float checkpoint is quantized after loading when `quantization` names a scheme."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("checkpoint directory not found", file=str(path))
    args = ModelArgs.from_dir(path)
    qconfig, stored = resolve_quantization(path, quantization)
    torch_dtype = resolve_dtype(dtype, args, device)
    state = load_state_dict(path, torch_dtype, device)
    with torch.device("meta"):
        model = Transformer(args)
        if stored:
            empty_quantized(model, qconfig, dtype=torch_dtype)
    _check_keys(model, state, args, path)
    model.load_state_dict(state, strict=False, assign=True)
    if args.tie_word_embeddings and stored:
        tie_quantized(model)
    elif args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if stored:
        prepare_model(model)
    elif qconfig is not None:
        quantize_model(model, qconfig, tied=args.tie_word_embeddings)
    return args, model.eval().requires_grad_(False)


def _check_keys(model: Transformer, state: dict, args: ModelArgs, path: Path) -> None:
    expected = model.state_dict()
    tied = args.tie_word_embeddings
    optional = {k for k in expected if k.startswith("lm_head.")} if tied else set()
    missing = sorted(expected.keys() - optional - state.keys())
    if missing:
        raise CheckpointError(
            f"tensor missing from the weights ({len(missing)} missing in all)",
            file=str(weight_files(path)[0]),
            field=missing[0],
        )
    for name in sorted(expected.keys() & state.keys()):
        _check_tensor(name, state[name], expected[name], path)
    _warn_extra(state, expected, path)


def _warn_extra(state: dict, expected: dict, path: Path) -> None:
    """Tensors the model has no place for are ignored, with one warning."""
    extra = sorted(k for k in state.keys() - expected if not k.endswith("rotary_emb.inv_freq"))
    if extra:
        log.warning("%s: ignoring %d unexpected tensors, e.g. %s", path, len(extra), extra[0])


def _check_tensor(name: str, got: torch.Tensor, want: torch.Tensor, path: Path) -> None:
    """Shape, and for quantized leaves (stored as is, not cast) dtype too: a wrong scale or
    zero-point dtype would load and then fail every forward pass inside the engine step."""
    quantized = _leaf(name) in QUANTIZED_LEAVES
    if quantized and got.dtype != want.dtype:
        raise QuantizationError(
            f"dtype {got.dtype} does not match the quantization_config ({want.dtype})",
            file=_shard_of(path, name),
            field=name,
        )
    if got.shape != want.shape:
        error = QuantizationError if quantized else CheckpointError
        raise error(
            f"shape {tuple(got.shape)} does not match config.json ({tuple(want.shape)})",
            file=_shard_of(path, name),
            field=name,
        )


def _shard_of(path: Path, name: str) -> str:
    """The weight file that holds tensor `name` (headers only; called on the error path)."""
    files = weight_files(path)
    for f in files:
        with safe_open(f, framework="pt") as st:
            names = st.keys()  # a safe_open handle has no __contains__
        if name in names:
            return str(f)
    return str(files[0])


def quantize_checkpoint(src: str | Path, scheme: str, out: str | Path) -> dict:
    """Write a quantized copy of a float checkpoint: the linears' and embeddings' weights as canonical quantized tensors, `quantization_config` in config.json, every other
    file copied. Returns what was written."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise CheckpointError("checkpoint directory not found", file=str(src))
    config_file = src / "config.json"
    raw = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if "quantization_config" in raw:
        raise QuantizationError(
            "the checkpoint is quantized already",
            file=str(config_file),
            field="quantization_config",
        )
    qconfig = parse_scheme(scheme, field="scheme", file="<quantize>")
    args = ModelArgs.from_dir(src)
    with torch.device("meta"):
        model = Transformer(args)
    # A tied lm_head has no tensor of its own: the quantized embedding table serves both.
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    embedding = "model.embed_tokens"
    state = {}
    for f in weight_files(src):
        with safe_open(f, framework="pt", device="cpu") as st:
            names = st.keys()
            for name in names:
                state[name] = st.get_tensor(name)
    quantized = quantized_state_dict(state, qconfig, linear_names=linears, embedding=embedding)
    out.mkdir(parents=True, exist_ok=True)
    _copy_side_files(src, out)
    save_file(quantized, str(out / SINGLE_FILE), metadata={"format": "pt"})
    raw["quantization_config"] = qconfig.to_json()
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    sizes = (sum(t.nbytes for t in state.values()), sum(t.nbytes for t in quantized.values()))
    return {"scheme": qconfig.scheme, "out": str(out), "bytes_in": sizes[0], "bytes_out": sizes[1]}


def _copy_side_files(src: Path, out: Path) -> None:
    """Tokenizer, generation config, README...: everything but the weights and config.json."""
    for f in src.iterdir():
        skip = f.suffix == ".safetensors" or f.name in (INDEX_FILE, "config.json")
        if f.is_file() and not skip:
            shutil.copy2(f, out / f.name)
