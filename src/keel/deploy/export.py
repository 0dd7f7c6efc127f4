"""``keel export``: a backbone or a fine-tuned classifier as an ONNX file or a ``torch.export``
program, with a dynamic batch dimension, checked against the eager model right after writing.

What is exported:

* ``embedding``: ``backbone.embed(x)``, (B, D): what kNN, ``keel embed``/``search``/``dedup`` use;
* ``feature_maps``: ``backbone.feature_maps(x)``, one output per stage, (B, C, H/s, W/s), named
  ``features_stride{s}``;
* ``logits``: a fine-tuned classifier's eval forward, (B, classes); a distilled DeiT gives the
  average of its class-token and distillation-token heads, as its eval forward does.

The input is one float32 tensor ``image`` (B, 3, S, S), normalised as keel's evaluation does (RGB
in [0, 1], then (x - mean) / std); the card says how.

How (one route for every family; all seven pass both formats on torch 2.13 and 2.14):

* The graph is captured with ``torch.export.export(strict=True)``: TorchDynamo keeps a batch size
  that a model reads as a Python number (``len(x)``, which keel's ViT used before it read
  ``x.shape[0]``) symbolic, where non-strict tracing (torch.export's default in recent versions)
  fixes the example's batch into the graph, and so does ``torch.onnx.export(model, dynamo=True)``
  given the module itself (torch 2.14).
* ``torch-export``: that program, ``torch.export.save``-d (``.pt2``); load it with
  ``torch.export.load(path).module()``.
* ``onnx``, torch >= 2.6: the torch.export-based ONNX exporter on that program
  (``torch.onnx.export(program, dynamo=True)``), the batch axis renamed ``batch``. torch < 2.6
  has no such exporter for a program: the TorchScript exporter with ``dynamic_axes`` (opset 17)
  is used there; its tracer records a Python int read from a tensor as a constant,
  which the check at other batch sizes catches. Weights go inside the one file below ~1.8 GB,
  else into ``FILE.data`` beside it (protobuf's 2 GB limit).

The check, right after writing: random inputs at batch 1 and at the example batch + 1 (neither is
the batch traced, so a batch fixed into the graph fails), run by ONNX Runtime on the CPU (``onnx``)
or by the program loaded back with ``torch.export.load`` (``torch-export``), must match the eager
model: **relative error = max |exported - eager| / max |eager|**, per output, the worst output,
at most 1e-4. A failed check deletes what was written and raises :class:`ExportError` (one line).

Next to the file: ``FILE.json``, the card (model, checkpoint, image size, normalisation, output
names and shapes, the check's numbers, the exporter, torch and keel versions; for a classifier its
classes and whether to apply softmax or sigmoid).
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from keel.data.views import ViewConfig

__all__ = ["ExportError", "ExportReport", "Embedding", "FeatureMaps", "export", "export_module",
           "relative_error", "FORMATS", "TOLERANCE"]

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
WHATS = ("embedding", "feature_maps", "logits")
TOLERANCE = 1e-4
INPUT = "image"
MEAN, STD = ViewConfig().mean, ViewConfig().std      # keel's normalisation for every backbone
_INLINE_BYTES = 1_800_000_000       # weights inside the .onnx below this (protobuf stops at 2 GB)
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportError(ValueError):
    """An export that failed, or whose file does not compute what the eager model does (one line)."""


@dataclass
class ExportReport:
    """What :func:`export_module` wrote and checked."""
    path: Path
    format: str
    what: str
    outputs: dict[str, list]            # name -> shape, "batch" first
    max_rel_error: float
    batches: list[int]                  # the batch sizes checked (never the traced one)
    runtime: str                        # what ran the written file in the check
    exporter: str
    files: list[Path] = field(default_factory=list)
    card: Path | None = None

    def summary(self) -> str:
        shapes = ", ".join("(" + ", ".join("B" if d == "batch" else str(d) for d in s) + ")"
                           for s in self.outputs.values())
        at = " and ".join(str(b) for b in self.batches)
        return (f"{self.format}: {self.what.replace('_', ' ')} {shapes}, dynamic batch, {self.runtime} "
                f"max rel. error {self.max_rel_error:.1e} at batch{'es' if len(self.batches) > 1 else ''} "
                f"{at} — ok")


class Embedding(nn.Module):
    """``backbone.embed`` as a module's forward (what gets exported)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.embed(x)


class FeatureMaps(nn.Module):
    """``backbone.feature_maps`` as a module's forward: a tuple, one output per map."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone.feature_maps(x))


# ---------------------------------------------------------------------------------- checking
def relative_error(want: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """max over outputs of max |got - want| / max |want| (inf when anything is not finite)."""
    worst = 0.0
    for w, g in zip(want, got):
        if w.numel() == 0:
            continue
        w, g = w.detach().double(), g.detach().double()
        diff, scale = float((w - g).abs().max()), float(w.abs().max())
        err = diff / scale if scale > 0 else diff
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err)
    return worst


def _eager(module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The eager outputs the exported file must reproduce (a function, so a test can break it)."""
    with torch.no_grad():
        out = module(x)
    return [t.float() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def _runner(path: Path, fmt: str):
    """(x -> list of output tensors, name of what runs them) for the written file."""
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()    # as many threads as torch is given
        opts.log_severity_level = 4            # a failing run is reported once, by the check's error
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda x: [torch.from_numpy(o) for o in session.run(None, {name: x.numpy()})]), "onnxruntime"
    # torch.export.load reads back the program this module has just written (our own file, never
    # one a user hands us), so nothing untrusted is unpickled here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")    # torch 2.14 warns about weight groups when reading a CPU file
        program = torch.export.load(str(path)).module()

    def run(x):
        with torch.no_grad():
            out = program(x)
        return list(out) if isinstance(out, (tuple, list)) else [out]
    return run, "torch.export.load"


def _check(module: nn.Module, path: Path, fmt: str, img_size: int, batch: int) -> tuple[float, list[int], str]:
    run, runtime = _runner(path, fmt)
    batches = [1, batch + 1]
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for b in batches:
        x = torch.randn(b, 3, img_size, img_size, generator=gen)
        want = _eager(module, x)
        try:
            got = run(x)
        except Exception as e:   # ONNX Runtime and guards raise many kinds; each means "does not run"
            raise ExportError(f"{fmt} check failed: {runtime} cannot run '{path}' at batch {b} ({_first_line(e)})"
                              ) from None
        shapes = [tuple(t.shape) for t in got]
        if shapes != [tuple(t.shape) for t in want]:
            raise ExportError(f"{fmt} check failed: at batch {b} '{path}' gives shapes {shapes}, the eager model "
                              f"{[tuple(t.shape) for t in want]}")
        err = relative_error(want, got)
        if not err <= TOLERANCE:
            raise ExportError(f"{fmt} check failed: '{path}' differs from the eager model by {err:.1e} at batch {b} "
                              f"(max |exported - eager| / max |eager|; at most {TOLERANCE:g} allowed)")
        worst = max(worst, err)
    return worst, batches, runtime


# ---------------------------------------------------------------------------------- writing
def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _dynamo_onnx() -> bool:
    return torch.__version__ >= "2.6"     # TorchVersion compares as a version


def _program(module: nn.Module, x: torch.Tensor, label: str):
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=True)
    except Exception as e:    # torch.export raises UserError, Unsupported, TypeError, ...: all mean "cannot"
        raise ExportError(f"{label} cannot be captured by torch.export with a dynamic batch: "
                          f"{_first_line(e)}") from None


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _write_onnx(module: nn.Module, x: torch.Tensor, path: Path, names: list[str], label: str,
                exporter: str) -> str:
    missing = [p for p in _ONNX_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'keel[export]'")
    params = inspect.signature(torch.onnx.export).parameters
    torchscript = exporter == "torchscript" or (exporter == "auto" and not _dynamo_onnx())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # both exporters warn about things they handle
        if torchscript:
            axes = {n: {0: "batch"} for n in [INPUT, *names]}
            try:
                with torch.no_grad():
                    torch.onnx.export(module, (x,), str(path), input_names=[INPUT], output_names=names,
                                      dynamic_axes=axes, opset_version=17, do_constant_folding=True,
                                      **({"dynamo": False} if "dynamo" in params else {}))
            except Exception as e:
                raise ExportError(f"{label} cannot be exported by the TorchScript ONNX exporter: {_first_line(e)}"
                                  ) from None
            return "torch.onnx (TorchScript), opset 17"
        program = _program(module, x, label)
        optional = {"verbose": False, "external_data": _weight_bytes(module) > _INLINE_BYTES}
        try:
            torch.onnx.export(program, (x,), str(path), input_names=[INPUT], output_names=names, dynamo=True,
                              **{k: v for k, v in optional.items() if k in params})   # not every version has them
        except Exception as e:
            raise ExportError(f"{label} cannot be translated to ONNX: {_first_line(e)}") from None
    _name_batch_axis(path)
    return "torch.export (strict) + torch.onnx (dynamo)"


def _name_batch_axis(path: Path) -> None:
    """Call the batch axis ``batch`` (the exporter names it after its symbol, ``s0``, ``s77``...)
    everywhere it appears, so runtimes and optimisation profiles show a readable name."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    old = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not old or old == "batch":
        return
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in info.type.tensor_type.shape.dim:
            if d.dim_param == old:
                d.dim_param = "batch"
    onnx.save(model, str(path))


def _opset(path: Path) -> int | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _written(path: Path) -> list[Path]:
    return [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]


def export_module(module: nn.Module, path: str | Path, fmt: str, img_size: int, output_names: list[str], *,
                  what: str = "embedding", batch: int = 2, exporter: str = "auto",
                  card: dict | None = None) -> ExportReport:
    """Export ``module`` (one (B, 3, img_size, img_size) input; a tensor or a tuple of tensors out,
    named ``output_names``) to ``path`` in ``fmt`` ("onnx" | "torch-export"), traced at batch
    ``batch`` (>= 2) with the batch axis dynamic; check it (see the module docstring), write the card
    ``path.json`` with ``card`` merged in, and return the report. ``exporter``: "auto", or for ONNX
    "torchscript" to use the TorchScript exporter whatever the torch version."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be {' or '.join(FORMATS)}, got {fmt!r}")
    if exporter not in ("auto", "torchscript"):
        raise ExportError(f"exporter must be auto or torchscript, got {exporter!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        raise ExportError(f"--batch must be at least 2, got {batch!r}: torch.export fixes an example batch "
                          "of 1 into the graph (it specialises sizes 0 and 1)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    label = f"{(card or {}).get('model') or type(module).__name__} ({what.replace('_', ' ')})"
    modes = [(m, m.training) for m in module.modules()]    # each as it was afterwards (train() would recurse)
    module.eval()
    try:
        x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        eager = _eager(module, x)
        if len(eager) != len(output_names):
            raise ExportError(f"{label} has {len(eager)} outputs but {len(output_names)} names were given")
        for stale in _written(path):
            stale.unlink()
        if fmt == "onnx":
            how = _write_onnx(module, x, path, list(output_names), label, exporter)
        else:
            torch.export.save(_program(module, x, label), str(path))
            how = "torch.export (strict)"
        try:
            err, batches, runtime = _check(module, path, fmt, img_size, batch)
        except ExportError as e:
            for p in _written(path):       # a file that does not compute the model must not be picked up
                p.unlink()
            if "TorchScript" in how:       # the usual cause on that route, said where it applies
                raise ExportError(f"{e} (the TorchScript exporter, used below torch 2.6, records sizes read as "
                                  "Python ints as constants; torch >= 2.6 exports through torch.export)") from None
            raise
    finally:
        for m, mode in modes:
            m.training = mode
    outputs = {n: ["batch", *t.shape[1:]] for n, t in zip(output_names, eager)}
    files = _written(path)
    report = ExportReport(path, fmt, what, outputs, err, batches, runtime, how, files, Path(f"{path}.json"))
    _write_card(report, img_size, batch, card or {})
    return report


def _write_card(report: ExportReport, img_size: int, batch: int, extra: dict) -> None:
    from keel.engine.checkpoint import write_json
    from keel.version import __version__

    card = {
        "format": report.format, "file": report.path.name, "files": [p.name for p in report.files],
        "what": report.what, **{k: v for k, v in extra.items() if k in ("model", "checkpoint")},
        "img_size": img_size,
        "input": {"name": INPUT, "shape": ["batch", 3, img_size, img_size], "dtype": "float32",
                  "preprocessing": "RGB scaled to [0, 1] (shorter side resized to img_size, centre crop), "
                                   "then (x - mean) / std per channel",
                  "mean": list(MEAN), "std": list(STD)},
        "outputs": report.outputs,
        **{k: v for k, v in extra.items() if k not in ("model", "checkpoint")},
        "check": {"runtime": report.runtime, "max_rel_error": report.max_rel_error, "tolerance": TOLERANCE,
                  "error": "max |exported - eager| / max |eager| per output, the worst output",
                  "batches": report.batches, "traced_batch": batch},
        "exporter": report.exporter,
        **({"opset": _opset(report.path)} if report.format == "onnx" else {}),
        "torch": str(torch.__version__), "keel_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(report.card, card)


# ---------------------------------------------------------------------------------- from a spec
def export(checkpoint: str, fmt: str = "onnx", out: str | Path | None = None, *, what: str = "auto",
           img_size: int | None = None, batch: int = 2, exporter: str = "auto") -> ExportReport:
    """Export what ``checkpoint`` (a pretraining or fine-tune run, a ``.safetensors`` file,
    ``timm:<model>:<file>`` or ``random:<model>``) holds. ``what``: "auto" (a fine-tune run's
    logits, else the embedding), "embedding", "feature_maps" or "logits" (fine-tune runs only).
    ``out`` defaults to ``<run>/export/<what>.onnx|.pt2`` (``./<model>-<what>...`` for
    ``random:``/``timm:``)."""
    from keel import hub
    from keel.deploy.predict import finetune_run, load_classifier_run

    if fmt not in FORMATS:
        raise ExportError(f"--format must be {' or '.join(FORMATS)}, got {fmt!r}")
    if what not in ("auto", *WHATS):
        raise ExportError(f"what must be auto, {', '.join(WHATS)}; got {what!r}")
    run = finetune_run(checkpoint)
    what = ("logits" if run else "embedding") if what == "auto" else what
    # the keel model name, for the card and messages (hub reads cards and configs, no weights)
    name, _ = hub.model_of(checkpoint, "--checkpoint")
    extra: dict = {"model": name, "checkpoint": str(checkpoint)}
    if what == "logits":
        if run is None:
            raise ExportError(f"'{checkpoint}' has no classifier head: logits come from a fine-tune run "
                              "(keel finetune); export its embedding or feature maps instead")
        module, info = load_classifier_run(checkpoint, img_size)
        size, names = info.img_size, ["logits"]
        extra.update(task=info.kind, classes=info.classes,
                     probabilities="softmax" if info.kind == "single" else "sigmoid")
        if info.kind == "multilabel":
            extra["threshold"] = info.threshold
    else:
        backbone, size = hub.resolve_backbone(checkpoint, img_size, arg="--checkpoint")
        backbone.requires_grad_(False)
        if what == "embedding":
            module, names = Embedding(backbone), ["embedding"]
        else:
            module = FeatureMaps(backbone)
            strides = [f["stride"] for f in getattr(backbone, "feature_info", [])]
            names = [f"features_stride{s}" for s in strides]
            if len(set(names)) != len(names) or not names:
                names = [f"features_{i}" for i in range(len(_eager(module.eval(), torch.zeros(2, 3, size, size))))]
    if out is None:
        local = Path(checkpoint).expanduser()
        if local.exists():
            out = (local if local.is_dir() else local.parent) / "export" / f"{what}{FORMATS[fmt]}"
        else:
            out = Path(f"{name}-{what}{FORMATS[fmt]}")
    return export_module(module, out, fmt, size, names, what=what, batch=batch, exporter=exporter, card=extra)
