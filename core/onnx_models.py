"""Running a loaded Hugging Face model with ONNX Runtime: exported once into the cache, optionally int8.

A model is exported from the torch model already loaded (so hub ids, local folders and the
shipped weights all work alike) into ``<cache>/onnx/<key>/model.onnx``, where the key digests
the weights themselves (a sample of every parameter), the inputs, the opset, the torch version
and the quantization recipe: a fine-tuned copy in the same folder gets a graph of its own.
The fp32 export is checked against torch on the export inputs before it is kept; ``int8``
then quantizes the linear layers' weights per output channel (ONNX Runtime's dynamic
quantization: activations are quantized per batch at run time). Per-tensor weights were
measured to cost far more (mean cosine to fp32 0.934 against 0.994 on SciFact abstracts).

:class:`OnnxModule` is called like the torch model (keyword tensors in, a tuple of tensors out),
so tokenization, batching, pooling and late chunking's offsets stay the code that runs with torch.
Anything that prevents a graph (onnxruntime missing, an operator the exporter lacks, custom
code, outputs that differ from torch) raises :class:`OnnxUnavailable`; the callers fall back to
torch with a warning. A cached graph that no longer loads is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.component import require
from core.cpu import cpu_model
from core.models import build_once, cache_dir

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnx"]
Quantization = Literal["none", "int8"]

OPSET = 17
# Bumped whenever the export or the quantization recipe changes, so old graphs are not reused.
RECIPE = 1
# fp32 graphs must reproduce torch's hidden states this closely on the export inputs.
EXPORT_TOLERANCE = 1e-3
GRAPH_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
CHOICE_FILE = "backend-choice.json"


class OnnxUnavailable(RuntimeError):
    """No usable ONNX graph for this model; the reason says why (the caller falls back to torch)."""


@dataclass(frozen=True)
class OnnxModule:
    """An ONNX Runtime session called like the torch model it was exported from."""

    session: Any
    input_names: tuple[str, ...]
    config: Any  # the model's Hugging Face config, read by callers as with a torch model
    graph: Path
    quantize: Quantization

    def __call__(self, **inputs: Any) -> tuple[Any, ...]:
        torch = require("torch", purpose="ONNX models")
        feeds = {name: inputs[name].detach().cpu().numpy().astype(np.int64, copy=False) for name in self.input_names}
        return tuple(torch.from_numpy(output) for output in self.session.run(None, feeds))


def weights_fingerprint(model: Any) -> str:
    """A digest of every parameter's name, shape, dtype and a strided sample of its values: any
    change to the weights (a fine-tuned copy, another checkpoint) changes it, at the cost of
    reading a few thousand numbers rather than the whole model."""
    digest = hashlib.sha256()
    for name, parameter in model.state_dict().items():
        flat = parameter.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step].float().cpu().numpy()
        digest.update(f"{name}:{tuple(parameter.shape)}:{parameter.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


def onnx_module(
    model: Any,
    sample_inputs: Mapping[str, Any],
    *,
    quantize: Quantization = "none",
    threads: int | None = None,
) -> OnnxModule:
    """The ONNX form of the eval-mode torch ``model`` (its first output), built once into the cache.

    ``sample_inputs`` (a padded batch of at least two texts, as the tokenizer makes it) names the
    inputs, traces the export and checks the result against torch.
    """
    try:
        ort = require("onnxruntime", purpose="the onnx backend")
    except ImportError as exc:
        raise OnnxUnavailable(str(exc)) from exc
    names = tuple(sample_inputs)
    key = _graph_key(model, names, quantize)
    folder = cache_dir() / "onnx" / key

    def build(target: Path, staging: Path) -> None:
        fp32 = staging / "fp32.onnx"
        _export(model, sample_inputs, fp32)
        if quantize == "int8":
            _quantize_int8(fp32, target / GRAPH_FILE)
        else:
            shutil.move(fp32, target / GRAPH_FILE)
        manifest = {"recipe": RECIPE, "opset": OPSET, "quantize": quantize, "inputs": list(names)}
        (target / MANIFEST_FILE).write_text(json.dumps(manifest))

    for attempt in (1, 2):
        try:
            build_once(folder, _is_complete, build, f"the ONNX export left no {GRAPH_FILE}")
        except OnnxUnavailable:
            raise
        except Exception as exc:  # the exporter raises many types; any of them means: no graph
            raise OnnxUnavailable(f"the model cannot be exported to ONNX: {_reason(exc)}") from exc
        try:
            session = _session(ort, folder / GRAPH_FILE, threads)
            break
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
            if attempt == 2:
                raise OnnxUnavailable(f"the ONNX graph {folder} does not load: {_reason(exc)}") from exc
            log.warning("the cached ONNX graph %s does not load (%s); building it again", folder, _reason(exc))
            shutil.rmtree(folder, ignore_errors=True)
    return OnnxModule(session, names, getattr(model, "config", None), folder / GRAPH_FILE, quantize)


def runtime_model(
    model: Any,
    *,
    backend: Backend,
    quantize: Quantization,
    cache_key: tuple[Any, ...],
    sample_inputs: Callable[[], Mapping[str, Any]],
    timing_inputs: Callable[[], Mapping[str, Any]],
    torch_only: str = "",
    dtype: str = "float32",
    label: str = "the model",
) -> tuple[Any, str]:
    """What runs ``model``'s forward passes as ``backend`` asks (the torch model or its ONNX graph),
    and how a run summary names it ("onnx int8", "torch float32").

    ``torch_only`` is why this model must stay on torch, if it must. Without a graph (see
    :class:`OnnxUnavailable`) the torch model runs, with a warning where onnx or int8 was asked for.
    """
    on_torch = f"torch {dtype}"
    if backend == "torch":
        return model, on_torch
    torch = require("torch", purpose="ONNX models")
    threads = torch.get_num_threads()
    reason = torch_only
    graph: OnnxModule | None = None
    if not reason:
        try:
            graph = shared_onnx_module(cache_key, model, sample_inputs(), quantize=quantize, threads=threads)
        except OnnxUnavailable as exc:
            reason = str(exc)
    if graph is None:
        if backend == "onnx" or quantize != "none":
            log.warning("%s runs with torch in %s, not onnx: %s", label, dtype, reason)
        return model, on_torch
    if backend == "auto" and quantize == "none" and choose_backend(model, graph, timing_inputs(), threads) == "torch":
        return model, on_torch
    return graph, f"onnx {'int8' if quantize == 'int8' else 'float32'}"


def choose_backend(
    torch_model: Any, onnx_model: OnnxModule, timing_inputs: Mapping[str, Any], threads: int
) -> Literal["torch", "onnx"]:
    """The faster of the two on this CPU, timed once on ``timing_inputs`` and remembered beside the
    graph (per CPU model and thread count), so later runs on the same machine decide at once."""
    record = onnx_model.graph.parent / CHOICE_FILE
    machine = f"{cpu_model()} / {threads} threads"
    try:
        choices = json.loads(record.read_text())
    except (OSError, ValueError):
        choices = {}
    if choices.get(machine) in ("torch", "onnx"):
        chosen: Literal["torch", "onnx"] = choices[machine]
        return chosen
    torch = require("torch", purpose="ONNX models")

    def seconds(model: Any) -> float:
        best = float("inf")
        for _ in range(3):
            began = time.perf_counter()
            with torch.inference_mode():
                model(**timing_inputs)
            best = min(best, time.perf_counter() - began)
        return best

    torch_seconds, onnx_seconds = seconds(torch_model), seconds(onnx_model)
    chosen = "onnx" if onnx_seconds < torch_seconds else "torch"
    log.info(
        "backend auto: onnx %.1f ms vs torch %.1f ms per batch on %s: %s",
        onnx_seconds * 1000,
        torch_seconds * 1000,
        machine,
        chosen,
    )
    choices[machine] = chosen
    try:
        record.write_text(json.dumps(choices))
    except OSError:  # a read-only cache: decide again next time
        pass
    return chosen


def _graph_key(model: Any, names: Sequence[str], quantize: Quantization) -> str:
    torch = require("torch", purpose="ONNX models")
    identity = {
        "weights": weights_fingerprint(model),
        "class": type(model).__name__,
        "inputs": list(names),
        "opset": OPSET,
        "torch": torch.__version__,
        "quantize": quantize,
        "recipe": RECIPE,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _is_complete(folder: Path) -> bool:
    return (folder / GRAPH_FILE).is_file() and (folder / MANIFEST_FILE).is_file()


def _export(model: Any, sample_inputs: Mapping[str, Any], path: Path) -> None:
    torch = require("torch", purpose="ONNX models")
    names = list(sample_inputs)

    class FirstOutput(torch.nn.Module):  # type: ignore[misc,name-defined]
        """Positional inputs in, the model's first output out: what the TorchScript exporter traces."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, *tensors: Any) -> Any:
            return self.inner(**dict(zip(names, tensors, strict=True)))[0]

    tensors = tuple(sample_inputs[name] for name in names)
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    # The TorchScript exporter (dynamo=False) needs no onnxscript; it is deprecated upstream but
    # present in the pinned torch, and a failure here only means torch runs the model. Its tracer
    # warns where a Python branch becomes a constant; the check below is what decides.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # eval(): the exporter puts the wrapper back into its own mode afterwards, and a new module
        # is in training mode, which would switch the shared model's dropout on.
        torch.onnx.export(
            FirstOutput().eval(),
            tensors,
            str(path),
            input_names=names,
            output_names=["output"],
            dynamic_axes={**axes, "output": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    _check_against_torch(model, path, [sample_inputs, _first_text_unpadded(sample_inputs)])


def _first_text_unpadded(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The batch's first text alone, without padding: another batch size, length and mask than the
    traced batch, where a shape baked into the graph would show."""
    length = int(inputs["attention_mask"][0].sum()) if "attention_mask" in inputs else None
    return {name: tensor[:1, :length] for name, tensor in inputs.items()}


def _check_against_torch(model: Any, path: Path, batches: Sequence[Mapping[str, Any]]) -> None:
    torch = require("torch", purpose="ONNX models")
    ort = require("onnxruntime", purpose="the onnx backend")
    session = _session(ort, path, None)
    for inputs in batches:
        with torch.inference_mode():
            expected = model(**inputs)[0].float().numpy()
        actual = session.run(None, {name: tensor.numpy().astype(np.int64) for name, tensor in inputs.items()})[0]
        difference = float(np.abs(actual - expected).max()) if actual.shape == expected.shape else float("inf")
        if not difference <= EXPORT_TOLERANCE:
            raise OnnxUnavailable(
                f"the exported graph's outputs differ from torch's by {difference:.3g} (allowed {EXPORT_TOLERANCE})"
            )


def _quantize_int8(source: Path, target: Path) -> None:
    """Per-channel int8 weights for every MatMul with a constant (weight) input: the linear layers."""
    onnx = require("onnx", purpose="int8 quantization")
    quantization = require("onnxruntime.quantization", purpose="int8 quantization")
    graph = onnx.load(str(source), load_external_data=False).graph
    weights = {initializer.name for initializer in graph.initializer}
    linear = [node.name for node in graph.node if node.op_type == "MatMul" and any(i in weights for i in node.input)]
    if not linear:
        raise OnnxUnavailable("the graph has no linear layers to quantize")
    quantization.quantize_dynamic(
        str(source),
        str(target),
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=linear,
        per_channel=True,
        weight_type=quantization.QuantType.QInt8,
    )


def _session(ort: Any, path: Path, threads: int | None) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initializers are noise to a user
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _reason(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:400]


_modules: dict[tuple[Any, ...], OnnxModule] = {}
_modules_lock = threading.Lock()


def shared_onnx_module(
    cache_key: tuple[Any, ...],
    model: Any,
    sample_inputs: Mapping[str, Any],
    *,
    quantize: Quantization,
    threads: int | None,
) -> OnnxModule:
    """:func:`onnx_module`, made once per process per ``cache_key`` (like the torch models)."""
    with _modules_lock:
        key = (*cache_key, quantize, threads)
        if key not in _modules:
            _modules[key] = onnx_module(model, sample_inputs, quantize=quantize, threads=threads)
        return _modules[key]
